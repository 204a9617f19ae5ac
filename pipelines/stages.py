"""The per-element work of the annotate pipeline, as plain functions.

Every stage has one shape: it takes an element and yields results or
:class:`schemas.FailureRecord` values, never raising for a bad input. The Beam
pipeline (``pipelines.beam``) only wires these together, so they are easy to
test and to reuse outside Beam.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from annotators import Annotation, Annotator
from pipelines.decode import (
    DecodeError, apply_geometry, decode_rgb, draft_size, hamming, perceptual_hash, plan_geometry, probe_image,
    reduced_box,
)
from pipelines.options import AnnotateOptions
from pipelines.sources import (
    IMAGE_EXTENSIONS,
    FileTooLargeError,
    InputRef,
    Location,
    iter_tar_samples,
    read_bytes,
    read_location,
)
from schemas import FAILED, FILTERED, FailureRecord, ManifestRow, build_metadata, content_key, is_valid_key
from schemas.records import printable
from schemas.codec import encode_jpeg, encode_member

log = logging.getLogger(__name__)

_TAR_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Candidate:
    """An input that passed probing and filtering: light enough to shuffle.

    Pixels are not carried; ``location`` says how to read the bytes again.
    """

    key: str
    source: str
    location: Location
    caption: str
    caption_source: str | None
    width: int
    height: int
    #: Set for a sample of existing controlset shards being re-annotated: its
    #: metadata (JSON text) and its other members, kept as they are.
    prior_meta: str | None = None
    prior_members: tuple[tuple[str, Location], ...] = ()
    #: 64-bit perceptual hash, when near-duplicate removal is on.
    phash: int | None = None
    #: What went wrong with the input's caption, if anything (the image is
    #: still used): kept in the sample's metadata as ``caption_note``.
    caption_note: str | None = None


@dataclass
class Decoded:
    """A candidate decoded and brought to the output geometry."""

    candidate: Candidate
    image: np.ndarray
    crop_box: tuple[int, int, int, int]
    frames: int
    prior_members: dict[str, bytes] = field(default_factory=dict)


@dataclass
class EncodedSample:
    """A finished sample: member name -> bytes, plus its manifest row."""

    key: str
    members: dict[str, bytes]
    row: ManifestRow


# ----------------------------------------------------------------- probe & filter


def _filter(c: Candidate, opts: AnnotateOptions) -> FailureRecord | None:
    short, long = sorted((c.width, c.height))
    if short < opts.min_size:
        return FailureRecord(
            c.source, FILTERED, "filter", "too_small",
            f"shorter side {short}px is below the minimum of {opts.min_size}px", key=c.key,
        )
    if long / short > opts.max_aspect:
        return FailureRecord(
            c.source, FILTERED, "filter", "aspect_ratio",
            f"aspect ratio {long / short:.2f} exceeds the maximum of {opts.max_aspect:g}", key=c.key,
        )
    return None


def _candidate(
    source: str, location: Location, data: bytes, caption: str, caption_source: str | None,
    opts: AnnotateOptions, caption_note: str | None = None,
) -> Candidate | FailureRecord:
    key = content_key(data)
    try:
        header = probe_image(data)
    except DecodeError as exc:
        return FailureRecord(source, FAILED, "decode", exc.reason, str(exc), key=key,
                             error_type="DecodeError")
    phash = None
    if opts.near_duplicates:
        try:
            phash = perceptual_hash(data)
        except DecodeError as exc:
            return FailureRecord(source, FAILED, "decode", exc.reason, str(exc), key=key,
                                 error_type="DecodeError")
    cand = Candidate(key, printable(source), location, caption, caption_source, header.width, header.height,
                     phash=phash, caption_note=caption_note)
    return _filter(cand, opts) or cand


#: Largest caption file (or tar member) read; a larger one is not used.
MAX_CAPTION_BYTES = 1 << 20


def read_caption(read: Any, where: str, limit: int = MAX_CAPTION_BYTES) -> tuple[str | None, str | None]:
    """``(caption, note)`` from ``read(limit) -> bytes``: a caption that cannot
    be used as it is costs only itself, never the image, and says why in
    ``note`` (kept in the sample's metadata): too large or unreadable -> no
    caption; not UTF-8 -> undecodable bytes replaced with U+FFFD."""
    caption = None
    try:
        data = read(limit)
    except FileTooLargeError as exc:
        note = f"caption too large, not used: {exc}"
    except Exception as exc:
        note = f"caption unreadable: {type(exc).__name__}: {exc}"
    else:
        try:
            return data.decode("utf-8").strip(), None
        except UnicodeDecodeError as exc:
            note = f"caption is not UTF-8 (byte {exc.start}): undecodable bytes replaced with U+FFFD"
            caption = data.decode("utf-8", errors="replace").strip()
    log.warning("%s: %s", printable(where), note)
    return caption, note


def probe_input(ref: InputRef, opts: AnnotateOptions) -> Iterator[Candidate | FailureRecord]:
    """Read one input (an image, or every sample of a tar), compute content
    keys, read headers and apply the size/aspect filters."""
    if ref.kind == "skipped":
        yield FailureRecord(ref.source, FILTERED, "discover", "not_an_input", ref.note or "not an input")
        return
    if ref.kind == "tar":
        yield from _probe_tar(ref, opts)
        return
    try:
        data = read_bytes(ref.source, opts.max_file_bytes)
    except FileTooLargeError as exc:
        yield FailureRecord(ref.source, FAILED, "read", "file_too_large", str(exc),
                            error_type=type(exc).__name__)
        return
    except Exception as exc:
        yield FailureRecord.from_exception(ref.source, "read", "read_error", exc)
        return
    caption, note = read_caption(lambda limit: read_bytes(ref.caption, limit), ref.caption) if ref.caption \
        else (None, None)
    yield _candidate(ref.source, Location(ref.source), data, caption or "",
                     "sidecar" if caption is not None else None, opts, note)


def _probe_tar(ref: InputRef, opts: AnnotateOptions) -> Iterator[Candidate | FailureRecord]:
    try:
        for sample in iter_tar_samples(ref.source, opts.max_file_bytes):
            source = f"{ref.source}#{sample.key}"
            try:
                yield _probe_tar_sample(source, sample, opts)
            except Exception as exc:  # one bad sample costs only itself, not the rest of the tar
                yield FailureRecord.from_exception(source, "read", "bad_sample", exc)
    except Exception as exc:
        # Samples yielded before the damage stand; the tar itself is one failure.
        yield FailureRecord.from_exception(ref.source, "read", "bad_tar", exc)


def _probe_tar_sample(source: str, sample, opts: AnnotateOptions) -> Candidate | FailureRecord:
    """One sample of a tar: a candidate, or why it is not one."""
    if sample.unsafe:
        return FailureRecord(source, FILTERED, "read", "unsafe_tar_member",
                             "tar member with an absolute path or '..' was not read")
    if sample.problem:
        return FailureRecord(source, FAILED, "read", "bad_tar_sample", sample.problem)
    image_ext = next((e for e in _TAR_IMAGE_EXTS if e in sample.members), None)
    if image_ext is None:
        return FailureRecord(
            source, FAILED, "read", "no_image_member",
            f"sample has no image member (members: {', '.join(sorted(sample.members)) or 'none'})",
        )
    loc = sample.members[image_ext]
    if "json" in sample.members and image_ext == "jpg":
        prior = _controlset_sample(source, sample, loc)
        if prior is not None:
            return prior
    try:
        data = read_location(loc, opts.max_file_bytes)
    except Exception as exc:
        reason = "file_too_large" if isinstance(exc, FileTooLargeError) else "read_error"
        return FailureRecord.from_exception(source, "read", reason, exc)
    caption, note = None, None
    if "txt" in sample.members:
        txt = sample.members["txt"]
        caption, note = read_caption(lambda limit: read_location(txt, limit), f"{source}.txt")
    return _candidate(source, loc, data, caption or "", "tar" if caption is not None else None, opts, note)


def _controlset_sample(source: str, sample, loc: Location) -> Candidate | FailureRecord | None:
    """A sample written by controlset (its json has our schema): it is
    re-annotated in place of being re-imported, keeping its key, image bytes,
    caption and every other member. None for any other WebDataset sample."""
    import json

    try:
        meta = json.loads(read_location(sample.members["json"], 1 << 24).decode("utf-8"))
    except Exception:
        return None
    if not isinstance(meta, dict) or "schema_version" not in meta or "annotators" not in meta:
        return None
    key = posixpath.basename(sample.key)
    if not is_valid_key(key):
        return None
    caption, note = "", None
    if "txt" in sample.members:
        txt = sample.members["txt"]
        # what controlset wrote: a caption of up to 1 MiB, whose replaced
        # bytes (U+FFFD, three bytes each) may have made it longer
        caption, note = read_caption(lambda limit: read_location(txt, limit), f"{source}.txt",
                                     4 * MAX_CAPTION_BYTES)
        caption = caption or ""
    others = tuple(sorted((ext, l) for ext, l in sample.members.items() if ext not in ("jpg", "json", "txt")))
    try:
        width, height = _checked_size(meta.get("original_width", 0)), _checked_size(meta.get("original_height", 0))
        box = meta.get("crop_box")
        if box is not None and not (isinstance(box, list) and len(box) == 4
                                    and all(isinstance(v, int) and 0 <= v < 1 << 31 for v in box)):
            raise ValueError(f"crop_box must be four non-negative integers, got {box!r}")
    except (TypeError, ValueError) as exc:
        return FailureRecord(source, FAILED, "read", "bad_metadata", f"controlset metadata: {exc}", key=key,
                             error_type=type(exc).__name__)
    return Candidate(
        key, printable(source), loc, caption, meta.get("caption_source"), width, height,
        prior_meta=json.dumps(meta, sort_keys=True), prior_members=others, caption_note=note,
    )


def _checked_size(value: Any) -> int:
    """A pixel count from foreign metadata, as an int the outputs can hold."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 31:
        raise ValueError(f"image sizes must be integers from 0 to 2**31-1, got {value!r}")
    return value


# ------------------------------------------------------------------------ dedup


def choose_duplicate(key: str, group: Sequence[Candidate]) -> tuple[Candidate, list[FailureRecord]]:
    """Keep one candidate per content key (the smallest source, so the choice
    is the same on every run); the others become ``duplicate`` records."""
    ordered = sorted(group, key=lambda c: c.source)
    kept = ordered[0]
    dropped = [
        FailureRecord(c.source, FILTERED, "dedup", "duplicate",
                      f"same content as {kept.source}", key=key)
        for c in ordered[1:]
    ]
    return kept, dropped


def near_duplicates(items: Sequence[tuple[str, str, int]], distance: int) -> dict[str, tuple[str, int]]:
    """Keys to drop as near-duplicates: {key: (kept source, bit distance)}.

    ``items`` are (key, source, phash). Images are visited in source order and
    each is kept unless its hash is within ``distance`` bits of an image
    already kept, so the choice is the same on every run. Candidates are found
    through four 16-bit bands of the hash: exact for distances up to 3 (two
    hashes that close share a band), approximate beyond.
    """
    bands: list[dict[int, list[tuple[int, str]]]] = [{} for _ in range(4)]
    dropped: dict[str, tuple[str, int]] = {}
    for key, source, h in sorted(items, key=lambda t: (t[1], t[0])):
        best: tuple[int, str] | None = None
        for b in range(4):
            for other, other_source in bands[b].get((h >> (16 * b)) & 0xFFFF, ()):
                d = hamming(h, other)
                if d <= distance and (best is None or (d, other_source) < best):
                    best = (d, other_source)
        if best is not None:
            dropped[key] = (best[1], best[0])
            continue
        for b in range(4):
            bands[b].setdefault((h >> (16 * b)) & 0xFFFF, []).append((h, source))
    return dropped


# ----------------------------------------------------------------------- decode


def decode_candidate(c: Candidate, opts: AnnotateOptions) -> Decoded | FailureRecord:
    """Read the bytes again, decode fully and bring to the output geometry."""
    try:
        data = read_location(c.location, opts.max_file_bytes)
    except Exception as exc:
        return FailureRecord.from_exception(c.source, "read", "read_error", exc, key=c.key)
    if c.prior_meta is None and content_key(data) != c.key:
        # the key names the bytes probed, deduplicated and planned: other
        # bytes under it would break both the plan and duplicate removal
        return FailureRecord(c.source, FAILED, "read", "changed_since_probe",
                             "the file's content changed after it was probed; rerun to include it", key=c.key)
    reduced = None
    if opts.reduced_jpeg_decode and c.prior_meta is None:
        reduced = draft_size(c.width, c.height, opts.resolution, opts.crop)
    try:
        rgb, header = decode_rgb(data, reduced)
    except DecodeError as exc:
        return FailureRecord(c.source, FAILED, "decode", exc.reason, str(exc), key=c.key,
                             error_type="DecodeError")
    if c.prior_meta is not None:  # already at its output geometry: keep it exactly
        import json

        try:
            prior = {ext: read_location(l, opts.max_file_bytes) for ext, l in c.prior_members}
        except Exception as exc:
            return FailureRecord.from_exception(c.source, "read", "read_error", exc, key=c.key)
        prior["jpg"] = data
        box = tuple(json.loads(c.prior_meta).get("crop_box") or (0, 0, rgb.shape[1], rgb.shape[0]))
        return Decoded(c, rgb, box, header.frames, prior)
    try:
        box, size = plan_geometry(header.width, header.height, opts.resolution, opts.crop)
        if rgb.shape[:2] == (header.height, header.width):
            image = apply_geometry(rgb, box, size)
        else:  # decoded at a reduced scale: crop whole reduced pixels, record the box they show
            pixels, box = reduced_box(box, (header.width, header.height), (rgb.shape[1], rgb.shape[0]),
                                      header.orientation)
            image = apply_geometry(rgb, pixels, size)
    except Exception as exc:
        return FailureRecord.from_exception(c.source, "decode", "resize_error", exc, key=c.key)
    return Decoded(c, image, box, header.frames)


# --------------------------------------------------------------------- annotate


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _free_accelerator_memory() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_annotator(
    annotator: Annotator, images: Sequence[np.ndarray], keys: Sequence[str], batch_size: int | None = None
) -> list[Annotation | BaseException]:
    """One annotator over many images, in chunks of ``batch_size``.

    A chunk that runs out of accelerator memory is split in halves and
    retried (not dropped), and later calls use the smaller size from the
    start; a chunk that fails otherwise is retried image by
    image, so one bad image costs only itself. Returns an Annotation or the
    exception for each image.
    """
    size = batch_size or len(images) or 1
    # a size that ran out of memory before is not tried again on every batch
    size = min(size, getattr(annotator, "_fitting_batch", size))
    out: list[Annotation | BaseException] = []
    for start in range(0, len(images), size):
        out += _run_chunk(annotator, list(images[start:start + size]), list(keys[start:start + size]))
    return out


def _run_chunk(annotator: Annotator, images: list, keys: list) -> list[Annotation | BaseException]:
    try:
        outs = annotator.annotate_batch(images, keys)
        if len(outs) != len(images):
            raise RuntimeError(f"returned {len(outs)} results for {len(images)} images")
        return list(outs)
    except Exception as exc:
        if len(images) == 1:
            return [exc]
        if _is_oom(exc):
            _free_accelerator_memory()
            half = len(images) // 2
            annotator._fitting_batch = min(half, getattr(annotator, "_fitting_batch", half))
            log.warning("%s ran out of memory on a batch of %d; retrying as two of %d (and using batches "
                        "of at most %d from now on)", annotator.name, len(images), half, annotator._fitting_batch)
            return _run_chunk(annotator, images[:half], keys[:half]) + _run_chunk(annotator, images[half:], keys[half:])
        return [r for i in range(len(images)) for r in _run_chunk(annotator, images[i:i + 1], keys[i:i + 1])]


def gpu_start_order(gpu: Sequence[Annotator], annotators: Sequence[Annotator],
                    costs: dict[str, float] | None = None, rank: int = 0, threads: int = 1) -> list[Annotator]:
    """The order ``gpu`` (annotators of the run ``annotators``) start a batch
    in: one that reuses another's work (normal: depth's forward) goes last,
    so that it finds that work done rather than waiting for it; otherwise
    the costliest (``costs``: seconds so far) first.

    ``rank`` is the worker's place among the worker processes sharing its
    GPU. Their batches tend to start together, and two copies of the same
    heavy network at once on one GPU slow each other more than two different
    ones: a worker of rank ``r`` > 0 takes the rotation of that order whose
    schedule on its ``threads`` GPU threads runs each network least at the
    same time as it runs in ranks 0 .. r-1 (each annotator counting 1 while
    no costs are known)."""
    names = {a.name for a in annotators}
    costs = costs or {}
    order = sorted(gpu, key=lambda a: -costs.get(a.name, 0.0))
    reusers = [a for a in order if any(n in names for n in a.run_after)]
    free = [a for a in order if a not in reusers]
    if rank <= 0 or len(free) < 2:
        return free + reusers
    weight = {a.name: max(costs.get(a.name, 0.0), 0.0) for a in free}
    if not any(weight.values()):
        weight = dict.fromkeys(weight, 1.0)
    placed = [_schedule(free, weight, threads)]
    for _ in range(rank):
        best = None
        for k in range(len(free)):
            spans = _schedule(free[k:] + free[:k], weight, threads)
            same = sum(max(0.0, min(end, other[n][1]) - max(start, other[n][0]))
                       for other in placed for n, (start, end) in spans.items())
            score = (round(same, 9), round(max(end for _, end in spans.values()), 9), k)
            if best is None or score < best[0]:
                best = (score, k, spans)
        placed.append(best[2])
    k = best[1]
    return free[k:] + free[:k] + reusers


def _schedule(order: Sequence[Annotator], weight: dict[str, float], threads: int) -> dict[str, tuple[float, float]]:
    """Each annotator's (start, end) when ``threads`` threads take ``order``
    in turn, each annotator lasting ``weight[name]``."""
    free_at = [0.0] * max(1, threads)
    spans = {}
    for a in order:
        i = free_at.index(min(free_at))
        spans[a.name] = (free_at[i], free_at[i] + weight[a.name])
        free_at[i] = spans[a.name][1]
    return spans


def annotate_decoded(
    batch: Sequence[Decoded],
    annotators: Sequence[Annotator],
    batch_sizes: dict[str, int] | None = None,
    timings: dict[str, float] | None = None,
    pool=None,
    gpu_pool=None,
    costs: dict[str, float] | None = None,
    spans: list | None = None,
    rank: int = 0,
) -> list[tuple[Decoded, dict[str, Annotation]] | FailureRecord]:
    """Run every annotator over a batch; one result per input, in order.

    Each annotator works in chunks of its own batch size (``batch_sizes``).
    With a thread ``pool``, annotators that do not use the GPU run on it while
    the GPU annotators run here, so CPU work overlaps GPU work (OpenCV and
    torch release the GIL); each CPU annotator's batch is cut into slices
    that the pool's threads share. With a ``gpu_pool`` the GPU annotators also run
    side by side on its threads: one annotator's host-side post-processing
    (peak association, line drawing, copies back) then overlaps another's
    kernels instead of leaving the GPU idle; they start in decreasing order
    of ``costs`` (seconds so far per annotator), so the longest ones do not
    start last and leave one thread working alone at the end of a batch.
    ``timings`` accumulates seconds per annotator (summed over slices);
    ``spans``, when given, receives ``(annotator, thread, start, end)`` per
    call (epoch seconds), for timelines of where a batch's time goes.
    ``rank``: the worker's place among those sharing its GPU (see
    :func:`gpu_start_order`).
    """
    import threading
    import time

    images = [d.image for d in batch]
    keys = [d.candidate.key for d in batch]
    batch_sizes = batch_sizes or {}

    def timed(annotator: Annotator, start: int = 0, stop: int | None = None) -> tuple[list, float]:
        t0, w0 = time.perf_counter(), time.time()
        res = run_annotator(annotator, images[start:stop], keys[start:stop], batch_sizes.get(annotator.name))
        seconds = time.perf_counter() - t0
        if spans is not None:  # list.append is atomic: threads may add side by side
            spans.append((annotator.name, threading.current_thread().name, w0, w0 + seconds))
        return res, seconds

    def cpu_slices(annotator: Annotator) -> list:
        # A CPU annotator works image by image: its batch is cut into slices
        # that the pool's threads run side by side (OpenCV releases the GIL),
        # so the CPU work keeps pace with the GPU's instead of trailing it.
        workers = getattr(pool, "_max_workers", 1)
        n_cpu = sum(not a.uses_gpu for a in annotators) or 1
        step = -(-len(images) // max(1, workers // n_cpu)) if images else 1
        return [pool.submit(timed, annotator, i, i + step) for i in range(0, len(images), step)] or \
            [pool.submit(timed, annotator)]

    pending: dict[str, list] = {}
    if pool is not None or gpu_pool is not None:
        if pool is not None:
            pending = {a.name: cpu_slices(a) for a in annotators if not a.uses_gpu}
        gpu = gpu_start_order([a for a in annotators if a.uses_gpu or pool is None], annotators, costs, rank,
                              getattr(gpu_pool, "_max_workers", 1))
        if gpu_pool is not None:
            pending.update({a.name: [gpu_pool.submit(timed, a)] for a in gpu})
            done = {}
        else:
            done = {a.name: timed(a) for a in gpu}
        for name, futures in pending.items():
            parts = [f.result() for f in futures]
            done[name] = ([r for res, _ in parts for r in res], sum(sec for _, sec in parts))
    else:
        done = {a.name: timed(a) for a in annotators}
    outputs = {}
    for name, (res, seconds) in done.items():
        outputs[name] = res
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + seconds
    results: list = []
    for i, d in enumerate(batch):
        per: dict[str, Annotation] = {}
        failure = None
        for a in annotators:
            r = outputs[a.name][i]
            if isinstance(r, BaseException):
                c = d.candidate
                failure = FailureRecord(
                    c.source, FAILED, "annotate", "annotator_error",
                    f"{a.name}: {type(r).__name__}: {r}", key=c.key, error_type=type(r).__name__,
                )
                break
            per[a.name] = r
        results.append(failure if failure is not None else (d, per))
    return results


def gate_sample(decoded: Decoded, annotations: dict[str, Annotation], gates) -> FailureRecord | None:
    """A ``filtered`` record if the sample fails a yield gate, else None."""
    c = decoded.candidate
    for gate in gates:
        if gate.annotator not in annotations:
            continue
        try:
            passed = gate.passes(annotations[gate.annotator].meta)
        except ValueError as exc:
            return FailureRecord(c.source, FAILED, "gate", "gate_error", str(exc), key=c.key,
                                 error_type="ValueError")
        if not passed:
            value = annotations[gate.annotator].meta.get(gate.field)
            return FailureRecord(c.source, FILTERED, "gate", f"gate:{gate.annotator}.{gate.field}",
                                 f"{gate.annotator}.{gate.field} = {value} fails {gate.text}", key=c.key)
    return None


# ----------------------------------------------------------------------- encode


def encode_sample(
    decoded: Decoded,
    annotations: dict[str, Annotation],
    annotators: Sequence[Annotator],
    opts: AnnotateOptions,
    shard_name: str,
) -> EncodedSample | FailureRecord:
    """Encode the image, conditions, caption and metadata into member bytes."""
    c = decoded.candidate
    try:
        h, w = decoded.image.shape[:2]
        if decoded.prior_members:  # re-annotation: every existing member stays as it was
            members = dict(decoded.prior_members)
        else:
            members = {"jpg": encode_jpeg(decoded.image, opts.jpeg_quality)}
        caption, caption_source = c.caption, c.caption_source
        ann_meta: dict[str, dict] = {}
        conditions: list[str] = []
        for annotator in annotators:
            ann = annotations[annotator.name]
            desc = annotator.describe()
            desc.update(ann.meta)
            ann_meta[annotator.name] = desc
            for name, value in ann.members.items():
                if name == "txt":
                    # A captioner decides with its own policy whether an
                    # input caption is kept; both captions go into metadata.
                    choose = getattr(annotator, "choose", None)
                    caption, extra = choose(c.caption, str(value)) if choose else (str(value), {})
                    desc.update(extra)
                    if extra.get("caption_source", "generated") == "generated":
                        caption_source = annotator.name
                    continue
                if name.endswith(".png"):
                    arr = np.asarray(value)
                    if arr.shape[:2] != (h, w):
                        raise ValueError(f"{annotator.name} wrote {name} of shape {arr.shape}, expected {h}x{w}")
                    conditions.append(name[: -len(".png")])
                members[name] = encode_member(name, value)
        if c.prior_meta is not None:
            import json

            meta = json.loads(c.prior_meta)
            meta["annotators"] = {**meta.get("annotators", {}), **ann_meta}
            meta["caption_source"] = caption_source
            conditions = sorted({*conditions, *(n[: -len(".png")] for n in members if n.endswith(".png"))})
        else:
            meta = None
        meta = meta or build_metadata(
            key=c.key,
            source=c.source,
            original_size=(c.width, c.height),
            crop_box=decoded.crop_box,
            size=(w, h),
            resolution=opts.resolution,
            crop=opts.crop,
            caption_source=caption_source,
            annotators=ann_meta,
            extra={"frames": decoded.frames} if decoded.frames > 1 else None,
        )
        if c.caption_note:
            meta["caption_note"] = c.caption_note
        members["txt"] = caption.encode("utf-8")
        members["json"] = encode_member("json", meta)
    except Exception as exc:
        return FailureRecord.from_exception(c.source, "encode", "encode_error", exc, key=c.key)
    row = ManifestRow(
        key=c.key, source=c.source, shard=shard_name,
        original_width=c.width, original_height=c.height, width=w, height=h,
        caption=caption, conditions=sorted(conditions), members=sorted(members),
        bytes=sum(len(v) for v in members.values()),
    )
    return EncodedSample(c.key, members, row)


# --------------------------------------------------------------------- planning


def plan_digest(fingerprint_json: str, candidates: Sequence[Candidate]) -> str:
    """Digest of everything that decides a shard's bytes: the run's options
    and the (key, source, caption) of each planned sample."""
    h = hashlib.sha256(fingerprint_json.encode())
    for c in sorted(candidates, key=lambda c: c.key):
        h.update(b"\0".join((c.key.encode(), c.source.encode(), c.caption.encode())) + b"\n")
    return h.hexdigest()


def shard_boundaries(sorted_keys: Sequence[str], shard_size: int) -> list[str]:
    """First key of each shard: shard i holds keys in [b[i], b[i+1])."""
    return [sorted_keys[i] for i in range(0, len(sorted_keys), shard_size)]
