"""``run_annotate``: the annotate command as a function."""

from __future__ import annotations

import contextlib
import json
import os
import logging
import posixpath
import time
import uuid
from dataclasses import replace
from typing import Any

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter

from annotators import create_annotator, get_annotator_class
from pipelines.beam import (
    NS,
    build_pipeline,
    discard_preloads,
    pipeline_options,
    preload_annotators,
    settle_imports,
    trace,
    write_input_list,
)
from pipelines.finalize import STATS_FILE
from pipelines.local_runner import workers_stop_together
from pipelines.options import AnnotateOptions, default_threads, parse_gate
from pipelines.sources import discover, open_output_fs
from schemas.errors import UsageError
from schemas.files import remove_quietly

log = logging.getLogger(__name__)


def describe_annotators(opts: AnnotateOptions) -> dict[str, dict]:
    """Create each annotator (without loading models) to validate names and
    options up front and to record versions and parameters."""
    out = {}
    for name, options in opts.annotators:
        try:
            annotator = create_annotator(name, **options)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from exc
        annotator.preflight()
        out[name] = annotator.describe()
    return out


#: Default decode/encode and CPU-annotator threads per worker process, at
#: most, when GPU annotators are selected.
GPU_RUN_THREADS = 4


def run_annotate(opts: AnnotateOptions, beam_args: list[str] | None = None) -> dict[str, Any]:
    """Run the annotate pipeline and return the stats written to ``stats.json``.

    Raises :class:`UsageError` for bad usage (missing input, unknown
    annotator, unwritable output) before any work starts. Bad input files
    never raise: they become failure or filter records.
    """
    trace("run_start")
    if not opts.annotators:
        raise UsageError("no annotators selected")
    names = [n for n, _ in opts.annotators]
    if len(set(names)) != len(names):
        raise UsageError(f"annotator listed twice: {', '.join(names)}")
    descriptions = describe_annotators(opts)
    for gate in opts.gates:
        g = parse_gate(gate)
        if g.annotator not in names:
            raise UsageError(f"gate {gate!r} names annotator {g.annotator!r}, which is not selected")
    refs = discover(list(opts.inputs))
    if not any(r.kind != "skipped" for r in refs):
        raise UsageError(f"no images or tar shards found in {', '.join(opts.inputs)}")
    fs, root = open_output_fs(opts.output)
    beam_args = list(beam_args or [])
    opts = replace(opts, run_id=opts.run_id or uuid.uuid4().hex)
    if opts.workers_per_gpu > 1:
        if not runs_locally(beam_args):
            raise UsageError("--workers-per-gpu is for local runs (the DirectRunner); other runners decide "
                             "how many worker processes share a machine's GPUs themselves")
        if not opts.gpus:
            opts = replace(opts, gpus=1)  # workers sharing a GPU: the first one
    if opts.gpus:
        if not any(a.startswith("--runner") for a in beam_args) and not any(
                a.startswith("--direct_running_mode") for a in beam_args):
            # One worker process per GPU (or workers_per_gpu of them); each
            # claims its GPU. (One process driving every GPU from threads
            # measured slower: the workers' Python work then shares one
            # GIL; BENCHMARKS.md.)
            beam_args += ["--direct_running_mode=multi_processing",
                          f"--direct_num_workers={opts.gpu_workers}"]
    fingerprint = opts.fingerprint(descriptions)
    run_info = {"annotators": names, "options": fingerprint}
    started = time.perf_counter()
    log.info("annotating %d inputs into %s with %s", len(refs), opts.output, ", ".join(names))
    workers = local_workers(beam_args)
    # With GPU annotators a worker is bound by its interpreter lock, not by
    # cores: fewer threads per worker measured faster (BENCHMARKS.md).
    cap = GPU_RUN_THREADS if any(get_annotator_class(n).uses_gpu for n in names) else None
    if not opts.io_threads:
        # probing remote inputs mostly waits on the network: no cap there
        opts = replace(opts, io_threads=default_threads(workers, cap),
                       probe_threads=opts.probe_threads or default_threads(workers))
    if not opts.cpu_threads:
        # the same share of the cores for the CPU annotators' threads
        opts = replace(opts, cpu_threads=default_threads(workers, cap))
    p = beam.Pipeline(options=pipeline_options(beam_args))
    input_list = write_input_list(fs, root, opts.run_id, refs)
    try:
        if runs_in_this_process(beam_args):
            # The workers are this process: start loading the models now, so
            # loading overlaps Beam's start-up as well as the planning stages.
            preload_annotators(opts)
            settle_imports(opts)
        build_pipeline(p, opts, input_list, len(refs), fingerprint, run_info)
        trace("pipeline_start", inputs=len(refs), beam_args=beam_args)
        with workers_stop_together() if workers > 1 and runs_locally(beam_args) else contextlib.nullcontext():
            result = p.run()
            result.wait_until_finish()
        trace("pipeline_done")
    finally:
        remove_quietly(fs, input_list)
        discard_preloads(opts.run_id)
        if opts.gpus:
            import shutil
            import tempfile

            shutil.rmtree(os.path.join(tempfile.gettempdir(), f"controlset-gpus-{opts.run_id}"), ignore_errors=True)
    elapsed = time.perf_counter() - started
    with fs.open(posixpath.join(root, STATS_FILE), "rb") as f:
        stats = json.load(f)
    stats["seconds"] = elapsed
    stats["counters"] = stage_counters(result)
    return stats


def runs_locally(beam_args: list[str]) -> bool:
    """Whether the pipeline runs on this machine (the DirectRunner, in any
    running mode)."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = (pipeline_options(beam_args).view_as(StandardOptions).runner or "DirectRunner").lower()
    return runner in _LOCAL_RUNNERS


_LOCAL_RUNNERS = ("directrunner", "direct", "fnapirunner", "bundlebaseddirectrunner")


def runs_in_this_process(beam_args: list[str]) -> bool:
    """Whether the pipeline's workers run in this process: the DirectRunner
    in memory or with worker threads (not worker processes, not a remote
    runner)."""
    from apache_beam.options.pipeline_options import DirectOptions

    mode = pipeline_options(beam_args).view_as(DirectOptions).direct_running_mode
    return runs_locally(beam_args) and mode != "multi_processing"


def local_workers(beam_args: list[str]) -> int:
    """Worker processes of a local multi-processing DirectRunner run (else 1)."""
    workers = 1
    if "--direct_running_mode=multi_processing" in beam_args:
        for a in beam_args:
            if a.startswith("--direct_num_workers="):
                workers = max(1, int(a.split("=", 1)[1]))
    return workers


def stage_counters(result) -> dict[str, int]:
    """controlset's Beam counters (inputs, decoded, annotated, written,
    shards_written, shards_skipped, ...) from a finished pipeline."""
    counters: dict[str, int] = {}
    try:
        query = result.metrics().query(MetricsFilter().with_namespace(NS))
    except Exception:  # some runners do not report metrics
        return counters
    for c in query["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + int(value or 0)
    return dict(sorted(counters.items()))
