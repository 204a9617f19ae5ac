"""Latents and text embeddings cached in the shards, so training skips the VAE and the text encoder.

``controlset cache-latents`` reads controlset shards and writes new ones
(same names, in another folder) that keep every member of every sample byte
for byte and add three members:

``latents.npy``
    float16, shape ``(2, 2C, R/f, R/f)``: the VAE encoder's latent
    distribution of the sample's centre crop at resolution ``R`` (index 0)
    and of its horizontal mirror (index 1); along the channels the ``C``
    means, then the ``C`` log-variances (unscaled, as diffusers'
    ``DiagonalGaussianDistribution`` holds them; log-variances clamped to
    [-30, 20]).
``text_embeds.npy``
    float16, shape ``(S, H)``: the text encoder's last hidden state for the
    caption (tokenised to the tokenizer's ``model_max_length``, as in
    training).
``latents.json``
    what the two arrays were made from: cache format version, resolution,
    crop, the fingerprint of the base's VAE encoder, text encoder and
    tokenizer, the compute precision and the stored dtype.

Arrays use numpy's ``.npy`` format, read with ``allow_pickle=False``.

The trainer (``--cached-latents auto|on|off``) then draws each step's latents
from the stored distribution with its own generator (``mean + std * noise``,
times the VAE's scaling factor), picks the plain or mirrored latents by the
same coin that flips the condition, and replaces dropped prompts by the
embedding of ``""`` computed once at start: neither the VAE nor the text
encoder runs while training. Random crops cannot be used with cached latents
(only the centre crop is cached).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from schemas.codec import encode_json
from schemas.errors import UsageError
from schemas.files import atomic_write_bytes, commit, remove_quietly, tmp_path
from schemas.sample import IMAGE_MEMBER, condition_member

log = logging.getLogger(__name__)

#: Bumped when the meaning or layout of the cached members changes.
CACHE_VERSION = 1
LATENTS_MEMBER = "latents.npy"
TEXT_EMBEDS_MEMBER = "text_embeds.npy"
CACHE_META_MEMBER = "latents.json"
CACHE_MEMBERS = (LATENTS_MEMBER, TEXT_EMBEDS_MEMBER, CACHE_META_MEMBER)
#: Summary of a caching run, in its output folder.
SUMMARY_FILE = "cache.json"
#: Fixed member mtime (2020-01-01T00:00:00Z) so equal inputs give equal bytes.
TAR_MTIME = 1577836800
CROP = "center"

_PRECISION_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# --------------------------------------------------------------------------
# the members


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_npy`; refuses pickled (object) arrays."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_cache_meta(raw: dict) -> dict | None:
    """The ``latents.json`` record of a raw sample, or None when it has none."""
    data = raw.get(CACHE_META_MEMBER)
    if data is None:
        return None
    return json.loads(data.decode("utf-8"))


def read_cached(raw: dict, *, resolution: int, fingerprint: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``(latents, text_embeds)`` of a raw sample, checked against the
    resolution and base fingerprint being trained; raises (and the sample is
    skipped) when the members are missing or were made for something else."""
    missing = [m for m in CACHE_MEMBERS if m not in raw]
    if missing:
        raise KeyError(f"sample has no cached {', '.join(missing)} (run controlset cache-latents)")
    meta = read_cache_meta(raw)
    if meta.get("cache_version") != CACHE_VERSION or meta.get("resolution") != resolution:
        raise ValueError(f"cached members are version {meta.get('cache_version')} at {meta.get('resolution')} px, "
                         f"expected version {CACHE_VERSION} at {resolution} px")
    if fingerprint is not None and meta.get("base_fingerprint") != fingerprint:
        raise ValueError("cached members were made with another base model")
    latents = decode_npy(raw[LATENTS_MEMBER])
    text = decode_npy(raw[TEXT_EMBEDS_MEMBER])
    if latents.ndim != 4 or latents.shape[0] != 2 or latents.shape[1] % 2 or text.ndim != 2:
        raise ValueError(f"cached arrays have shapes {latents.shape} and {text.shape}")
    return latents, text


# --------------------------------------------------------------------------
# which base made the cache


def base_fingerprint(base) -> str:
    """SHA-256 over what determines the cached values: the weights of the
    VAE encoder (``encoder.*``, ``quant_conv.*``; a fine-tuned decoder keeps
    the cache valid), of the text encoder, their activation settings, and
    the tokenizer (vocabulary, maximum length, the ids of a probe text).
    Weights are hashed as float32, so the stored precision of the base does
    not matter. About a second for SD 1.5 on a CPU."""
    import torch

    h = hashlib.sha256(b"controlset latent cache fingerprint 1\0")

    def add_state(prefix: str, state: dict) -> None:
        for name in sorted(state):
            t = state[name].detach()
            if t.is_floating_point():
                t = t.float()
            t = t.cpu().contiguous()
            h.update(f"{prefix}{name}:{str(t.dtype)}:{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    vae_state = {k: v for k, v in base.vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    add_state("vae.", vae_state)
    add_state("text_encoder.", base.text_encoder.state_dict())
    vc, tc = base.vae.config, base.text_encoder.config
    settings = {
        "vae": {k: getattr(vc, k, None) if not isinstance(vc, dict) else vc.get(k)
                for k in ("act_fn", "norm_num_groups", "latent_channels", "mid_block_add_attention", "use_quant_conv")},
        "text_encoder": {k: getattr(tc, k, None) for k in ("hidden_act", "layer_norm_eps")},
    }
    tok = base.tokenizer
    probe = "a photograph of an astronaut riding a horse, 4k, detailed!"
    settings["tokenizer"] = {
        "model_max_length": int(tok.model_max_length),
        "vocab": sorted(tok.get_vocab().items()),
        "probe": list(tok(probe).input_ids),
    }
    h.update(encode_json(settings))
    return h.hexdigest()


def probe_cache(urls: Sequence[str]) -> dict | None:
    """The ``latents.json`` of the first readable sample of the shards, or
    None when that sample has no cached members."""
    from training.data import iter_raw_samples

    for url in urls:
        for raw in iter_raw_samples(url, lambda u, e: log.warning("probing %s for cached latents: %s", u, e)):
            try:
                return read_cache_meta(raw)
            except ValueError as exc:
                raise UsageError(f"{url}: sample {raw.get('__key__')} has an unreadable {CACHE_META_MEMBER}: {exc}") from exc
    return None


def resolve_cached_latents(mode: str, urls: Sequence[str], base, resolution: int) -> str | None:
    """Decide whether training reads cached latents (``--cached-latents``).

    Returns the base fingerprint the cached samples must carry when they are
    used, None when images and captions are encoded every step. Raises
    :class:`UsageError` when ``on`` finds no cache, or when the cache was
    made for another base model or resolution."""
    if mode == "off":
        return None
    meta = probe_cache(urls)
    if meta is None:
        if mode == "on":
            raise UsageError(
                f"--cached-latents on: the shards carry no cached latents ({urls[0]} has no "
                f"{LATENTS_MEMBER} / {TEXT_EMBEDS_MEMBER} / {CACHE_META_MEMBER}); write them with "
                "`controlset cache-latents --base BASE --shards ... --output-dir DIR` and train on DIR's shards"
            )
        return None
    hint = "re-run controlset cache-latents for this base and resolution, or pass --cached-latents off"
    if meta.get("cache_version") != CACHE_VERSION:
        raise UsageError(f"the shards' cached latents are format version {meta.get('cache_version')}, "
                         f"this trainer reads version {CACHE_VERSION}: {hint}")
    if meta.get("resolution") != resolution:
        raise UsageError(f"the shards' cached latents are for --resolution {meta.get('resolution')}, "
                         f"training is at {resolution}: {hint}")
    fingerprint = base_fingerprint(base)
    if meta.get("base_fingerprint") != fingerprint:
        raise UsageError(
            f"the shards' cached latents were made with another base model (fingerprint "
            f"{str(meta.get('base_fingerprint'))[:12]}..., --base {base.source} is {fingerprint[:12]}...): {hint}"
        )
    return fingerprint


# --------------------------------------------------------------------------
# cached batches -> model inputs (the trainer's step and the benchmark)


def cached_inputs(batch: dict, generator, device, *, scaling_factor: float, empty_embedding, dtype):
    """``(latents, text_embeddings)`` of a cached batch, as the VAE and text
    encoder would have given them: latents sampled from the stored
    distribution with ``generator`` (same draws as
    ``latent_dist.sample(generator)``) and scaled, float32; text embeddings
    in ``dtype``, those of dropped prompts replaced by ``empty_embedding``
    (the embedding of ``""``, shape ``(S, H)`` or ``(1, S, H)``)."""
    import torch

    moments = batch["latents"].to(device, non_blocking=True).float()
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, device=device)
    latents = (mean + std * noise) * scaling_factor
    text = batch["text_embeds"].to(device, non_blocking=True).to(dtype)
    empty = batch["empty_prompt"].to(device, non_blocking=True)
    uncond = empty_embedding.reshape(1, *text.shape[1:]).to(device, dtype)
    text = torch.where(empty[:, None, None], uncond, text)
    return latents, text


def empty_prompt_embedding(base, device, dtype):
    """The text encoder's embedding of ``""`` (``(S, H)``), rounded through
    float16 like the cached embeddings."""
    import torch

    from training.models import encode_prompts

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        emb = encode_prompts(base, [""], device)
    return emb[0].half().to(dtype)


def encode_cache_batch(base, pixels, captions: list[str], device, dtype):
    """``(moments, text)`` for a batch: ``moments`` float16 ``(B, 2, 2C, h, w)``
    (the latent distribution of each image and of its mirror), ``text``
    float16 ``(B, S, H)``; both on the CPU. ``base.vae`` and
    ``base.text_encoder`` must already be on ``device`` in ``dtype``."""
    import torch

    from training.models import encode_prompts

    vae = base.vae
    b = pixels.shape[0]
    x = pixels.to(device, non_blocking=True)
    x = torch.cat([x, x.flip(-1)]).to(vae.dtype)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        dist = vae.encode(x).latent_dist
        moments = torch.cat([dist.mean, dist.logvar], dim=1).float()
        text = encode_prompts(base, captions, device).float()
    moments = moments.reshape(2, b, *moments.shape[1:]).transpose(0, 1)
    return moments.half().cpu(), text.half().cpu()


# --------------------------------------------------------------------------
# the caching run


class _Skip(Exception):
    """A sample that is left out, with a short reason for the summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class _ShardStats:
    shard: str
    input: str
    read: int = 0
    written: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    unreadable: int = 0

    def to_dict(self) -> dict:
        return {"shard": self.shard, "input": self.input, "read": self.read, "written": self.written,
                "skipped": dict(sorted(self.skipped.items())), "unreadable_data": self.unreadable}


def _output_paths(urls: Sequence[str], fs, root: str) -> list[str]:
    """One output per input shard, same file name; never an input itself."""
    names = [posixpath.basename(u.rstrip("/")) for u in urls]
    dup = [n for n, c in collections.Counter(names).items() if c > 1]
    if dup:
        raise UsageError(f"several input shards are named {dup[0]}: their cached copies would collide in one --output-dir")
    outs = [posixpath.join(root, n) for n in names]
    for url, out in zip(urls, outs):
        src = url.split("://", 1)[1] if url.startswith("file://") else url
        if "://" not in src and "://" not in out and os.path.realpath(src) == os.path.realpath(out):
            raise UsageError(f"--output-dir would overwrite the input {url}: cached shards are written as new files, "
                             "choose another folder")
    return outs


def cache_shards(
    base_path: str,
    shards: Sequence[str] | str,
    output_dir: str,
    *,
    resolution: int = 512,
    batch_size: int = 32,
    mixed_precision: str = "auto",
    device: str | None = None,
    conditions: Sequence[str] = (),
    workers: int = 4,
    base_config: str | None = None,
    base_original_config: str | None = None,
) -> dict:
    """Write a cached copy of every shard into ``output_dir`` (see the module
    docstring) and ``output_dir/cache.json``; returns that summary plus the
    run's time. Samples that cannot be decoded, lack one of ``conditions``,
    or give non-finite values are left out with a warning and counted by
    reason. The output depends only on the inputs and options (and, on a GPU,
    on its kernels): equal runs write equal bytes."""
    import concurrent.futures

    import fsspec
    import torch
    import webdataset as wds

    from training.data import SampleSpec, decode_sample, expand_shards, iter_raw_samples
    from training.models import load_base
    from training.train import resolve_precision

    if resolution % 8:
        raise UsageError("--resolution must be a multiple of 8")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if mixed_precision not in ("auto", "no", "fp16", "bf16"):
        raise UsageError(f"--mixed-precision must be auto, no, fp16 or bf16, got {mixed_precision!r}")
    try:
        cond_members = [condition_member(c) for c in conditions]
    except ValueError as exc:
        raise UsageError(f"--condition: {exc}") from None
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise UsageError(f"--device {device}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available")
    dtype = resolve_precision(mixed_precision, dev)
    urls = expand_shards(shards)
    fs, root = fsspec.core.url_to_fs(output_dir)
    outs = _output_paths(urls, fs, root)

    base = load_base(base_path, base_config, base_original_config)
    fingerprint = base_fingerprint(base)
    base.vae.requires_grad_(False).to(dev, dtype=dtype).eval()
    base.text_encoder.requires_grad_(False).to(dev, dtype=dtype).eval()
    base.unet = None  # not needed: free its memory
    if dev.type == "cuda":
        # Same kernels on every run, so equal inputs give equal bytes.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    meta_record = encode_json({
        "cache_version": CACHE_VERSION,
        "resolution": resolution,
        "crop": CROP,
        "base_fingerprint": fingerprint,
        "precision": _PRECISION_NAMES[str(dtype).replace("torch.", "")],
        "stored_dtype": "float16",
        "latents": {"member": LATENTS_MEMBER, "layout": "[plain, mirrored] x [mean (C), logvar (C)], unscaled"},
        "text_embeds": {"member": TEXT_EMBEDS_MEMBER, "layout": "text encoder last hidden state (tokens, hidden)"},
    })
    spec = SampleSpec(conditions=(), resolution=resolution, random_flip=False, center_crop=True,
                      proportion_empty_prompts=0.0)

    def prepare(raw: dict) -> tuple[np.ndarray, str]:
        """The trainer's centre crop of the image, and the caption."""
        for member in [IMAGE_MEMBER, *cond_members]:
            if member not in raw:
                raise _Skip(f"missing {member}")
        try:
            # The generator is unused by a centre crop without flip or prompt dropout.
            item = decode_sample(raw, spec, np.random.default_rng(0))
        except Exception as exc:
            raise _Skip(f"undecodable {IMAGE_MEMBER}", f"{type(exc).__name__}: {exc}") from exc
        return item["pixel_values"], item["caption"]

    fs.makedirs(root, exist_ok=True)
    stats_all: list[_ShardStats] = []
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for url, out in zip(urls, outs):
            stats = _ShardStats(posixpath.basename(out), url)
            stats_all.append(stats)

            def on_error(u, exc, stats=stats):
                stats.unreadable += 1
                log.warning("skipping unreadable data in %s: %s: %s", u, type(exc).__name__, exc)

            def skip(raw: dict, exc: _Skip, stats=stats) -> None:
                stats.skipped[exc.reason] += 1
                log.warning("skipping sample %s of %s: %s", raw.get("__key__"), url, exc)

            tmp = tmp_path(out)
            try:
                with fs.open(tmp, "wb") as f:
                    sink = wds.TarWriter(f, user="controlset", group="controlset", mtime=TAR_MTIME, encoder=False)
                    for chunk in _read_ahead(iter_raw_samples(url, on_error), pool, prepare, batch_size):
                        _write_chunk(chunk, base, dev, dtype, sink, stats, skip, meta_record)
                    sink.close()
                commit(fs, tmp, out)
            except BaseException:
                remove_quietly(fs, tmp)
                raise
            log.info("%s: %d of %d samples cached", out, stats.written, stats.read)

    totals = collections.Counter()
    for s in stats_all:
        totals.update(s.skipped)
    summary = {
        "cache_version": CACHE_VERSION,
        "base": base.source,
        "base_fingerprint": fingerprint,
        "resolution": resolution,
        "crop": CROP,
        "precision": _PRECISION_NAMES[str(dtype).replace("torch.", "")],
        "members": list(CACHE_MEMBERS),
        "conditions_checked": list(cond_members),
        "samples_read": sum(s.read for s in stats_all),
        "samples_written": sum(s.written for s in stats_all),
        "samples_skipped": dict(sorted(totals.items())),
        "unreadable_data": sum(s.unreadable for s in stats_all),
        "shards": [s.to_dict() for s in stats_all],
    }
    atomic_write_bytes(fs, posixpath.join(root, SUMMARY_FILE), json.dumps(summary, indent=2).encode() + b"\n")
    seconds = time.perf_counter() - started
    return {**summary, "output_dir": output_dir, "device": str(dev), "seconds": round(seconds, 3),
            "images_per_s": round(summary["samples_written"] / max(seconds, 1e-9), 3)}


def _read_ahead(raws: Iterable[dict], pool, prepare, batch_size: int):
    """Chunks of ``batch_size`` ``(raw, future)`` pairs, in input order; the
    next chunk is already being decoded while the current one is encoded."""
    it = iter(raws)
    queue: collections.deque = collections.deque()
    done = False

    def fill() -> None:
        nonlocal done
        while not done and len(queue) < 2 * batch_size:
            raw = next(it, None)
            if raw is None:
                done = True
                return
            queue.append((raw, pool.submit(prepare, raw)))

    fill()
    while queue:
        chunk = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
        fill()
        yield chunk


def _write_chunk(chunk, base, device, dtype, sink, stats: _ShardStats, skip, meta_record: bytes) -> None:
    import torch

    ready: list[tuple[dict, np.ndarray, str]] = []
    for raw, future in chunk:
        stats.read += 1
        try:
            pixels, caption = future.result()
        except _Skip as exc:
            skip(raw, exc)
            continue
        ready.append((raw, pixels, caption))
    if not ready:
        return
    pixels = torch.from_numpy(np.stack([p for _, p, _ in ready]))
    moments, text = encode_cache_batch(base, pixels, [c for _, _, c in ready], device, dtype)
    finite = torch.isfinite(moments).flatten(1).all(1) & torch.isfinite(text).flatten(1).all(1)
    for i, (raw, _, _) in enumerate(ready):
        if not bool(finite[i]):
            skip(raw, _Skip("non-finite latents or text embeddings"))
            continue
        members: dict[str, Any] = {
            k: v for k, v in raw.items() if not k.startswith("__") and k not in CACHE_MEMBERS
        }
        members[LATENTS_MEMBER] = encode_npy(moments[i].numpy())
        members[TEXT_EMBEDS_MEMBER] = encode_npy(text[i].numpy())
        members[CACHE_META_MEMBER] = meta_record
        sink.write({"__key__": raw["__key__"], **members})
        stats.written += 1
