"""Device and precision choices shared by the neural annotators.

Imported only from ``setup()`` methods, so torch loads when a neural
annotator is first used, not when the registry is listed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``None`` -> ``cuda`` when a GPU is present, else ``cpu``.

    An explicit ``cuda[:N]`` without a GPU is an error rather than a silent
    fall-back, so a misconfigured GPU job fails loudly instead of crawling.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA GPU is available")
    return dev


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype:
    """``None`` -> bf16 on a GPU, fp32 on the CPU."""
    if precision is None or precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(
            f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}"
        ) from None


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for reduced precision; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_model(
    net: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: Sequence[torch.nn.Module] = (),
) -> torch.nn.Module:
    """Move ``net`` to ``device`` in evaluation mode with its weights in ``dtype``.

    Reduced precision casts the weights themselves (not autocast over fp32
    weights): every kernel then reads half the bytes and no cast kernels run
    between layers, which matters most for the launch-bound token-by-token
    decoding of captioners. The normalisation kernels (LayerNorm, GroupNorm,
    BatchNorm) accumulate in fp32 internally whatever their input type.
    ``channels_last`` lists sub-modules whose 4-D weights are stored NHWC,
    the layout the tensor-core convolution kernels work in natively.
    """
    net = net.to(device=device, dtype=dtype).eval()
    for module in channels_last:
        module.to(memory_format=torch.channels_last)
    return net


def keep_fp32(module: torch.nn.Module) -> torch.nn.Module:
    """Run ``module`` in fp32 inside a reduced-precision model.

    Its weights become fp32 and its input is cast up on the way in, so its
    output is fp32 too (used for the last layer of a depth head, whose values
    would otherwise be rounded to bf16's 8 significant bits: visible banding
    after per-image normalisation, and useless 16-bit maps).
    """
    module.float()
    module.register_forward_pre_hook(_inputs_to_fp32)
    return module


def _inputs_to_fp32(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def batch_bucket(n: int) -> int:
    """The batch size a compiled forward runs ``n`` images at: the next power
    of two, so that the odd sizes of the last batches of a run share a few
    compiled shapes instead of each compiling its own."""
    return 1 << max(0, int(n) - 1).bit_length()


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with copies of its last image appended up to ``size`` images."""
    n = int(x.shape[0])
    return x if size <= n else torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])


def _load_batch(static_in: torch.Tensor, x: torch.Tensor) -> None:
    """Copy ``x`` into a graph's input buffer, padding with its last image."""
    n = int(x.shape[0])
    static_in[:n].copy_(x)
    if static_in.shape[0] > n:
        static_in[n:].copy_(x[-1:].expand(static_in.shape[0] - n, *x.shape[1:]))


class CompiledForward:
    """``fn(x) -> Tensor`` through ``torch.compile`` with fixed shapes.

    ``fn`` maps a batch (first dimension = images) to a tensor with one row
    per image, each row depending on its own image only. Batches are padded
    to :func:`batch_bucket` sizes by repeating the last image and the padding
    rows are dropped from the result, so a run compiles a handful of shapes.
    Compilation happens at the first call of each shape; if it fails (no
    compiler, an unsupported operation) a warning is logged once and ``fn``
    runs eagerly from then on, so ``compile`` is never a reason for a run to
    stop. ``backend`` is torch.compile's (inductor, the one that generates
    fused kernels, unless a test asks for another).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], what: str, backend: Any = "inductor") -> None:
        self.fn = fn
        self.what = what
        self.error: str | None = None
        try:
            self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = torch.compile(
                fn, dynamic=False, backend=backend
            )
        except Exception as exc:  # torch builds without dynamo support
            self._fail(exc)

    @property
    def active(self) -> bool:
        """True while the compiled path is in use (no failure so far)."""
        return self._compiled is not None

    def _fail(self, exc: BaseException) -> None:
        self._compiled = None
        self.error = _one_line(exc)
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if isinstance(inner, BaseException):  # dynamo wraps the backend's own error
            self.error += f" {_one_line(inner)}"
        log.warning("torch.compile of the %s failed (%s); running it eagerly", self.what, self.error)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self.fn(x)
        n = int(x.shape[0])
        size = batch_bucket(n)
        padded = pad_batch(x, size)
        try:
            y = self._compiled(padded)
        except torch.OutOfMemoryError:
            raise  # not a compiler problem: the caller may retry smaller batches
        except Exception as exc:  # compiler errors surface at the first call
            self._fail(exc)
            return self.fn(x)
        return y if size == n else y[:n]


class GraphedForward:
    """``fn(x) -> Tensor`` (or a tuple or list of tensors, one row per image
    each) replayed from CUDA graphs, one per batch shape.

    A replayed graph launches a whole forward pass at once, so the host's
    per-kernel launch work disappears: a few percent for one annotator alone
    at these batch sizes (BENCHMARKS.md), more when several annotators'
    threads share the host in a pipeline. Batches are padded to
    :func:`batch_bucket` sizes like :class:`CompiledForward` (or to
    ``bucket(n)``); at most ``max_graphs`` shapes are captured (others run
    eagerly), and the graphs of one model share one memory pool. The result
    is copied out of the graph's static output, so it stays valid after the
    next replay. Calls
    from several threads are serialised by a lock, and each replay waits
    (on the device) for the previous call's copies. Anything but a CUDA
    input runs ``fn`` itself; if capturing fails (an operation that syncs
    with the host, say) a warning is logged once and ``fn`` runs eagerly
    from then on.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], what: str, max_graphs: int = 4,
                 bucket: Callable[[int], int] = batch_bucket) -> None:
        self.fn = fn
        self.what = what
        self.max_graphs = max_graphs
        self.bucket = bucket
        self.error: str | None = None
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None
        self._stream: Any = None
        self._done: Any = None  # event after the last call's copy out
        self._lock = threading.Lock()

    @property
    def captured(self) -> int:
        """Number of graphs captured so far."""
        return len(self._graphs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.error is not None or x.device.type != "cuda" or torch.is_grad_enabled():
            return self.fn(x)
        n = int(x.shape[0])
        size = max(n, self.bucket(n))
        key = (size, tuple(x.shape[1:]), x.dtype, tuple(x.stride()[1:]), str(x.device))
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                if len(self._graphs) >= self.max_graphs:
                    return self.fn(x)
                try:
                    entry = self._capture(x, size)
                except torch.OutOfMemoryError:
                    # each graph keeps its memory: capture no further shapes
                    # (the caller retries smaller batches, which run eagerly)
                    self.max_graphs = len(self._graphs)
                    raise
                except Exception as exc:
                    self.error = _one_line(exc)
                    log.warning("CUDA graph capture of the %s failed (%s); running it eagerly",
                                self.what, self.error)
                    return self.fn(x)
                self._graphs[key] = entry
            graph, static_in, static_out = entry
            stream = torch.cuda.current_stream(x.device)
            if self._done is not None:
                stream.wait_event(self._done)
            _load_batch(static_in, x)
            graph.replay()
            y = _map_tensors(static_out, lambda t: t[:n].clone())
            self._done = torch.cuda.Event()
            self._done.record(stream)
            return y

    def _capture(self, x: torch.Tensor, size: int) -> tuple:
        static_in = torch.empty((size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            static_in = static_in.contiguous(memory_format=torch.channels_last)
        _load_batch(static_in, x)
        caller = torch.cuda.current_stream(x.device)
        if self._stream is None:
            # this forward's own side stream: warm-up and capture run on it
            self._stream = torch.cuda.Stream(x.device)
        try:
            self._stream.wait_stream(caller)
            # Warm-up first, as capture requires: library handles, cuDNN's
            # engine choices and lazily loaded kernels happen here, not in the
            # graph. A network's first run can take seconds: warm-ups share
            # the lock, so networks on other threads warm up side by side
            # instead of each waiting for the others' first runs.
            with _CAPTURE_LOCK.shared(), torch.cuda.stream(self._stream):
                for _ in range(2):
                    self.fn(static_in)
            # One capture at a time in the process, and no warm-up beside it:
            # entering a capture synchronises the whole device and empties the
            # allocators' caches, and a warm-up's first run (its allocations,
            # library loading) is the work least safe beside a capture.
            with _CAPTURE_LOCK.exclusive():
                graph = torch.cuda.CUDAGraph()
                # thread_local: other threads' work on their own streams is not
                # an error during this capture
                with torch.cuda.graph(graph, pool=self._pool, stream=self._stream,
                                      capture_error_mode="thread_local"):
                    static_out = self.fn(static_in)
        finally:
            # a failed capture leaves its stream current (torch's context
            # does not restore it when ending the capture raises)
            torch.cuda.set_stream(caller)
            caller.wait_stream(self._stream)
        if self._pool is None:
            self._pool = graph.pool()
        return graph, static_in, static_out


class SharedLock:
    """A lock held either by any number of threads together (:meth:`shared`)
    or by one thread alone (:meth:`exclusive`); a waiting exclusive holder
    goes before new shared ones. Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


#: warm-ups before a capture hold it shared, captures alone
_CAPTURE_LOCK = SharedLock()


def _map_tensors(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map_tensors(o, fn) for o in out)
    raise TypeError(f"a graphed forward returns tensors, got {type(out).__name__}")


def graphed(owner: Any, fn: Callable[[torch.Tensor], torch.Tensor], what: str,
            bucket: Callable[[int], int] = batch_bucket) -> GraphedForward:
    """The :class:`GraphedForward` of ``fn`` kept on ``owner`` (one per
    function, so the eager and the compiled forward get their own graphs)."""
    cache = owner.__dict__.setdefault("_graphed_forwards", {})
    key = id(fn) if not hasattr(fn, "__func__") else (id(fn.__func__), id(fn.__self__))
    if key not in cache:
        cache[key] = GraphedForward(fn, what, bucket=bucket)
    return cache[key]


_COMPILE_LOCK = threading.Lock()


def enable_compile(owner: Any, eager: Callable[[torch.Tensor], torch.Tensor], what: str,
                   backend: Any = "inductor") -> None:
    """Set ``owner.compiled`` to a :class:`CompiledForward` of ``eager`` once
    (idempotent, safe from several threads)."""
    with _COMPILE_LOCK:
        if owner.compiled is None:
            owner.compiled = CompiledForward(eager, what, backend)


def forward_runner(owner: Any, eager: Callable[[torch.Tensor], torch.Tensor], graphs: bool,
                   what: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward a model runs: its compiled one if ``owner.compiled`` is
    set, else ``eager``; replayed from CUDA graphs when ``graphs``."""
    run = owner.compiled if owner.compiled is not None else eager
    return graphed(owner, run, what) if graphs else run


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


# ----------------------------------------------------------- bilinear resize

_RESIZE_MATRICES: dict[tuple, torch.Tensor] = {}


def bilinear_matrix(src: int, dst: int, align_corners: bool, scale: float | None = None) -> torch.Tensor:
    """(dst, src) float64 matrix of 1-D bilinear interpolation with the
    source positions of ``F.interpolate(mode="bilinear")``: ``align_corners``
    maps the corner pixels onto each other; otherwise pixel centres, with
    ``scale`` (input / output size; given as ``1 / scale_factor`` when the
    caller passed a scale factor) and positions below 0 clamped to 0."""
    import numpy as np

    out = np.arange(dst, dtype=np.float64)
    if align_corners:
        pos = out * ((src - 1) / (dst - 1)) if dst > 1 else np.zeros(dst)
    else:
        step = scale if scale is not None else src / dst
        pos = np.maximum((out + 0.5) * step - 0.5, 0.0)
    lo = np.minimum(np.floor(pos).astype(np.int64), src - 1)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    m = np.zeros((dst, src), dtype=np.float64)
    np.add.at(m, (np.arange(dst), lo), 1.0 - frac)
    np.add.at(m, (np.arange(dst), hi), frac)
    return torch.from_numpy(m)


def _resize_matrix(src: int, dst: int, align_corners: bool, scale: float | None, like: torch.Tensor) -> torch.Tensor:
    key = (src, dst, align_corners, scale, like.dtype, str(like.device))
    m = _RESIZE_MATRICES.get(key)
    if m is None:
        # built on first use, in the eager warm-up that precedes any CUDA
        # graph capture, so a capture only reads it
        m = bilinear_matrix(src, dst, align_corners, scale).to(device=like.device, dtype=like.dtype)
        if m.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            # another GPU thread's stream may read it next: the copy must be done
            torch.cuda.current_stream(m.device).synchronize()
        _RESIZE_MATRICES[key] = m
    return m


def bilinear_resize(x: torch.Tensor, size: tuple[int, int], align_corners: bool,
                    scale_factor: float | None = None) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=...)`` of an
    (N, C, H, W) tensor, computed as two matrix products (along the width,
    then the height) in the tensor's own memory layout; the result keeps
    the layout (NHWC in, NHWC out). ``scale_factor``: as given to
    ``F.interpolate`` without ``recompute_scale_factor`` (it decides the
    source positions when ``align_corners`` is off). Inside ``torch.compile``
    it is ``F.interpolate`` itself, which the compiler generates its own
    kernel for.

    Why: torch's bilinear kernels move a few hundred GB/s on an H100 or
    H200, while these products run on the tensor cores; for the 2x
    upsampling in DPT's head (64 images, 128 channels, 192 -> 384 px) that
    is the difference between one of the largest kernels of the forward pass
    and a small one. Each output is the same weighted sum of the same two
    neighbours per axis; in reduced precision the weights are rounded to the
    tensor's type and the result is rounded after each axis, so it differs
    from torch's kernel by about that type's rounding (bf16, DPT's 192 -> 384
    px: at most 0.058 against 0.048 for torch's own bf16 kernel, on
    unit-variance inputs).
    """
    if torch.compiler.is_compiling():
        import torch.nn.functional as F

        if scale_factor is not None:
            return F.interpolate(x, scale_factor=scale_factor, mode="bilinear", align_corners=align_corners)
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)
    n, c, h, w = x.shape
    oh, ow = int(size[0]), int(size[1])
    inv = 1.0 / scale_factor if scale_factor is not None else None
    ry = _resize_matrix(h, oh, align_corners, inv, x)
    rx = _resize_matrix(w, ow, align_corners, inv, x)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        t = x.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous
        t = torch.matmul(rx, t)  # (N, H, OW, C)
        t = torch.matmul(ry, t.reshape(n, h, ow * c)).reshape(n, oh, ow, c)
        return t.permute(0, 3, 1, 2)
    t = torch.matmul(x, rx.T)  # (N, C, H, OW)
    return torch.matmul(ry, t)  # (N, C, OH, OW)


class BilinearUpsample(torch.nn.Module):
    """Drop-in for ``nn.Upsample(mode="bilinear")`` computed by
    :func:`bilinear_resize` (same output, faster on GPUs)."""

    def __init__(self, scale_factor: float | None, size: Any, align_corners: bool) -> None:
        super().__init__()
        self.scale_factor, self.size, self.align_corners = scale_factor, size, bool(align_corners)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
            return bilinear_resize(x, size, self.align_corners)
        s = float(self.scale_factor)
        size = (int(x.shape[-2] * s), int(x.shape[-1] * s))
        return bilinear_resize(x, size, self.align_corners, None if self.align_corners else s)


def replace_bilinear_upsampling(net: torch.nn.Module) -> int:
    """Swap every ``nn.Upsample(mode="bilinear")`` sub-module of ``net`` for
    :class:`BilinearUpsample`; returns how many were swapped."""
    swapped = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            # the plain classes only (a subclass may override forward), with
            # the semantics BilinearUpsample reproduces, and no hooks to lose
            if type(child) in (torch.nn.Upsample, torch.nn.UpsamplingBilinear2d) and child.mode == "bilinear" \
                    and not isinstance(child.scale_factor, tuple) and not child.recompute_scale_factor \
                    and not (child._forward_hooks or child._forward_pre_hooks):
                setattr(parent, name, BilinearUpsample(child.scale_factor, child.size, bool(child.align_corners)))
                swapped += 1
    return swapped


def warm_device(device: Any, dtypes: Sequence[torch.dtype] = (torch.bfloat16,)) -> float:
    """Run a few tiny operations on ``device`` in each of ``dtypes`` and wait
    for them; returns the seconds taken.

    A process's first convolution on a GPU loads cuDNN's engine libraries
    and its first matrix product cuBLAS(Lt): about four seconds together on
    an H200, paid inside the first network's first batch (and, under graph
    capture's lock, by every other network waiting behind it). The calls
    release the interpreter lock, so run on a thread of their own
    (:func:`start_device_warmup`) they overlap the Python imports that
    follow torch's. The operations are those the networks are built of:
    3x3, 1x1 and depthwise convolutions in both memory formats, a matrix
    product, attention and bilinear resizing. Nothing is kept."""
    import time

    import torch.nn.functional as F

    device = torch.device(device)
    started = time.perf_counter()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
        for dtype in dtypes:
            x = torch.randn(2, 16, 24, 24, device=device, dtype=dtype)
            for memory_format in (torch.contiguous_format, torch.channels_last):
                x = x.contiguous(memory_format=memory_format)
                for k, groups in ((3, 1), (1, 1), (7, 16)):
                    w = torch.randn(16, 16 // groups, k, k, device=device, dtype=dtype)
                    w = w.contiguous(memory_format=memory_format)
                    F.conv2d(x, w, padding=k // 2, groups=groups)
                F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            a = torch.randn(2, 4, 32, 32, device=device, dtype=dtype)
            torch.matmul(a, a.transpose(-1, -2))
            F.scaled_dot_product_attention(a, a, a)
            F.layer_norm(a, (32,))
    if stream is not None:
        stream.synchronize()
    return time.perf_counter() - started


def start_device_warmup(device: Any, dtypes: Sequence[torch.dtype] = (torch.bfloat16,),
                        done: Callable[[float], None] | None = None) -> threading.Thread:
    """:func:`warm_device` on a daemon thread (started, returned for joining);
    ``done`` is called there with the seconds it took. A failure is logged
    and changes nothing: the networks' first batch then pays the libraries'
    loading, as without the warm-up."""

    def run() -> None:
        try:
            seconds = warm_device(device, dtypes)
            log.debug("device %s warmed up in %.2f s", device, seconds)
            if done is not None:
                done(seconds)
        except Exception as exc:  # an optimisation only
            log.warning("warming up %s failed (%s); the first batch loads the GPU libraries instead",
                        device, _one_line(exc))

    thread = threading.Thread(target=run, name="controlset-warmup", daemon=True)
    thread.start()
    return thread
