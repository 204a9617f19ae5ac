"""The training loop: ControlNet on controlset shards, locked then unlocked.

Read top to bottom: setup (distributed, models, optimiser, data), optional
resume, then the loop. One optimiser step = ``gradient_accumulation_steps``
micro-batches; after each step one line goes to ``metrics.jsonl``, and every
``checkpointing_steps`` a resumable checkpoint is written. Resuming restores
the step, the phase, the optimiser/LR/scaler/EMA state, the RNG and the data
position, so the continued run's losses equal an uninterrupted run's.

Multi-GPU: launch with ``torchrun --nproc-per-node N -m controlset train ...``
(any host count); each rank streams its own part of the data and DDP averages
the gradients.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from schemas.errors import UsageError
from training.cache import cached_inputs, empty_prompt_embedding, resolve_cached_latents
from training.config import TrainConfig
from training.data import DataState, SampleSpec, ShardStream, expand_shards, load_validation_samples, make_loader
from training.models import (
    Base,
    ConditioningMethod,
    build_method,
    check_prediction_type,
    denoising_target,
    encode_images,
    encode_prompts,
    load_base,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------
# small pieces


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed() -> Dist:
    """Join the torchrun process group when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
    return d


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Learning-rate multiplier for optimiser step ``step`` (0-based)."""
    warm = cfg.lr_warmup_steps
    if cfg.lr_scheduler != "constant" and warm and step < warm:
        return (step + 1) / warm
    if cfg.lr_scheduler in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warm) / max(1, cfg.max_train_steps - warm))
    if cfg.lr_scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def make_optimizer(cfg: TrainConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    groups = [{**g, "base_lr": g["lr"]} for g in groups]
    kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)


class EMA:
    """Exponential moving average of a list of parameters (fp32 copies).

    With diffusers' warm-up: update ``n`` (0-based) uses the decay
    ``min(decay, (1 + n) / (10 + n))``. Without it the initial weights fade
    only as ``decay ** n`` (at 0.9999, 37% of the average after 10k updates
    would still be the untrained, zero-initialised weights). ``updates`` is
    saved in checkpoints so that a resumed average continues exactly."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """``scaler.step`` then ``scaler.update``; False when the fp16 grad scaler
    skipped the step (inf/NaN gradients), which it signals only by lowering
    its scale."""
    before = scaler.get_scale()  # 1.0 without a sync when the scaler is off
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before


@dataclass
class TrainState:
    """What, besides weights and optimiser, a checkpoint must restore."""

    step: int = 0
    phase: str = "locked"
    data: DataState = field(default_factory=DataState)


# --------------------------------------------------------------------------
# checkpoints


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints (those with ``state.json``), oldest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        name = os.path.basename(path)
        if name.split("-", 1)[1].isdigit() and os.path.exists(os.path.join(path, "state.json")):
            found.append((int(name.split("-", 1)[1]), path))
    return [p for _, p in sorted(found)]


def save_checkpoint(cfg, d: Dist, state: TrainState, method, optimizer, scaler, ema, generator) -> str:
    from safetensors.torch import save_file

    final = os.path.join(cfg.output_dir, f"checkpoint-{state.step}")
    tmp = final + ".tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        weights = {k: v.contiguous() for k, v in method.trainable_state_dict(state.phase).items()}
        save_file(weights, os.path.join(tmp, "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}, os.path.join(tmp, "optimizer.pt"))
        if ema is not None:
            save_file({str(i): s.contiguous() for i, s in enumerate(ema.shadow)}, os.path.join(tmp, "ema.safetensors"))
    d.barrier()
    rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"rng": rng, "data": json.dumps(state.data.to_dict())}, os.path.join(tmp, f"rank-{d.rank}.pt"))
    d.barrier()
    if d.main:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": state.step, "phase": state.phase, "world_size": d.world_size,
                       "dataloader_num_workers": cfg.dataloader_num_workers, "method": cfg.method,
                       "ema_updates": ema.updates if ema is not None else 0}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if cfg.checkpoints_total_limit:
            for old in list_checkpoints(cfg.output_dir)[: -cfg.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved %s", final)
    d.barrier()
    return final


def find_resume(cfg: TrainConfig) -> str | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = list_checkpoints(cfg.output_dir)
        if not found:
            log.info("no checkpoint in %s: starting from scratch", cfg.output_dir)
            return None
        return found[-1]
    path = cfg.resume_from_checkpoint
    if not os.path.exists(os.path.join(path, "state.json")):
        path = os.path.join(cfg.output_dir, path)
    if not os.path.exists(os.path.join(path, "state.json")):
        raise UsageError(f"--resume-from-checkpoint {cfg.resume_from_checkpoint}: no checkpoint there")
    return path


def check_fresh_output_dir(cfg: TrainConfig, d: Dist) -> None:
    """Before a fresh (non-resumed) run: refuse an ``--output-dir`` holding
    another run's checkpoints, or delete them with ``--overwrite-output-dir``.

    Mixed runs break the checkpoints: rotation keeps the highest step numbers
    (deleting the new run's) and ``--resume-from-checkpoint latest`` would
    pick the old run's."""
    old = list_checkpoints(cfg.output_dir)
    if not old:
        return
    if not cfg.overwrite_output_dir:
        names = ", ".join(os.path.basename(p) for p in old)
        raise UsageError(
            f"--output-dir {cfg.output_dir} already holds checkpoints of an earlier run ({names}). "
            "To continue that run pass --resume-from-checkpoint latest; to start a new one use another "
            "(or an empty) --output-dir, or pass --overwrite-output-dir to delete those checkpoints"
        )
    d.barrier()  # every rank has looked before rank 0 deletes
    if d.main:
        log.warning("--overwrite-output-dir: deleting %d checkpoint(s) of an earlier run in %s", len(old), cfg.output_dir)
        for path in old:
            shutil.rmtree(path)
    d.barrier()


def read_checkpoint_state(path: str, cfg: TrainConfig, d: Dist) -> tuple[TrainState, dict]:
    """The step, phase and this rank's data position of checkpoint ``path``;
    also its RNG state (``rng``) and its ``state.json`` (``meta``)."""
    with open(os.path.join(path, "state.json")) as f:
        meta = json.load(f)
    if meta.get("method", cfg.method) != cfg.method:  # checkpoints before the key existed are not checked
        raise UsageError(f"checkpoint {path} was trained with --method {meta['method']}, not --method {cfg.method}")
    for key, now in (("world_size", d.world_size), ("dataloader_num_workers", cfg.dataloader_num_workers)):
        if meta[key] != now:
            log.warning("checkpoint was written with %s=%s, now %s: the data order will differ", key, meta[key], now)
    rank_file = os.path.join(path, f"rank-{d.rank}.pt")
    extra = torch.load(rank_file, map_location="cpu", weights_only=True) if os.path.exists(rank_file) else {}
    data = DataState.from_dict(json.loads(extra["data"])) if "data" in extra else DataState()
    return TrainState(step=int(meta["step"]), phase=meta["phase"], data=data), {**extra, "meta": meta}


def truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint we
    resume; ``step`` -1 drops all of them, for a fresh run)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(lines)


# --------------------------------------------------------------------------
# validation


@torch.no_grad()
def validate(cfg, base: Base, method: ConditioningMethod, samples: list[dict], step: int, device, dtype, writer) -> str:
    """Generate one image per held-out sample with classifier-free guidance;
    save rows of (condition(s) | sample) as ``validation/step-NNNNNN.png``."""
    import numpy as np
    from PIL import Image

    method.eval()
    pipe = method.pipeline(base)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    rows = []
    for s in samples:
        cond = torch.from_numpy(s["conditioning"])[None].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = pipe(
                s["caption"], image=cond, num_inference_steps=cfg.validation_inference_steps,
                guidance_scale=cfg.validation_guidance_scale, generator=gen, output_type="np",
                height=cfg.resolution, width=cfg.resolution,
            ).images[0]
        tiles = [s["conditioning"][i : i + 3].transpose(1, 2, 0) for i in range(0, s["conditioning"].shape[0], 3)]
        rows.append(np.concatenate(tiles + [out], axis=1))
    method.train()
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
    path = os.path.join(cfg.output_dir, "validation", f"step-{step:06d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path)
    if writer is not None:
        writer.add_image("validation", grid, step, dataformats="HWC")
    return path


def make_writer(cfg: TrainConfig):
    if cfg.report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: logging to metrics.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(os.path.join(cfg.output_dir, "logs"))


# --------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig, callback=None) -> dict:
    """Train as configured; returns a summary (final step, exports, paths).

    ``callback(step, method, base, device, dtype) -> dict | None``, when
    given, runs on rank 0 before the first step (step 0, fresh runs only) and
    after every optimiser step; what it returns is added to that step's
    ``metrics.jsonl`` line (evaluations such as condition fidelity). Its time
    is excluded from ``images_per_s``."""
    cfg.validate()
    d = setup_distributed()
    device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision(cfg.mixed_precision, device)
    if device.type == "cuda" and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda":
        # every step has the same shapes: let cuDNN time its convolution algorithms once
        torch.backends.cudnn.benchmark = True
    os.makedirs(cfg.output_dir, exist_ok=True)
    resume = find_resume(cfg)
    if not resume:
        check_fresh_output_dir(cfg, d)
    torch.manual_seed(cfg.seed + d.rank)

    # Models. Frozen parts in the reduced precision; trained ones in fp32.
    base = load_base(cfg.base, cfg.base_config, cfg.base_original_config)
    check_prediction_type(base.noise_scheduler)
    method = build_method(
        cfg.method, base, conditioning_channels=3 * len(cfg.condition), learning_rate=cfg.learning_rate,
        unlock_learning_rate=cfg.unlock_learning_rate, only_mid_control=cfg.only_mid_control,
        controlnet_path=cfg.controlnet, conditioning_embedding_channels=tuple(cfg.conditioning_embedding_channels),
        connection_init_std=cfg.connection_init_std, lite_channels=cfg.lite_channels,
    )
    if cfg.controlnet and cfg.method not in ("controlnet", "controlnet_gaussian"):
        raise UsageError(f"--controlnet initialises a ControlNet; --method {cfg.method} has none")
    if cfg.unlock_at is not None and not method.can_unlock:
        raise UsageError(f"--method {cfg.method} trains the whole UNet already: --unlock-at does not apply")
    # Cached latents (``--cached-latents``): checked against this base before
    # its frozen parts are cast.
    shard_urls = expand_shards(cfg.shards)
    cache_fingerprint = resolve_cached_latents(cfg.cached_latents, shard_urls, base, cfg.resolution)
    cached = cache_fingerprint is not None
    validating = bool(cfg.validation_steps and cfg.validation_shards)
    base.vae.requires_grad_(False).eval()
    base.text_encoder.requires_grad_(False).eval()
    empty_embedding = None
    if cached:
        log.info("reading cached latents and text embeddings from the shards%s",
                 "" if cfg.center_crop else " (centre crops: random crops need --cached-latents off)")
        base.text_encoder.to(device, dtype=dtype)
        empty_embedding = empty_prompt_embedding(base, device, dtype)
    if not cached or validating or callback is not None:
        base.vae.to(device, dtype=dtype)
        base.text_encoder.to(device, dtype=dtype)
    else:  # neither runs again: keep them off the accelerator
        base.text_encoder.to("cpu")
    method.cast_frozen(dtype, will_unlock=cfg.unlock_at is not None)
    method.to(device)
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        method.enable_gradient_checkpointing()
    method.train()
    noise_scheduler = base.noise_scheduler

    # Resume: weights now, optimiser state once the optimiser exists.
    state, resume_extra = TrainState(), {}
    if resume:
        from safetensors.torch import load_file

        state, resume_extra = read_checkpoint_state(resume, cfg, d)
        weights = load_file(os.path.join(resume, "trainable.safetensors"))
        # strict=False because frozen weights are not in checkpoints; every
        # weight the phase trains must be, or it would silently restart.
        absent = sorted(set(method.trainable_state_dict(state.phase)) - set(weights))
        if absent:
            raise UsageError(f"checkpoint {resume} lacks {len(absent)} weight(s) trained in the {state.phase} phase: "
                             f"{absent[:3]} ...")
        missing = method.load_state_dict(weights, strict=False)
        if missing.unexpected_keys:
            raise UsageError(f"checkpoint {resume} does not fit this model: {missing.unexpected_keys[:3]} ...")
        log.info("resuming from %s at step %d (%s)", resume, state.step, state.phase)

    method.set_phase(state.phase)
    optimizer = make_optimizer(cfg, method.param_groups("locked"), device)
    if state.phase == "unlocked":
        optimizer.add_param_group({**method.param_groups("unlocked")[-1], "base_lr": cfg.unlock_learning_rate})
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = EMA(method.param_groups("locked")[0]["params"], cfg.ema_decay) if cfg.use_ema else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + d.rank)
    if resume:
        opt = torch.load(os.path.join(resume, "optimizer.pt"), map_location=device, weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scaler.load_state_dict(opt["scaler"])
        if ema is not None and os.path.exists(os.path.join(resume, "ema.safetensors")):
            from safetensors.torch import load_file

            shadow = load_file(os.path.join(resume, "ema.safetensors"), device=str(device))
            ema.shadow = [shadow[str(i)] for i in range(len(ema.shadow))]
            # Checkpoints written before the count was saved: one update per step.
            ema.updates = int(resume_extra["meta"].get("ema_updates", state.step))
        if "rng" in resume_extra:
            torch.set_rng_state(resume_extra["rng"]["torch"])
            generator.set_state(resume_extra["rng"]["generator"])
            if "cuda" in resume_extra["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state(resume_extra["rng"]["cuda"])

    def wrap(module):
        if d.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(module, device_ids=[d.local_rank] if device.type == "cuda" else None)
        return torch.compile(module) if cfg.torch_compile else module

    model = wrap(method)

    # Data.
    spec = SampleSpec(tuple(cfg.condition), cfg.resolution, cfg.random_flip, cfg.center_crop, cfg.proportion_empty_prompts,
                      cached=cached, cache_fingerprint=cache_fingerprint)
    stream = ShardStream(
        shard_urls, spec, cfg.train_batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
        num_workers=cfg.dataloader_num_workers, shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled,
        state=DataState.from_dict(state.data.to_dict()),
    )
    batches = iter(make_loader(stream))
    val_samples = []
    if validating and d.main:
        val_samples = load_validation_samples(cfg.validation_shards, spec, cfg.num_validation_images)
    elif cfg.validation_steps and d.main:
        log.info("no --validation-shards: skipping validation")

    metrics_path = os.path.join(cfg.output_dir, METRICS_FILE)
    if d.main:
        truncate_metrics(metrics_path, state.step if resume else -1)
        with open(os.path.join(cfg.output_dir, "train_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    writer = make_writer(cfg) if d.main else None
    global_batch = cfg.train_batch_size * cfg.gradient_accumulation_steps * d.world_size
    log.info("training %s from step %d to %d, global batch %d, %s", cfg.method, state.step, cfg.max_train_steps, global_batch, dtype)

    if callback is not None and d.main and state.step == 0:
        extra = callback(0, method, base, device, dtype)
        if extra:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": 0, **extra}) + "\n")
        method.train()

    scaling_factor = base.vae.config.scaling_factor

    def model_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The one place a batch becomes (latents, text embeddings), for every
        method: cached members, or the VAE and text encoder run now. Both
        routes draw the latent sample from ``generator`` first."""
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if "latents" in batch:
                return cached_inputs(batch, generator, device, scaling_factor=scaling_factor,
                                     empty_embedding=empty_embedding, dtype=dtype)
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            latents = encode_images(base, pixels, generator).float()
            return latents, encode_prompts(base, batch["captions"], device)

    last = time.perf_counter()
    while state.step < cfg.max_train_steps:
        event = None
        if state.phase == "locked" and cfg.unlock_at is not None and state.step >= cfg.unlock_at:
            # Unlock the SD decoder half: new parameter group, new DDP wrapper.
            state.phase = "unlocked"
            method.set_phase("unlocked")
            group = method.param_groups("unlocked")[-1]
            optimizer.add_param_group({**group, "base_lr": group["lr"]})
            model = wrap(method)
            event = "unlocked"
            log.info("step %d: unlocked the SD decoder (%s, lr %g)", state.step, group["name"], group["lr"])

        factor = lr_factor(cfg, state.step)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor

        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            state.data.update(batch)
            cond = batch["conditioning"].to(device, non_blocking=True)
            if cfg.channels_last:
                cond = cond.contiguous(memory_format=torch.channels_last)
            latents, text = model_inputs(batch)
            noise = torch.randn(latents.shape, generator=generator, device=device)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            target = denoising_target(noise_scheduler, latents, noise, t)
            last_micro = micro == cfg.gradient_accumulation_steps - 1
            sync = contextlib.nullcontext() if last_micro or d.world_size == 1 else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    pred = model(noisy, t, text, cond)
                loss = F.mse_loss(pred.float(), target.float())
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
            loss_sum += loss.detach()

        params = [p for g in optimizer.param_groups for p in g["params"]]
        if cfg.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        stepped = optimizer_step(optimizer, scaler)
        optimizer.zero_grad(set_to_none=True)
        if ema is not None and stepped:  # a skipped fp16 step left the weights as they were
            ema.update()
        state.step += 1

        loss_avg = loss_sum / cfg.gradient_accumulation_steps
        skipped = state.data.skipped
        if d.world_size > 1:
            # One collective for both: the mean loss and the total skipped samples of all ranks.
            totals = torch.stack([loss_avg, torch.tensor(float(skipped), device=device)])
            dist.all_reduce(totals)
            loss_avg, skipped = totals[0] / d.world_size, int(totals[1].round())
        now = time.perf_counter()
        record = {
            "step": state.step,
            "loss": float(loss_avg),
            "phase": state.phase,
            "trainable_params": sum(p.numel() for p in params),
            "images_per_s": global_batch / max(now - last, 1e-9),
            "skipped_samples": skipped,
            **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
        }
        if event:
            record["event"] = event
        last = now
        if callback is not None and d.main:
            record.update(callback(state.step, method, base, device, dtype) or {})
            method.train()
        if d.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        writer.add_scalar(f"train/{k}", v, state.step)
        if not math.isfinite(record["loss"]):
            log.warning("step %d: loss is %s", state.step, record["loss"])

        if state.step % cfg.checkpointing_steps == 0 or state.step == cfg.max_train_steps:
            save_checkpoint(cfg, d, state, method, optimizer, scaler, ema, generator)
        if val_samples and cfg.validation_steps and state.step % cfg.validation_steps == 0:
            path = validate(cfg, base, method, val_samples, state.step, device, dtype, writer)
            log.info("step %d: validation images in %s", state.step, path)
        last = time.perf_counter()  # images/s measures training, not checkpoints or validation

    summary = {"rank": d.rank, "step": state.step, "phase": state.phase, "output_dir": cfg.output_dir, "metrics": metrics_path}
    if cfg.export and d.main:
        if ema is not None:
            ema.copy_to_params()  # export the averaged weights
        unlocked = state.phase == "unlocked"
        full = None
        if unlocked and dtype != torch.float32:
            full = load_base(cfg.base, cfg.base_config, cfg.base_original_config).unet
        summary["exports"] = method.export(cfg.output_dir, unet_changed=unlocked, full_precision_unet=full)
        log.info("exported %s", summary["exports"])
    if writer is not None:
        writer.close()
    d.barrier()
    return summary
