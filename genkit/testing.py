"""Tiny random-weight pipelines of every model family genkit drives, built offline.

(Over 500 lines on purpose: every family, each a builder and a random-architecture sampler side by side, so a
family's tiny model and its property-test space are read and changed together.)

`build_tiny(family, folder)` makes a real diffusers pipeline (or a genkit-mini folder) out of
config classes, with tokenizers made in memory from the small vocabulary below, and saves it
with `save_pretrained(folder, safe_serialization=True)`: the folder loads back with
`diffusers.DiffusionPipeline.from_pretrained(folder)` (or `genkit.load`) like a user's model.
Nothing is downloaded. `random_arch(family, rng)` draws a random valid architecture (widths,
group counts, head sizes and counts, depths, VAE depth, cross-/joint-attention sizes) for
property tests; `build_tiny(..., arch=random_arch(...))` builds it.

The weights are random, so images are noise; the models exist to exercise code paths in seconds
on a CPU.

`FAMILIES[name]` is one `TinyModel` per family: its builder, default architecture, random-architecture
sampler, a small (height, width) every default and random architecture accepts, and the extra call
arguments a quick test should pass. A new family enters every contract test by one entry here.
`TINY_SIZE`, `CALL_ARGS` and `DEFAULT_ARCH` are views of it.
"""

from __future__ import annotations

__all__ = [
    "FAMILIES", "TinyModel", "TINY_SIZE", "CALL_ARGS", "WORDS", "DEFAULT_ARCH", "build_tiny", "random_arch",
    "build_tiny_sd", "build_tiny_mini", "clip_tokenizer", "t5_tokenizer", "gemma_tokenizer",
]

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

SIZE = (32, 32)  # (height, width) in pixels: every family's default and random architectures accept it

# Words of typical prompts: each becomes one token, so prompts tokenize to real, meaningful ids.
WORDS = """
a an the of on in at to with and or by from near under over above below behind next left right top bottom
center middle corner side front back is are two three one small large big tiny huge red green blue yellow purple
orange pink brown black white gray grey dark light bright circle square triangle star shape shapes object
photo picture painting drawing sketch render image portrait landscape cat dog bird horse car tree house sky sea
mountain flower city street man woman person face sun moon water forest sitting standing eating burger squirrel
detailed style high quality realistic beautiful blurry background foreground
""".split()
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"


# ---------------------------------------------------------------------------------------------
# Tokenizers, built in memory


def _apply_merges(symbols: list[str], ranks: dict) -> list[str]:
    """BPE on one word: merge the lowest-ranked adjacent pair until no pair has a merge."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _word_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """BPE merges that turn each word (a list of symbols) into a single token.

    A word's merges go after all earlier ones, joining what the earlier merges leave of it, so
    they never change how an earlier word splits."""
    merges, ranks = [], {}
    for symbols in words:
        pieces = _apply_merges(list(symbols), ranks)
        current = pieces[0]
        for piece in pieces[1:]:
            ranks[(current, piece)] = len(merges)
            merges.append((current, piece))
            current += piece
    return merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (bytes that print stay themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def clip_tokenizer(max_length: int = 77):
    """A CLIPTokenizer: the 256 byte symbols (alone and word-final), one token per word of WORDS."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    merges = _word_merges([list(w[:-1]) + [w[-1] + "</w>"] for w in WORDS])
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    """A T5Tokenizer (unigram): "▁word" for each word of WORDS, single characters for the rest."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in ALPHABET]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def gemma_tokenizer(max_length: int = 8192):
    """A GemmaTokenizer (BPE on "▁"-joined text): "▁word" for each word of WORDS, characters for the rest."""
    from transformers import GemmaTokenizer

    merges = _word_merges([["▁", *w] for w in WORDS] + [list(w) for w in WORDS])
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁", *ALPHABET, *("".join(m) for m in merges)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=max_length)


# ---------------------------------------------------------------------------------------------
# Text encoders and VAEs shared by several families


def _clip_encoder(tokenizer, hidden: int, layers: int, heads: int, projection_dim: int | None = None):
    """CLIPTextModel, or CLIPTextModelWithProjection when `projection_dim` is given."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def _t5_encoder(tokenizer, d_model: int, layers: int, heads: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=max(4, d_model // heads), d_ff=2 * d_model,
        num_layers=layers, num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _vae(arch: dict, latent_channels: int = 4, **extra):
    """AutoencoderKL with one down/up block per entry of arch["vae_block_out_channels"] (factor 2 ** (n - 1))."""
    from diffusers import AutoencoderKL

    channels = tuple(arch["vae_block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=channels,
        norm_num_groups=arch["vae_norm_num_groups"], layers_per_block=arch["vae_layers_per_block"],
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), sample_size=SIZE[0], **extra,
    )


def _vae_factor(arch: dict) -> int:
    return 2 ** (len(arch["vae_block_out_channels"]) - 1)


def _unet(arch: dict, **extra):
    """UNet2DConditionModel; arch["cross_attention"] says which levels (finest first) have cross-attention."""
    from diffusers import UNet2DConditionModel

    cross = arch["cross_attention"]
    return UNet2DConditionModel(
        sample_size=arch["sample_size"], in_channels=4, out_channels=4,
        block_out_channels=tuple(arch["block_out_channels"]), layers_per_block=arch["layers_per_block"],
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)),
        attention_head_dim=arch["attention_head_dim"],  # diffusers' name for the number of heads
        norm_num_groups=arch["norm_num_groups"], use_linear_projection=arch["use_linear_projection"], **extra,
    )


# ---------------------------------------------------------------------------------------------
# Random-architecture pieces shared by several families (every choice valid at SIZE, 32x32 pixels)

WIDTHS = (4, 8, 12, 16, 24, 32)  # multiples of every group count and head count drawn below


def _pick(rng: random.Random, choices, n: int) -> tuple:
    return tuple(rng.choice(choices) for _ in range(n))


def _random_vae(rng: random.Random, max_blocks: int = 4) -> dict:
    """AutoencoderKL: 1..max_blocks levels (factor 1..2 ** (max_blocks - 1))."""
    return dict(vae_block_out_channels=_pick(rng, (4, 8, 16), rng.randint(1, max_blocks)),
                vae_norm_num_groups=rng.choice((1, 2, 4)), vae_layers_per_block=rng.randint(1, 2))


def _random_unet(rng: random.Random) -> dict:
    levels = rng.randint(1, 3)
    arch = dict(
        block_out_channels=_pick(rng, WIDTHS, levels), layers_per_block=rng.randint(1, 2),
        cross_attention=tuple(rng.random() < 0.6 for _ in range(levels)),
        attention_head_dim=_pick(rng, (1, 2, 4), levels), norm_num_groups=rng.choice((1, 2, 4)),
        use_linear_projection=rng.random() < 0.5, text_layers=rng.randint(1, 2), text_heads=rng.choice((1, 2, 4)),
        **_random_vae(rng),
    )
    arch["sample_size"] = SIZE[0] // _vae_factor(arch)
    return arch


def _random_t5(rng: random.Random) -> dict:
    return dict(t5_d_model=rng.choice((16, 32, 48)), t5_layers=rng.randint(1, 2), t5_heads=rng.choice((1, 2, 4)))


# ---------------------------------------------------------------------------------------------
# One description per family

@dataclass(frozen=True)
class TinyModel:
    """Everything the tests need of one family's tiny model."""

    make: Callable[[dict, Path], Path]  # (architecture, folder) -> the folder, saved as a user's model
    default_arch: dict  # the architecture build_tiny uses unless told otherwise
    random_arch: Callable[[random.Random], dict]  # a random valid architecture (keys of default_arch)
    size: tuple[int, int] = SIZE  # (height, width) valid for the default and every random architecture
    call_args: dict = field(default_factory=dict)  # extra pipeline call arguments for a quick test


def _saved(builder):
    """A diffusers builder as a `TinyModel.make`: build, then save_pretrained like a user's folder."""

    def make(arch: dict, folder: Path) -> Path:
        builder(arch).save_pretrained(folder, safe_serialization=True)
        return folder

    return make


FAMILIES: dict[str, TinyModel] = {}  # filled below, one entry per family section


# ---------------------------------------------------------------------------------------------
# The families, one section each: a default architecture, a builder, a random architecture (valid at SIZE)

# -- sd

_ARCH_SD = dict(  # the tiny SD 1.x the tests have always used
    sample_size=8, block_out_channels=(8, 16), layers_per_block=1, cross_attention=(True, False),
    attention_head_dim=2, norm_num_groups=4, use_linear_projection=False, cross_attention_dim=32,
    text_layers=2, text_heads=4, vae_block_out_channels=(8, 8, 16, 16), vae_norm_num_groups=4,
    vae_layers_per_block=1,
)


def _build_sd(arch: dict):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    tokenizer = clip_tokenizer()
    text_encoder = _clip_encoder(tokenizer, arch["cross_attention_dim"], arch["text_layers"], arch["text_heads"])
    unet = _unet(arch, cross_attention_dim=arch["cross_attention_dim"])
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    return StableDiffusionPipeline(vae=_vae(arch), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _random_sd(rng: random.Random) -> dict:
    return dict(_random_unet(rng), cross_attention_dim=rng.choice((8, 16, 24, 32)))


FAMILIES["sd"] = TinyModel(_saved(_build_sd), _ARCH_SD, _random_sd)


# -- sdxl

_ARCH_SDXL = dict(
    sample_size=8, block_out_channels=(8, 16), layers_per_block=1, cross_attention=(False, True),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=4,
    use_linear_projection=True, addition_time_embed_dim=8, text_hidden=(16, 16), text_layers=2, text_heads=2,
    projection_dim=16, vae_block_out_channels=(8, 8, 16, 16), vae_norm_num_groups=4, vae_layers_per_block=1,
)


def _build_sdxl(arch: dict):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    hidden, hidden_2 = arch["text_hidden"]
    text_encoder = _clip_encoder(tokenizer, hidden, arch["text_layers"], arch["text_heads"])
    text_encoder_2 = _clip_encoder(tokenizer_2, hidden_2, arch["text_layers"], arch["text_heads"],
                                   projection_dim=arch["projection_dim"])
    unet = _unet(
        arch, cross_attention_dim=hidden + hidden_2,  # the pipeline concatenates both encoders' hidden states
        transformer_layers_per_block=tuple(arch["transformer_layers_per_block"]), addition_embed_type="text_time",
        addition_time_embed_dim=arch["addition_time_embed_dim"],
        # six size/crop numbers, each embedded, plus the second encoder's pooled projection
        projection_class_embeddings_input_dim=6 * arch["addition_time_embed_dim"] + arch["projection_dim"],
    )
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=_vae(arch), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def _random_sdxl(rng: random.Random) -> dict:
    arch = _random_unet(rng)
    levels = len(arch["block_out_channels"])
    return dict(arch, transformer_layers_per_block=_pick(rng, (1, 2), levels),
                text_hidden=_pick(rng, (8, 16, 24, 32), 2), projection_dim=rng.choice((8, 16, 32)),
                addition_time_embed_dim=rng.choice((4, 8, 16)))


FAMILIES["sdxl"] = TinyModel(_saved(_build_sdxl), _ARCH_SDXL, _random_sdxl)


# -- sd3

_ARCH_SD3 = dict(
    patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=8, dual_attention_layers=(),
    qk_norm=None, clip_hidden=(16, 16), projection_dim=(16, 16), text_layers=1, text_heads=2, t5_d_model=32,
    t5_layers=1, t5_heads=2, latent_channels=16,  # as SD3 (its inpainting pipeline requires 16)
    vae_block_out_channels=(8, 8), vae_norm_num_groups=4,
    vae_layers_per_block=1,
)


def _build_sd3(arch: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    encoders = [
        _clip_encoder(tok, hidden, arch["text_layers"], arch["text_heads"], projection)
        for tok, hidden, projection in zip((tokenizer, tokenizer_2), arch["clip_hidden"], arch["projection_dim"])
    ]
    text_encoder_3 = _t5_encoder(tokenizer_3, arch["t5_d_model"], arch["t5_layers"], arch["t5_heads"])
    inner = arch["num_attention_heads"] * arch["attention_head_dim"]
    factor = _vae_factor(arch)
    transformer = SD3Transformer2DModel(
        sample_size=SIZE[0] // factor, patch_size=arch["patch_size"],
        in_channels=arch["latent_channels"], out_channels=arch["latent_channels"], num_layers=arch["num_layers"],
        attention_head_dim=arch["attention_head_dim"], num_attention_heads=arch["num_attention_heads"],
        caption_projection_dim=inner,  # the text stream runs at the image stream's width
        # the CLIP hidden states are padded (or cut) to the T5 width and joined with T5's along the sequence
        joint_attention_dim=arch["t5_d_model"], pooled_projection_dim=sum(arch["projection_dim"]),
        pos_embed_max_size=64, dual_attention_layers=tuple(arch["dual_attention_layers"]), qk_norm=arch["qk_norm"],
    )
    vae = _vae(arch, arch["latent_channels"], use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
               scaling_factor=1.5305)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def _random_sd3(rng: random.Random) -> dict:
    layers = rng.randint(1, 2)
    return dict(
        patch_size=rng.choice((1, 2)), num_layers=layers, num_attention_heads=rng.choice((1, 2, 4)),
        attention_head_dim=rng.choice((4, 8, 16)), qk_norm=rng.choice((None, "rms_norm")),
        dual_attention_layers=tuple(range(rng.randint(0, layers))),  # SD3.5's extra self-attention
        clip_hidden=_pick(rng, (8, 16, 24, 32), 2), projection_dim=_pick(rng, (8, 16, 32), 2),
        text_layers=rng.randint(1, 2), text_heads=rng.choice((1, 2, 4)), latent_channels=rng.choice((4, 8, 16)),
        **_random_t5(rng), **_random_vae(rng),
    )


FAMILIES["sd3"] = TinyModel(_saved(_build_sd3), _ARCH_SD3, _random_sd3)


# -- flux

_ARCH_FLUX = dict(
    num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 4, 8),
    guidance_embeds=True, clip_hidden=16, text_layers=1, text_heads=2, t5_d_model=32, t5_layers=1, t5_heads=2,
    latent_channels=4, vae_block_out_channels=(8, 8), vae_norm_num_groups=4, vae_layers_per_block=1,
)


def _build_flux(arch: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = _clip_encoder(tokenizer, arch["clip_hidden"], arch["text_layers"], arch["text_heads"])
    text_encoder_2 = _t5_encoder(tokenizer_2, arch["t5_d_model"], arch["t5_layers"], arch["t5_heads"])
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * arch["latent_channels"],  # latents are packed in 2x2 patches
        num_layers=arch["num_layers"], num_single_layers=arch["num_single_layers"],
        attention_head_dim=arch["attention_head_dim"], num_attention_heads=arch["num_attention_heads"],
        joint_attention_dim=arch["t5_d_model"], pooled_projection_dim=arch["clip_hidden"],
        guidance_embeds=arch["guidance_embeds"], axes_dims_rope=tuple(arch["axes_dims_rope"]),
    )
    vae = _vae(arch, arch["latent_channels"], use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
               scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def _random_flux(rng: random.Random) -> dict:
    head_dim = rng.choice((8, 12, 16, 24))
    first = 2 * rng.randint(1, head_dim // 2 - 2)  # rotary dims per axis (index, row, column): even, sum head_dim
    second = 2 * rng.randint(1, (head_dim - first) // 2 - 1)
    return dict(
        num_layers=rng.randint(1, 2), num_single_layers=rng.randint(0, 2), num_attention_heads=rng.choice((1, 2, 4)),
        attention_head_dim=head_dim, axes_dims_rope=(first, second, head_dim - first - second),
        guidance_embeds=rng.random() < 0.5, clip_hidden=rng.choice((8, 16, 32)), text_layers=rng.randint(1, 2),
        text_heads=rng.choice((1, 2, 4)), latent_channels=rng.choice((1, 4, 8, 16)), **_random_t5(rng),
        **_random_vae(rng, max_blocks=3),
    )


FAMILIES["flux"] = TinyModel(_saved(_build_flux), _ARCH_FLUX, _random_flux)


# -- chroma

_ARCH_CHROMA = dict(
    num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 4, 8),
    approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1, t5_d_model=32, t5_layers=1,
    t5_heads=2, latent_channels=4, vae_block_out_channels=(8, 8), vae_norm_num_groups=4, vae_layers_per_block=1,
)


def _build_chroma(arch: dict):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer = t5_tokenizer()
    text_encoder = _t5_encoder(tokenizer, arch["t5_d_model"], arch["t5_layers"], arch["t5_heads"])
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4 * arch["latent_channels"],  # latents are packed in 2x2 patches, as Flux's
        num_layers=arch["num_layers"], num_single_layers=arch["num_single_layers"],
        attention_head_dim=arch["attention_head_dim"], num_attention_heads=arch["num_attention_heads"],
        joint_attention_dim=arch["t5_d_model"], axes_dims_rope=tuple(arch["axes_dims_rope"]),
        approximator_num_channels=arch["approximator_num_channels"],
        approximator_hidden_dim=arch["approximator_hidden_dim"], approximator_layers=arch["approximator_layers"],
    )
    vae = _vae(arch, arch["latent_channels"], use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
               scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                          transformer=transformer)


def _random_chroma(rng: random.Random) -> dict:
    flux = _random_flux(rng)
    keep = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "axes_dims_rope",
            "latent_channels", "t5_d_model", "t5_layers", "t5_heads", "vae_block_out_channels", "vae_norm_num_groups",
            "vae_layers_per_block")
    return dict({k: flux[k] for k in keep}, approximator_num_channels=rng.choice((8, 16, 32)),
                approximator_hidden_dim=rng.choice((16, 32)), approximator_layers=rng.randint(1, 2))


FAMILIES["chroma"] = TinyModel(_saved(_build_chroma), _ARCH_CHROMA, _random_chroma)


# -- z-image

__all__ += ["qwen_tokenizer"]

QWEN_CHAT_TEMPLATE = (  # Qwen3's for plain messages; ZImagePipeline applies it with enable_thinking=True
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer(max_length: int = 131072):
    """A Qwen2Tokenizer (byte-level BPE, as Qwen3's): "Ġword" and "word" for each word of WORDS, bytes for the rest,
    Qwen's chat markers and chat template."""
    from transformers import Qwen2Tokenizer

    symbols = list(_bytes_to_unicode().values())
    space = _bytes_to_unicode()[ord(" ")]
    merges = _word_merges([[space, *w] for w in WORDS] + [list(w) for w in WORDS])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(symbols + ["".join(m) for m in merges]))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


_ARCH_Z_IMAGE = dict(
    dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, qk_norm=True, axes_dims=(8, 4, 4), qwen_hidden=16,
    qwen_layers=2, qwen_heads=2, qwen_kv_heads=1, qwen_head_dim=8, latent_channels=16,  # as Z-Image (Flux's VAE)
    vae_block_out_channels=(8, 8), vae_norm_num_groups=4, vae_layers_per_block=1,
)


def _build_z_image(arch: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=arch["qwen_hidden"], intermediate_size=2 * arch["qwen_hidden"],
        num_hidden_layers=arch["qwen_layers"], num_attention_heads=arch["qwen_heads"],
        num_key_value_heads=arch["qwen_kv_heads"], head_dim=arch["qwen_head_dim"], max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    transformer = ZImageTransformer2DModel(  # head size = sum(axes_dims), rotary dims per axis (caption, row, column)
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=arch["latent_channels"], dim=arch["dim"],
        n_layers=arch["n_layers"], n_refiner_layers=arch["n_refiner_layers"], n_heads=arch["n_heads"],
        n_kv_heads=arch["n_heads"], qk_norm=arch["qk_norm"], cap_feat_dim=arch["qwen_hidden"],
        axes_dims=list(arch["axes_dims"]), axes_lens=[1024, 512, 512],
    )
    with torch.no_grad():  # its pad tokens are made with torch.empty: random like every other weight
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = _vae(arch, arch["latent_channels"], use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
               scaling_factor=0.3611)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)


def _random_z_image(rng: random.Random) -> dict:
    head_dim = rng.choice((8, 12, 16))
    first = 2 * rng.randint(1, head_dim // 2 - 2)  # rotary dims per axis: even, sum head_dim (as Flux's)
    second = 2 * rng.randint(1, (head_dim - first) // 2 - 1)
    heads = rng.choice((1, 2, 4))
    qwen_heads = rng.choice((1, 2, 4))
    return dict(
        dim=heads * head_dim, n_layers=rng.randint(1, 2), n_refiner_layers=rng.randint(1, 2), n_heads=heads,
        qk_norm=rng.random() < 0.5, axes_dims=(first, second, head_dim - first - second),
        qwen_hidden=rng.choice((8, 16, 32)), qwen_layers=rng.randint(1, 3), qwen_heads=qwen_heads,
        qwen_kv_heads=rng.choice([k for k in (1, 2, 4) if qwen_heads % k == 0]), qwen_head_dim=rng.choice((4, 8, 16)),
        latent_channels=rng.choice((4, 8, 16)), **_random_vae(rng),
    )


FAMILIES["z-image"] = TinyModel(_saved(_build_z_image), _ARCH_Z_IMAGE, _random_z_image)


# -- qwen-image (and its editing models, qwen-image-edit and qwen-image-edit-plus: the same components and a processor)

__all__ += ["qwen_vl_tokenizer"]

QWEN_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")  # Qwen2.5-VL's image markers


def qwen_vl_tokenizer():
    """qwen_tokenizer with Qwen2.5-VL's image markers, as Qwen-Image's text encoder reads them."""
    tokenizer = qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *QWEN_VL_TOKENS]})
    return tokenizer


_ARCH_QWEN_IMAGE = dict(
    num_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(8, 4, 4),  # rotary: frame, row, column
    qwen_hidden=16, qwen_layers=2, qwen_heads=2, qwen_kv_heads=1, vision_hidden=16, vision_heads=2,
    z_dim=4, vae_base_dim=4, vae_dim_mult=(1, 2, 4), vae_temporal_downsample=(False, True),  # factor 4: multiple 8
)


def _qwen_vl_encoder(arch: dict, tokenizer):
    """A Qwen2.5-VL (text and vision towers), as Qwen-Image reads prompts (and its editing models, images too)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    half = arch["qwen_hidden"] // arch["qwen_heads"] // 2  # multimodal rotary sections (time, height, width)
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in zip(
        ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), QWEN_VL_TOKENS)}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=arch["qwen_hidden"], intermediate_size=2 * arch["qwen_hidden"],
            num_hidden_layers=arch["qwen_layers"], num_attention_heads=arch["qwen_heads"],
            num_key_value_heads=arch["qwen_kv_heads"], max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                             "mrope_section": [half // 4, half // 4, half - 2 * (half // 4)]},
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, hidden_size=arch["vision_hidden"], intermediate_size=2 * arch["vision_hidden"],
                           num_heads=arch["vision_heads"], out_hidden_size=arch["qwen_hidden"],
                           fullatt_block_indexes=[0]),
        **ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen_image_components(arch: dict) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer = qwen_vl_tokenizer()
    z = arch["z_dim"]
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z, out_channels=z,  # latents are packed in 2x2 patches
        num_layers=arch["num_layers"], attention_head_dim=arch["attention_head_dim"],
        num_attention_heads=arch["num_attention_heads"], joint_attention_dim=arch["qwen_hidden"],
        guidance_embeds=False, axes_dims_rope=tuple(arch["axes_dims_rope"]),
    )
    vae = AutoencoderKLQwenImage(  # Wan's causal 3D VAE on one frame; factor 2 ** len(temperal_downsample)
        base_dim=arch["vae_base_dim"], z_dim=z, dim_mult=list(arch["vae_dim_mult"]), num_res_blocks=1,
        temperal_downsample=list(arch["vae_temporal_downsample"]), latents_mean=[0.0] * z, latents_std=[1.0] * z,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image's scheduler_config.json
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    return dict(scheduler=scheduler, vae=vae, text_encoder=_qwen_vl_encoder(arch, tokenizer), tokenizer=tokenizer,
                transformer=transformer)


def _build_qwen_image(arch: dict):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**_qwen_image_components(arch))


def _qwen_image_edit(pipeline_class: str):
    """A `TinyModel.make` of Qwen-Image's editing pipeline `pipeline_class`: Qwen-Image's components and Qwen2.5-VL's
    processor (its tokenizer, and an image processor that reads at most 56x56 pixels: 4 vision tokens an image).
    transformers cannot build that processor without torchvision (its video half needs it), so its files are written
    beside the pipeline's as a Qwen-Image-Edit folder holds them, and model_index.json names it."""

    def make(arch: dict, folder: Path) -> Path:
        import json

        import diffusers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from genkit.outputs import save_text

        components = _qwen_image_components(arch)
        pipe = getattr(diffusers, pipeline_class)(**components, processor=None)
        pipe.save_pretrained(folder, safe_serialization=True)
        components["tokenizer"].save_pretrained(folder / "processor")
        Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(folder / "processor")
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        save_text(folder / "model_index.json", json.dumps(index, indent=2) + "\n")
        return folder

    return make


def _random_qwen_image(rng: random.Random) -> dict:
    head_dim = rng.choice((8, 12, 16))
    first = 2 * rng.randint(1, head_dim // 2 - 2)  # rotary dims per axis: even, sum head_dim (as Flux's)
    second = 2 * rng.randint(1, (head_dim - first) // 2 - 1)
    qwen_heads = rng.choice((1, 2))
    levels = rng.randint(2, 4)  # VAE factor 2 to 8
    return dict(
        num_layers=rng.randint(1, 2), num_attention_heads=rng.choice((1, 2, 4)), attention_head_dim=head_dim,
        axes_dims_rope=(first, second, head_dim - first - second), qwen_hidden=qwen_heads * rng.choice((8, 16)),
        qwen_layers=rng.randint(1, 2), qwen_heads=qwen_heads, qwen_kv_heads=1, vision_hidden=rng.choice((8, 16)),
        vision_heads=rng.choice((1, 2)), z_dim=rng.choice((4, 8, 16)), vae_base_dim=rng.choice((4, 8)),
        vae_dim_mult=(1,) + _pick(rng, (1, 2), levels - 1),
        vae_temporal_downsample=(False,) + tuple(rng.random() < 0.5 for _ in range(levels - 2)),
    )


# the editing models read each input image at about a megapixel whatever the output's size: a VAE of factor 16 keeps
# the tiny one's mid-block attention at 64x64 latents (at factor 8, 128x128 took 1.7 s an image on a 2-core CPU; at
# Qwen-Image's factor 4, 256x256); its size multiple, 32, leaves it out of the outpainting tests (instruction edits only)
_ARCH_QWEN_IMAGE_EDIT = dict(_ARCH_QWEN_IMAGE, vae_base_dim=2, vae_dim_mult=(1, 2, 4, 4, 4),
                             vae_temporal_downsample=(False, True, True, True))

__all__ += ["plain_pipeline"]

# editing pipelines that need an input image: plain diffusers' text-to-image twin on their components
_TEXT_TO_IMAGE = {"QwenImageEditPipeline": "QwenImagePipeline", "QwenImageEditPlusPipeline": "QwenImagePipeline"}


def plain_pipeline(folder: str | Path):
    """`folder`'s model as plain diffusers loads it (`DiffusionPipeline.from_pretrained`), to make an image from text
    as genkit's family does: an editing model's pipeline (Qwen-Image-Edit's needs an input image, and its processor
    torchvision) becomes its text-to-image pipeline on the same components, the processor left out."""
    import json

    import diffusers

    index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    twin = _TEXT_TO_IMAGE.get(index["_class_name"])
    if twin is None:
        return diffusers.DiffusionPipeline.from_pretrained(folder)
    edit = diffusers.DiffusionPipeline.from_pretrained(folder, processor=None)
    cls = getattr(diffusers, twin)
    expected, _ = cls._get_signature_keys(cls)
    return cls(**{name: getattr(edit, name) for name in expected})


FAMILIES["qwen-image"] = TinyModel(_saved(_build_qwen_image), _ARCH_QWEN_IMAGE, _random_qwen_image)
FAMILIES["qwen-image-edit"] = TinyModel(_qwen_image_edit("QwenImageEditPipeline"), _ARCH_QWEN_IMAGE_EDIT,
                                         _random_qwen_image)
FAMILIES["qwen-image-edit-plus"] = TinyModel(_qwen_image_edit("QwenImageEditPlusPipeline"), _ARCH_QWEN_IMAGE_EDIT,
                                              _random_qwen_image)


# -- flux2-klein

_ARCH_FLUX2_KLEIN = dict(
    num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 4, 4, 4),
    qwen_hidden=16, qwen_layers=27,  # the pipeline reads hidden states 9, 18 and 27 (text_encoder_out_layers)
    qwen_heads=2, qwen_kv_heads=1, qwen_head_dim=8, is_distilled=False, latent_channels=4,
    vae_block_out_channels=(8, 8), vae_norm_num_groups=4, vae_layers_per_block=1,
)


def _build_flux2_klein(arch: dict):
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=arch["qwen_hidden"], intermediate_size=2 * arch["qwen_hidden"],
        num_hidden_layers=arch["qwen_layers"], num_attention_heads=arch["qwen_heads"],
        num_key_value_heads=arch["qwen_kv_heads"], head_dim=arch["qwen_head_dim"], max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * arch["latent_channels"],  # latents are patchified 2x2 into channels
        num_layers=arch["num_layers"], num_single_layers=arch["num_single_layers"],
        attention_head_dim=arch["attention_head_dim"], num_attention_heads=arch["num_attention_heads"],
        joint_attention_dim=3 * arch["qwen_hidden"],  # three of Qwen3's hidden states side by side
        axes_dims_rope=tuple(arch["axes_dims_rope"]), guidance_embeds=False,
    )
    channels = tuple(arch["vae_block_out_channels"])
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
        layers_per_block=arch["vae_layers_per_block"], latent_channels=arch["latent_channels"],
        norm_num_groups=arch["vae_norm_num_groups"], sample_size=SIZE[0], use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():  # its latents' batch-norm statistics, as a trained VAE has them (not 0 and 1)
        vae.bn.running_mean.normal_(0.0, 0.1)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(  # black-forest-labs' Flux.2 scheduler_config.json
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
        time_shift_type="exponential", use_dynamic_shifting=True)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=arch["is_distilled"])


def _random_flux2_klein(rng: random.Random) -> dict:
    head_dim = rng.choice((8, 16, 24))
    axes = [2 * rng.randint(1, head_dim // 8) for _ in range(3)]  # rotary dims per axis (time, row, column, index)
    qwen_heads = rng.choice((1, 2, 4))
    return dict(
        num_layers=rng.randint(1, 2), num_single_layers=rng.randint(0, 2), num_attention_heads=rng.choice((1, 2, 4)),
        attention_head_dim=head_dim, axes_dims_rope=(*axes, head_dim - sum(axes)), qwen_hidden=rng.choice((8, 16, 32)),
        qwen_heads=qwen_heads, qwen_kv_heads=rng.choice([k for k in (1, 2, 4) if qwen_heads % k == 0]),
        qwen_head_dim=rng.choice((4, 8)), is_distilled=rng.random() < 0.5, latent_channels=rng.choice((1, 4, 8)),
        **_random_vae(rng, max_blocks=3),
    )


FAMILIES["flux2-klein"] = TinyModel(_saved(_build_flux2_klein), _ARCH_FLUX2_KLEIN, _random_flux2_klein)


# -- pixart-sigma

_ARCH_PIXART_SIGMA = dict(
    sample_size=32, patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=8, learned_sigma=True,
    t5_d_model=32, t5_layers=1, t5_heads=2, latent_channels=4, vae_block_out_channels=(8, 8, 16, 16),
    vae_norm_num_groups=4, vae_layers_per_block=1,
)


def _build_pixart_sigma(arch: dict):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = t5_tokenizer(max_length=300)
    text_encoder = _t5_encoder(tokenizer, arch["t5_d_model"], arch["t5_layers"], arch["t5_heads"])
    latent = arch["latent_channels"]
    transformer = PixArtTransformer2DModel(
        sample_size=arch["sample_size"], patch_size=arch["patch_size"], num_layers=arch["num_layers"],
        num_attention_heads=arch["num_attention_heads"], attention_head_dim=arch["attention_head_dim"],
        cross_attention_dim=arch["num_attention_heads"] * arch["attention_head_dim"],
        caption_channels=arch["t5_d_model"],
        in_channels=latent, out_channels=2 * latent if arch["learned_sigma"] else latent, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
        activation_fn="gelu-approximate",
    )
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae(arch, latent),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def _random_pixart_sigma(rng: random.Random) -> dict:
    return dict(
        sample_size=rng.choice((32, 64)), patch_size=rng.choice((1, 2)), num_layers=rng.randint(1, 2),
        num_attention_heads=rng.choice((1, 2, 4)), attention_head_dim=rng.choice((4, 8, 16)),
        learned_sigma=rng.random() < 0.5, latent_channels=rng.choice((4, 8)), **_random_t5(rng), **_random_vae(rng),
    )


FAMILIES["pixart-sigma"] = TinyModel(_saved(_build_pixart_sigma), _ARCH_PIXART_SIGMA, _random_pixart_sigma,
                                      # its resolution binning would generate at >= 256 pixels
                                      call_args={"use_resolution_binning": False, "clean_caption": False})


# -- sana

_ARCH_SANA = dict(
    sample_size=16, patch_size=1, num_layers=1, num_attention_heads=2, attention_head_dim=8,
    num_cross_attention_heads=2, cross_attention_head_dim=8, mlp_ratio=2.5, gemma_hidden=16, gemma_layers=1,
    gemma_heads=2, gemma_kv_heads=1, gemma_head_dim=8, latent_channels=4, vae_block_out_channels=(8, 8, 16),
    vae_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), vae_attention_head_dim=4,
)


def _build_sana(arch: dict):
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_tokenizer()
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=arch["gemma_hidden"], intermediate_size=2 * arch["gemma_hidden"],
        num_hidden_layers=arch["gemma_layers"], num_attention_heads=arch["gemma_heads"],
        num_key_value_heads=arch["gemma_kv_heads"], head_dim=arch["gemma_head_dim"], max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    inner = arch["num_attention_heads"] * arch["attention_head_dim"]
    latent = arch["latent_channels"]
    transformer = SanaTransformer2DModel(
        sample_size=arch["sample_size"], patch_size=arch["patch_size"], in_channels=latent, out_channels=latent,
        num_layers=arch["num_layers"], num_attention_heads=arch["num_attention_heads"],
        attention_head_dim=arch["attention_head_dim"], num_cross_attention_heads=arch["num_cross_attention_heads"],
        cross_attention_head_dim=arch["cross_attention_head_dim"], cross_attention_dim=inner,
        caption_channels=arch["gemma_hidden"], mlp_ratio=arch["mlp_ratio"],
    )
    channels, types = tuple(arch["vae_block_out_channels"]), tuple(arch["vae_block_types"])
    multiscales = tuple((5,) if t == "EfficientViTBlock" else () for t in types)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=latent, attention_head_dim=arch["vae_attention_head_dim"],
        encoder_block_types=types, decoder_block_types=types, encoder_block_out_channels=channels,
        decoder_block_out_channels=channels, encoder_layers_per_block=(1,) * len(types),
        decoder_layers_per_block=(1,) * len(types), encoder_qkv_multiscales=multiscales,
        decoder_qkv_multiscales=multiscales, downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)


def _random_sana(rng: random.Random) -> dict:
    channels = [rng.choice((4, 8))]
    for _ in range(rng.randint(0, 3)):  # the DC-AE's shortcuts need each level 1x or 2x the one before
        channels.append(min(32, channels[-1] * rng.choice((1, 2))))
    heads = rng.choice((1, 2, 4))
    return dict(
        sample_size=16, patch_size=rng.choice((1, 2)), num_layers=rng.randint(1, 2), num_attention_heads=heads,
        attention_head_dim=rng.choice((4, 8, 16)), num_cross_attention_heads=rng.choice((1, 2, 4)),
        cross_attention_head_dim=rng.choice((4, 8)), mlp_ratio=rng.choice((1.0, 2.5)),
        gemma_hidden=rng.choice((8, 16, 32)), gemma_layers=rng.randint(1, 2), gemma_heads=heads,
        gemma_kv_heads=rng.choice([k for k in (1, 2, 4) if heads % k == 0]), gemma_head_dim=rng.choice((4, 8, 16)),
        latent_channels=rng.choice([c for c in (2, 4, 8) if channels[-1] % c == 0]),
        vae_block_out_channels=tuple(channels),
        vae_block_types=("ResBlock",) + _pick(rng, ("ResBlock", "EfficientViTBlock"), len(channels) - 1),
        vae_attention_head_dim=rng.choice((2, 4)),
    )


FAMILIES["sana"] = TinyModel(_saved(_build_sana), _ARCH_SANA, _random_sana, call_args={"use_resolution_binning": False})


# -- genkit-mini

_ARCH_GENKIT_MINI = dict(sample_size=16, channels=(8, 16), cross_attention_levels=1, head_dim=8)


def _random_genkit_mini(rng: random.Random) -> dict:
    levels = rng.randint(1, 3)
    return dict(sample_size=SIZE[0], channels=_pick(rng, (8, 16, 24, 32), levels),
                cross_attention_levels=rng.randint(1, levels), head_dim=rng.choice((4, 8)))


def _genkit_mini(arch: dict, folder: Path) -> Path:
    from genkit.train.base import ModelConfig, build_unet, export

    return export(build_unet(ModelConfig(**arch)), folder)


FAMILIES["genkit-mini"] = TinyModel(_genkit_mini, _ARCH_GENKIT_MINI, _random_genkit_mini)


TINY_SIZE = {name: model.size for name, model in FAMILIES.items()}
CALL_ARGS = {name: model.call_args for name, model in FAMILIES.items() if model.call_args}
DEFAULT_ARCH = {name: model.default_arch for name, model in FAMILIES.items()}


def _tiny(family: str) -> TinyModel:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def build_tiny(family: str, folder: str | Path, *, seed: int = 0, arch: dict | None = None) -> Path:
    """Build `family`'s tiny pipeline with random weights from `seed` and save it in `folder`; returns the folder.

    `arch` overrides keys of DEFAULT_ARCH[family] (see random_arch); None keeps the default."""
    model = _tiny(family)
    unknown = set(arch or ()) - set(model.default_arch)
    if unknown:
        raise ValueError(f"{family} has no architecture keys {sorted(unknown)}; known: {sorted(model.default_arch)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model.make({**model.default_arch, **(arch or {})}, Path(folder))


def random_arch(family: str, rng: random.Random) -> dict:
    """A random valid architecture for `family` (a full dict of DEFAULT_ARCH[family]'s keys), drawn from `rng`."""
    model = _tiny(family)
    return {**model.default_arch, **model.random_arch(rng)}


def build_tiny_sd(folder: str | Path) -> Path:
    """The default tiny Stable Diffusion 1.x pipeline (UNet, VAE with factor 8, CLIP text encoder) in `folder`."""
    return build_tiny("sd", folder)


def build_tiny_mini(folder: str | Path) -> Path:
    """The default tiny genkit-mini folder (the real MiniLM encoder from its package, a tiny random UNet)."""
    return build_tiny("genkit-mini", folder)


# ---------------------------------------------------------------------------------------------
# Config-only folders of real architectures (no weights), for genkit.memory's plans and their tests

_CLIP_L = dict(  # openai/clip-vit-large-patch14's text tower (SD 1.5, SDXL's first encoder, Flux's CLIP)
    architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=49408, hidden_size=768,
    intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
)
_CLIP_G = dict(  # LAION's OpenCLIP ViT-bigG/14 text tower with its projection, as SDXL and SD3 ship it
    _CLIP_L, architectures=["CLIPTextModelWithProjection"], hidden_size=1280, intermediate_size=5120,
    num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
)
_T5_XXL = dict(  # google/t5-v1_1-xxl's encoder (SD3's and Flux's)
    architectures=["T5EncoderModel"], model_type="t5", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
    num_layers=24, num_decoder_layers=24, num_heads=64, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0,
    feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False,
    is_encoder_decoder=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
_VAE_4 = dict(  # Stable Diffusion's KL autoencoder: 4 latent channels, factor 8
    _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3,
    out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    scaling_factor=0.18215,
)
_VAE_16 = dict(  # SD3's and Flux's: 16 latent channels, no quant convs
    _VAE_4, latent_channels=16, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
_UNET_SD15 = dict(
    _class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, out_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, sample_size=64,
)
_UNET_SDXL = dict(
    _UNET_SD15, addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
)
_MMDIT_SD35_LARGE = dict(
    _class_name="SD3Transformer2DModel", attention_head_dim=64, caption_projection_dim=2432, in_channels=16,
    joint_attention_dim=4096, num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2,
    pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128, dual_attention_layers=[],
)
_FLUX_DEV = dict(
    _class_name="FluxTransformer2DModel", attention_head_dim=128, axes_dims_rope=[16, 56, 56], guidance_embeds=True,
    in_channels=64, joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38,
    patch_size=1, pooled_projection_dim=768,
)
_CLIP_TOKENIZER, _T5_TOKENIZER = ("transformers", "CLIPTokenizer", None), ("transformers", "T5TokenizerFast", None)

# name -> (pipeline class, {component: (library, class, config or None: listed in model_index.json, no file)})
CONFIG_FOLDERS = {
    "sd15": ("StableDiffusionPipeline", {  # stable-diffusion-v1-5, without its safety checker
        "unet": ("diffusers", "UNet2DConditionModel", _UNET_SD15), "vae": ("diffusers", "AutoencoderKL", _VAE_4),
        "text_encoder": ("transformers", "CLIPTextModel", _CLIP_L), "tokenizer": _CLIP_TOKENIZER,
        "scheduler": ("diffusers", "PNDMScheduler", None)}),
    "sdxl": ("StableDiffusionXLPipeline", {  # stable-diffusion-xl-base-1.0
        "unet": ("diffusers", "UNet2DConditionModel", _UNET_SDXL),
        "vae": ("diffusers", "AutoencoderKL", dict(_VAE_4, sample_size=1024, scaling_factor=0.13025,
                                                   force_upcast=True)),
        "text_encoder": ("transformers", "CLIPTextModel", _CLIP_L),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", _CLIP_G),
        "tokenizer": _CLIP_TOKENIZER, "tokenizer_2": _CLIP_TOKENIZER,
        "scheduler": ("diffusers", "EulerDiscreteScheduler", None)}),
    "sd35-large": ("StableDiffusion3Pipeline", {  # stable-diffusion-3.5-large
        "transformer": ("diffusers", "SD3Transformer2DModel", _MMDIT_SD35_LARGE),
        "vae": ("diffusers", "AutoencoderKL", dict(_VAE_16, scaling_factor=1.5305, shift_factor=0.0609)),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection",
                         dict(_CLIP_L, architectures=["CLIPTextModelWithProjection"])),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", _CLIP_G),
        "text_encoder_3": ("transformers", "T5EncoderModel", _T5_XXL),
        "tokenizer": _CLIP_TOKENIZER, "tokenizer_2": _CLIP_TOKENIZER, "tokenizer_3": _T5_TOKENIZER,
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", None)}),
    "flux-dev": ("FluxPipeline", {  # FLUX.1-dev
        "transformer": ("diffusers", "FluxTransformer2DModel", _FLUX_DEV),
        "vae": ("diffusers", "AutoencoderKL", dict(_VAE_16, scaling_factor=0.3611, shift_factor=0.1159)),
        "text_encoder": ("transformers", "CLIPTextModel", _CLIP_L),
        "text_encoder_2": ("transformers", "T5EncoderModel", _T5_XXL),
        "tokenizer": _CLIP_TOKENIZER, "tokenizer_2": _T5_TOKENIZER,
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", None)}),
}
__all__ += ["CONFIG_FOLDERS", "config_folder"]


def config_folder(name: str, folder: str | Path) -> Path:
    """Write the published architecture `name` (a key of CONFIG_FOLDERS: sd15, sdxl, sd35-large, flux-dev) into
    `folder` as configs alone: model_index.json and each model's config.json, no weights, tokenizer or scheduler
    files. genkit.memory plans from such a folder; nothing can generate from it. Returns the folder."""
    import json

    from genkit.outputs import save_text

    if name not in CONFIG_FOLDERS:
        raise ValueError(f"unknown architecture {name!r}; one of {', '.join(CONFIG_FOLDERS)}")
    pipeline, components = CONFIG_FOLDERS[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    for component, (library, cls, config) in components.items():
        index[component] = [library, cls]
        if config is not None:
            (folder / component).mkdir(exist_ok=True)
            save_text(folder / component / "config.json", json.dumps(config, indent=2) + "\n")
    save_text(folder / "model_index.json", json.dumps(index, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# GGUF files of a tiny transformer, in the layout ComfyUI-GGUF and city96's conversions publish (genkit.quantize)

__all__ += ["flux_original_keys", "write_gguf", "build_tiny_gguf"]


def flux_original_keys(state: dict) -> dict:
    """A diffusers FluxTransformer2DModel's state dict under the original model's (Black Forest Labs') key names, as
    single-file Flux checkpoints and their GGUF conversions hold it: the inverse of diffusers'
    `convert_flux_transformer_checkpoint_to_diffusers` and of `genkit.families.flux.flux_to_diffusers`, read off the
    latter's tables (q, k, v joined into qkv, a single block's q, k, v and MLP input into linear1, the final
    modulation's scale and shift swapped back)."""
    from genkit.families.flux import DOUBLE, RENAMES, SINGLE

    state, out = dict(state), {}

    def move(new: str, old: str) -> None:  # diffusers' name `new` back to the original `old`
        if old.endswith(".scale"):
            out[old] = state.pop(new)
            return
        for end in (".weight", ".bias"):
            if new + end in state:
                out[old + end] = state.pop(new + end)

    def join(parts: list[str], old: str) -> None:
        for end in (".weight", ".bias"):
            out[old + end] = torch.cat([state.pop(part + end) for part in parts])

    for old, new in RENAMES.items():
        move(new, old)
    for stream, table, prefix in (("transformer_blocks", DOUBLE, "double_blocks"),
                                  ("single_transformer_blocks", SINGLE, "single_blocks")):
        for block in sorted({key.split(".")[1] for key in state if key.startswith(stream + ".")}):
            new, old = f"{stream}.{block}.", f"{prefix}.{block}."
            for a, b in table.items():
                move(new + b, old + a)
            if prefix == "double_blocks":
                join([f"{new}attn.to_{x}" for x in "qkv"], old + "img_attn.qkv")
                join([f"{new}attn.add_{x}_proj" for x in "qkv"], old + "txt_attn.qkv")
            else:
                join([f"{new}attn.to_q", f"{new}attn.to_k", f"{new}attn.to_v", f"{new}proj_mlp"], old + "linear1")
    for end in (".weight", ".bias"):  # diffusers' AdaLayerNormContinuous is (scale, shift); the original (shift, scale)
        scale, shift = state.pop("norm_out.linear" + end).chunk(2, dim=0)
        out["final_layer.adaLN_modulation.1" + end] = torch.cat([shift, scale])
    if state:
        raise ValueError(f"keys with no original name: {sorted(state)[:5]}")
    return out


def write_gguf(state: dict, path: str | Path, quant_type: str = "Q8_0", arch: str = "flux") -> Path:
    """Write `state` (name -> tensor) as a GGUF file as ComfyUI-GGUF's converter does: the weight matrices whose rows
    split into whole blocks of `quant_type` (gguf.GGMLQuantizationType's name: Q8_0, Q4_0, Q4_K, ...) quantized with
    `gguf.quants.quantize`, vectors and the rest in F32; `general.architecture` says `arch`."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[quant_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for name, tensor in state.items():
        data = tensor.detach().to(torch.float32).contiguous().numpy()
        if data.ndim == 2 and data.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_tiny_gguf(folder: str | Path, path: str | Path, quant_type: str = "Q8_0", layout: str = "original") -> Path:
    """The transformer of a tiny Flux pipeline `folder` (build_tiny("flux", ...)) as a transformer-only GGUF file
    `path`, quantized to `quant_type`: what `--model FILE.gguf --base FOLDER` loads. `layout` "original": the original
    model's key names, as ComfyUI-GGUF's files of Flux are (diffusers converts them on loading, assuming Flux's
    published width of 3072: a tiny model's single blocks do not split so); "diffusers": diffusers' own names, which
    diffusers loads as they are."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(Path(folder), subfolder="transformer")
    state = transformer.state_dict()
    return write_gguf(flux_original_keys(state) if layout == "original" else state, path, quant_type)


# ---------------------------------------------------------------------------------------------
# Single files of a tiny pipeline, in the original layouts A1111 and ComfyUI keep (genkit.single_file): the inverse of
# diffusers' single_file_utils conversions (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, the CLIP and
# OpenCLIP conversions), as its scripts/convert_diffusers_to_original_stable_diffusion.py does for SD's full sizes

__all__ += ["ldm_checkpoint", "write_single_file"]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _ldm_unet(state: dict, config) -> dict:
    """A UNet2DConditionModel's state dict under LDM's names (input_blocks, middle_block, output_blocks)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    per, levels = config.layers_per_block, len(config.block_out_channels)
    prefixes = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2."}
    for i in range(levels):
        for j in range(per):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{1 + i * (per + 1) + j}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * (per + 1) + j}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per + 1)}.0.op."
        for j in range(per + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (per + 1) + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (per + 1) + j}.1."
        attention = any(key.startswith(f"up_blocks.{i}.attentions.") for key in state)
        prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{i * (per + 1) + per}.{2 if attention else 1}.conv."
    exact = {**{d: o for d, o in DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].items()},
             **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    out = {}
    for key, value in state.items():
        if key in exact:
            out[exact[key]] = value
            continue
        prefix = next(p for p in prefixes if key.startswith(p))
        rest = key[len(prefix):]
        if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
            name, _, end = rest.partition(".")
            rest = f"{_RESNET[name]}.{end}"
        out[prefixes[prefix] + rest] = value
    return out


def _ldm_vae(state: dict, config) -> dict:
    """An AutoencoderKL's state dict under LDM's names (encoder.down.N.block.M, mid.attn_1's 1x1 convolutions ...)."""
    levels, out = len(config.block_out_channels), {}
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = new.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
            where = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                new = ".".join([parts[0], where, str(level), "block", *parts[4:]])
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = ".".join([parts[0], where, str(level), "downsample" if where == "down" else "upsample", *parts[5:]])
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = ".".join([parts[0], "mid", f"block_{int(parts[3]) + 1}", *parts[4:]])
        elif parts[1] == "mid_block":  # attentions.0: linear layers become LDM's 1x1 convolutions
            name = ".".join(parts[4:-1])
            new = ".".join([parts[0], "mid", "attn_1", attention[name], parts[-1]])
            value = value[:, :, None, None] if value.dim() == 2 else value
        out[new] = value
    return out


def _text_model(state: dict) -> dict:
    """A CLIP text model's keys under "text_model." (transformers 5 flattens CLIPTextModel; the files do not)."""
    return {key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}": value
            for key, value in state.items()}


def _open_clip(state: dict) -> dict:
    """A CLIPTextModelWithProjection's state dict under OpenCLIP's names (resblocks, in_proj, c_fc ...)."""
    state, out = _text_model(state), {}
    renames = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
               "text_model.embeddings.position_embedding.weight": "positional_embedding",
               "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    layers = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}
    for key, value in state.items():
        if key in renames:
            out[renames[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            n, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                continue  # joined below
            name, _, end = rest.rpartition(".")
            out[f"transformer.resblocks.{n}.{layers[name]}.{end}"] = value
    for n in {key.split(".")[3] for key in state if key.startswith("text_model.encoder.layers.")}:
        for end in ("weight", "bias"):
            out[f"transformer.resblocks.{n}.attn.in_proj_{end}"] = torch.cat(
                [state[f"text_model.encoder.layers.{n}.self_attn.{x}_proj.{end}"] for x in "qkv"])
    return out


def ldm_checkpoint(folder: str | Path) -> dict:
    """The tiny SD 1.x or SDXL pipeline in `folder` as one state dict in the original single-file layout: the UNet under
    model.diffusion_model., the VAE under first_stage_model., the text encoders under cond_stage_model.transformer.
    (SD 1.x) or conditioner.embedders.0.transformer. and .1.model. (SDXL)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(Path(folder))
    state = {f"model.diffusion_model.{k}": v for k, v in _ldm_unet(pipe.unet.state_dict(), pipe.unet.config).items()}
    state.update({f"first_stage_model.{k}": v for k, v in _ldm_vae(pipe.vae.state_dict(), pipe.vae.config).items()})
    clip = {k: v for k, v in _text_model(pipe.text_encoder.state_dict()).items() if not k.endswith("position_ids")}
    if getattr(pipe, "text_encoder_2", None) is None:
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.items()})
    else:
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in clip.items()})
        state.update({f"conditioner.embedders.1.model.{k}": v
                      for k, v in _open_clip(pipe.text_encoder_2.state_dict()).items()})
    return state


def write_single_file(state: dict, path: str | Path) -> Path:
    """Write `state` as a .safetensors file (or, for a .ckpt path, a pickle under "state_dict", as LDM's trainer saved)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    from safetensors.torch import save_file

    from genkit.outputs import atomic_write

    if path.suffix == ".ckpt":
        atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))
    else:
        atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return path


# ---------------------------------------------------------------------------------------------
# A tiny upscaling model (genkit.hires' FILE upscaler): Real-ESRGAN's compact network (SRVGGNetCompact) in the layout
# spandrel detects ("RealESRGAN Compact": body.0 and body.1 present): body.0 a 3x3 convolution 3 -> features, then
# PReLU and (convolution, PReLU) x convs, the last convolution to 3 x scale^2 channels, a pixel shuffle by scale.


def upscaler_state(scale: int = 2, features: int = 4, convs: int = 1, seed: int = 0) -> dict:
    """A random-weight compact upscaler's state dict (`body.N.weight`/`.bias`), scale x."""
    generator = torch.Generator().manual_seed(seed)
    layers = [torch.nn.Conv2d(3, features, 3, 1, 1), torch.nn.PReLU(features)]
    for _ in range(convs):
        layers += [torch.nn.Conv2d(features, features, 3, 1, 1), torch.nn.PReLU(features)]
    layers.append(torch.nn.Conv2d(features, 3 * scale * scale, 3, 1, 1))
    body = torch.nn.ModuleList(layers)
    with torch.no_grad():
        for parameter in body.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return {f"body.{key}": value for key, value in body.state_dict().items()}


def build_tiny_upscaler(path: str | Path, scale: int = 2, seed: int = 0) -> Path:
    """The tiny upscaler as a .safetensors file, as A1111's models/ESRGAN and ComfyUI's models/upscale_models hold them."""
    return write_single_file(upscaler_state(scale, seed=seed), path)


# ---------------------------------------------------------------------------------------------
# Tiny ControlNets (genkit.controlnet): each family's own kind, made as a trainer starts one (`Family.new_controlnet`:
# diffusers' ControlNetModel.from_unet for the UNet families, the transformer families' control models built from
# their transformer's config), with the layers a new one holds at zero (which would change nothing) drawn at random,
# saved with save_pretrained: the folder loads as a user's ControlNet folder does.

__all__ += ["build_tiny_controlnet", "ldm_controlnet"]


def _tiny_pipe(model: str | Path):
    """(family, diffusers pipeline) of the tiny model saved in `model` (build_tiny's folder), in float32."""
    import json

    from genkit import families

    index = json.loads((Path(model) / "model_index.json").read_text(encoding="utf-8"))
    family = families.detect(index["_class_name"], str(model))
    return family, family.load(str(model), dtype=torch.float32, use_safetensors=True, local=True)


def build_tiny_controlnet(model: str | Path, folder: str | Path, *, seed: int = 0, std: float = 0.1) -> Path:
    """A random-weight ControlNet for the tiny model saved in `model` (build_tiny's folder), saved in `folder`."""
    family, pipe = _tiny_pipe(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = family.new_controlnet(pipe)
        with torch.no_grad():
            for parameter in controlnet.parameters():
                if not parameter.any():
                    parameter.normal_(0.0, std)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def ldm_controlnet(state: dict, config) -> dict:
    """A ControlNetModel's state dict under the original ControlNet's names (lllyasviel's files, A1111's and ComfyUI's
    models/controlnet): the UNet encoder's as LDM's, the conditioning embedding as input_hint_block, the zero
    convolutions as zero_convs and middle_block_out. Four embedding levels, as diffusers' converter reads them."""
    own = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if key.startswith("controlnet_cond_embedding.conv_in."):
            own[f"input_hint_block.0.{key.rsplit('.', 1)[1]}"] = value
        elif key.startswith("controlnet_cond_embedding.conv_out."):
            own[f"input_hint_block.14.{key.rsplit('.', 1)[1]}"] = value
        elif key.startswith("controlnet_cond_embedding.blocks."):
            block, end = key.split(".")[2], key.rsplit(".", 1)[1]
            own[f"input_hint_block.{2 * (int(block) + 1)}.{end}"] = value
        elif head == "controlnet_down_blocks":
            number, end = rest.split(".")
            own[f"zero_convs.{number}.0.{end}"] = value
        elif head == "controlnet_mid_block":
            own[f"middle_block_out.0.{rest}"] = value
    rest = {key: value for key, value in state.items() if not key.startswith(("controlnet_cond_embedding.",
                                                                              "controlnet_down_blocks.",
                                                                              "controlnet_mid_block."))}
    return {**_ldm_unet(rest, config), **own}


# ---------------------------------------------------------------------------------------------
# Tiny IP-Adapters (genkit.ipadapter): random weights in each family's own file layout (`Family.ip_adapter_shapes`:
# h94/IP-Adapter's for SD 1.x and SDXL, XLabs' for Flux.1) saved as users have them, the weights file beside an
# image_encoder/ folder holding a tiny CLIPVisionModelWithProjection: genkit reads them as it reads a user's.

__all__ += ["build_tiny_ip_adapter", "IP_ADAPTER_FILES"]

IP_ADAPTER_FILES = {"sd": "ip-adapter_sd15.safetensors", "sdxl": "ip-adapter_sdxl.safetensors",
                    "flux": "ip_adapter.safetensors"}  # the published files' names (h94's, XLabs')


def build_tiny_ip_adapter(model: str | Path, folder: str | Path, *, seed: int = 0, std: float = 0.5,
                          image_embed_dim: int = 16) -> Path:
    """A random-weight IP-Adapter for the tiny model saved in `model`, written to `folder` (the weights file and its
    image_encoder/); returns the weights file."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    family, pipe = _tiny_pipe(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=image_embed_dim))
        state = {key: torch.randn(shape) * std + (1.0 if key.endswith("norm.weight") else 0.0)  # LayerNorm scales
                 for key, shape in family.ip_adapter_shapes(pipe, image_embed_dim).items()}
    encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
    file = folder / IP_ADAPTER_FILES.get(family.name, "ip-adapter.safetensors")
    save_file(state, str(file))
    return file
