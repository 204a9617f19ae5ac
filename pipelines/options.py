"""The options of an annotate run, as one typed, serialisable value."""

from __future__ import annotations

import operator
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from schemas.codec import JPEG_QUALITY
from schemas.sample import SCHEMA_VERSION

DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class AnnotateOptions:
    """Everything that decides what an annotate run writes.

    ``annotators`` is a tuple of ``(name, options)`` pairs, in the order given.
    """

    inputs: tuple[str, ...]
    output: str
    annotators: tuple[tuple[str, dict[str, Any]], ...] = (("canny", {}),)
    resolution: int = 512
    crop: str = "center"
    shard_size: int = 1000
    prefix: str = "shard"
    min_size: int = 256
    max_aspect: float = 3.0
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    batch_size: int | None = None  # images per Beam batch; None: the largest annotator batch
    annotator_batch_sizes: tuple[tuple[str, int], ...] = ()  # per-annotator chunk sizes
    gates: tuple[str, ...] = ()  # yield gates, e.g. "openpose.keypoints>=8", "mlsd.lines>16"
    near_duplicates: int = 0  # >0: drop images whose perceptual hash is within N bits of a kept one
    io_threads: int = 0  # decode/encode threads per worker process; 0: half the CPUs per local worker, 2 to 8
    gpu_threads: int = 2  # GPU annotators running side by side per worker process (1: one after another)
    cpu_threads: int = 0  # threads sharing the CPU annotators' work per worker process; 0: as io_threads
    #: threads reading remote inputs while probing, per worker; 0: io_threads
    #: (a run sets it to the uncapped default when io_threads was not given)
    probe_threads: int = 0
    gpus: int = 0  # >0: worker processes claiming GPUs, workers_per_gpu on each
    #: worker processes sharing each GPU (>1 only when asked: each process
    #: has its own interpreter lock and models, which helps when one
    #: process's host work keeps its GPU waiting)
    workers_per_gpu: int = 1
    run_id: str = ""  # distinguishes concurrent runs (GPU claims, preloaded models); set per run
    jpeg_quality: int = JPEG_QUALITY
    #: decode large JPEGs at a reduced DCT scale when their crop keeps at
    #: least twice the output's pixels per axis (pipelines.decode.DRAFT_GAP)
    reduced_jpeg_decode: bool = True
    #: each worker annotates one made-up batch while the inputs are still
    #: being planned, so CUDA graph capture and the networks' first calls do
    #: not land on the first real batch (GPU annotators, centre crop only)
    warm_batch: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.io_threads < 0:
            raise ValueError(f"io threads must be >= 0, got {self.io_threads}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu threads must be >= 0, got {self.cpu_threads}")
        if self.gpu_threads < 1:
            raise ValueError(f"gpu threads must be >= 1, got {self.gpu_threads}")
        if self.workers_per_gpu < 1:
            raise ValueError(f"workers per GPU must be >= 1, got {self.workers_per_gpu}")
        if self.resolution < 64 or self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 and >= 64, got {self.resolution}")
        if self.shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {self.shard_size}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        for gate in self.gates:
            parse_gate(gate)
        if self.max_aspect < 1:
            raise ValueError(f"max aspect must be >= 1, got {self.max_aspect}")
        if not self.prefix or any(c in self.prefix for c in "/.\\ "):
            raise ValueError(f"shard prefix must be a plain name without dots, got {self.prefix!r}")

    def fingerprint(self, annotator_descriptions: dict[str, dict]) -> dict[str, Any]:
        """What, besides the samples themselves, decides a shard's bytes.

        Used in each shard's plan digest, so a rerun with other options
        rewrites shards instead of keeping stale ones.
        """
        fingerprint = {
            "schema_version": SCHEMA_VERSION,
            "resolution": self.resolution,
            "crop": self.crop,
            "shard_size": self.shard_size,
            "jpeg_quality": self.jpeg_quality,
            "annotators": annotator_descriptions,
            "gates": sorted(self.gates),
            "near_duplicates": self.near_duplicates,
        }
        if self.reduced_jpeg_decode:
            # only when on: a full decode is what shards were made with before
            # the option existed, and those stay valid for --full-jpeg-decode
            fingerprint["reduced_jpeg_decode"] = True
        return fingerprint

    @property
    def gpu_workers(self) -> int:
        """Worker processes claiming GPUs on a host: ``gpus`` x ``workers_per_gpu``."""
        return self.gpus * self.workers_per_gpu

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_threads(workers: int = 1, cap: int | None = None) -> int:
    """Decode/encode threads, and CPU-annotator threads, per worker process:
    half the machine's CPUs divided among ``workers`` local worker processes
    (2 to 8, or to ``cap``; the other half runs the other kind), so local
    runs do not oversubscribe the cores."""
    return max(2, min(cap or 8, 8, (os.cpu_count() or 2) // 2 // max(1, workers)))


_GATE_RE = re.compile(r"^\s*([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\s*(>=|<=|==|!=|>|<)\s*(-?[0-9.]+)\s*$")
_OPS = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
    "==": operator.eq, "!=": operator.ne,
}


@dataclass(frozen=True)
class Gate:
    """A yield gate on an annotator's per-sample metadata, e.g. keep only
    images where ``mlsd.lines > 16`` (as ControlNet 1.1 selected its M-LSD
    data) or ``openpose.keypoints >= 8``."""

    annotator: str
    field: str
    op: str
    value: float

    @property
    def text(self) -> str:
        return f"{self.annotator}.{self.field}{self.op}{self.value:g}"

    def passes(self, meta: dict[str, Any]) -> bool:
        value = meta.get(self.field)
        if not isinstance(value, (int, float)):
            raise ValueError(f"annotator {self.annotator!r} reports no numeric {self.field!r}")
        return bool(_OPS[self.op](value, self.value))


def parse_gate(text: str) -> Gate:
    m = _GATE_RE.match(text)
    if not m:
        raise ValueError(f"gate must look like NAME.FIELD>=NUMBER (ops: >= > <= < == !=), got {text!r}")
    return Gate(m.group(1), m.group(2), m.group(3), float(m.group(4)))
