"""Qwen-Image-Edit: Qwen-Image's transformer trained to edit by instruction. The input image is read twice: by
Qwen2.5-VL beside the prompt (through its processor, as vision tokens) and by the VAE, whose latents join the noise's
in the transformer's sequence; the whole image is drawn anew from noise ("make the circle blue"), not noised
part-way as img2img does.

So in genkit an input image is an instruction edit ("instruct", the model's way: no strength, no mask), and without
one the model makes an image from text through QwenImagePipeline (its transformer is Qwen-Image's). The loaded
pipeline is therefore a QwenImagePipeline sharing the edit pipeline's components, the edit pipeline riding along.

diffusers' edit pipelines hand a batch's prompts to the processor with one copy of the image, where the processor
wants one per prompt (a batch of several prompts fails); genkit's subclasses encode each prompt alone, which also keeps
a prompt's embedding independent of its batch-mates. transformers builds Qwen2.5-VL's processor only with torchvision
(its video half needs it); without torchvision genkit builds the image half itself from the same files.
QwenImageEditPipeline takes one input image; QwenImageEditPlusPipeline (Qwen-Image-Edit-2509 and 2511) several
(families/qwen_image_edit_plus.py).
"""

import functools

import torch

from genkit.errors import GenkitError, term
from genkit.families.qwen_image import OneStep, QwenImage, fixed_length, pad_prompt
from genkit.families.shared import sharing


class QwenImageEdit(QwenImage):
    name = "qwen-image-edit"
    title = "Qwen-Image-Edit"
    pipeline_classes = ("QwenImageEditPipeline",)
    edit_tasks = ("instruct",)  # (Qwen-Image's img2img and inpainting are for its text-to-image model)
    references = 1  # input images one edit reads
    controlnet_classes = ()  # Qwen-Image's ControlNets were trained on its text-to-image model, not this one

    def load(self, source, *, dtype, use_safetensors, local):
        """Its text-to-image pipeline (QwenImagePipeline on the same components), the edit pipeline beside it."""
        from diffusers import DiffusionPipeline, QwenImagePipeline

        extra = {} if _has_torchvision() else {"processor": images_processor(source, local)}
        edit = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, use_safetensors=use_safetensors,
                                                 local_files_only=local, **extra)
        pipe = sharing(fixed_length(QwenImagePipeline), edit)
        pipe.instruct_pipeline = sharing(self.instruct_class(type(edit)), edit)
        return pipe

    def instruct_class(self, pipeline_class):
        """The class its instruction edits run on: diffusers' `pipeline_class` encoding each prompt alone."""
        return each_prompt(pipeline_class)

    def edit_pipe(self, pipe, task: str):
        if task == "instruct":
            # its progress bars as the loader set the pipeline's, after this family's load made both
            pipe.instruct_pipeline.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
            return pipe.instruct_pipeline
        return super().edit_pipe(pipe, task)

    def check_job(self, job) -> None:
        from genkit import edit

        super().check_job(job)
        count = len(edit.references(job.image)) if job.task == "instruct" else 1
        if count <= self.references:
            return
        if self.references == 1:
            raise GenkitError(f"{count} input images: {self.title} edits one (QwenImageEditPipeline); pass one "
                              f"{term('image')}, or use Qwen-Image-Edit-2509/2511 (qwen-image-edit-plus), which reads "
                              "several", param="image")
        raise GenkitError(f"{count} input images: {self.title} reads at most {self.references} (pass fewer "
                          f"{term('image')})", param="image")


class _EachPrompt(OneStep):
    """diffusers' edit pipeline with each prompt encoded alone (with the input images) and padded, masked, to the
    longest it may be: its images' tokens and 512 of the prompt's (as families/qwen_image.py pads text alone)."""

    def encode_prompt(self, prompt, **kwargs):
        if prompt is None or kwargs.get("prompt_embeds") is not None:
            return super().encode_prompt(prompt, **kwargs)
        limit, parts = kwargs.get("max_sequence_length", 512), []
        for text in [prompt] if isinstance(prompt, str) else prompt:
            hidden, mask = super().encode_prompt([text], **kwargs)
            own = len(self.tokenizer(text, add_special_tokens=False).input_ids)  # the rest: images and template
            parts.append(pad_prompt(hidden, mask, hidden.shape[1] - own + limit))
        longest = max(hidden.shape[1] for hidden, _ in parts)  # the same for every prompt but one past the limit
        parts = [pad_prompt(hidden, mask, longest) for hidden, mask in parts]
        return torch.cat([hidden for hidden, _ in parts]), torch.cat([mask for _, mask in parts])


@functools.lru_cache(maxsize=None)
def each_prompt(pipeline_class):
    """`pipeline_class` (QwenImageEditPipeline or QwenImageEditPlusPipeline) encoding each prompt alone."""
    return type(pipeline_class.__name__, (_EachPrompt, pipeline_class), {})


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def images_processor(source, local: bool):
    """Qwen2.5-VL's processor for images alone (its tokenizer and image processor, from the folder's processor/), for
    a transformers without torchvision, which refuses to build the whole processor (its video processor needs it)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor

    class ImagesOnly(Qwen2VLProcessor):  # its constructor checks every part's class, the missing video part's too
        def check_argument_for_proper_class(self, name, argument):
            return None if argument is None else super().check_argument_for_proper_class(name, argument)

    processor = ImagesOnly(
        image_processor=AutoImageProcessor.from_pretrained(source, subfolder="processor", local_files_only=local),
        tokenizer=AutoTokenizer.from_pretrained(source, subfolder="processor", local_files_only=local),
        video_processor=None)
    processor.__class__ = Qwen2VLProcessor  # what it is to diffusers' pipelines
    return processor


FAMILY = QwenImageEdit()
