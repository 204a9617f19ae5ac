"""Model weights of the neural annotators: where they are, and loading them safely.

The files are those of the Hugging Face repository ``lllyasviel/Annotators``,
under their names there (``ControlNetHED.pth``, ``mlsd_large_512_fp32.pth``,
``body_pose_model.pth``, ``hand_pose_model.pth``, ``facenet.pth``). They are
looked for in

1. the folder given as ``weights=DIR`` (``--weights DIR`` on the command line),
   if any — and only there, so an explicit folder is never silently bypassed;
2. otherwise the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), read
   without network access.

``controlset weights fetch`` fills the cache (or a folder) where a network
exists. Files are loaded with ``torch.load(weights_only=True)`` (or safetensors)
and checked against a sha256 where one is known.

This module also holds the few runtime helpers the neural annotators share
(input grouping, detection size), so each annotator module stays about its
model.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from annotators.base import MissingWeightsError
from schemas.errors import UsageError

#: The Hugging Face repository the files come from.
REPO_ID = "lllyasviel/Annotators"

#: Files each annotator needs (``openpose`` needs the hand/face files only when
#: those options are on; ``files_for`` handles that).
ANNOTATOR_FILES: dict[str, tuple[str, ...]] = {
    "hed": ("ControlNetHED.pth",),
    "mlsd": ("mlsd_large_512_fp32.pth",),
    "openpose": ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
}

#: Expected sha256 of each file. None means "not known here": the values were
#: not available when this table was written and are deliberately not guessed.
#: Files read from the Hugging Face cache are still checked, against the
#: content hash the cache stores them under (the LFS object id is the sha256).
KNOWN_SHA256: dict[str, str | None] = {
    "ControlNetHED.pth": None,
    "mlsd_large_512_fp32.pth": None,
    "body_pose_model.pth": None,
    "hand_pose_model.pth": None,
    "facenet.pth": None,
}

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# (path, size, mtime) -> verified; hashing a 200 MB file once per process is enough.
_VERIFIED: set[tuple[str, int, float]] = set()


class WeightsChecksumError(UsageError):
    """A weights file does not have the expected sha256 (corrupt or wrong file)."""


def all_files() -> list[str]:
    """Every known file name, in a stable order."""
    seen: list[str] = []
    for files in ANNOTATOR_FILES.values():
        seen.extend(f for f in files if f not in seen)
    return seen


def hf_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder in effect (for messages)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency
        return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


def _from_hf_cache(filename: str) -> str | None:
    """Path of ``filename`` in the local Hugging Face cache, or None.

    Never touches the network (``local_files_only``), whatever HF_HUB_OFFLINE says.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        found = try_to_load_from_cache(REPO_ID, filename)
    except Exception:
        found = None
    if isinstance(found, str) and os.path.isfile(found):
        return found
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(REPO_ID, filename, local_files_only=True)
    except Exception:
        return None


def locate(filenames: Sequence[str], weights: str | os.PathLike | None = None) -> dict[str, str]:
    """Paths of ``filenames``: in the folder ``weights`` if given, else the HF cache.

    Raises :class:`MissingWeightsError` naming every missing file, the place
    searched and how to get them.
    """
    found: dict[str, str] = {}
    missing: list[str] = []
    if weights is not None:
        folder = Path(weights).expanduser()
        for name in filenames:
            path = folder / name
            if path.is_file():
                found[name] = str(path)
            else:
                missing.append(name)
        where = f"the weights folder {str(folder)!r}" + (
            "" if folder.is_dir() else " (which does not exist)"
        )
    else:
        for name in filenames:
            path = _from_hf_cache(name)
            if path is None:
                missing.append(name)
            else:
                found[name] = path
        where = f"the Hugging Face cache {hf_cache_dir()!r} (repo {REPO_ID})"
    if missing:
        names = " ".join(missing)
        raise MissingWeightsError(
            f"missing model weights {', '.join(missing)}: searched {where}; "
            f"get them with `controlset weights fetch {names}` where a network exists "
            f"(or `--dest DIR` and pass `--weights DIR`), or copy them from "
            f"https://huggingface.co/{REPO_ID} into a folder given as --weights"
        )
    return found


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def expected_sha256(path: str | os.PathLike, filename: str) -> str | None:
    """The sha256 ``path`` must have: the known value for ``filename``, else
    (for a file in the Hugging Face cache) the content hash it is stored under."""
    known = KNOWN_SHA256.get(filename)
    if known:
        return known
    real = os.path.realpath(path)
    # HF cache layout: .../models--owner--name/blobs/<sha256 of an LFS file>
    if os.path.basename(os.path.dirname(real)) == "blobs":
        blob = os.path.basename(real)
        if _SHA256_RE.match(blob):
            return blob
    return None


def verify(path: str | os.PathLike, filename: str) -> None:
    """Check ``path`` against its expected sha256, if one is known."""
    expected = expected_sha256(path, filename)
    if expected is None:
        return
    st = os.stat(path)
    ident = (os.path.realpath(path), st.st_size, st.st_mtime)
    if ident in _VERIFIED:
        return
    actual = sha256_of(path)
    if actual != expected:
        raise WeightsChecksumError(
            f"weights file {str(path)!r} ({filename}) has sha256 {actual}, expected {expected}: "
            f"the file is corrupt or not the {REPO_ID} file; delete it and fetch it again"
        )
    _VERIFIED.add(ident)


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors of a checkpoint, loaded without executing code from the file.

    ``.safetensors`` files go through safetensors; anything else through
    ``torch.load(map_location="cpu", weights_only=True)``.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise UsageError(f"weights file {path!r} does not hold a state dict")
    return state


def load_weights(filename: str, weights: str | os.PathLike | None = None) -> dict[str, Any]:
    """Locate, verify and load one file by its repository name."""
    path = locate([filename], weights)[filename]
    verify(path, filename)
    return load_state_dict(path)


def network_options(name: str, weights, device, precision, detect_resolution,
                    cuda_graphs: bool = True) -> dict[str, Any]:
    """Validated options shared by the lllyasviel-weight annotators."""
    check_precision_name(precision)
    if detect_resolution is not None and int(detect_resolution) < 64:
        raise ValueError(f"{name} detect_resolution must be >= 64")
    return {
        "weights": None if weights is None else str(weights),
        "device": device,
        "precision": precision,
        "detect_resolution": None if detect_resolution is None else int(detect_resolution),
        "cuda_graphs": bool(cuda_graphs),
    }


def run_network(owner: Any, net: Any, x: Any, what: str, exact_shapes: bool = False) -> Any:
    """``net(x)``, replayed from CUDA graphs when the owner's ``cuda_graphs``
    option is on and ``x`` is on a GPU, which takes the kernel launches off
    the host (H200: M-LSD 1547 against 1463 img/s eager, OpenPose 2297
    against 2139, HED about the same). ``exact_shapes``: one graph per batch
    size met, rather than padding batches to powers of two."""
    if owner._options.get("cuda_graphs") and x.device.type == "cuda":
        from annotators._torch import batch_bucket, graphed

        return graphed(owner, net, what, bucket=(lambda n: n) if exact_shapes else batch_bucket)(x)
    return net(x)


def load_network(factory: Callable[[], Any], filename: str, options: dict[str, Any], strict: bool = True):
    """Build ``factory()``, load ``filename`` into it (located, verified and
    loaded safely) and move it to the options' device and precision.

    Returns ``(network, device, dtype)``."""
    from annotators._torch import resolve_device, resolve_precision

    state = load_weights(filename, options["weights"])
    device = resolve_device(options["device"])
    dtype = resolve_precision(options["precision"], device)
    return prepare_model(build_loaded(factory, state, strict), device, dtype), device, dtype


def build_loaded(factory: Callable[[], Any], state: dict[str, Any], strict: bool = True):
    """``factory()`` with ``state`` loaded into it, built without first
    filling its layers with random numbers: the modules are made on the meta
    device and take the loaded tensors themselves. Falls back to a normal
    build when that leaves anything unloaded (a buffer the file does not
    hold, with ``strict=False``, say). Random initialisation of a large
    network is seconds of CPU work per worker process, repeated for every
    process that starts at once."""
    import torch

    try:
        with torch.device("meta"):
            net = factory()
        net.load_state_dict(state, strict=strict, assign=True)
    except Exception:  # whatever a meta build trips on, the normal build decides
        net = None
    if net is None or _has_meta_tensors(net):
        net = factory()
        net.load_state_dict(state, strict=strict)
    return net


def _has_meta_tensors(net) -> bool:
    """Any parameter, buffer or plain tensor attribute still on the meta device."""
    import torch

    if any(t.is_meta for t in (*net.parameters(), *net.buffers())):
        return True
    return any(isinstance(v, torch.Tensor) and v.is_meta for m in net.modules() for v in vars(m).values())


def resolve_names(names: Iterable[str] | None) -> list[str]:
    """Annotator names and/or file names -> file names (all files when empty)."""
    names = list(names or [])
    if not names:
        return all_files()
    files: list[str] = []
    for name in names:
        if name in ANNOTATOR_FILES:
            picked: Sequence[str] = ANNOTATOR_FILES[name]
        elif name in KNOWN_SHA256:
            picked = (name,)
        else:
            raise UsageError(
                f"unknown weights name {name!r}; valid: "
                f"{', '.join(list(ANNOTATOR_FILES) + all_files())}"
            )
        files.extend(f for f in picked if f not in files)
    return files


def fetch(names: Iterable[str] | None = None, dest: str | os.PathLike | None = None) -> dict[str, str]:
    """Download files (by annotator or file name; all when empty) from the hub.

    With ``dest`` the files are placed in that folder (usable as ``--weights``);
    without, they go to the Hugging Face cache. Returns {file name: path}.
    Fails with one line when the hub cannot be reached.
    """
    files = resolve_names(names)
    if hf_offline():
        raise UsageError(
            f"cannot download {', '.join(files)}: HF_HUB_OFFLINE is set; unset it on a machine "
            f"with network access, or copy the files from https://huggingface.co/{REPO_ID}"
        )
    import logging

    from huggingface_hub import hf_hub_download

    # The hub client logs every retry; the failure is reported once below.
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        return _download(files, dest, hf_hub_download)
    finally:
        hub_log.setLevel(level)


def _download(files: list[str], dest, hf_hub_download) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in files:
        try:
            if dest is not None:
                Path(dest).mkdir(parents=True, exist_ok=True)
                path = hf_hub_download(REPO_ID, name, local_dir=str(dest))
            else:
                path = hf_hub_download(REPO_ID, name)
        except Exception as exc:  # network, auth, missing file: one clear line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                f"could not download {name} from https://huggingface.co/{REPO_ID}: "
                f"{type(exc).__name__}: {reason[:200]}"
            ) from None
        verify(path, name)
        out[name] = path
    return out


def status(weights: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per (annotator, file): where it was found, or None."""
    rows = []
    for annotator, files in ANNOTATOR_FILES.items():
        for name in files:
            try:
                path: str | None = locate([name], weights)[name]
            except MissingWeightsError:
                path = None
            rows.append({"annotator": annotator, "file": name, "path": path})
    return rows


# --------------------------------------------------------------------------
# Runtime helpers shared by the neural annotators.


def reference_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Size (h, w) controlnet-aux's ``resize_image`` gives an image: shorter side
    scaled to ``resolution``, both sides rounded to a multiple of 64."""
    k = float(resolution) / min(height, width)
    h = int(np.round(height * k / 64.0)) * 64
    w = int(np.round(width * k / 64.0)) * 64
    return max(h, 64), max(w, 64)


def group_by_shape(images: Sequence[np.ndarray]) -> dict[tuple[int, int], list[int]]:
    """Indices of the images grouped by (height, width), in input order, so each
    group runs through a network as one batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((int(image.shape[0]), int(image.shape[1])), []).append(i)
    return groups


def images_to_device(images: Sequence[np.ndarray], device) -> "Any":
    """Stack uint8 HxWx3 images into an (N, 3, H, W) uint8 tensor on ``device``.

    The copy to the device is uint8 (4x less traffic than float); the
    conversion to float happens there. On CUDA the images are written once
    into a page-locked buffer and uploaded asynchronously on a separate copy
    stream, so the upload of one chunk overlaps the computation of the
    previous one; the current stream waits for the copy before using it.
    """
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2)
    # From the caching host allocator: a block is handed out again only after
    # the copies recorded on it have finished, so no manual ring is needed.
    host = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=True)
    _stage(host.numpy(), images)
    compute = torch.cuda.current_stream(device)
    copy = cuda_stream("upload", device)
    with torch.cuda.stream(copy):
        dev = host.to(device, non_blocking=True)
    compute.wait_stream(copy)
    # the block was allocated on the copy stream but is used (and freed) on
    # the compute stream: keep it from being reused before that work is done
    dev.record_stream(compute)
    return dev.permute(0, 3, 1, 2)


_STAGING_POOL: Any = None
_STAGING_LOCK = threading.Lock()
#: Batches larger than this are copied into page-locked memory by several
#: threads (numpy's copy releases the GIL): one thread copies about 5-10 GB/s,
#: a 64-image batch at 512 px is 50 MB.
_PARALLEL_STAGING_BYTES = 8 << 20


def _stage(staging: np.ndarray, images: Sequence[np.ndarray]) -> None:
    """Copy ``images`` into the rows of ``staging``."""
    global _STAGING_POOL
    if staging.nbytes < _PARALLEL_STAGING_BYTES or len(images) < 2:
        for i, image in enumerate(images):
            staging[i] = image
        return
    with _STAGING_LOCK:  # GPU threads may stage at the same time
        if _STAGING_POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _STAGING_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                               thread_name_prefix="controlset-staging")
    workers = _STAGING_POOL._max_workers
    step = -(-len(images) // workers)

    def copy(start: int) -> None:
        for i in range(start, min(len(images), start + step)):
            staging[i] = images[i]

    list(_STAGING_POOL.map(copy, range(0, len(images), step)))


_STREAMS: dict[tuple[str, str], Any] = {}


def cuda_stream(name: str, device) -> "Any":
    """A CUDA stream for one purpose (``name``) on ``device``, made once and
    shared by every caller in the process."""
    import torch

    key = (name, str(device))
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


class HostCopy:
    """Device tensors on their way to the host.

    On CUDA each tensor is copied with ``non_blocking=True`` into a
    page-locked buffer and one event is recorded after the copies, so the
    host can go on queueing work; :meth:`arrays` waits on that event only.
    On the CPU the tensors are used as they are.
    """

    def __init__(self, tensors: dict[str, "Any"], device) -> None:
        import torch

        self.event = None
        if torch.device(device).type == "cuda":
            self.tensors = {}
            for k, v in tensors.items():
                buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                buf.copy_(v, non_blocking=True)
                self.tensors[k] = buf
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))
        else:
            self.tensors = {k: v.contiguous() for k, v in tensors.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """Numpy copies of the tensors (waits for their copies on CUDA).

        The page-locked buffers go back to the allocator afterwards, so the
        returned arrays own their memory.
        """
        if self.event is not None:
            self.event.synchronize()
            out = {k: v.numpy().copy() for k, v in self.tensors.items()}
        else:
            out = {k: v.numpy() for k, v in self.tensors.items()}
        self.tensors = {}
        return out


def chunk_size(option: int | None, n: int, device, gpu_chunk: int | None = None) -> int:
    """Images per chunk when a batch of ``n`` is split so that host and
    device work overlap: ``option`` when given; on CUDA ``gpu_chunk`` (the
    annotator's choice, sized so that the device stays efficient), by
    default a quarter of the batch (at least 8); on the CPU the whole batch
    (nothing to overlap with)."""
    import torch

    if option is not None:
        return max(1, int(option))
    if torch.device(device).type == "cuda":
        return max(1, int(gpu_chunk)) if gpu_chunk is not None else max(8, -(-n // 4))
    return max(1, n)


def run_pipelined(
    items: Sequence[Any], launch: Callable[[Any], Any], finish: Callable[[Any], None], depth: int = 1
) -> None:
    """``launch(item)`` (queue one chunk's device work and its copy to the
    host; return a handle) for each item, and ``finish(handle)`` (the host
    work of that chunk) in order, with up to ``depth`` chunks launched
    ahead: the host finishes chunk k while the device computes chunk k+1."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(launch(item))
        if len(pending) > depth:
            finish(pending.popleft())
    while pending:
        finish(pending.popleft())


def pipelined(
    n: int, chunk: int, launch: Callable[[int, int], Any], finish: Callable[[Any], None], depth: int = 2
) -> None:
    """:func:`run_pipelined` over ``range(n)`` in chunks: ``launch(start,
    stop)`` per chunk, up to ``depth`` chunks in flight."""
    ranges = [(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    run_pipelined(ranges, lambda r: launch(*r), finish, depth)


def resize_batch(x: "Any", size: tuple[int, int]) -> "Any":
    """Resize an (N, C, H, W) float batch of 0..255 pixels on its device.

    Used only when the detection size differs from the image size: shrinking
    uses antialiased bilinear (close to OpenCV's INTER_AREA), enlarging bicubic
    (close to INTER_LANCZOS4); results are rounded to whole pixel values like
    OpenCV's uint8 output.
    """
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] * size[1] < x.shape[-2] * x.shape[-1]
    if shrink:
        y = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    else:
        y = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return y.round().clamp(0, 255)


def check_precision_name(precision: str | None) -> str | None:
    """Validate a precision option early (before torch is imported)."""
    if precision not in (None, "auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; valid: fp32, bf16, fp16")
    return precision


def prepare_model(model: "Any", device, dtype) -> "Any":
    """Put a network in inference mode on ``device`` in ``dtype``.

    Reduced precision casts the weights themselves (rather than autocasting
    every op), and CUDA uses channels-last, the faster layout for convolutions.
    """
    import torch

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device=device, dtype=dtype)
    if torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def to_input(x: "Any", device, dtype) -> "Any":
    """A float network input in the layout :func:`prepare_model` chose."""
    import torch

    x = x.to(dtype)
    if torch.device(device).type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x
