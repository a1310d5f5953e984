"""One helper the families' modules share: another diffusers pipeline on a loaded pipeline's own models."""

from __future__ import annotations


def sharing(pipeline_class, pipe, **extra):
    """`pipeline_class` made of `pipe`'s components (and `extra` ones, such as a processor `pipe` lacks), its optional
    settings (Flux.2 [klein]'s is_distilled) from `pipe`'s config, its progress bars as `pipe`'s.

    This is what diffusers' `DiffusionPipeline.from_pipe` makes, less its last step, which casts every model to one
    dtype (float32 unless told): the models are shared, so that would change the loaded pipeline's too (a bf16
    transformer silently in fp32) and undo a VAE kept in another dtype."""
    expected, optional = pipeline_class._get_signature_keys(pipeline_class)
    parts = {name: extra[name] if name in extra else getattr(pipe, name) for name in expected}
    settings = {name: pipe.config[name] for name in optional if name in pipe.config and name not in extra}
    made = pipeline_class(**parts, **settings, **{k: v for k, v in extra.items() if k not in parts})
    made.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return made
