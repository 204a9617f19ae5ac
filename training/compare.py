"""``controlset compare``: ControlNet against its alternatives on one task.

One YAML file describes the whole experiment (see ``bench/compare_gpu.yaml``
and ``docs/comparison.md``):

1. the task's shards: generated (``task: {kind: shapes, ...}``, see
   :mod:`training.tasks`) or given (``data: {train: [...], val: [...]}``,
   e.g. shards written by ``controlset annotate``);
2. the base: a small SD-shaped model pre-trained on the task's images
   (autoencoder, then text-to-image UNet; :mod:`training.pretrain`), or an
   existing one (``base: {pretrained: DIR}``);
3. every entry of ``methods`` trained from that base with the ordinary
   trainer and the same seed, data order, batch and steps; every
   ``eval.every`` steps the held-out conditions are sampled with the same
   seeded noise and sampler, the condition's annotator is run on the
   samples and compared with the conditions (:mod:`training.fidelity`), and
   the held-out denoising loss is measured;
4. the report: ``report.md`` (table), ``results.json`` (everything,
   machine-readable, with device, date and command), ``convergence.png``
   and ``grids/*.png`` sample grids.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time

import numpy as np
import torch

from schemas.errors import UsageError

log = logging.getLogger(__name__)

_TOP_KEYS = {"output_dir", "seed", "condition", "task", "data", "base", "train", "eval", "methods", "annotator_options",
             "gpus", "methods_per_gpu"}
_TASK_KEYS = {"kind", "n_train", "n_val", "size", "per_shard"}
_BASE_KEYS = {"pretrained", "preset", "seed", "autoencoder", "text_to_image"}
_AE_KEYS = {"steps", "batch_size", "learning_rate", "kl_weight"}


@dataclasses.dataclass
class EvalSettings:
    """How and how often fidelity is measured."""

    every: int = 100
    num_images: int = 16
    batch_size: int = 16
    inference_steps: int = 20
    guidance_scale: float = 4.0
    tolerance: float = 2.0
    threshold: float = 0.5
    grid_images: int = 8
    loss_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)

    @classmethod
    def from_dict(cls, d: dict | None) -> "EvalSettings":
        """From the config's ``eval`` mapping (or :func:`dataclasses.asdict`)."""
        return cls(**{k: tuple(v) if k == "loss_timesteps" else v for k, v in (d or {}).items()})


def load_config(path: str) -> dict:
    """Read and check a compare YAML file."""
    from schemas.files import read_yaml_mapping

    cfg = read_yaml_mapping(path)
    check_config(cfg, path)
    return cfg


def check_config(cfg: dict, where: str = "config") -> None:
    """Raise :class:`UsageError` for unknown keys, methods or options."""
    from training.config import TrainConfig
    from training.models import METHODS

    def unknown(got, known, what):
        bad = sorted(set(got) - set(known))
        if bad:
            raise UsageError(f"{where}: unknown {what} key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")

    unknown(cfg, _TOP_KEYS, "top-level")
    if not cfg.get("methods"):
        raise UsageError(f"{where}: 'methods' must list at least one method")
    if "task" not in cfg and not cfg.get("data"):
        raise UsageError(f"{where}: give 'task' (generate shards) or 'data' (train/val shards)")
    unknown(cfg.get("task") or {}, _TASK_KEYS, "task")
    if (cfg.get("task") or {}).get("kind", "shapes") != "shapes":
        raise UsageError(f"{where}: task kind must be 'shapes'")
    if cfg.get("data"):
        unknown(cfg["data"], {"train", "val"}, "data")
        if not cfg["data"].get("train") or not cfg["data"].get("val"):
            raise UsageError(f"{where}: data needs both 'train' and 'val' shards")
    base = cfg.get("base") or {}
    unknown(base, _BASE_KEYS, "base")
    unknown(base.get("autoencoder") or {}, _AE_KEYS, "base.autoencoder")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    norm = lambda d: {str(k).replace("-", "_") for k in (d or {})}  # noqa: E731
    unknown(norm(base.get("text_to_image")), fields, "base.text_to_image")
    unknown(norm(cfg.get("train")), fields, "train")
    unknown(cfg.get("eval") or {}, {f.name for f in dataclasses.fields(EvalSettings)}, "eval")
    labels = set()
    for m in cfg["methods"]:
        if not isinstance(m, dict) or "method" not in m:
            raise UsageError(f"{where}: each method needs at least 'method' (and optionally 'label' and trainer options)")
        if m["method"] not in METHODS:
            raise UsageError(f"{where}: unknown method {m['method']!r}; available: {', '.join(sorted(METHODS))}")
        unknown(norm({k: v for k, v in m.items() if k != "label"}), fields, f"method {m.get('label', m['method'])}")
        label = m.get("label", m["method"])
        if label in labels:
            raise UsageError(f"{where}: duplicate method label {label!r}")
        labels.add(label)


def _norm(d: dict | None) -> dict:
    return {str(k).replace("-", "_"): v for k, v in (d or {}).items()}


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "method"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _to_uint8(images) -> list[np.ndarray]:
    return [(np.clip(np.asarray(i, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8) for i in images]


def condition_map(conditioning: np.ndarray) -> np.ndarray:
    """A stored condition back from the trainer's 3xHxW [0, 1] tensor: HxW
    uint8 when its channels are equal (edge maps), else HxWx3."""
    c = (np.clip(conditioning[:3], 0, 1) * 255).round().astype(np.uint8)
    if np.array_equal(c[0], c[1]) and np.array_equal(c[0], c[2]):
        return c[0]
    return c.transpose(1, 2, 0)


# --------------------------------------------------------------------------
# evaluation


class Evaluator:
    """Samples the held-out conditions with fixed noise and scores them."""

    def __init__(self, samples: list[dict], meter, settings: EvalSettings, seed: int) -> None:
        self.captions = [s["caption"] for s in samples]
        self.conditioning = torch.from_numpy(np.stack([s["conditioning"] for s in samples]))
        self.pixels = torch.from_numpy(np.stack([s["pixel_values"] for s in samples]))
        self.cond_maps = [condition_map(s["conditioning"]) for s in samples]
        self.targets = _to_uint8([(s["pixel_values"].transpose(1, 2, 0) + 1) / 2 for s in samples])
        self.meter = meter
        self.settings = settings
        self.seed = seed

    @torch.no_grad()
    def sample(self, base, method, device, dtype) -> list[np.ndarray]:
        """One image per held-out sample (uint8 HxWx3), same noise every call."""
        from training.methods import ConditionedSampler

        method.eval()
        sampler = ConditionedSampler(base, method)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        out = []
        bs = self.settings.batch_size
        for i in range(0, len(self.captions), bs):
            cond = self.conditioning[i : i + bs].to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                images = sampler(self.captions[i : i + bs], image=cond, num_inference_steps=self.settings.inference_steps,
                                 guidance_scale=self.settings.guidance_scale, generator=gen).images
            out += _to_uint8(images)
        return out

    @torch.no_grad()
    def heldout_loss(self, base, method, device, dtype) -> float:
        """Denoising MSE on the held-out samples at fixed timesteps and noise."""
        from training.models import denoising_target, encode_images, encode_prompts

        method.eval()
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        losses = []
        bs = self.settings.batch_size
        for i in range(0, len(self.captions), bs):
            pixels = self.pixels[i : i + bs].to(device)
            cond = self.conditioning[i : i + bs].to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                latents = encode_images(base, pixels, torch.Generator(device=device).manual_seed(self.seed + i)).float()
                text = encode_prompts(base, self.captions[i : i + bs], device)
                for t in self.settings.loss_timesteps:
                    noise = torch.randn(latents.shape, generator=gen).to(device)
                    tt = torch.full((latents.shape[0],), int(t), device=device, dtype=torch.long)
                    noisy = base.noise_scheduler.add_noise(latents, noise, tt)
                    target = denoising_target(base.noise_scheduler, latents, noise, tt)
                    pred = method(noisy, tt, text, cond).float()
                    losses.append(float(torch.nn.functional.mse_loss(pred, target.float())) * latents.shape[0])
        return sum(losses) / (len(self.captions) * len(self.settings.loss_timesteps))

    def evaluate(self, base, method, device, dtype) -> tuple[dict, list[np.ndarray]]:
        images = self.sample(base, method, device, dtype)
        scores = self.meter.score(images, self.cond_maps)
        scores["heldout_loss"] = self.heldout_loss(base, method, device, dtype)
        return scores, images


# --------------------------------------------------------------------------
# figures


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo if hi > lo else 1.0
    raw = span / n
    mag = 10 ** np.floor(np.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(start, hi + step * 1e-6, step)]


def draw_panel(series: list[tuple[str, list[float], list[float]]], title: str, ylabel: str, *,
               hlines: list[tuple[str, float]] = (), size=(640, 420), ylim: tuple[float, float] | None = None):
    """One line chart as a PIL image: ``series`` = (label, xs, ys); dashed
    horizontal reference lines ``hlines`` = (label, y)."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(14), _font(12)
    left, right, top, bottom = 62, 16, 30, 118
    pw, ph = w - left - right, h - top - bottom
    xs_all = [x for _, xs, _ in series for x in xs] or [0, 1]
    ys_all = [y for _, _, ys in series for y in ys if np.isfinite(y)] + [y for _, y in hlines if np.isfinite(y)]
    x0, x1 = min(xs_all), max(max(xs_all), min(xs_all) + 1)
    if ylim:
        y0, y1 = ylim
    else:
        y0, y1 = (min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0)
        pad = (y1 - y0) * 0.08 or 0.5
        y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph

    d.text((left, 6), title, fill="black", font=f)
    for yt in _nice_ticks(y0, y1):
        _, py = px(x0, yt)
        d.line([(left, py), (left + pw, py)], fill=(225, 225, 225))
        d.text((4, py - 7), f"{yt:.3g}", fill="black", font=fs)
    for xt in _nice_ticks(x0, x1, 6):
        pxx, _ = px(xt, y0)
        d.line([(pxx, top), (pxx, top + ph)], fill=(235, 235, 235))
        d.text((pxx - 10, top + ph + 4), f"{xt:g}", fill="black", font=fs)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    d.text((left + pw // 2 - 14, top + ph + 20), "step", fill="black", font=fs)
    d.text((left, top + ph + 20), ylabel, fill=(80, 80, 80), font=fs)
    for i, (label, y) in enumerate(hlines):
        if not np.isfinite(y) or not y0 <= y <= y1:
            continue
        _, py = px(x0, y)
        for sx in range(left, left + pw, 10):
            d.line([(sx, py), (min(sx + 5, left + pw), py)], fill=(90, 90, 90), width=1)
        d.text((left + pw - 6 - d.textlength(label, font=fs), py - 15), label, fill=(90, 90, 90), font=fs)
    legend_y = top + ph + 40
    for i, (label, xs, ys) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        pts = [px(x, y) for x, y in zip(xs, ys) if np.isfinite(y)]
        pts = [(x, min(max(y, top), top + ph)) for x, y in pts]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        col, row = i % 3, i // 3
        lx, ly = left + col * (pw // 3), legend_y + row * 16
        d.line([(lx, ly + 7), (lx + 18, ly + 7)], fill=colour, width=3)
        d.text((lx + 22, ly), label[:28], fill="black", font=fs)
    return img


def tile_grid(columns: list[tuple[str, list[np.ndarray]]], min_tile: int = 96):
    """A grid image: one titled column per ``(title, images)``, one row per sample."""
    from PIL import Image, ImageDraw

    rows = min(len(c[1]) for c in columns)
    h0, w0 = columns[0][1][0].shape[:2]
    k = max(1, int(np.ceil(min_tile / max(h0, w0))))
    th, tw = h0 * k, w0 * k
    head = 20
    grid = Image.new("RGB", (tw * len(columns), head + th * rows), "white")
    d = ImageDraw.Draw(grid)
    f = _font(12)
    for c, (title, images) in enumerate(columns):
        d.text((c * tw + 3, 3), title[: max(4, tw // 7)], fill="black", font=f)
        for r in range(rows):
            a = images[r]
            if a.ndim == 2:
                a = np.stack([a] * 3, -1)
            grid.paste(Image.fromarray(a).resize((tw, th), Image.NEAREST), (c * tw, head + r * th))
    return grid


# --------------------------------------------------------------------------
# the run


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def prepare_data(cfg: dict, out: str) -> dict[str, list[str]]:
    """The train and held-out shards: the given ones, or the generated task."""
    if cfg.get("data"):
        from training.data import expand_shards

        return {"train": list(cfg["data"]["train"]) if isinstance(cfg["data"]["train"], list) else [cfg["data"]["train"]],
                "val": expand_shards(cfg["data"]["val"])}
    from training.tasks import write_shapes_task

    task = {k: v for k, v in (cfg.get("task") or {}).items() if k != "kind"}
    return write_shapes_task(os.path.join(out, "data"), seed=int(cfg.get("seed", 0)), **task)


def prepare_base(cfg: dict, out: str, shards: dict, train_common: dict) -> tuple[str, dict]:
    """The pre-trained base folder (reused when the same recipe already ran)."""
    from training.config import TrainConfig
    from training.pretrain import assemble_base, train_autoencoder
    from training.tiny import write_tiny_base
    from training.train import train

    base_cfg = cfg.get("base") or {}
    if base_cfg.get("pretrained"):
        return base_cfg["pretrained"], {"pretrained": base_cfg["pretrained"]}
    root = os.path.join(out, "base")
    final = os.path.join(root, "pretrained")
    recipe = {"base": base_cfg, "shards": shards["train"], "train": train_common, "seed": cfg.get("seed", 0),
              "condition": cfg.get("condition", "canny")}
    stamp = os.path.join(final, "controlset_recipe.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            prev = json.load(f)
        if prev.get("hash") == _hash(recipe):
            log.info("reusing the pre-trained base in %s", final)
            return final, prev["summary"]
    t0 = time.perf_counter()
    random_dir = write_tiny_base(os.path.join(root, "random"), seed=int(base_cfg.get("seed", 0)),
                                 preset=base_cfg.get("preset", "tiny"))
    res = int(train_common.get("resolution", 64))
    workers = int(train_common.get("dataloader_num_workers", 2))
    ae = {"steps": 1000, "batch_size": 32, "learning_rate": 1e-3, **(base_cfg.get("autoencoder") or {})}
    ae_summary = train_autoencoder(random_dir, shards["train"], os.path.join(root, "autoencoder"),
                                   condition=cfg.get("condition", "canny"), resolution=res, seed=int(cfg.get("seed", 0)),
                                   num_workers=workers, mixed_precision=train_common.get("mixed_precision", "auto"),
                                   steps=int(ae["steps"]), batch_size=int(ae["batch_size"]),
                                   learning_rate=float(ae["learning_rate"]), kl_weight=float(ae.get("kl_weight", 1e-6)))
    with_vae = assemble_base(random_dir, os.path.join(root, "with-vae"), vae_dir=os.path.join(root, "autoencoder", "vae"))
    t2i_out = os.path.join(root, "text-to-image")
    shutil.rmtree(t2i_out, ignore_errors=True)
    t2i = {**train_common, "proportion_empty_prompts": 0.1, "learning_rate": 2e-4, **_norm(base_cfg.get("text_to_image"))}
    t2i.update(base=with_vae, shards=shards["train"], output_dir=t2i_out, method="unet", condition=[cfg.get("condition", "canny")],
               seed=int(cfg.get("seed", 0)), validation_steps=0, report_to="none", export=True, unlock_at=None,
               resume_from_checkpoint=None, checkpoints_total_limit=1)
    t2i.setdefault("checkpointing_steps", int(t2i.get("max_train_steps", 1000)))
    t_cfg = TrainConfig(**t2i)
    t0_t2i = time.perf_counter()
    train(t_cfg)
    t2i_s = time.perf_counter() - t0_t2i
    rows = _read_metrics(t2i_out)
    assemble_base(with_vae, final, unet_dir=os.path.join(t2i_out, "unet"))
    summary = {
        "preset": base_cfg.get("preset", "tiny"),
        "autoencoder": ae_summary,
        "text_to_image": {"steps": t_cfg.max_train_steps, "final_loss": _tail_mean([r["loss"] for r in rows if "loss" in r]),
                          "learning_rate": t_cfg.learning_rate, "batch_size": t_cfg.train_batch_size, "seconds": t2i_s},
        "seconds": time.perf_counter() - t0,
    }
    with open(stamp, "w") as f:
        json.dump({"hash": _hash(recipe), "recipe": recipe, "summary": summary}, f, indent=2, default=str)
    return final, summary


def _read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _tail_mean(values: list[float], frac: float = 0.1) -> float | None:
    if not values:
        return None
    k = max(1, int(len(values) * frac))
    return float(np.mean(values[-k:]))


def steps_to_threshold(curve: list[dict], threshold: float) -> int | None:
    """First evaluated step whose fidelity reaches ``threshold`` (None: never)."""
    for point in curve:
        if point["fidelity"] >= threshold:
            return int(point["step"])
    return None


def run_method(entry: dict, *, base_dir: str, shards: dict, train_common: dict, evaluator: Evaluator,
               settings: EvalSettings, out: str, seed: int, condition: str) -> dict:
    """Train one method with fidelity evaluations; its row of the results."""
    from training.config import TrainConfig
    from training.train import train

    label = entry.get("label", entry["method"])
    run_dir = os.path.join(out, "runs", _slug(label))
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh, seeded run (metrics.jsonl appends)
    opts = {"export": False, **train_common, **_norm({k: v for k, v in entry.items() if k != "label"})}
    opts.update(base=base_dir, shards=shards["train"], output_dir=run_dir, condition=[condition], seed=seed,
                validation_steps=0, report_to="none", resume_from_checkpoint=None, checkpoints_total_limit=1)
    opts.setdefault("checkpointing_steps", int(opts.get("max_train_steps", 1000)))
    cfg = TrainConfig(**opts)
    curve: list[dict] = []
    state = {"peak": 0, "images": None}

    def callback(step, method, base, device, dtype):
        if device.type == "cuda":
            state["peak"] = max(state["peak"], torch.cuda.max_memory_allocated(device))
        if step % settings.every and step != cfg.max_train_steps:
            return None
        t0 = time.perf_counter()
        scores, images = evaluator.evaluate(base, method, device, dtype)
        state["images"] = images
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)  # the training peak, not evaluation's
        point = {"step": step, **scores, "eval_s": time.perf_counter() - t0}
        curve.append(point)
        log.info("%s step %d: fidelity %.4f, held-out loss %.4f", label, step, scores["fidelity"], scores["heldout_loss"])
        return {k: v for k, v in scores.items()}

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(cfg, callback=callback)
    wall = time.perf_counter() - t0
    rows = [r for r in _read_metrics(run_dir) if "loss" in r]
    global_batch = cfg.train_batch_size * cfg.gradient_accumulation_steps
    times = [global_batch / r["images_per_s"] for r in rows if r.get("images_per_s")]
    warm = times[min(len(times) - 1, max(1, len(times) // 10)):] if times else []
    final = curve[-1] if curve else {}
    result = {
        "label": label,
        "method": cfg.method,
        "unlock_at": cfg.unlock_at,
        "learning_rate": cfg.learning_rate,
        "steps": cfg.max_train_steps,
        "batch_size": global_batch,
        "trainable_params": max((r["trainable_params"] for r in rows), default=None),
        "trainable_params_start": rows[0]["trainable_params"] if rows else None,
        "steps_to_threshold": steps_to_threshold(curve, settings.threshold),
        "final_fidelity": final.get("fidelity"),
        "best_fidelity": max((p["fidelity"] for p in curve), default=None),
        "final_chamfer": final.get("chamfer"),
        "final_heldout_loss": final.get("heldout_loss"),
        "final_train_loss": _tail_mean([r["loss"] for r in rows]),
        "step_time_ms": float(np.median(warm)) * 1000 if warm else None,
        "peak_memory_mib": state["peak"] / 2**20 if state["peak"] else None,
        "wall_s": wall,
        "curve": curve,
        "run_dir": run_dir,
    }
    if state["images"] is not None:
        n = settings.grid_images
        grid = tile_grid([("condition", evaluator.cond_maps[:n]), ("target", evaluator.targets[:n]),
                          (f"{label} @{cfg.max_train_steps}", state["images"][:n])])
        path = os.path.join(out, "grids", f"{_slug(label)}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid.save(path)
        result["grid"] = path
        result["_images"] = state["images"]
    return result


def make_job(cfg: dict, base_dir: str, pretrain_summary: dict, shards: dict, out: str) -> dict:
    """What every method's run shares (plain data, so worker processes can take it)."""
    settings = EvalSettings.from_dict(cfg.get("eval"))
    return {"base_dir": base_dir, "base_recipe": _hash(pretrain_summary), "shards": shards,
            "train_common": _norm(cfg.get("train")), "settings": dataclasses.asdict(settings), "out": out,
            "seed": int(cfg.get("seed", 0)), "condition": str(cfg.get("condition", "canny")),
            "annotator_options": cfg.get("annotator_options")}


def method_result(entry: dict, job: dict, evaluator: "Evaluator | None" = None) -> dict:
    """One method's row: reused from ``runs/<label>/result.json`` when the same
    method, base, data, trainer options and evaluation already ran to the end
    (so a comparison stopped part-way resumes where it stopped), else trained."""
    label = entry.get("label", entry["method"])
    run_dir = os.path.join(job["out"], "runs", _slug(label))
    key = _hash({k: job[k] for k in ("base_recipe", "shards", "train_common", "settings", "seed", "condition",
                                     "annotator_options")} | {"entry": entry})
    stamp, images_path = os.path.join(run_dir, "result.json"), os.path.join(run_dir, "final_samples.npy")
    if os.path.exists(stamp) and os.path.exists(images_path):
        with open(stamp) as f:
            prev = json.load(f)
        if prev.get("key") == key:
            log.info("%s: reusing the finished run in %s", label, run_dir)
            result = prev["result"]
            result["_images"] = list(np.load(images_path, allow_pickle=False))
            return result
    settings = EvalSettings.from_dict(job["settings"])
    if evaluator is None:
        evaluator = make_evaluator(job["shards"], job["condition"], job["train_common"], settings, job["seed"],
                                   job["annotator_options"])
    result = run_method(entry, base_dir=job["base_dir"], shards=job["shards"], train_common=job["train_common"],
                        evaluator=evaluator, settings=settings, out=job["out"], seed=job["seed"], condition=job["condition"])
    if "_images" in result:
        np.save(images_path, np.stack(result["_images"]), allow_pickle=False)
        with open(stamp + ".tmp", "w") as f:
            json.dump({"key": key, "result": {k: v for k, v in result.items() if not k.startswith("_")}}, f, indent=2,
                      default=str)
        os.replace(stamp + ".tmp", stamp)
    return result


def make_evaluator(shards: dict, condition: str, train_common: dict, settings: EvalSettings, seed: int,
                   annotator_options: dict | None) -> "Evaluator":
    """The held-out samples, the fidelity meter and the fixed sampling noise."""
    from training.data import SampleSpec, load_validation_samples
    from training.fidelity import FidelityMeter

    resolution = int(train_common.get("resolution", 512))
    samples = load_validation_samples(shards["val"], SampleSpec((condition,), resolution), settings.num_images)
    if not samples:
        raise UsageError("no held-out samples could be read from the val shards")
    meter = FidelityMeter(condition, annotator_options, tolerance=settings.tolerance)
    return Evaluator(samples, meter, settings, seed)


def resolve_gpus(value) -> int:
    """``gpus`` of the config: how many methods train at once, one per GPU
    (0 or "all": every visible GPU; never more than there are)."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    want = have if value in (0, "all", None) else int(value)
    if want < 0:
        raise UsageError(f"gpus must be >= 0 or 'all', not {value!r}")
    return max(1, min(want, have)) if have else 1


def visible_device(index: int, visible: str | None) -> str:
    """What ``CUDA_VISIBLE_DEVICES`` must say for a worker to see only the
    parent's GPU number ``index`` (the parent may itself see a subset)."""
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return ids[index] if index < len(ids) else str(index)


def _pin_gpu(gpu: int, visible: str | None) -> None:
    # Runs first in a fresh (spawned) worker, before CUDA is initialised there.
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_device(gpu, visible)
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s gpu{gpu} %(name)s: %(message)s")


def run_parallel(entries: list[dict], job: dict, gpus: int, finished, per_gpu: int = 1) -> None:
    """Train the methods in spawned worker processes, ``per_gpu`` at a time on
    each of ``gpus`` GPUs. With one per GPU each method has its card to itself
    (its step time and peak memory are its own); several per GPU fill a card
    that one small model's launch-bound steps leave mostly idle."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    slots = [g for _ in range(per_gpu) for g in range(gpus)]  # spread over the GPUs first
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    pools = [ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_pin_gpu, initargs=(g, visible))
             for g in slots]
    log.info("training %d methods, %d at a time on %d GPU(s)", len(entries), len(slots), gpus)
    try:
        queue = list(enumerate(entries))
        running = {}
        free = list(range(len(slots)))
        while queue or running:
            while queue and free:
                slot = free.pop(0)
                i, entry = queue.pop(0)
                running[pools[slot].submit(method_result, entry, job)] = (i, slot)
            ready, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in ready:
                i, slot = running.pop(fut)
                free.append(slot)
                result = fut.result()
                result["shared_gpu_with"] = per_gpu - 1
                finished(i, result)
    finally:
        for p in pools:
            p.shutdown(wait=True, cancel_futures=True)


@torch.no_grad()
def reference_scores(base_dir: str, evaluator: Evaluator, dtype_name: str) -> tuple[dict, list[np.ndarray]]:
    """Fidelity of the targets themselves, of their VAE reconstructions (the
    ceiling through this VAE) and of the base sampled without condition
    (the floor); the last one's images for the overview grid."""
    from training.methods import UNetFinetuneMethod
    from training.models import load_base
    from training.train import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision(dtype_name, device)
    base = load_base(base_dir)
    for m in (base.vae, base.text_encoder, base.unet):
        m.to(device).eval()
    meter = evaluator.meter
    refs = {"targets": meter.score(evaluator.targets, evaluator.cond_maps)["fidelity"]}
    recon = []
    vae = base.vae
    for i in range(0, len(evaluator.targets), evaluator.settings.batch_size):
        x = evaluator.pixels[i : i + evaluator.settings.batch_size].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        recon += _to_uint8((y.float() / 2 + 0.5).permute(0, 2, 3, 1).cpu().numpy())
    refs["vae_reconstruction"] = meter.score(recon, evaluator.cond_maps)["fidelity"]
    plain = UNetFinetuneMethod(base).to(device)
    images = evaluator.sample(base, plain, device, dtype)
    refs["base_without_condition"] = meter.score(images, evaluator.cond_maps)["fidelity"]
    return refs, images


def run_compare(cfg: dict, *, output_dir: str | None = None, command: str = "") -> dict:
    """Run the comparison described by ``cfg`` (a loaded compare config);
    returns the results (also written to ``results.json``)."""
    check_config(cfg)
    out = output_dir or cfg.get("output_dir") or "compare-out"
    os.makedirs(out, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    condition = str(cfg.get("condition", "canny"))
    settings = EvalSettings.from_dict(cfg.get("eval"))
    train_common = _norm(cfg.get("train"))
    t_start = time.perf_counter()

    shards = prepare_data(cfg, out)
    base_dir, pretrain_summary = prepare_base(cfg, out, shards, train_common)
    evaluator = make_evaluator(shards, condition, train_common, settings, seed, cfg.get("annotator_options"))
    samples, meter = evaluator.captions, evaluator.meter
    refs, base_images = reference_scores(base_dir, evaluator, train_common.get("mixed_precision", "auto"))
    log.info("reference fidelity: %s", refs)

    def summarise(results: list[dict], partial: bool) -> dict:
        return {
            "device": _device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "torch": torch.__version__,
            "condition": condition,
            "metric": "edge F1" if meter.kind == "edges" else "IoU",
            "tolerance_px": settings.tolerance if meter.kind == "edges" else None,
            "threshold": settings.threshold,
            "eval": dataclasses.asdict(settings),
            "held_out_samples": len(samples),
            "references": refs,
            "pretraining": pretrain_summary,
            "methods": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
            "wall_s": time.perf_counter() - t_start,
            "partial": partial,
            "config": cfg,
        }

    job = make_job(cfg, base_dir, pretrain_summary, shards, out)
    done: dict[int, dict] = {}

    def finished(i: int, result: dict) -> None:
        done[i] = result
        if len(done) < len(cfg["methods"]):
            # a long comparison leaves a readable report after every method,
            # so an interrupted run still shows what it measured
            partial = summarise([done[k] for k in sorted(done)], partial=True)
            with open(os.path.join(out, "results.json"), "w") as f:
                json.dump(partial, f, indent=2, default=str)
            write_report(partial, out)

    gpus = resolve_gpus(cfg.get("gpus", 1))
    per_gpu = int(cfg.get("methods_per_gpu", 1))
    if per_gpu < 1:
        raise UsageError(f"methods_per_gpu must be >= 1, not {per_gpu}")
    if (gpus > 1 or per_gpu > 1) and len(cfg["methods"]) > 1:
        run_parallel(cfg["methods"], job, gpus, finished, per_gpu)
    else:
        for i, entry in enumerate(cfg["methods"]):
            finished(i, method_result(entry, job, evaluator))
    results = [done[k] for k in sorted(done)]

    n = settings.grid_images
    columns = [("condition", evaluator.cond_maps[:n]), ("target", evaluator.targets[:n]), ("base", base_images[:n])]
    columns += [(r["label"], r.pop("_images")[:n]) for r in results if "_images" in r]
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    tile_grid(columns).save(os.path.join(out, "grids", "overview.png"))

    summary = summarise(results, partial=False)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    write_report(summary, out)
    return summary


def _fmt(v, spec: str = ".3f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return none
    return format(v, spec)


def write_report(summary: dict, out: str) -> str:
    """``report.md`` and ``convergence.png`` from the results."""
    metric = summary["metric"]
    thr = summary["threshold"]
    refs = summary["references"]
    fid_series = [(r["label"], [p["step"] for p in r["curve"]], [p["fidelity"] for p in r["curve"]]) for r in summary["methods"]]
    loss_series = [(r["label"], [p["step"] for p in r["curve"]], [p["heldout_loss"] for p in r["curve"]])
                   for r in summary["methods"]]
    hl = [(f"threshold {thr:g}", thr), ("VAE reconstruction", refs["vae_reconstruction"]),
          ("base, no condition", refs["base_without_condition"])]
    from PIL import Image

    a = draw_panel(fid_series, f"condition fidelity ({summary['condition']} {metric}, held-out)", metric, hlines=hl,
                   ylim=(0.0, 1.0))
    b = draw_panel(loss_series, "held-out denoising loss", "MSE")
    fig = Image.new("RGB", (a.width + b.width, max(a.height, b.height)), "white")
    fig.paste(a, (0, 0))
    fig.paste(b, (a.width, 0))
    fig.save(os.path.join(out, "convergence.png"))

    tol = f" within {summary['tolerance_px']:g} px" if summary.get("tolerance_px") is not None else ""
    lines = [
        "# ControlNet and its alternatives",
        "",
        f"- device: {summary['device']}",
        f"- date: {summary['date']}",
        f"- command: `{summary['command']}`" if summary["command"] else "- command: (API call)",
        f"- condition: {summary['condition']}; fidelity = {metric}{tol} between the condition and the "
        f"{summary['condition']} annotator's output on the generated image, {summary['held_out_samples']} held-out samples",
        f"- references: targets {refs['targets']:.3f}, VAE reconstructions {refs['vae_reconstruction']:.3f} (ceiling), "
        f"base without condition {refs['base_without_condition']:.3f} (floor)",
        f"- wall time: {summary['wall_s']:.0f} s",
        *(["- **partial**: the run was still going; methods not listed here had not finished"] if summary.get("partial") else []),
        "",
        f"| method | trainable params | steps to {metric} >= {thr:g} | final {metric} | best {metric} | final Chamfer (px) "
        "| held-out loss | train loss | step time (ms) | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["methods"]:
        params = r["trainable_params"]
        if params and r.get("trainable_params_start") and r["trainable_params_start"] != params:
            params_s = f"{r['trainable_params_start']:,} -> {params:,}"
        else:
            params_s = f"{params:,}" if params else "-"
        reached = r["steps_to_threshold"]
        lines.append(
            f"| {r['label']} | {params_s} | {reached if reached is not None else 'not reached'} | "
            f"{_fmt(r['final_fidelity'])} | {_fmt(r['best_fidelity'])} | {_fmt(r['final_chamfer'], '.2f')} | "
            f"{_fmt(r['final_heldout_loss'], '.4f')} | {_fmt(r['final_train_loss'], '.4f')} | "
            f"{_fmt(r['step_time_ms'], '.1f')} | {_fmt(r['peak_memory_mib'], '.0f', 'n/a (CPU)')} |"
        )
    lines += [
        "",
        "Steps to threshold are counted at the evaluation points (every "
        f"{summary['eval']['every']} steps). Step time is the median optimiser step without evaluations; "
        "peak memory is the CUDA allocator's peak during training steps."
        + (f" Methods trained {shared + 1} at a time on each GPU (`methods_per_gpu`), so their step times "
           "include that sharing; compare them with each other, not with a method alone on a GPU."
           if (shared := max((r.get("shared_gpu_with") or 0) for r in summary["methods"])) else ""),
        "",
        "![convergence](convergence.png)",
        "",
        "![samples](grids/overview.png)",
        "",
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
