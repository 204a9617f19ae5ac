"""Alternatives to ControlNet's zero convolutions, as conditioning methods.

Each class is registered in :data:`training.models.METHODS` and selected with
``--method``; all of them work with the ordinary trainer, its checkpoints,
validation and exports.

* ``controlnet_gaussian``: ControlNet whose connections (the input and output
  "zero" convolutions) start from Gaussian weights instead of zeros.
* ``concat``: the condition as extra input channels of the UNet's first
  convolution (space-to-depth to the latent grid), the whole UNet fine-tuned.
* ``controlnet_lite``: a small convolutional control encoder instead of the
  copy of the UNet encoder, joined to the UNet by zero convolutions.
* ``xattn_adapter``: a hypernetwork-style adapter on every cross-attention
  layer; the condition becomes tokens attended to by the frozen queries.
* ``unet``: plain text-to-image fine-tuning of the UNet (the condition is read
  but unused) - the recipe that pre-trains a base on a new image domain.

:class:`ConditionedSampler` samples from any method with classifier-free
guidance, so every method is evaluated with the same sampler.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from training.models import (
    Base,
    ConditioningMethod,
    ControlNetMethod,
    cast_frozen_unet,
    decoder_group,
    register_method,
    save_trained_unet,
)


def vae_scale_factor(base: Base) -> int:
    """Pixels per latent cell of the base's VAE (8 for SD)."""
    return 2 ** (len(base.vae.config.block_out_channels) - 1)


# --------------------------------------------------------------------------
# a sampler for every method


class ConditionedSampler:
    """Classifier-free-guidance sampling through ``method.forward``.

    Called like diffusers' ControlNet pipeline for the arguments the trainer
    uses: ``sampler(prompt, image=cond, num_inference_steps=..., guidance_scale=...,
    generator=..., output_type="np", height=..., width=...)`` returns an object
    with ``images`` (N x H x W x 3 floats in [0, 1]). The condition is given to
    both the conditional and the unconditional branch, as diffusers' ControlNet
    pipeline does; the scheduler is UniPC built from the base's training
    schedule.
    """

    def __init__(self, base: Base, method: ConditioningMethod, scheduler=None) -> None:
        from diffusers import UniPCMultistepScheduler

        self.base = base
        self.method = method
        self.scheduler = scheduler or UniPCMultistepScheduler.from_config(base.noise_scheduler.config)

    def set_progress_bar_config(self, **_) -> None:
        """Accepted for pipeline compatibility (this sampler draws no bar)."""

    @torch.no_grad()
    def __call__(self, prompt, image, num_inference_steps: int = 20, guidance_scale: float = 7.5, generator=None,
                 output_type: str = "np", height: int | None = None, width: int | None = None,
                 negative_prompt: str | None = None):
        from training.models import encode_prompts

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        cond = image if image.ndim == 4 else image[None]
        device = cond.device
        n = len(prompts)
        if cond.shape[0] == 1 and n > 1:
            cond = cond.expand(n, *cond.shape[1:])
        height = height or cond.shape[-2]
        width = width or cond.shape[-1]
        f = vae_scale_factor(self.base)
        text = encode_prompts(self.base, prompts, device).float()
        cfg = guidance_scale > 1.0
        if cfg:
            uncond = encode_prompts(self.base, [negative_prompt or ""] * n, device).float()
            text = torch.cat([uncond, text])
            cond = torch.cat([cond, cond])
        shape = (n, self.base.vae.config.latent_channels, height // f, width // f)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        latents = torch.randn(shape, generator=generator, device=gen_device).to(device)
        sched = self.scheduler
        sched.set_timesteps(num_inference_steps, device=device)
        latents = latents * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = torch.cat([latents, latents]) if cfg else latents
            inp = sched.scale_model_input(inp, t)
            tt = t.expand(inp.shape[0]) if t.ndim == 0 else t
            pred = self.method(inp, tt, text, cond).float()
            if cfg:
                u, c = pred.chunk(2)
                pred = u + guidance_scale * (c - u)
            latents = sched.step(pred, t, latents).prev_sample
        vae = self.base.vae
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return SimpleNamespace(images=images)
        return SimpleNamespace(images=images.permute(0, 2, 3, 1).cpu().numpy())


# --------------------------------------------------------------------------
# helpers shared by the methods that keep the base locked


class _DecoderUnlockMixin:
    """``unlocked`` phase = the method's own groups + the SD decoder half, as
    for ControlNet; frozen UNet parts are stored in the training precision."""

    unet: nn.Module
    unlock_learning_rate: float

    def _groups(self, own: list[dict], phase: str) -> list[dict]:
        if phase == "unlocked":
            own = own + [decoder_group(self.unet, self.unlock_learning_rate)]
        return own

    def cast_frozen(self, dtype: torch.dtype, will_unlock: bool) -> None:
        cast_frozen_unet(self.unet, dtype, will_unlock)

    def _export_unet(self, out_dir: str, unet_changed: bool, full_precision_unet) -> dict[str, str]:
        if not unet_changed:
            return {}
        return {"unet": save_trained_unet(self.unet, out_dir, full_precision_unet)}


def _save_module(module: nn.Module, out_dir: str, name: str, config: dict) -> dict[str, str]:
    """``<name>.safetensors`` (fp32 weights) + ``<name>.json`` (how to rebuild it)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, f"{name}.safetensors")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}, weights)
    cfg_path = os.path.join(out_dir, f"{name}.json")
    with open(cfg_path, "w") as f:
        json.dump(config, f, indent=2)
    return {"weights": weights, "config": cfg_path}


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def unet_residual_specs(unet) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(channels, level) of every down-block residual the UNet accepts as
    ``down_block_additional_residuals`` (conv_in, each layer, each downsampler)
    and of the middle block; level ``l`` is the latent grid divided by ``2**l``."""
    boc = list(unet.config.block_out_channels)
    lpb = unet.config.layers_per_block
    layers = [lpb] * len(boc) if isinstance(lpb, int) else list(lpb)
    specs = [(boc[0], 0)]
    for i, ch in enumerate(boc):
        specs += [(ch, i)] * layers[i]
        if i < len(boc) - 1:
            specs.append((ch, i + 1))
    return specs, (boc[-1], len(boc) - 1)


class HintEncoder(nn.Module):
    """Condition image -> features on the latent grid: a 3x3 conv, then
    ``log2(factor)`` stride-2 convs (as ControlNet's condition embedding)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int, factor: int) -> None:
        super().__init__()
        steps = int(round(math.log2(factor)))
        chans = list(channels)[: steps + 1]
        while len(chans) < steps + 1:
            chans.append(chans[-1])
        layers: list[nn.Module] = [nn.Conv2d(in_channels, chans[0], 3, padding=1), nn.SiLU()]
        for i in range(steps):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, stride=2), nn.SiLU()]
        layers.append(nn.Conv2d(chans[-1], out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------
# 2. ControlNet with Gaussian-initialised connections


@register_method
class GaussianControlNetMethod(ControlNetMethod):
    """ControlNet whose input and output connections (the condition
    embedding's last conv, every ``controlnet_down_blocks`` conv and the
    middle-block conv - zero convolutions in ControlNet) start from N(0, std)
    weights and zero biases. ``connection_init_std`` 0 means 1/sqrt(fan_in)
    (variance-preserving), so from the first step the copy's features are
    added to the locked UNet at full strength."""

    name = "controlnet_gaussian"

    def __init__(self, base: Base, *, connection_init_std: float = 0.0, seed: int | None = None, **kw) -> None:
        super().__init__(base, **kw)
        self.connection_init_std = connection_init_std
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for conv in self.connections():
            fan_in = conv.weight[0].numel()
            std = connection_init_std or 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
                if conv.bias is not None:
                    conv.bias.zero_()

    def connections(self) -> list[nn.Conv2d]:
        """The convolutions ControlNet initialises to zero."""
        cn = self.controlnet
        return [cn.controlnet_cond_embedding.conv_out, *cn.controlnet_down_blocks, cn.controlnet_mid_block]


# --------------------------------------------------------------------------
# 3. the condition as extra input channels, on top of plain text-to-image
#    fine-tuning (also used to pre-train a base on the task's images)


@register_method
class UNetFinetuneMethod(ConditioningMethod):
    """Plain text-to-image fine-tuning of the whole UNet; the condition is
    ignored. Used to pre-train a base on a new image domain so that it draws
    the domain but follows no spatial condition. Exports ``unet/``."""

    name = "unet"
    can_unlock = False

    def __init__(self, base: Base, *, learning_rate: float = 1e-5, **_) -> None:
        super().__init__()
        self.unet = base.unet
        self.learning_rate = learning_rate

    def forward(self, noisy_latents, timesteps, text_embeddings, conditioning=None):
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings, return_dict=False)[0]

    def param_groups(self, phase: str) -> list[dict]:
        return [{"name": "unet", "params": list(self.unet.parameters()), "lr": self.learning_rate}]

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def export(self, out_dir: str, unet_changed: bool = False, full_precision_unet=None) -> dict[str, str]:
        udir = os.path.join(out_dir, "unet")
        self.unet.save_pretrained(udir, safe_serialization=True)
        return {"unet": udir}

    def pipeline(self, base: Base):
        return ConditionedSampler(base, self)


@register_method
class ConcatMethod(UNetFinetuneMethod):
    """The condition concatenated to the noisy latents as extra input
    channels of the UNet's ``conv_in``; the whole UNet trains.

    The condition image (3K channels at pixel resolution) is brought to the
    latent grid without loss by space-to-depth (``pixel_unshuffle`` by the
    VAE factor f: 3K*f*f channels). The new input weights start at zero, so
    step 0 is exactly the base model."""

    name = "concat"
    can_unlock = False

    def __init__(self, base: Base, *, conditioning_channels: int = 3, learning_rate: float = 1e-5, **_) -> None:
        super().__init__(base, learning_rate=learning_rate)
        self.factor = vae_scale_factor(base)
        self.conditioning_channels = conditioning_channels
        self.latent_channels = base.unet.config.in_channels
        old = self.unet.conv_in
        extra = conditioning_channels * self.factor**2
        new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, padding=old.padding,
                        stride=old.stride, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, : old.in_channels] = old.weight
            new.bias.copy_(old.bias)
        self.unet.conv_in = new
        self.unet.register_to_config(in_channels=old.in_channels + extra)

    def forward(self, noisy_latents, timesteps, text_embeddings, conditioning):
        cond = F.pixel_unshuffle(conditioning.to(noisy_latents.dtype), self.factor)
        x = torch.cat([noisy_latents, cond], dim=1)
        return self.unet(x, timesteps, encoder_hidden_states=text_embeddings, return_dict=False)[0]

    def export(self, out_dir: str, unet_changed: bool = False, full_precision_unet=None) -> dict[str, str]:
        """``unet/`` (diffusers; ``in_channels`` = latent + condition channels)
        and ``conditioning.json`` describing the input layout."""
        udir = super().export(out_dir)["unet"]
        path = os.path.join(out_dir, "conditioning.json")
        with open(path, "w") as f:
            json.dump({"method": self.name, "input": "concat([latents, pixel_unshuffle(condition, factor)], dim=1)",
                       "latent_channels": self.latent_channels, "conditioning_channels": self.conditioning_channels,
                       "factor": self.factor, "condition_range": [0, 1]}, f, indent=2)
        return {"unet": udir, "config": path}


# --------------------------------------------------------------------------
# 4. ControlNet-lite


class LiteControlEncoder(nn.Module):
    """A small convolutional control encoder: the condition is embedded on
    the latent grid, taken down one stride-2 conv per UNet level, and every
    UNet skip connection and the middle block receive a zero-initialised 1x1
    projection of the features at their resolution."""

    def __init__(self, conditioning_channels: int, width: int, factor: int, specs: list[tuple[int, int]],
                 mid: tuple[int, int], embedding_channels: tuple[int, ...] = (16, 32, 96, 256)) -> None:
        super().__init__()
        self.hint = HintEncoder(conditioning_channels, embedding_channels, width, factor)
        levels = max([lvl for _, lvl in specs] + [mid[1]])
        self.down = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1, stride=2)) for _ in range(levels)
        )
        self.levels = [lvl for _, lvl in specs]
        self.mid_level = mid[1]
        self.zero_convs = nn.ModuleList(_zero(nn.Conv2d(width, ch, 1)) for ch, _ in specs)
        self.mid_conv = _zero(nn.Conv2d(width, mid[0], 1))

    def forward(self, cond: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = [self.hint(cond)]
        for down in self.down:
            feats.append(down(feats[-1]))
        residuals = [conv(feats[lvl]) for conv, lvl in zip(self.zero_convs, self.levels)]
        return residuals, self.mid_conv(feats[self.mid_level])


@register_method
class ControlNetLiteMethod(_DecoderUnlockMixin, ConditioningMethod):
    """ControlNet-lite: :class:`LiteControlEncoder` in place of the trainable
    copy of the UNet encoder; the base stays locked (its decoder can be
    unlocked as with ControlNet). The encoder sees only the condition, not
    the noisy latents or the timestep."""

    name = "controlnet_lite"
    can_unlock = True

    def __init__(self, base: Base, *, conditioning_channels: int = 3, learning_rate: float = 1e-5,
                 unlock_learning_rate: float = 2e-6, lite_channels: int = 64,
                 conditioning_embedding_channels: tuple[int, ...] = (16, 32, 96, 256), **_) -> None:
        super().__init__()
        self.unet = base.unet
        specs, mid = unet_residual_specs(self.unet)
        self.config = {"conditioning_channels": conditioning_channels, "width": lite_channels,
                       "factor": vae_scale_factor(base), "specs": specs, "mid": list(mid),
                       "embedding_channels": list(conditioning_embedding_channels)}
        self.control = LiteControlEncoder(conditioning_channels, lite_channels, vae_scale_factor(base), specs, mid,
                                          tuple(conditioning_embedding_channels))
        self.learning_rate = learning_rate
        self.unlock_learning_rate = unlock_learning_rate

    def forward(self, noisy_latents, timesteps, text_embeddings, conditioning):
        down, mid = self.control(conditioning.to(noisy_latents.dtype))
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0]

    def param_groups(self, phase: str) -> list[dict]:
        return self._groups([{"name": "control", "params": list(self.control.parameters()), "lr": self.learning_rate}], phase)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def export(self, out_dir: str, unet_changed: bool = False, full_precision_unet=None) -> dict[str, str]:
        """``controlnet_lite.safetensors`` + ``controlnet_lite.json`` (the
        arguments of :class:`LiteControlEncoder`) and ``unet/`` if unlocked."""
        paths = _save_module(self.control, out_dir, "controlnet_lite", {"method": self.name, **self.config})
        return {**paths, **self._export_unet(out_dir, unet_changed, full_precision_unet)}

    def pipeline(self, base: Base):
        return ConditionedSampler(base, self)


def load_lite_encoder(out_dir: str) -> LiteControlEncoder:
    """Rebuild the encoder a ``controlnet_lite`` run exported."""
    from safetensors.torch import load_file

    with open(os.path.join(out_dir, "controlnet_lite.json")) as f:
        c = json.load(f)
    enc = LiteControlEncoder(c["conditioning_channels"], c["width"], c["factor"], [tuple(s) for s in c["specs"]],
                             tuple(c["mid"]), tuple(c["embedding_channels"]))
    enc.load_state_dict(load_file(os.path.join(out_dir, "controlnet_lite.safetensors")))
    return enc


# --------------------------------------------------------------------------
# 5. cross-attention adapter


def sincos_2d(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """(h*w, dim) 2-D sine-cosine position embedding (half the channels per axis)."""
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / max(1, quarter))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        ang = coord[:, None] * freq[None]
        parts += [ang.sin(), ang.cos()]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = F.pad(emb, (0, dim - emb.shape[1]))
    return emb.to(dtype)


class CrossAttnAdapter(nn.Module):
    """Extra keys/values for one cross-attention layer, computed from the
    condition tokens; the output projection starts at zero."""

    def __init__(self, token_dim: int, inner_dim: int, query_dim: int) -> None:
        super().__init__()
        self.to_k = nn.Linear(token_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(token_dim, inner_dim, bias=False)
        self.to_out = _zero(nn.Linear(inner_dim, query_dim))


class _AdapterProcessor:
    """Attention processor: the layer's usual attention plus, on
    cross-attention layers (``adapter`` given), attention of its (frozen)
    queries over the condition tokens through the adapter.

    The tokens arrive as ``cross_attention_kwargs`` (``condition_tokens``),
    not through shared state: diffusers hands those kwargs to checkpointed
    blocks, so the backward recomputation under gradient checkpointing sees
    the same tokens as the forward. Self-attention layers get this processor
    too (without an adapter) so that they accept, and ignore, the kwarg."""

    def __init__(self, adapter: CrossAttnAdapter | None = None) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()
        self.adapter = adapter

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 condition_tokens: torch.Tensor | None = None, *args, **kw):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.adapter is None or condition_tokens is None:
            return out
        tokens = condition_tokens
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states)
        hd = q.shape[-1] // heads
        a = self.adapter
        k = a.to_k(tokens.to(q.dtype)).view(b, -1, heads, hd).transpose(1, 2)
        v = a.to_v(tokens.to(q.dtype)).view(b, -1, heads, hd).transpose(1, 2)
        q = q.view(b, n, heads, hd).transpose(1, 2)
        extra = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, heads * hd)
        return out + a.to_out(extra) / attn.rescale_output_factor


@register_method
class CrossAttnAdapterMethod(_DecoderUnlockMixin, ConditioningMethod):
    """Hypernetwork-style adapter: small trainable networks attached to every
    cross-attention layer of the locked UNet. The condition is encoded into
    tokens on a grid (``HintEncoder`` to the latent grid, one more stride-2
    conv, 2-D sine-cosine positions); each cross-attention layer attends
    from its frozen queries to those tokens through its own key/value
    projections, added through a zero-initialised output projection."""

    name = "xattn_adapter"
    can_unlock = True

    def __init__(self, base: Base, *, conditioning_channels: int = 3, learning_rate: float = 1e-5,
                 unlock_learning_rate: float = 2e-6, lite_channels: int = 64,
                 conditioning_embedding_channels: tuple[int, ...] = (16, 32, 96, 256), **_) -> None:
        super().__init__()
        self.unet = base.unet
        self.token_dim = lite_channels
        self.encoder = nn.Sequential(
            HintEncoder(conditioning_channels, tuple(conditioning_embedding_channels), lite_channels, vae_scale_factor(base)),
            nn.SiLU(), nn.Conv2d(lite_channels, lite_channels, 3, padding=1, stride=2),
        )
        adapters, procs = {}, {}
        modules = dict(self.unet.named_modules())
        for name in self.unet.attn_processors:
            attn = modules[name[: -len(".processor")]]
            if name.endswith("attn2.processor"):  # cross-attention
                inner = attn.to_q.out_features
                key = name.replace(".", "_")
                adapters[key] = CrossAttnAdapter(lite_channels, inner, attn.to_out[0].out_features)
                procs[name] = _AdapterProcessor(adapters[key])
            else:
                procs[name] = _AdapterProcessor()
        if not adapters:
            raise ValueError("the UNet has no cross-attention layers for the adapter")
        self.adapters = nn.ModuleDict(adapters)
        self.unet.set_attn_processor(procs)
        self.config = {"method": self.name, "conditioning_channels": conditioning_channels, "token_dim": lite_channels,
                       "embedding_channels": list(conditioning_embedding_channels), "factor": vae_scale_factor(base),
                       "layers": sorted(adapters)}
        self.learning_rate = learning_rate
        self.unlock_learning_rate = unlock_learning_rate

    def tokens(self, conditioning: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(conditioning)
        b, c, h, w = feats.shape
        return feats.flatten(2).transpose(1, 2) + sincos_2d(h, w, c, feats.device, feats.dtype)[None]

    def forward(self, noisy_latents, timesteps, text_embeddings, conditioning):
        tokens = self.tokens(conditioning.to(noisy_latents.dtype))
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings,
                         cross_attention_kwargs={"condition_tokens": tokens}, return_dict=False)[0]

    def param_groups(self, phase: str) -> list[dict]:
        params = list(self.encoder.parameters()) + list(self.adapters.parameters())
        return self._groups([{"name": "adapter", "params": params, "lr": self.learning_rate}], phase)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def export(self, out_dir: str, unet_changed: bool = False, full_precision_unet=None) -> dict[str, str]:
        """``xattn_adapter.safetensors`` (encoder + per-layer adapters) and
        ``xattn_adapter.json``; ``unet/`` if the decoder was unlocked."""
        holder = nn.ModuleDict({"encoder": self.encoder, "adapters": self.adapters})
        paths = _save_module(holder, out_dir, "xattn_adapter", self.config)
        return {**paths, **self._export_unet(out_dir, unet_changed, full_precision_unet)}

    def pipeline(self, base: Base):
        return ConditionedSampler(base, self)
