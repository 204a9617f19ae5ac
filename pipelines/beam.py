"""The annotate pipeline on Apache Beam.

    Create(inputs) -> Probe -> Dedup [-> NearDuplicates] -> AssignShard
      -> GroupByKey(shard) -> PlanShards -> Reshuffle
      -> MakeShards (decode, annotate in batches, encode, write the tar)
      -> Finalize(stats.json, failures.parquet, filtered.parquet)

Probing is light (bytes are hashed, headers read, pixels not decoded), so
duplicates are removed and samples are assigned to fixed-size shards before
any expensive work; shards already complete from an earlier run with the same
plan are skipped before decoding. Pixels are decoded once, after planning, in
the worker that writes their shard: a shard is the unit of parallel work and
of resume, and no image or encoded sample crosses between workers.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import posixpath
import threading
import time
from typing import Any, Iterable, Sequence

import apache_beam as beam
import fsspec
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from fsspec.core import url_to_fs

from annotators import create_annotator, get_annotator_class
from pipelines.finalize import finalize
from pipelines.options import AnnotateOptions, default_threads
from pipelines.sources import InputRef, local_path
from pipelines.stages import (
    Candidate,
    annotate_decoded,
    choose_duplicate,
    decode_candidate,
    encode_sample,
    gate_sample,
    near_duplicates,
    plan_digest,
    gpu_start_order,
    probe_input,
    run_annotator,
    shard_boundaries,
)
from pipelines.writer import ShardSummary, ShardWriter, read_shard_summary, shard_is_complete, shard_name
from schemas import FILTERED, FailureRecord
from schemas.files import TMP_MARK, atomic_write_bytes

log = logging.getLogger(__name__)
NS = "controlset"


def _counter(name: str):
    return Metrics.counter(NS, name)


#: Environment variable naming a file that each process appends timeline
#: events to (JSON lines: wall time, process, thread, event). For diagnosing
#: where a run's start-up time goes across worker processes; off by default.
TRACE_ENV = "CONTROLSET_TRACE"


def tracing() -> bool:
    """Whether :func:`trace` writes events in this process."""
    import os

    return bool(os.environ.get(TRACE_ENV)) and not _TRACE_FAILED


def trace(event: str, **fields: Any) -> None:
    """Append one timeline event to ``$CONTROLSET_TRACE`` when it is set."""
    import os

    global _TRACE_FAILED

    path = os.environ.get(TRACE_ENV)
    if not path or _TRACE_FAILED:
        return
    row = {"t": round(time.time(), 4), "pid": os.getpid(), "thread": threading.current_thread().name,
           "event": event, **fields}
    if _TRACE_PIDS.get(os.getpid()) is None:
        # a process's first event also says when the process started (its
        # interpreter's start-up and Beam's hand-over come before any event)
        _TRACE_PIDS[os.getpid()] = True
        started = _process_started()
        if started is not None:
            row["process_started"] = round(started, 3)
    try:
        # one write per line with O_APPEND: lines of several processes do not interleave
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row, default=str) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:  # a diagnostic must never cost the run
        if not _TRACE_FAILED:
            _TRACE_FAILED = True
            log.warning("cannot write the trace to %s (%s); tracing off in this process", path, exc)


_TRACE_FAILED = False
_TRACE_PIDS: dict[int, bool] = {}
_EXIT_TRACED = False


def _process_started() -> float | None:
    """When this process started (epoch seconds; Linux only, else None)."""
    import os

    try:
        with open("/proc/self/stat") as f:
            # field 22 (clock ticks after boot), after the command name in parentheses
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def models_tag(opts: AnnotateOptions) -> str:
    """The key under which a worker process shares its loaded annotators."""
    return json.dumps(opts.annotators, sort_keys=True, default=str)


#: Inputs per element of the probe stage: a few thousand elements instead of
#: one per file cost Beam less to hand out between workers, and the inputs of
#: one element are probed on threads (reading and hashing release the GIL; on
#: a bucket each read mostly waits on the network). A tar is an element of
#: its own.
PROBE_GROUP = 64


def _is_remote(url: str) -> bool:
    return local_path(url) is None


def probe_groups(refs: list[InputRef]) -> list[tuple[InputRef, ...]]:
    """``refs`` as the probe stage's elements: groups of up to
    ``PROBE_GROUP`` files, each tar alone."""
    groups: list[tuple[InputRef, ...]] = []
    current: list[InputRef] = []
    for ref in refs:
        if ref.kind == "tar":
            groups.append((ref,))
            continue
        current.append(ref)
        if len(current) == PROBE_GROUP:
            groups.append(tuple(current))
            current = []
    if current:
        groups.append(tuple(current))
    return groups


class ProbeFn(beam.DoFn):
    """Reads each input's bytes and header (no pixels), a group of inputs at
    a time on the worker's threads. Its setup also starts loading the
    annotators in the background, so model loading overlaps the planning
    stages instead of following them."""

    def __init__(self, opts: AnnotateOptions) -> None:
        self.opts = opts
        self.inputs = _counter("inputs")
        self.caption_notes = _counter("caption_notes")

    def setup(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        trace("probe_setup")
        preload_annotators(self.opts)
        settle_imports(self.opts)
        self._pool = ThreadPoolExecutor(max_workers=self.opts.probe_threads or self.opts.io_threads
                                        or default_threads(),
                                        thread_name_prefix="controlset-probe")

    def teardown(self) -> None:
        stop_warm_ups()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def start_bundle(self) -> None:
        self._bundle_inputs, self._bundle_busy = 0, 0.0

    def finish_bundle(self) -> None:
        # where a run's planning time goes, per worker, in the trace; the
        # seconds include the steps Beam fuses after the probe (keying)
        if self._bundle_inputs:
            trace("probe_bundle", inputs=self._bundle_inputs, busy_seconds=round(self._bundle_busy, 3))

    def process(self, group: tuple[InputRef, ...]) -> Iterable:
        started = time.perf_counter()
        try:
            yield from self._probe_group(group)
        finally:
            self._bundle_inputs += len(group)
            self._bundle_busy += time.perf_counter() - started

    def _probe_group(self, group: tuple[InputRef, ...]) -> Iterable:
        def probe(ref: InputRef) -> list:
            return list(probe_input(ref, self.opts))

        # Threads only for groups of remote files: a local file in the page
        # cache is read in microseconds, and threads would only contend for
        # the GIL (header parsing is Python): 0.25 ms a file serially against
        # 0.42 ms on two threads (2 cores). A tar (a group of its own) streams
        # its samples one at a time instead (a .tar.gz's samples carry their
        # bytes). Results keep the group's order; counters stay on the
        # bundle's thread (Beam's metrics are per thread).
        if any(ref.kind == "tar" for ref in group):
            batches: Iterable = ([r] for ref in group for r in probe_input(ref, self.opts))
        elif any(_is_remote(ref.source) for ref in group):
            batches = self._pool.map(probe, group)
        else:
            batches = map(probe, group)
        for results in batches:
            for result in results:
                self.inputs.inc()
                if isinstance(result, FailureRecord):
                    yield beam.pvalue.TaggedOutput("records", result)
                else:
                    if result.caption_note:
                        self.caption_notes.inc()
                    yield result


class DedupFn(beam.DoFn):
    def process(self, item: tuple[str, Iterable[Candidate]]) -> Iterable:
        key, group = item
        kept, dropped = choose_duplicate(key, list(group))
        yield kept
        for record in dropped:
            yield beam.pvalue.TaggedOutput("records", record)


class DropNearFn(beam.DoFn):
    def process(self, c: Candidate, drop: dict) -> Iterable:
        if c.key in drop:
            kept_source, bits = drop[c.key]
            yield beam.pvalue.TaggedOutput("records", FailureRecord(
                c.source, FILTERED, "dedup", "near_duplicate",
                f"perceptual hash within {bits} bit(s) of {kept_source}", key=c.key))
        else:
            yield c


def _assign(c: Candidate, boundaries: list[str]) -> tuple[int, Candidate]:
    return bisect.bisect_right(boundaries, c.key) - 1, c


class PlanShardFn(beam.DoFn):
    """Per shard: compute the plan digest; skip shards already complete."""

    def __init__(self, opts: AnnotateOptions, fingerprint_json: str) -> None:
        self.opts = opts
        self.fingerprint_json = fingerprint_json
        self.skipped = _counter("shards_skipped")

    def setup(self) -> None:
        self.fs, self.root = url_to_fs(self.opts.output)

    def process(self, item: tuple[int, Iterable[Candidate]]) -> Iterable:
        index, cands = item
        cands = sorted(cands, key=lambda c: c.key)
        name = shard_name(self.opts.prefix, index)
        digest = plan_digest(self.fingerprint_json, cands)
        if shard_is_complete(self.fs, self.root, name, digest):
            self.skipped.inc()
            yield beam.pvalue.TaggedOutput("done", read_shard_summary(self.fs, self.root, name))
            return
        yield (index, digest, cands)


#: Annotated batches a worker may have encoding while it annotates the next
#: one. Two measured no faster than one (BENCHMARKS.md): where encoding is
#: slower than annotating, a deeper queue only fills up, and each batch in
#: it holds every annotation array of its images.
ENCODE_AHEAD = 1


@dataclasses.dataclass
class _OpenShard:
    """A shard being made: its writer and the batches not yet written."""

    index: int
    digest: str
    name: str
    writer: ShardWriter
    unwritten: int


class ShardFn(beam.DoFn):
    """Makes planned shards: decode, annotate in batches, encode, and stream
    the samples into each shard's tar, then commit it.

    A shard is the unit of work (and of resume): its samples never leave the
    worker, so no image or encoded sample is shuffled between workers. Models
    load once per worker process (Beam's Shared handle) and are shared by its
    threads; GPU work is serialised per process by a lock while other threads
    decode and encode. CPU annotators run on a thread pool beside GPU ones.

    The shards of a bundle flow through one pipeline of batches: batch k+1
    is decoded and batch k-1 (up to ``ENCODE_AHEAD`` batches) is encoded
    while batch k is annotated, across shard boundaries too. The last batch of a
    shard is annotated only when the next element has arrived (or the bundle
    ends), so the next shard's first batch decodes meanwhile, and the last
    batch's encoding overlaps the next shard's first batches; the
    accelerator does not wait at shard boundaries.
    A shard is committed, and its summary emitted, once its last batch is
    written: during a later element's ``process`` (the summary then takes
    that element's window and timestamp; every element here is in the
    global window) or in ``finish_bundle``. Batches never mix shards, so
    shards are the same as made one by one."""

    def __init__(self, opts: AnnotateOptions, total: int = 0) -> None:
        from apache_beam.utils.shared import Shared

        self.opts = opts
        self.total = total
        self._shared = Shared()
        self._tag = models_tag(opts)
        self.decoded = _counter("decoded")
        self.decode_failed = _counter("decode_failed")
        self.annotated = _counter("annotated")
        self.failed = _counter("annotate_failed")
        self.gated = _counter("gated")
        self.written = _counter("written")
        self.shards = _counter("shards_written")

    def setup(self) -> None:
        from collections import deque

        from pipelines.options import parse_gate

        trace("shard_setup")
        self.models = self._shared.acquire(lambda: loaded_annotators(self.opts), tag=self._tag)
        trace("shard_setup_models")
        self.annotators = self.models.annotators
        self.batch_sizes = annotator_batch_sizes(self.opts, self.annotators)
        self.batch = beam_batch_size(self.opts)
        self.gates = [parse_gate(g) for g in self.opts.gates]
        self.progress = Progress(self.total)
        self.fs, self.root = url_to_fs(self.opts.output)
        #: batches not yet annotated: [shard, index in shard, candidates, decode future]
        self._todo: deque = deque()
        #: annotated batches being encoded, oldest first: (shard, staged, images)
        self._encoding: deque = deque()
        self._open: list[_OpenShard] = []
        # where the bundle thread's time goes: waiting for decoding,
        # annotating (GPU and CPU annotators), waiting for encoding
        self._waits = {"wait_decode": 0.0, "annotate": 0.0, "wait_encode": 0.0}

    def process(self, item: tuple[int, str, list[Candidate]]) -> Iterable[ShardSummary]:
        index, digest, cands = item
        trace("shard_start", shard=index, samples=len(cands))
        self._report_loading()
        name = shard_name(self.opts.prefix, index)
        batches = [cands[i:i + self.batch] for i in range(0, len(cands), self.batch)]
        try:
            shard = _OpenShard(index, digest, name, ShardWriter(self.fs, self.root, name), len(batches))
            self._open.append(shard)
            self._todo.extend([shard, k, batch, None] for k, batch in enumerate(batches))
            if not batches:
                yield self._commit(shard)
            # The newest batch stays in hand until the next element (or the
            # bundle's end): annotating it then overlaps decoding that
            # element's first batch.
            while len(self._todo) > 1:
                yield from self._step()
        except BaseException:
            self._abort_open()
            raise

    def start_bundle(self) -> None:
        # nothing carries over from an earlier bundle (one that failed is
        # aborted, one that finished is drained)
        self._abort_open()
        self._waits = dict.fromkeys(self._waits, 0.0)

    def finish_bundle(self) -> Iterable:
        from apache_beam.transforms.window import GlobalWindows

        try:
            summaries = []
            while self._todo:
                summaries += list(self._step())
            while self._encoding:
                summaries += list(self._write_encoded())
        except BaseException:
            self._abort_open()
            raise
        self._count_waits()
        for summary in summaries:
            yield GlobalWindows.windowed_value_at_end_of_window(summary)

    def teardown(self) -> None:
        global _EXIT_TRACED
        from pipelines.local_runner import fast_exit_at_interpreter_exit

        trace("shard_teardown")
        stop_warm_ups()
        self._abort_open()
        # a local run's worker ends at once when its interpreter exits (it
        # traces process_exit itself)
        if not fast_exit_at_interpreter_exit() and tracing() and not _EXIT_TRACED:
            import atexit

            # registered once, late, so it runs first when the interpreter exits
            atexit.register(trace, "process_exit")
            _EXIT_TRACED = True

    def _step(self) -> Iterable[ShardSummary]:
        """Annotate the next batch (its decoding was started earlier), start
        decoding the one after it, then write the batch annotated before."""
        shard, k, cands, decoding = self._todo.popleft()
        prefetch = self.models.prefetch
        t0 = time.perf_counter()
        if decoding is None:
            decoding = prefetch.submit(self._decode, cands)
        if self._todo and self._todo[0][3] is None:
            self._todo[0][3] = prefetch.submit(self._decode, self._todo[0][2])
        decoded = decoding.result()
        t1 = time.perf_counter()
        staged = self._annotate(decoded, shard.name, self.models.io_pool)
        t2 = time.perf_counter()
        if k == 0:
            trace("first_batch_annotated", shard=shard.index, seconds=round(t2 - t1, 3))
        self._waits["wait_decode"] += t1 - t0
        self._waits["annotate"] += t2 - t1
        # the batches annotated before encode while this one is annotated;
        # the oldest are written once more than ENCODE_AHEAD are in flight
        self._encoding.append((shard, staged, len(cands)))
        while len(self._encoding) > ENCODE_AHEAD:
            yield from self._write_encoded()

    def _write_encoded(self) -> Iterable[ShardSummary]:
        """Write the oldest batch being encoded into its shard; commit the
        shard when that was its last batch."""
        shard, staged, n = self._encoding.popleft()
        t0 = time.perf_counter()
        self._write(staged, n, shard.writer)
        self._waits["wait_encode"] += time.perf_counter() - t0
        shard.unwritten -= 1
        if shard.unwritten == 0:
            yield self._commit(shard)

    def _commit(self, shard: _OpenShard) -> ShardSummary:
        # still open while committing: if that fails, _abort_open removes
        # whatever the commit left behind along with the other shards in flight
        summary = shard.writer.commit(shard.digest)
        self._open.remove(shard)
        trace("shard_commit", shard=shard.index, written=summary.written)
        self.written.inc(summary.written)
        self.shards.inc()
        self._count_waits()
        return summary

    def _count_waits(self) -> None:
        for stage, seconds in self._waits.items():
            if seconds:
                Metrics.counter(NS, f"stage_ms_{stage}").inc(int(seconds * 1000))
            self._waits[stage] = 0.0

    def _abort_open(self) -> None:
        """Drop the shards in flight (their temporary files); a retry or a
        rerun makes them again."""
        open_shards = getattr(self, "_open", None)
        if open_shards is None:  # setup never ran to its end
            return
        for shard in open_shards:
            shard.writer.abort()
        open_shards.clear()
        self._todo.clear()
        self._encoding.clear()

    def _report_loading(self) -> None:
        """Model-loading seconds as counters (``load_ms_<annotator>``), once
        per worker process: counters only count inside a bundle, not in
        ``setup``."""
        with self.models.lock:
            pending, self.models.load_ms = self.models.load_ms, {}
        for ann_name, ms in pending.items():
            Metrics.counter(NS, f"load_ms_{ann_name}").inc(ms)

    def _decode(self, cands: list[Candidate]) -> list:
        return list(self.models.io_pool.map(lambda c: decode_candidate(c, self.opts), cands))

    def _annotate(self, decoded: list, name: str, io) -> list:
        """Annotate a key-ordered batch and start encoding it: (kind, future)
        per input, in the same order. Counters are updated on the bundle's
        thread (Beam's metrics are per thread), here and in :meth:`_write`."""
        ok = [d for d in decoded if not isinstance(d, FailureRecord)]
        self.decoded.inc(len(ok))
        self.decode_failed.inc(len(decoded) - len(ok))
        timings: dict[str, float] = {}
        spans: list | None = [] if tracing() else None
        with self.models.lock:
            annotated = iter(annotate_decoded(ok, self.annotators, self.batch_sizes, timings, self.models.pool,
                                              self.models.gpu_pool, self.models.costs, spans,
                                              self.models.rank))
            for ann_name, seconds in timings.items():
                self.models.costs[ann_name] = self.models.costs.get(ann_name, 0.0) + seconds
        for ann_name, thread, start, end in spans or ():
            trace("annotator_span", annotator=ann_name, on=thread, start=round(start, 4), end=round(end, 4),
                  images=len(ok))
        for ann_name, seconds in timings.items():
            Metrics.counter(NS, f"ms_{ann_name}").inc(int(seconds * 1000))

        def finish(d):
            if isinstance(d[1], FailureRecord):
                return d[1]
            dec, annotations = d[1]
            return gate_sample(dec, annotations, self.gates) or encode_sample(
                dec, annotations, self.annotators, self.opts, name)

        staged = [("failed", d) if isinstance(d, FailureRecord) else ("ok", next(annotated)) for d in decoded]
        return [(kind, io.submit(finish, (kind, d))) for kind, d in staged]

    def _write(self, staged: list, n: int, writer: ShardWriter) -> None:
        """Collect a batch's encoded samples in key order into the shard."""
        for kind, fut in staged:
            result = fut.result()
            if kind == "ok":
                if not isinstance(result, FailureRecord):
                    self.annotated.inc()
                elif result.stage == "gate":
                    self.gated.inc()
                else:
                    self.failed.inc()
            if isinstance(result, FailureRecord):
                writer.add_failure(result)
            else:
                writer.add(result)
        self.progress.advance(n)


class LoadedAnnotators:
    """The annotators of one worker process, loaded once and shared, with the
    process's decode/encode threads."""

    def __init__(self, opts: AnnotateOptions, cancel: threading.Event | None = None,
                 imported: threading.Event | None = None, wanted: threading.Event | None = None) -> None:
        import os
        from concurrent.futures import ThreadPoolExecutor

        started = time.perf_counter()
        trace("load_start")
        gpu_index = claim_gpu(opts) if opts.gpus else None
        #: place among the workers sharing the GPU (their batches start
        #: the GPU annotators in different orders; see gpu_start_order)
        self.rank = claimed_rank()
        self.annotators = []
        for name, options in opts.annotators:
            options = dict(options)
            if gpu_index is not None and "device" in get_annotator_class(name).option_names():
                options["device"] = f"cuda:{gpu_index}"
            self.annotators.append(create_annotator(name, **options))
        # The GPU's libraries load on a thread of their own while the rest
        # of the code is imported (see annotators._torch.warm_device).
        warmup = _start_warmup(gpu_index, self.annotators)
        # The code first (set ``imported`` after it), then weights and devices.
        for a in self.annotators:
            a.import_code()
        trace("imported", seconds=round(time.perf_counter() - started, 3))
        if gpu_index is not None:
            _share_torch_threads(opts.gpu_workers)
        if imported is not None:
            imported.set()
        #: milliseconds each annotator took to load, not yet counted
        self.load_ms: dict[str, int] = {}
        for a in self.annotators:
            if cancel is not None and cancel.is_set():
                raise PreloadCancelled()
            t0 = time.perf_counter()
            a.setup()
            self.load_ms[a.name] = int((time.perf_counter() - t0) * 1000)
            trace("loaded", annotator=a.name, seconds=self.load_ms[a.name] / 1000)
        if warmup is not None:
            # done long before (its seconds are traced as ``device_warm``);
            # joined so that nothing of it runs beside a graph capture
            warmup.join()
        slow = sorted(self.load_ms.items(), key=lambda kv: -kv[1])
        log.info("process %d%s: annotators loaded in %.1f s (%s)", os.getpid(),
                 "" if gpu_index is None else f" (GPU {gpu_index})", time.perf_counter() - started,
                 ", ".join(f"{n} {ms / 1000:.1f} s" for n, ms in slow))
        self.lock = threading.Lock()
        # Decoding and encoding threads of this worker process.
        io_threads = opts.io_threads or default_threads()
        self.io_pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="controlset-io")
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controlset-prefetch")
        cpu = [a for a in self.annotators if not a.uses_gpu]
        cpu_threads = max(len(cpu), opts.cpu_threads or default_threads())
        self.pool = ThreadPoolExecutor(max_workers=cpu_threads, thread_name_prefix="controlset-cpu") \
            if cpu and len(cpu) < len(self.annotators) else None
        if self.pool is not None:
            # The CPU annotators run side by side on images (and decoding and
            # encoding on their own threads); OpenCV's thread pool inside each
            # call would only oversubscribe the cores. Without the pool (CPU
            # annotators only) OpenCV keeps its own parallelism.
            import cv2

            cv2.setNumThreads(1)
        gpu = len(self.annotators) - len(cpu)
        threads = min(opts.gpu_threads, gpu)
        self.gpu_pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="controlset-gpu", initializer=_own_cuda_stream,
            initargs=(gpu_index,),
        ) if threads > 1 else None
        #: seconds each annotator has taken so far (the GPU threads start the
        #: costliest first)
        self.costs: dict[str, float] = {}
        # Only while loading ahead of the shards (``wanted``: a shard is
        # waiting for these models); models loaded on demand go straight to work.
        if warmup is not None and opts.warm_batch and wanted is not None:
            self.warm_batch(opts, stop=(wanted,) if cancel is None else (wanted, cancel))
            if cancel is not None and cancel.is_set():
                raise PreloadCancelled()

    def warm_batch(self, opts: AnnotateOptions, stop: Sequence[threading.Event] = ()) -> list[str]:
        """Run each GPU annotator over one made-up batch of the run's first
        batch shape, on the threads real batches use, and drop the results;
        returns the names of the annotators warmed.

        A network's first calls at a batch shape load kernels, pick cuDNN's
        engines and capture a CUDA graph: seconds per network (the first
        batch of 250 images with every annotator took 8.6-9.1 s on an H200,
        later ones 3.4 s). Run while the planning stages are still probing
        the inputs (which on a large or remote input list outlasts model
        loading), that work is off the first real batch. Annotators start one
        by one as the GPU threads free up; once any ``stop`` event is set (a
        shard is waiting for the models, or the run is ending) no further
        annotator starts: the rest warm up on the first real batch as before,
        so a short planning stage costs at most the annotators already
        started (one per GPU thread). Only for the
        centre crop (every sample is ``resolution`` square, so the shapes are
        known). A failure costs only the warm-up: it is logged, and that
        annotator warms up on the first real batch."""
        import numpy as np

        gpu = [a for a in self.annotators if a.uses_gpu]
        if not gpu or opts.crop != "center":
            return []
        n = min(beam_batch_size(opts), opts.shard_size)
        r = opts.resolution
        # a smooth pattern: noise would make the detectors' host-side
        # post-processing (peaks, lines) do work no photo asks of it
        y, x = np.mgrid[0:r, 0:r]
        image = np.stack([x * 255 // r, y * 255 // r, (x + y) * 255 // (2 * r)], axis=-1).astype(np.uint8)
        images, keys = [image] * n, [f"warm{i:06d}" for i in range(n)]
        sizes = annotator_batch_sizes(opts, self.annotators)
        queue = gpu_start_order(gpu, self.annotators)
        started = time.perf_counter()
        take = threading.Lock()

        def next_annotator():
            with take:
                if not queue or any(e.is_set() for e in stop):
                    return None
                return queue.pop(0)

        def warm(a) -> str | None:
            try:
                results = run_annotator(a, images, keys, sizes.get(a.name))
            except Exception as exc:  # an optimisation only
                log.warning("warm-up batch of %s failed (%s: %s); its first real batch warms it up instead",
                            a.name, type(exc).__name__, exc)
                return None
            failed = sum(isinstance(res, BaseException) for res in results)
            if failed:
                log.warning("warm-up batch of %s: %d of %d made-up images failed", a.name, failed, n)
            return a.name

        def warm_in_turn() -> list[str]:
            done = []
            while (a := next_annotator()) is not None:
                name = warm(a)
                if name is not None:
                    done.append(name)
            return done

        if self.gpu_pool is not None:
            workers = min(getattr(self.gpu_pool, "_max_workers", 1), len(gpu))
            threads = [self.gpu_pool.submit(warm_in_turn) for _ in range(workers)]
            warmed = [name for t in threads for name in t.result()]
        else:
            warmed = warm_in_turn()
        trace("warm_batch", images=n, seconds=round(time.perf_counter() - started, 3), annotators=warmed,
              skipped=[a.name for a in gpu if a.name not in warmed])
        return warmed


def _start_warmup(gpu_index: int | None, annotators: list) -> "threading.Thread | None":
    """Start warming up the GPU that ``annotators`` run on (``gpu_index``, else
    their own device option) in the precisions they run at; none when no
    annotator runs on a GPU."""
    neural = [a for a in annotators if a.uses_gpu]
    if not neural:
        return None
    import torch

    from annotators._torch import resolve_device, resolve_precision, start_device_warmup

    if gpu_index is not None:
        device = torch.device(f"cuda:{gpu_index}")
    else:
        try:
            device = resolve_device(neural[0].params.get("device"))
        except Exception:  # the annotator's own set-up reports it
            return None
        if device.type != "cuda":
            return None
    # fp32 as well: some layers stay in fp32 at reduced precision (depth's head)
    dtypes = {resolve_precision(a.params.get("precision"), device) for a in neural} | {torch.float32}
    dtypes = sorted(dtypes, key=str)
    return start_device_warmup(device, dtypes,
                               done=lambda seconds: trace("device_warm", seconds=round(seconds, 3)))


class _Preload:
    """Annotators loading on a background thread, cancellable between two
    annotators' set-ups."""

    def __init__(self, opts: AnnotateOptions) -> None:
        from concurrent.futures import Future

        self.future: Future = Future()
        self.cancel = threading.Event()
        #: set once the annotators' code is imported (or loading failed)
        self.imported = threading.Event()
        #: set once a shard waits for the models (the warm-up batch stops)
        self.wanted = threading.Event()
        self.thread = threading.Thread(target=self._load, args=(opts,), name="controlset-preload", daemon=True)
        self.thread.start()

    def _load(self, opts: AnnotateOptions) -> None:
        try:
            self.future.set_result(LoadedAnnotators(opts, self.cancel, self.imported, self.wanted))
        except BaseException as exc:  # re-raised where the models are taken
            self.future.set_exception(exc)
        finally:
            self.imported.set()


_PRELOADS: dict[str, _Preload] = {}
_PRELOAD_LOCK = threading.Lock()


def preload_annotators(opts: AnnotateOptions) -> None:
    """Start loading ``opts``' annotators on a background thread of this
    process (once per set of annotators and run); :func:`loaded_annotators`
    takes the result. Loading then overlaps the planning stages that run
    before the first shard (probing every input's header can take minutes on
    a bucket)."""
    key = _preload_key(opts)
    with _PRELOAD_LOCK:
        if key not in _PRELOADS:
            _PRELOADS[key] = _Preload(opts)


#: The longest the probe stage waits for the annotators' imports (an
#: optimisation only: past this it goes on beside them).
IMPORT_WAIT_S = 300.0


def settle_imports(opts: AnnotateOptions, timeout: float = IMPORT_WAIT_S) -> bool:
    """With local inputs, wait until this process's preload has imported the
    annotators' code; weights then load while the inputs are probed.

    Importing torch, transformers and the networks' modules is seconds of
    Python that holds the interpreter lock, and so is probing local files:
    run side by side, each keeps stealing the lock from the other and both
    finish later than one after the other would (3000 local JPEGs: 0.8 s
    alone, 4.1 s beside the imports, which took 5.7 s instead of 4.1).
    Loading weights and setting up the GPU mostly release the lock, so they
    do overlap the probing. Remote inputs are probed on threads that mostly
    wait for the network: there the imports run beside them. Returns whether
    it waited."""
    if any(_is_remote(i) for i in opts.inputs):
        return False
    with _PRELOAD_LOCK:
        preload = _PRELOADS.get(_preload_key(opts))
    if preload is None:
        return False
    if not preload.imported.wait(timeout):
        log.warning("annotators' imports still running after %.0f s; probing inputs beside them", timeout)
    return True


def _preload_key(opts: AnnotateOptions) -> tuple[str, str]:
    # per run: two runs in one process never share (or cancel) a preload
    return opts.run_id, models_tag(opts)


def loaded_annotators(opts: AnnotateOptions) -> "LoadedAnnotators":
    """The preloaded annotators of ``opts`` (waiting for them if still
    loading), else freshly loaded ones. A preload that failed is dropped and
    the load tried again here, so the error (or a retry's success) is the
    caller's, as without preloading."""
    key = _preload_key(opts)
    with _PRELOAD_LOCK:
        preload = _PRELOADS.get(key)
    if preload is not None and not preload.cancel.is_set():
        preload.wanted.set()
        try:
            return preload.future.result()
        except BaseException:
            with _PRELOAD_LOCK:
                if _PRELOADS.get(key) is preload:
                    del _PRELOADS[key]
    return LoadedAnnotators(opts)


def discard_preloads(run_id: str, wait: float = 30.0) -> None:
    """End of run ``run_id``: stop and forget its preloads in this process,
    so a long-lived process keeps no models nobody took (a run whose shards
    were all complete). Waits up to ``wait`` seconds for a load in progress
    to reach the end of its current annotator. Worker processes of other
    runners exit with their run instead."""
    with _PRELOAD_LOCK:
        keys = [k for k in _PRELOADS if k[0] == run_id]
        preloads = [_PRELOADS.pop(k) for k in keys]
    for preload in preloads:
        preload.cancel.set()
        preload.thread.join(wait)


def stop_warm_ups() -> None:
    """No further annotator of this process starts a warm-up batch (a
    worker being torn down: its GPU threads' work would hold up its exit)."""
    with _PRELOAD_LOCK:
        for preload in _PRELOADS.values():
            preload.wanted.set()


class PreloadCancelled(Exception):
    """A background load stopped by :func:`discard_preloads`."""


def _own_cuda_stream(gpu_index: int | None) -> None:
    """Give a GPU thread its own CUDA stream (torch's current stream is per
    thread): the annotators side by side then queue work that can run
    concurrently, and each waits only for its own work, not for every
    kernel another thread queued before it on a shared stream."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    device = torch.device("cuda", gpu_index if gpu_index is not None else torch.cuda.current_device())
    torch.cuda.set_device(device)
    torch.cuda.set_stream(torch.cuda.Stream(device))


def _share_torch_threads(workers: int) -> None:
    """Give torch's CPU operations (building and loading networks, CPU-side
    pre- and post-processing) this process's share of the host's cores,
    ``workers`` being the run's GPU worker processes per host
    (``AnnotateOptions.gpu_workers``): each would otherwise start a thread per core, and
    several loading models at once then fight over the cores instead of
    sharing them."""
    import os
    import sys

    torch = sys.modules.get("torch")
    if torch is None or workers <= 1:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_CLAIMED_GPU: int | None = None
_CLAIMED_RANK = 0


def claimed_rank() -> int:
    """This worker's place among the workers sharing its GPU (0 for the
    first, and where no GPU was claimed)."""
    return _CLAIMED_RANK if _CLAIMED_GPU is not None else 0


def claim_gpu(opts: AnnotateOptions) -> int:
    """A GPU index for this worker process: ``opts.gpus`` GPUs with
    ``opts.workers_per_gpu`` worker slots each, claimed through lock files
    under the system temp folder (one per slot), so no GPU gets more
    workers than asked. Slots go round the GPUs (slot ``i`` is GPU
    ``i % gpus``): the first ``gpus`` workers each get a GPU of their own.
    The slot's rank on its GPU (``i // gpus``) is :func:`claimed_rank`."""
    global _CLAIMED_GPU, _CLAIMED_RANK
    if _CLAIMED_GPU is not None:
        return _CLAIMED_GPU
    import os
    import tempfile

    folder = os.path.join(tempfile.gettempdir(), f"controlset-gpus-{opts.run_id}")
    os.makedirs(folder, exist_ok=True)
    for slot in range(opts.gpu_workers):
        try:
            fd = os.open(os.path.join(folder, f"gpu-{slot}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        _CLAIMED_GPU, _CLAIMED_RANK = slot % opts.gpus, slot // opts.gpus
        return _CLAIMED_GPU
    raise RuntimeError(f"more worker processes than --gpus {opts.gpus} x --workers-per-gpu {opts.workers_per_gpu}; "
                       "every worker slot is taken")


#: Batch size of a neural annotator on a machine without a GPU (their
#: defaults are sized for GPUs; a CPU gains nothing from large batches and
#: can run out of memory with them, which is not recoverable there).
CPU_BATCH_SIZE = 16


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def annotator_batch_sizes(opts: AnnotateOptions, annotators) -> dict[str, int]:
    """Chunk size per annotator: ``--annotator-batch`` values, else each
    annotator's default for GPU annotators (at most ``CPU_BATCH_SIZE``
    without a GPU); CPU ones take the whole batch."""
    sizes = dict(opts.annotator_batch_sizes)
    gpu = any(a.uses_gpu for a in annotators) and _cuda_available()
    for a in annotators:
        if a.name not in sizes and a.uses_gpu:
            sizes[a.name] = _default_batch(type(a), gpu)
    return sizes


def _default_batch(cls, gpu: bool) -> int:
    """An annotator class's default batch, capped without a GPU."""
    return cls.default_batch_size if gpu else min(cls.default_batch_size, CPU_BATCH_SIZE)


def beam_batch_size(opts: AnnotateOptions) -> int:
    """Images per Beam batch: ``--batch-size``, else the largest annotator
    batch, at most half a shard (and at least 16): batches are pipelined
    (decoding the next and encoding the previous while one is annotated),
    across the shards of a bundle too; only a bundle's first decode and
    last encode are not hidden."""
    if opts.batch_size:
        return opts.batch_size
    from annotators import get_annotator_class

    sizes = dict(opts.annotator_batch_sizes)
    classes = [get_annotator_class(n) for n, _ in opts.annotators]
    gpu = any(c.uses_gpu for c in classes) and _cuda_available()
    largest = max([16] + [sizes.get(c.name, _default_batch(c, gpu)) for c in classes])
    return max(16, min(largest, -(-opts.shard_size // 2)))


class Progress:
    """Prints images done, rate and ETA every few seconds (per worker process)."""

    def __init__(self, total: int, every: float = 5.0) -> None:
        import time

        self.total, self.every = total, every
        self.done = 0
        self.start = self.last = time.perf_counter()

    def advance(self, n: int) -> None:
        import sys
        import time

        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = f", ETA {max(0, self.total - self.done) / rate:.0f}s" if self.total and rate else ""
        of = f"/{self.total}" if self.total else ""
        print(f"controlset: annotated {self.done}{of} images ({rate:.1f} img/s{eta})", file=sys.stderr, flush=True)


def _finalize(_, opts: AnnotateOptions, inputs: int, boundaries: list[str],
              records: list[FailureRecord], summaries: list[ShardSummary],
              run_info: dict) -> dict:
    trace("finalize")
    fs, root = url_to_fs(opts.output)
    return finalize(fs, root, prefix=opts.prefix, inputs=inputs, num_shards=len(boundaries),
                    early_records=records, summaries=summaries, run_info=run_info)


#: Name of the run's input list beside its outputs (hidden, and carrying the
#: temporary mark, so a list left by a killed run is removed by the next).
INPUT_LIST = ".controlset-inputs" + TMP_MARK + "{run_id}.jsonl"


def write_input_list(fs, root: str, run_id: str, refs: list[InputRef]) -> str:
    """Write the discovered inputs (JSON lines) beside the outputs and return
    its URL. The pipeline reads them from there instead of carrying them in
    its own definition: a job graph that embeds the list outgrows Dataflow's
    limit for the job's request at a few hundred thousand inputs (200000
    hashed gs:// names: a 12 MB pipeline)."""
    path = posixpath.join(root, INPUT_LIST.format(run_id=run_id))
    lines = [json.dumps(dataclasses.asdict(r), sort_keys=True) for r in refs]
    atomic_write_bytes(fs, path, ("\n".join(lines) + "\n").encode() if lines else b"")
    return fs.unstrip_protocol(path)


def read_input_groups(url: str) -> list[tuple[InputRef, ...]]:
    """The probe stage's elements (:func:`probe_groups`) of an input list."""
    with fsspec.open(url, "rb") as f:
        refs = [InputRef(**json.loads(line)) for line in f.read().decode().splitlines() if line]
    return probe_groups(refs)


def build_pipeline(p: beam.Pipeline, opts: AnnotateOptions, input_list: str, total: int,
                   fingerprint: dict, run_info: dict) -> beam.PCollection:
    """Add the annotate stages to ``p``; returns the one-element stats PCollection.

    ``input_list``: the URL of the ``total`` discovered inputs written by
    :func:`write_input_list`; the pipeline reads them from there, so its
    definition stays small for any number of inputs."""
    fingerprint_json = json.dumps(fingerprint, sort_keys=True)
    probed = (
        p
        | "InputList" >> beam.Create([input_list])
        | "ReadInputs" >> beam.FlatMap(read_input_groups)
        | "SpreadInputs" >> beam.Reshuffle()
        | "Probe" >> beam.ParDo(ProbeFn(opts)).with_outputs("records", main="ok")
    )
    inputs = probed.ok | "CountOk" >> beam.combiners.Count.Globally()
    early_failed = probed.records | "CountRecords" >> beam.combiners.Count.Globally()
    deduped = (
        probed.ok
        | "ByKey" >> beam.Map(lambda c: (c.key, c))
        | "GroupDuplicates" >> beam.GroupByKey()
        | "Dedup" >> beam.ParDo(DedupFn()).with_outputs("records", main="kept")
    )
    kept = deduped.kept
    near_records = None
    if opts.near_duplicates:
        drop = (
            kept
            | "Hashes" >> beam.Map(lambda c: (c.key, c.source, c.phash))
            | "AllHashes" >> beam.combiners.ToList()
            | "NearDuplicates" >> beam.Map(near_duplicates, opts.near_duplicates)
        )
        split = kept | "DropNear" >> beam.ParDo(DropNearFn(), beam.pvalue.AsSingleton(drop)).with_outputs(
            "records", main="kept")
        kept, near_records = split.kept, split.records
    boundaries = (
        kept
        | "Keys" >> beam.Map(lambda c: c.key)
        | "AllKeys" >> beam.combiners.ToList()
        | "Boundaries" >> beam.Map(lambda keys: shard_boundaries(sorted(keys), opts.shard_size))
    )
    planned = (
        kept
        | "AssignShard" >> beam.Map(_assign, beam.pvalue.AsSingleton(boundaries))
        | "GroupPlan" >> beam.GroupByKey()
        | "PlanShards" >> beam.ParDo(PlanShardFn(opts, fingerprint_json)).with_outputs("done", main="todo")
    )
    written = (
        planned.todo
        | "Spread" >> beam.Reshuffle()
        | "MakeShards" >> beam.ParDo(ShardFn(opts, total=total))
    )
    summaries = (written, planned.done) | "AllShards" >> beam.Flatten()
    early = [probed.records, deduped.records] + ([near_records] if near_records is not None else [])
    records = tuple(early) | "EarlyRecords" >> beam.Flatten()
    total_inputs = (
        (inputs, early_failed)
        | "InputCounts" >> beam.Flatten()
        | "SumInputs" >> beam.CombineGlobally(sum)
    )
    return (
        p
        | "Once" >> beam.Create([None])
        | "Finalize" >> beam.Map(
            _finalize,
            opts,
            beam.pvalue.AsSingleton(total_inputs),
            beam.pvalue.AsSingleton(boundaries),
            beam.pvalue.AsList(records),
            beam.pvalue.AsList(summaries),
            run_info,
        )
    )


def pipeline_options(args: list[str]) -> PipelineOptions:
    """Beam options from pass-through arguments; the DirectRunner by default."""
    args = list(args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=DirectRunner")
    return PipelineOptions(args)


def unknown_beam_args(args: list[str]) -> list[str]:
    """Arguments that no Beam options class knows: typos are caught here
    instead of being discarded with a warning deep inside Beam."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    seen: dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)  # the same parser Beam builds itself
    _, unknown = parser.parse_known_args(list(args))
    return unknown
