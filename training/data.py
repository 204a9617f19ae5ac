"""Streaming controlset shards into training batches, resumable to the sample.

The stream is built so that its position can be saved and restored exactly:

* There are ``world_size * num_workers`` *streams* (one per DataLoader worker
  of each rank). Each stream reads its own sequence of *rounds*; a round is a
  list of shards: in epoch mode a seeded permutation of all shards split
  between the streams, in ``resampled`` mode shards drawn with replacement.
  With fewer shards than streams every stream reads all shards and keeps every
  ``n_streams``-th sample instead, so no worker sits idle.
* Samples go through a seeded shuffle buffer that is flushed at the end of
  each round, so the position of a stream is just ``(round, items emitted in
  that round)``. Every batch carries the position of its stream after it.
* Resuming replays the current round's tar members up to the saved position
  without decoding them, then continues; augmentation randomness is seeded
  per sample from its position, not from a shared generator, so replaying does
  not shift it.
* The DataLoader takes batches from its workers round-robin; on resume the
  worker ids are rotated so the next batch comes from the stream that would
  have delivered it in the uninterrupted run.

Samples that cannot be decoded are skipped with a warning and counted.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.utils.data as tud

from schemas.errors import UsageError
from schemas.sample import IMAGE_MEMBER, TEXT_MEMBER, condition_member

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------
# shard lists


def expand_shards(specs: Sequence[str] | str) -> list[str]:
    """Expand shard specs (paths, globs, ``{000..009}`` brace patterns, fsspec
    URLs, ``::``-separated lists) into a sorted-within-spec list of URLs."""
    import braceexpand
    import fsspec

    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    for spec in specs:
        for part in str(spec).split("::"):
            for url in braceexpand.braceexpand(part):
                if not url:
                    continue
                if _GLOB_CHARS & set(url):
                    if "://" in url:
                        fs, _, paths = fsspec.get_fs_token_paths(url)
                        protocol = url.split("://", 1)[0]
                        matches = sorted(f"{protocol}://{p}" if "://" not in p else p for p in fs.glob(url))
                    else:
                        matches = sorted(glob.glob(os.path.expanduser(url)))
                    if not matches:
                        raise UsageError(f"no shards match {url!r}")
                    out.extend(matches)
                else:
                    if "://" not in url and not os.path.exists(os.path.expanduser(url)):
                        raise UsageError(f"shard not found: {url}")
                    out.append(os.path.expanduser(url) if "://" not in url else url)
    if not out:
        raise UsageError("no shards given")
    return out


def iter_raw_samples(url: str, on_error) -> Iterator[dict]:
    """Raw samples (``{"__key__", member: bytes}``) of one tar shard, streamed
    through fsspec so local paths and remote URLs work the same."""
    import fsspec
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def handler(exc: Exception) -> bool:
        on_error(url, exc)
        return True  # keep going with the next member / shard

    try:
        with fsspec.open(url, "rb") as stream:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
            yield from group_by_keys(files, handler=handler)
    except Exception as exc:  # unreadable shard: count it and move on
        on_error(url, exc)


# --------------------------------------------------------------------------
# decoding and augmentation


@dataclass
class SampleSpec:
    """How raw samples become training tensors."""

    conditions: tuple[str, ...] = ("canny",)
    resolution: int = 512
    random_flip: bool = True
    center_crop: bool = False
    proportion_empty_prompts: float = 0.5
    #: Read latents and text embeddings cached in the shards (see
    #: :mod:`training.cache`) instead of the image; crops are then centred.
    cached: bool = False
    #: Base fingerprint the cached members must carry (``cached`` only).
    cache_fingerprint: str | None = None


def _decode(data: bytes, mode: str):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert(mode)


def _image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the image header, without decoding the pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """Size after scaling the shorter side to ``resolution`` (before the square crop)."""
    w, h = size
    scale = resolution / min(w, h)
    if scale == 1.0:
        return w, h
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def decode_sample(raw: dict, spec: SampleSpec, rng: np.random.Generator) -> dict:
    """One raw sample -> ``pixel_values`` (3xRxR float32 in [-1, 1]),
    ``conditioning`` (3K x R x R in [0, 1], K conditions each as RGB, stacked)
    and ``caption`` (replaced by "" with probability
    ``proportion_empty_prompts``). Crop and flip are drawn once and applied to
    the image and every condition alike.

    With ``spec.cached`` the image is not decoded: the sample gives instead
    ``latents`` (the cached latent distribution of the centre crop, flipped
    or not as the condition is), ``text_embeds`` (the caption's cached
    embedding) and ``empty_prompt`` (whether the prompt is dropped); the crop
    is always centred, since the cache holds the centre crop only."""
    from PIL import Image

    cached = spec.cached
    if cached:
        from training.cache import read_cached

        moments, text_embeds = read_cached(raw, resolution=spec.resolution, fingerprint=spec.cache_fingerprint)
        image_size = _image_size(raw[IMAGE_MEMBER])
        image = None
    else:
        image = _decode(raw[IMAGE_MEMBER], "RGB")
        image_size = image.size
    conds = []
    for name in spec.conditions:
        member = condition_member(name)
        if member not in raw:
            raise KeyError(f"sample has no {member} member")
        cond = _decode(raw[member], "RGB")  # edge maps are L; 3 channels like ControlNet's inputs
        if cond.size != image_size:
            raise ValueError(f"{member} is {cond.size}, image is {image_size}")
        conds.append(cond)
    caption = raw.get(TEXT_MEMBER, b"").decode("utf-8").strip()

    # Resize the shorter side to the resolution, then crop a square.
    r = spec.resolution
    size = resized_size(image_size, r)
    if size != image_size:
        if image is not None:
            image = image.resize(size, Image.BICUBIC)
        # Nearest keeps edge maps binary and segmentation labels exact.
        conds = [c.resize(size, Image.NEAREST) for c in conds]
    w, h = size
    if spec.center_crop or cached:
        left, top = (w - r) // 2, (h - r) // 2
    else:
        left, top = int(rng.integers(0, w - r + 1)), int(rng.integers(0, h - r + 1))
    flip = spec.random_flip and bool(rng.random() < 0.5)
    empty = bool(rng.random() < spec.proportion_empty_prompts)

    def prep(im):
        a = np.asarray(im.crop((left, top, left + r, top + r)), dtype=np.float32)
        if flip:
            a = a[:, ::-1]
        return np.ascontiguousarray(a.transpose(2, 0, 1)) / 255.0

    cond = np.concatenate([prep(c) for c in conds], axis=0) if conds else np.zeros((0, r, r), np.float32)
    out = {"conditioning": cond, "caption": "" if empty else caption, "key": raw["__key__"]}
    if cached:
        out["latents"] = moments[1 if flip else 0]
        out["text_embeds"] = text_embeds
        out["empty_prompt"] = empty
    else:
        out["pixel_values"] = prep(image) * 2.0 - 1.0
    return out


# --------------------------------------------------------------------------
# the resumable stream


@dataclass
class StreamPosition:
    """Where one stream is: its round and the items it emitted in that round."""

    round: int = 0
    index: int = 0


@dataclass
class DataState:
    """Position of every stream of this rank plus batches consumed (for the
    worker rotation). Saved in checkpoints."""

    batches: int = 0
    streams: dict[int, StreamPosition] = field(default_factory=dict)
    skipped: int = 0

    def to_dict(self) -> dict:
        return {
            "batches": self.batches,
            "skipped": self.skipped,
            "streams": {str(k): [v.round, v.index] for k, v in self.streams.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DataState":
        return cls(
            batches=int(d["batches"]),
            skipped=int(d.get("skipped", 0)),
            streams={int(k): StreamPosition(int(v[0]), int(v[1])) for k, v in d["streams"].items()},
        )

    def update(self, batch: dict) -> None:
        """Record a consumed batch."""
        self.batches += 1
        self.skipped += int(batch["skipped"])
        self.streams[int(batch["stream"])] = StreamPosition(int(batch["round"]), int(batch["index"]))


class ShardStream(tud.IterableDataset):
    """An infinite, resumable iterable of collated batches, one stream per
    DataLoader worker of each rank."""

    def __init__(
        self,
        shards: Sequence[str],
        spec: SampleSpec,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        state: DataState | None = None,
    ) -> None:
        self.shards = list(shards)
        self.spec = spec
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.state = state or DataState()

    @property
    def n_streams(self) -> int:
        return self.world_size * self.workers

    def _round_shards(self, stream: int, rnd: int) -> tuple[list[str], int | None]:
        """Shards of one round of a stream, and the sample-level stride (None
        when whole shards are split between the streams)."""
        n = self.n_streams
        if self.resampled:
            rng = random.Random(f"{self.seed}-resample-{stream}-{rnd}")
            k = max(1, len(self.shards) // n)
            return [rng.choice(self.shards) for _ in range(k)], None
        perm = list(self.shards)
        random.Random(f"{self.seed}-epoch-{rnd}").shuffle(perm)
        if len(perm) >= n:
            return perm[stream::n], None
        return perm, n

    def _round_items(self, stream: int, rnd: int, counter: list[int]) -> Iterator[dict]:
        """Shuffled raw samples of one round (undecoded)."""
        shards, stride = self._round_shards(stream, rnd)

        def on_error(url, exc):
            counter[0] += 1
            log.warning("skipping unreadable data in %s: %s: %s", url, type(exc).__name__, exc)

        def source():
            i = 0
            for url in shards:
                for raw in iter_raw_samples(url, on_error):
                    if stride is None or i % stride == stream:
                        yield raw
                    i += 1

        rng = random.Random(f"{self.seed}-shuffle-{stream}-{rnd}")
        buf: list[dict] = []
        for raw in source():
            buf.append(raw)
            if len(buf) >= self.shuffle_buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        while buf:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()

    def iter_stream(self, stream: int) -> Iterator[dict]:
        """Batches of one stream from its saved position on, forever."""
        pos = self.state.streams.get(stream, StreamPosition())
        rnd, start = pos.round, pos.index
        batch: list[dict] = []
        skipped = [0]
        empty_rounds = 0
        while True:
            index = 0
            produced = False
            for raw in self._round_items(stream, rnd, skipped):
                index += 1
                produced = True
                if index <= start:
                    if index == start:
                        skipped[0] = 0  # already counted before the interruption
                    continue  # replaying up to the saved position
                rng = np.random.default_rng([self.seed, stream, rnd, index])
                try:
                    item = decode_sample(raw, self.spec, rng)
                except Exception as exc:
                    skipped[0] += 1
                    log.warning("skipping bad sample %s: %s: %s", raw.get("__key__"), type(exc).__name__, exc)
                    continue
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self._collate(batch, stream, rnd, index, skipped[0])
                    batch, skipped[0] = [], 0
            if produced:
                empty_rounds = 0
            else:
                empty_rounds += 1
                if empty_rounds > 3:
                    raise RuntimeError(f"data stream {stream} found no samples in its shards")
            if start > index:
                log.warning("stream %d: saved position %d is past the end of round %d", stream, start, rnd)
            # A batch may straddle two rounds; its position is the later one.
            rnd, start = rnd + 1, 0

    @staticmethod
    def _collate(items: list[dict], stream: int, rnd: int, index: int, skipped: int) -> dict:
        batch = {
            "conditioning": torch.from_numpy(np.stack([i["conditioning"] for i in items])),
            "captions": [i["caption"] for i in items],
            "keys": [i["key"] for i in items],
            "stream": stream,
            "round": rnd,
            "index": index,
            "skipped": skipped,
        }
        if "latents" in items[0]:  # cached: see training.cache.cached_inputs
            batch["latents"] = torch.from_numpy(np.stack([i["latents"] for i in items]))
            batch["text_embeds"] = torch.from_numpy(np.stack([i["text_embeds"] for i in items]))
            batch["empty_prompt"] = torch.tensor([i["empty_prompt"] for i in items], dtype=torch.bool)
        else:
            batch["pixel_values"] = torch.from_numpy(np.stack([i["pixel_values"] for i in items]))
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = tud.get_worker_info()
        physical = info.id if info is not None else 0
        # Rotate so the DataLoader's next batch comes from the stream that
        # would have delivered it had the run not been interrupted.
        logical = (physical + self.state.batches) % self.workers
        return self.iter_stream(self.rank * self.workers + logical)


def make_loader(stream: ShardStream) -> tud.DataLoader:
    """A DataLoader over a :class:`ShardStream` (batches are built in the workers)."""
    return tud.DataLoader(
        stream,
        batch_size=None,
        num_workers=stream.num_workers,
        prefetch_factor=2 if stream.num_workers else None,
    )


def load_validation_samples(shards: Sequence[str], spec: SampleSpec, n: int) -> list[dict]:
    """The first ``n`` decodable samples of held-out shards, centre-cropped,
    captions kept (no prompt dropout, no flip)."""
    vspec = SampleSpec(spec.conditions, spec.resolution, random_flip=False, center_crop=True, proportion_empty_prompts=0.0)
    out: list[dict] = []
    rng = np.random.default_rng(0)
    for url in expand_shards(shards):
        for raw in iter_raw_samples(url, lambda u, e: log.warning("validation shard %s: %s", u, e)):
            try:
                out.append(decode_sample(raw, vspec, rng))
            except Exception as exc:
                log.warning("skipping bad validation sample %s: %s", raw.get("__key__"), exc)
                continue
            if len(out) >= n:
                return out
    return out
