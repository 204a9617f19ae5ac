"""The annotator interface: a name, the members it writes, its parameters and
version, and one batch call.

An annotator is a tiny model wrapper in the spirit of Beam's ``ModelHandler``:
``setup()`` loads whatever it needs once (idempotent), and
``annotate_batch(images, keys)`` maps a batch of RGB ``uint8`` HxWx3 arrays to
one :class:`Annotation` per image. Pre- and post-processing live in pure
functions beside each annotator so they can be tested on their own.

Annotators know nothing of Beam, tar files or the command line: they can be
used from a notebook, the pipeline or the trainer alike.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from schemas.errors import UsageError


@dataclass
class Annotation:
    """The outputs of one annotator for one image.

    ``members`` maps a sample member name to its value: ``<cond>.png`` ->
    ``uint8`` (or ``uint16``) array of the input's height and width, either
    HxW or HxWx3 RGB; ``<name>.json`` -> a JSON-serialisable object; ``txt`` ->
    a caption string. ``meta`` holds the per-sample values the annotator used
    or measured (e.g. the Canny thresholds drawn for this sample, the number of
    lines found); it is stored in the sample's ``json`` under the annotator's
    name.
    """

    members: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


class AnnotatorError(Exception):
    """Base class for errors raised by annotators."""


class MissingWeightsError(AnnotatorError, UsageError, FileNotFoundError):
    """Model weights are not where they were looked for.

    The message names the missing file(s), the places searched and how to get
    them; the command line prints it as one line.
    """


class Annotator:
    """Base class of every annotator. Subclass, set the class attributes, and
    decorate with :func:`annotators.register_annotator`.

    Constructor keyword arguments are the annotator's options; they are
    validated by :func:`annotators.create_annotator` and reported by
    :attr:`params` so they can be recorded in each sample's metadata.
    """

    #: Registry name, also the condition name (``<name>.png``).
    name: ClassVar[str] = ""
    #: Bumped when outputs change for the same input and parameters.
    version: ClassVar[str] = "1"
    #: Member names this annotator writes into each sample.
    members: ClassVar[tuple[str, ...]] = ()
    #: True for neural annotators that benefit from a GPU.
    uses_gpu: ClassVar[bool] = False
    #: A sensible batch size for ``annotate_batch`` on the default device.
    default_batch_size: ClassVar[int] = 16
    #: Annotators whose work this one reuses (normal reuses depth's forward
    #: pass): a pipeline running both schedules this one after them.
    run_after: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any) -> None:
        self._options = dict(options)

    @property
    def params(self) -> dict[str, Any]:
        """The options in effect, JSON-serialisable (recorded in metadata)."""
        return {k: _jsonable(v) for k, v in sorted(self._options.items())}

    def describe(self) -> dict[str, Any]:
        """Name, version, members and parameters, for sample metadata."""
        return {
            "version": self.version,
            "members": list(self.members),
            "params": self.params,
        }

    def setup(self) -> None:
        """Load models or other expensive state. Safe to call more than once."""

    def import_code(self) -> None:
        """Import the code :meth:`setup` runs (torch, the network's module),
        without reading weights or touching a device. Importing is most of
        a fresh process's start-up and holds the interpreter lock; a
        pipeline imports first, then loads weights while it reads inputs."""

    def preflight(self) -> None:
        """Cheap checks before a run starts (e.g. that weight files exist), so
        a missing file fails in one line before any data is read. Raises
        :class:`MissingWeightsError`; loads nothing."""

    def annotate_batch(
        self, images: Sequence[np.ndarray], keys: Sequence[str] | None = None
    ) -> list[Annotation]:
        """Annotate a batch of RGB uint8 HxWx3 images; one Annotation each.

        ``keys`` are the sample keys; annotators with per-sample randomness
        (e.g. random Canny thresholds) seed it from the key so reruns match.
        """
        raise NotImplementedError

    def __call__(self, image: np.ndarray, key: str = "") -> Annotation:
        """Annotate one image (a batch of one)."""
        return self.annotate_batch([image], [key])[0]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({opts})"

    @classmethod
    def option_names(cls) -> list[str]:
        """Names of the keyword options the constructor accepts."""
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate the annotator input contract: RGB uint8 HxWx3, C-contiguous."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected an RGB uint8 HxWx3 array, got dtype={image.dtype} shape={image.shape}"
        )
    return np.ascontiguousarray(image)


def check_chunk_size(name: str, chunk_size: Any) -> int | None:
    """The ``chunk_size`` option of annotators that split a batch to overlap
    host and device work: None (the annotator's default) or an int >= 1."""
    if chunk_size is None:
        return None
    if int(chunk_size) < 1:
        raise ValueError(f"{name} chunk_size must be >= 1, got {chunk_size!r}")
    return int(chunk_size)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, (list,)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def key_rng(key: str, seed: int, salt: str) -> np.random.Generator:
    """A random generator seeded from a sample key, a user seed and a salt.

    Per-sample randomness derived this way is identical on every rerun and
    machine and independent of batch composition or worker order.
    """
    import hashlib

    digest = hashlib.sha256(f"{salt}\0{seed}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
