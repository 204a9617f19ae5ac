"""The trainer's settings: one typed dataclass, settable from flags or YAML.

Every field is a command-line flag (``learning_rate`` -> ``--learning-rate``,
named like diffusers' ``train_controlnet.py`` where the same setting exists)
and a key of the ``--config`` YAML file (``learning_rate`` or
``learning-rate``). Precedence: defaults < YAML < flags given explicitly.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from schemas.errors import UsageError
from schemas.files import read_yaml_mapping


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Settings of one training run (see ``docs/training.md``)."""

    # model
    base: str = _f("", "Stable Diffusion base: local diffusers folder or a single .safetensors/.ckpt SD1.x/2.x file")
    base_config: str | None = _f(None, "for a single-file --base: local diffusers folder with the matching configs")
    base_original_config: str | None = _f(None, "for a single-file --base: the original LDM inference yaml")
    controlnet: str | None = _f(None, "start from this diffusers ControlNet folder instead of copying the UNet encoder")
    method: str = _f("controlnet", "how control is added to the base: controlnet, controlnet_gaussian, concat, "
                     "controlnet_lite, xattn_adapter, or unet (text-to-image fine-tuning, condition unused)")
    connection_init_std: float = _f(0.0, "controlnet_gaussian: std of the connections' initial weights (0 = 1/sqrt(fan_in))")
    lite_channels: int = _f(64, "controlnet_lite / xattn_adapter: width of the small control encoder")
    conditioning_embedding_channels: list[int] = _f([16, 32, 96, 256], "channels of the condition encoder's blocks")
    # data
    shards: list[str] = _f([], "training shards: paths, globs, {000..099} patterns or fsspec URLs")
    condition: list[str] = _f(["canny"], "condition member(s) to train on, e.g. canny; several are stacked")
    resolution: int = _f(512, "training resolution (square crops)")
    proportion_empty_prompts: float = _f(0.5, "fraction of captions replaced by the empty prompt")
    random_flip: bool = _f(True, "random horizontal flip of image and condition together")
    center_crop: bool = _f(False, "centre crop instead of random crop")
    cached_latents: str = _f("auto", "latents and text embeddings written into the shards by `controlset cache-latents`: "
                             "auto (use them when the shards carry them), on (require them) or off (run the VAE and "
                             "text encoder every step); cached latents are of the centre crop")
    shuffle_buffer: int = _f(1000, "samples in the shuffle buffer of each data stream")
    resampled: bool = _f(False, "draw shards with replacement instead of epochs over all shards")
    dataloader_num_workers: int = _f(2, "DataLoader worker processes per GPU (0 = in the main process)")
    # schedule
    output_dir: str = _f("controlnet-model", "where checkpoints, logs, metrics.jsonl and exports go")
    max_train_steps: int = _f(10000, "optimiser steps to train")
    train_batch_size: int = _f(4, "batch size per device")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimiser step")
    learning_rate: float = _f(1e-5, "learning rate of the ControlNet")
    unlock_at: int | None = _f(None, "optimiser step after which the SD decoder half also trains ('never' = keep locked)")
    unlock_learning_rate: float = _f(2e-6, "learning rate of the SD decoder half once unlocked")
    only_mid_control: bool = _f(False, "add control only at the middle block (as the original only_mid_control)")
    lr_scheduler: str = _f("constant", "constant, constant_with_warmup, linear or cosine")
    lr_warmup_steps: int = _f(0, "warm-up steps of the learning rate")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    use_8bit_adam: bool = _f(False, "8-bit AdamW from bitsandbytes")
    use_ema: bool = _f(False, "keep an exponential moving average of the ControlNet (exported when on)")
    ema_decay: float = _f(0.9999, "EMA decay")
    # performance
    mixed_precision: str = _f("auto", "no, fp16, bf16 or auto (bf16 on GPU, no on CPU)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    allow_tf32: bool = _f(True, "TF32 matmuls on Ampere+ GPUs")
    channels_last: bool = _f(False, "channels-last memory format for the UNet and ControlNet")
    torch_compile: bool = _f(False, "torch.compile the model (recompiled when the decoder unlocks)")
    seed: int = _f(0, "seed of data order, augmentation, noise and timesteps")
    # run management
    checkpointing_steps: int = _f(500, "save a resumable checkpoint every N optimiser steps")
    checkpoints_total_limit: int | None = _f(3, "keep only the last K checkpoints (None = keep all)")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint folder to resume from")
    overwrite_output_dir: bool = _f(False, "start a fresh run in an --output-dir that holds an earlier run's "
                                    "checkpoints, deleting them (without it such a run stops with an error)")
    validation_steps: int = _f(500, "generate validation images every N steps (0 = never)")
    validation_shards: list[str] = _f([], "held-out shards whose conditions and captions are used for validation")
    num_validation_images: int = _f(4, "held-out samples generated at each validation")
    validation_inference_steps: int = _f(20, "sampling steps of validation images")
    validation_guidance_scale: float = _f(7.5, "classifier-free guidance scale of validation images")
    report_to: str = _f("tensorboard", "tensorboard or none (metrics.jsonl is always written)")
    export: bool = _f(True, "export the ControlNet (diffusers + A1111 layout) at the end")

    def __post_init__(self) -> None:
        if isinstance(self.unlock_at, str):
            self.unlock_at = parse_unlock(self.unlock_at)
        if isinstance(self.cached_latents, bool):  # YAML reads a bare on / off as a boolean
            self.cached_latents = "on" if self.cached_latents else "off"
        for name in ("shards", "condition", "validation_shards"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            # "canny,depth" and ["canny", "depth"] mean the same.
            if name == "condition":
                value = [v.strip() for item in value for v in str(item).split(",") if v.strip()]
            setattr(self, name, list(value))

    def validate(self) -> None:
        """Raise :class:`UsageError` for inconsistent settings."""
        if not self.base:
            raise UsageError("--base is required (a diffusers SD folder or a .safetensors checkpoint; "
                             "`controlset base tiny DIR` writes a tiny random one for tests)")
        if not self.shards:
            raise UsageError("--shards is required")
        if not self.condition:
            raise UsageError("--condition needs at least one condition name")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise UsageError(f"--mixed-precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.cached_latents not in ("auto", "on", "off"):
            raise UsageError(f"--cached-latents must be auto, on or off, got {self.cached_latents!r}")
        if self.lr_scheduler not in ("constant", "constant_with_warmup", "linear", "cosine"):
            raise UsageError(f"unknown --lr-scheduler {self.lr_scheduler!r}")
        if self.resolution % 8:
            raise UsageError("--resolution must be a multiple of 8")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.unlock_at is not None and self.unlock_at < 0:
            raise UsageError("--unlock-at must be a step >= 0 or 'never'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_unlock(value: str | int | None) -> int | None:
    """``--unlock-at`` value: a step number, or ``never`` / ``none``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("never", "none", "")):
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--unlock-at must be a step number or 'never', got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`TrainConfig` field (defaults suppressed so
    that only flags actually given override the YAML file)."""
    hints = get_type_hints(TrainConfig)
    parser.add_argument("--config", help="YAML file setting any of the options below")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        kw: dict = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", ""), "dest": f.name}
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif str(hint).startswith("list"):
            kw["nargs"] = "+"
            kw["type"] = int if "int" in str(hint) else str
        elif f.name == "unlock_at":
            kw["type"] = parse_unlock
            kw["metavar"] = "STEP|never"
        elif f.name in ("checkpoints_total_limit",):
            kw["type"] = lambda v: None if v.lower() in ("none", "0") else int(v)
        elif hint in (int, float, str):
            kw["type"] = hint
        else:
            kw["type"] = str
        parser.add_argument(flag, **kw)


def load_yaml(path: str) -> dict:
    """Options from a YAML file, keys normalised to field names."""
    data = read_yaml_mapping(path, "a mapping of option: value")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UsageError(f"--config {path}: unknown option {key!r}")
        out[name] = value
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--config`` YAML < explicit flags."""
    values: dict = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    try:
        cfg = TrainConfig(**values)
    except TypeError as exc:
        raise UsageError(str(exc)) from exc
    return cfg
