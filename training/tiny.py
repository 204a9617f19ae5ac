"""A tiny, randomly initialised Stable-Diffusion-shaped model for tests and demos.

It has the real diffusers/transformers classes (UNet2DConditionModel,
AutoencoderKL with SD's 8x downsampling, CLIPTextModel, a CLIP BPE tokenizer
over single bytes built offline, DDPMScheduler with SD's schedule) at a
fraction of the size. Its weights are random: it draws noise, not pictures.
"""

from __future__ import annotations

import json
import os

TINY_NOTE = "TINY RANDOMLY INITIALISED MODEL for tests and demos: random weights, not a trained Stable Diffusion."


def _byte_symbols() -> list[str]:
    """The printable stand-ins byte-level BPE uses for the 256 byte values
    (printable Latin-1 bytes map to themselves, the rest to code points 256+)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def build_tokenizer(max_length: int = 77):
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (alone and
    word-final) with no merges: every caption tokenises, character by character."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for sym in _byte_symbols():
        vocab[sym] = len(vocab)
        vocab[sym + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


#: Sizes of the presets: ``tiny`` for CPU tests, ``small`` (a few million
#: parameters, three UNet levels) for short GPU experiments such as
#: ``controlset compare``.
PRESETS = {
    "tiny": {
        "unet": dict(sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                     layers_per_block=1, attention_head_dim=8, norm_num_groups=16),
        "vae": dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64),
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    },
    "small": {
        "unet": dict(sample_size=16, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                     block_out_channels=(64, 128, 128), layers_per_block=2, attention_head_dim=16, norm_num_groups=32),
        "vae": dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=32, sample_size=128),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    },
}


def tiny_components(seed: int = 0, preset: str = "tiny") -> dict:
    """Seeded tiny ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``
    of the given size preset (see :data:`PRESETS`)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    sizes = PRESETS[preset]
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, cross_attention_dim=sizes["text"]["hidden_size"], **sizes["unet"]
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # SD's 8x downsampling
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        **sizes["vae"],
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **sizes["text"],
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def write_tiny_base(out_dir: str, seed: int = 0, preset: str = "tiny") -> str:
    """Write the tiny model as a diffusers Stable Diffusion folder (loadable by
    ``StableDiffusionPipeline.from_pretrained`` and ``--base``), labelled as
    random in ``README.md`` and ``model_index.json``."""
    from diffusers import StableDiffusionPipeline

    parts = tiny_components(seed, preset)
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    index_path = os.path.join(out_dir, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["_controlset_note"] = TINY_NOTE
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(
            f"# Tiny random Stable-Diffusion-shaped model\n\n{TINY_NOTE}\n\n"
            f"Written by `controlset base tiny` (seed {seed}, preset {preset}). Same classes and latent layout as SD 1.x "
            "(UNet2DConditionModel, AutoencoderKL with 8x downsampling, CLIP text encoder with a byte-level "
            "tokenizer, DDPM scaled-linear schedule), with tiny widths and random weights. Use it to exercise "
            "the trainer; its images are noise.\n"
        )
    return out_dir


def is_tiny(path: str) -> bool:
    """True when ``path`` is a folder written by :func:`write_tiny_base`."""
    try:
        with open(os.path.join(path, "model_index.json")) as f:
            return "_controlset_note" in json.load(f)
    except (OSError, ValueError):
        return False
