"""The networks: the Stable Diffusion base and the conditioning methods trained on it.

A *conditioning method* is a ``torch.nn.Module`` that owns the base UNet and
whatever it adds for control. The trainer only talks to this interface:

* ``forward(noisy_latents, timesteps, text_embeddings, conditioning)`` -> the
  UNet's prediction,
* ``param_groups(phase)`` -> named parameter groups with their learning rates
  for the ``locked`` / ``unlocked`` phase,
* ``export(out_dir)`` and ``pipeline(base)`` for the results.

``controlnet`` is defined here; the alternatives (Gaussian-initialised
connections, extra input channels, a lighter control encoder, a
cross-attention adapter, plain UNet fine-tuning) are in
:mod:`training.methods`. All are registered in :data:`METHODS` and selected
with ``--method``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from schemas.errors import UsageError

log = logging.getLogger(__name__)

PHASES = ("locked", "unlocked")


@dataclass
class Base:
    """A Stable Diffusion model split into the parts the trainer uses."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler
    source: str


def _single_file_error(path: str, why: str) -> UsageError:
    return UsageError(
        f"cannot load the single-file checkpoint {path}: {why}. Loading a .safetensors SD 1.x/2.x checkpoint "
        "offline needs the architecture configs: pass --base-config DIR, a local diffusers-format folder of the "
        "same architecture (with unet/, vae/, text_encoder/, tokenizer/, scheduler/ configs), or "
        "--base-original-config FILE.yaml (the original LDM inference yaml, e.g. v1-inference.yaml), "
        "or use a diffusers-format folder as --base"
    )


def load_base(path: str, base_config: str | None = None, original_config: str | None = None) -> Base:
    """Load ``path``: a local diffusers-format Stable Diffusion folder, or a
    single ``.safetensors`` / ``.ckpt`` SD 1.x/2.x checkpoint (loaded with
    diffusers' ``from_single_file``, offline)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if os.path.isdir(path):
        missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not os.path.isdir(os.path.join(path, s))]
        if missing:
            raise UsageError(f"--base {path} is not a diffusers Stable Diffusion folder (missing {', '.join(missing)}/)")
        kw = {"local_files_only": True}
        return Base(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
            source=path,
        )
    if os.path.isfile(path):
        if not path.endswith((".safetensors", ".ckpt")):
            raise UsageError(f"--base {path}: expected a diffusers folder or a .safetensors/.ckpt checkpoint")
        from diffusers import StableDiffusionPipeline

        kw: dict = {"local_files_only": True, "safety_checker": None, "requires_safety_checker": False}
        if base_config:
            kw["config"] = base_config
        if original_config:
            kw["original_config"] = original_config
        try:
            pipe = StableDiffusionPipeline.from_single_file(path, **kw)
        except Exception as exc:  # diffusers raises several types when configs are not local
            raise _single_file_error(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        return Base(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            source=path,
        )
    raise UsageError(f"--base {path} does not exist")


@torch.no_grad()
def encode_prompts(base: Base, captions: list[str], device: torch.device) -> torch.Tensor:
    """CLIP text embeddings (last hidden state) of the captions."""
    ids = base.tokenizer(
        captions, padding="max_length", max_length=base.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return base.text_encoder(ids, return_dict=False)[0]


@torch.no_grad()
def encode_images(base: Base, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled VAE latents (a sample of the posterior) of images in [-1, 1]."""
    vae = base.vae
    dist = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    return dist.sample(generator) * vae.config.scaling_factor


#: The scheduler ``prediction_type`` values the trainer implements.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(scheduler) -> str:
    """The scheduler's ``prediction_type``; a :class:`UsageError` for one the
    trainer does not implement (rather than silently training epsilon)."""
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise UsageError(f"the base's scheduler has prediction_type {kind!r}; training supports "
                         f"{' and '.join(PREDICTION_TYPES)} only")
    return kind


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict for ``add_noise(latents, noise, timesteps)``:
    the noise (``epsilon``) or the velocity (``v_prediction``)."""
    if check_prediction_type(scheduler) == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


# --------------------------------------------------------------------------
# conditioning methods


class ConditioningMethod(nn.Module):
    """Interface of a way to add spatial control to the base UNet."""

    name: str = ""
    #: Whether an ``unlocked`` phase exists (``--unlock-at``).
    can_unlock: bool = True

    def forward(self, noisy_latents, timesteps, text_embeddings, conditioning):  # pragma: no cover - interface
        raise NotImplementedError

    def param_groups(self, phase: str) -> list[dict]:
        """``[{"name", "params", "lr"}]`` trained in ``phase``; the locked
        phase's groups come first and keep their order when unlocking."""
        raise NotImplementedError

    def set_phase(self, phase: str) -> None:
        """Set ``requires_grad`` so exactly ``param_groups(phase)`` train."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.requires_grad_(False)
        for group in self.param_groups(phase):
            for p in group["params"]:
                p.requires_grad_(True)

    def trainable_state_dict(self, phase: str) -> dict[str, torch.Tensor]:
        """Every parameter the phase trains, by its name in this module."""
        ids = {id(p) for g in self.param_groups(phase) for p in g["params"]}
        return {n: p.detach() for n, p in self.named_parameters() if id(p) in ids}

    def cast_frozen(self, dtype: torch.dtype, will_unlock: bool) -> None:
        """Store parameters that never train in ``dtype`` (saves memory)."""

    def enable_gradient_checkpointing(self) -> None:
        raise NotImplementedError

    def export(self, out_dir: str, unet_changed: bool = False, full_precision_unet=None) -> dict[str, str]:
        raise NotImplementedError

    def pipeline(self, base: Base):
        """An inference pipeline (diffusers) using this method's modules."""
        raise NotImplementedError


METHODS: dict[str, Callable[..., ConditioningMethod]] = {}


def register_method(cls):
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


#: State-dict prefixes of the modules :func:`decoder_modules` returns.
DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")


def decoder_modules(unet) -> list[nn.Module]:
    """The SD decoder half that ``sd_locked=False`` trains in the original
    ControlNet: the output blocks and the output layers."""
    return [getattr(unet, p.rstrip(".")) for p in DECODER_PREFIXES]


def decoder_group(unet: nn.Module, lr: float) -> dict:
    """The optimiser group that the ``unlocked`` phase adds: the SD decoder half."""
    params = [p for m in decoder_modules(unet) for p in m.parameters()]
    return {"name": "unet_decoder", "params": params, "lr": lr}


def cast_frozen_unet(unet: nn.Module, dtype: torch.dtype, will_unlock: bool) -> None:
    """Store the frozen UNet weights in the training precision; the decoder
    half stays fp32 when it will be unlocked (it becomes trainable)."""
    if dtype == torch.float32:
        return
    keep = {id(p) for m in decoder_modules(unet) for p in m.parameters()} if will_unlock else set()
    for p in unet.parameters():
        if id(p) not in keep:
            p.data = p.data.to(dtype)


def save_trained_unet(unet: nn.Module, out_dir: str, full_precision_unet: nn.Module | None = None) -> str:
    """Write ``out_dir/unet`` (diffusers format) after the decoder was trained.

    When the frozen parts were stored in reduced precision, the trained
    decoder is written into a full-precision copy of the base UNet instead."""
    if full_precision_unet is not None:
        trained = {k: v for k, v in unet.state_dict().items() if k.startswith(DECODER_PREFIXES)}
        full_precision_unet.load_state_dict(trained, strict=False)
        unet = full_precision_unet
    udir = os.path.join(out_dir, "unet")
    unet.save_pretrained(udir, safe_serialization=True)
    return udir


@register_method
class ControlNetMethod(ConditioningMethod):
    """ControlNet: a trainable copy of the UNet encoder joined by zero
    convolutions; the base is locked, optionally its decoder is unlocked."""

    name = "controlnet"

    def __init__(
        self,
        base: Base,
        *,
        conditioning_channels: int = 3,
        learning_rate: float = 1e-5,
        unlock_learning_rate: float = 2e-6,
        only_mid_control: bool = False,
        controlnet_path: str | None = None,
        conditioning_embedding_channels: tuple[int, ...] = (16, 32, 96, 256),
        **_ignored,
    ) -> None:
        # Options of other methods (``_ignored``) are accepted so that the
        # trainer can pass one set of options to whichever method it builds.
        from diffusers import ControlNetModel

        super().__init__()
        self.unet = base.unet
        if controlnet_path:
            try:
                self.controlnet = ControlNetModel.from_pretrained(controlnet_path, local_files_only=True)
            except (OSError, EnvironmentError) as exc:
                raise UsageError(f"--controlnet {controlnet_path}: not a diffusers ControlNet folder ({exc})") from exc
            got = self.controlnet.config.conditioning_channels
            if got != conditioning_channels:
                raise UsageError(
                    f"--controlnet {controlnet_path} takes {got} condition channels, the selected conditions give {conditioning_channels}"
                )
        else:
            self.controlnet = ControlNetModel.from_unet(
                self.unet,
                conditioning_channels=conditioning_channels,
                conditioning_embedding_out_channels=tuple(conditioning_embedding_channels),
            )
        self.learning_rate = learning_rate
        self.unlock_learning_rate = unlock_learning_rate
        self.only_mid_control = only_mid_control

    def forward(self, noisy_latents, timesteps, text_embeddings, conditioning):
        down, mid = self.controlnet(
            noisy_latents, timesteps, encoder_hidden_states=text_embeddings, controlnet_cond=conditioning, return_dict=False
        )
        if self.only_mid_control:
            # diffusers adds the mid residual only when down residuals are given.
            down = [torch.zeros_like(d) for d in down]
        return self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=text_embeddings,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    def _controlnet_params(self) -> list[nn.Parameter]:
        skip = set()
        if self.only_mid_control:  # the skip-connection zero convs are unused
            skip = {id(p) for p in self.controlnet.controlnet_down_blocks.parameters()}
        return [p for p in self.controlnet.parameters() if id(p) not in skip]

    def param_groups(self, phase: str) -> list[dict]:
        groups = [{"name": "controlnet", "params": self._controlnet_params(), "lr": self.learning_rate}]
        if phase == "unlocked":
            groups.append(decoder_group(self.unet, self.unlock_learning_rate))
        return groups

    def cast_frozen(self, dtype: torch.dtype, will_unlock: bool) -> None:
        cast_frozen_unet(self.unet, dtype, will_unlock)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        self.controlnet.enable_gradient_checkpointing()

    def export(self, out_dir: str, unet_changed: bool = False, full_precision_unet=None) -> dict[str, str]:
        """``controlnet/`` (diffusers), ``controlnet.safetensors`` (original
        ControlNet / A1111 layout) and, if the decoder was trained, ``unet/``
        (into ``full_precision_unet``, the base UNet as loaded, when given)."""
        from training.export import save_a1111

        paths = {}
        cdir = os.path.join(out_dir, "controlnet")
        self.controlnet.save_pretrained(cdir, safe_serialization=True)
        paths["diffusers"] = cdir
        paths["a1111"] = save_a1111(self.controlnet, os.path.join(out_dir, "controlnet.safetensors"))
        if unet_changed:
            paths["unet"] = save_trained_unet(self.unet, out_dir, full_precision_unet)
        return paths

    def pipeline(self, base: Base):
        from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

        return StableDiffusionControlNetPipeline(
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            unet=self.unet,
            controlnet=self.controlnet,
            scheduler=UniPCMultistepScheduler.from_config(base.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def build_method(name: str, base: Base, **options) -> ConditioningMethod:
    """Construct the conditioning method ``name`` (see :data:`METHODS`);
    options a method does not use are ignored."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise UsageError(f"unknown --method {name!r}; available: {', '.join(sorted(METHODS))}") from None
    return cls(base, **options)


# The alternatives register themselves in METHODS on import.
from training import methods as _methods  # noqa: E402,F401
