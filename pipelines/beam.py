"""The annotate pipeline on Apache Beam.

    Create(inputs) -> Probe -> Dedup -> PlanShards -> Reshuffle -> Decode
      -> BatchElements -> Annotate+Encode -> GroupByKey(shard) -> WriteShard
      -> Finalize(stats.json, failures.parquet, filtered.parquet)

Probing is light (bytes are hashed, headers read, pixels not decoded), so
duplicates are removed and samples are assigned to fixed-size shards before
any expensive work; shards already complete from an earlier run with the same
plan are skipped before decoding. Pixels are decoded once, after planning.
"""

from __future__ import annotations

import bisect
import json
import logging
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from fsspec.core import url_to_fs

from annotators import create_annotator
from pipelines.finalize import finalize
from pipelines.options import AnnotateOptions
from pipelines.sources import InputRef
from pipelines.stages import (
    Candidate,
    Decoded,
    EncodedSample,
    annotate_decoded,
    choose_duplicate,
    decode_candidate,
    encode_sample,
    plan_digest,
    probe_input,
    shard_boundaries,
)
from pipelines.writer import ShardSummary, read_shard_summary, shard_is_complete, shard_name, write_shard
from schemas import FailureRecord

log = logging.getLogger(__name__)
NS = "controlset"


def _counter(name: str):
    return Metrics.counter(NS, name)


class ProbeFn(beam.DoFn):
    def __init__(self, opts: AnnotateOptions) -> None:
        self.opts = opts
        self.inputs = _counter("inputs")

    def process(self, ref: InputRef) -> Iterable:
        for result in probe_input(ref, self.opts):
            self.inputs.inc()
            if isinstance(result, FailureRecord):
                yield beam.pvalue.TaggedOutput("records", result)
            else:
                yield result


class DedupFn(beam.DoFn):
    def process(self, item: tuple[str, Iterable[Candidate]]) -> Iterable:
        key, group = item
        kept, dropped = choose_duplicate(key, list(group))
        yield kept
        for record in dropped:
            yield beam.pvalue.TaggedOutput("records", record)


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
        for c in cands:
            yield (index, digest, c)


class DecodeFn(beam.DoFn):
    def __init__(self, opts: AnnotateOptions) -> None:
        self.opts = opts
        self.decoded = _counter("decoded")
        self.failed = _counter("decode_failed")

    def process(self, item: tuple[int, str, Candidate]) -> Iterable:
        index, digest, c = item
        result = decode_candidate(c, self.opts)
        if isinstance(result, FailureRecord):
            self.failed.inc()
            yield beam.pvalue.TaggedOutput("failed", (index, (digest, result)))
        else:
            self.decoded.inc()
            yield (index, digest, result)


class AnnotateFn(beam.DoFn):
    """Runs every selected annotator on a batch; models load once per worker
    (in ``setup``), not once per bundle or element."""

    def __init__(self, opts: AnnotateOptions) -> None:
        self.opts = opts
        self.annotated = _counter("annotated")
        self.failed = _counter("annotate_failed")

    def setup(self) -> None:
        self.annotators = [create_annotator(name, **o) for name, o in self.opts.annotators]
        for a in self.annotators:
            a.setup()

    def process(self, batch: list[tuple[int, str, Decoded]]) -> Iterable:
        results = annotate_decoded([d for _, _, d in batch], self.annotators)
        for (index, digest, _), result in zip(batch, results):
            if not isinstance(result, FailureRecord):
                decoded, annotations = result
                result = encode_sample(decoded, annotations, self.annotators, self.opts,
                                       shard_name(self.opts.prefix, index))
            if isinstance(result, FailureRecord):
                self.failed.inc()
            else:
                self.annotated.inc()
            yield (index, (digest, result))


class WriteShardFn(beam.DoFn):
    def __init__(self, opts: AnnotateOptions) -> None:
        self.opts = opts
        self.written = _counter("written")
        self.shards = _counter("shards_written")

    def setup(self) -> None:
        self.fs, self.root = url_to_fs(self.opts.output)

    def process(self, item: tuple[int, Iterable[tuple[str, Any]]]) -> Iterable[ShardSummary]:
        index, entries = item
        samples: list[EncodedSample] = []
        failures: list[FailureRecord] = []
        digests = set()
        for digest, result in entries:
            digests.add(digest)
            (failures if isinstance(result, FailureRecord) else samples).append(result)
        assert len(digests) == 1, "one shard, one plan"
        summary = write_shard(self.fs, self.root, shard_name(self.opts.prefix, index),
                              samples, failures, digests.pop())
        self.written.inc(summary.written)
        self.shards.inc()
        yield summary


def _finalize(_, opts: AnnotateOptions, inputs: int, boundaries: list[str],
              records: list[FailureRecord], summaries: list[ShardSummary],
              run_info: dict) -> dict:
    fs, root = url_to_fs(opts.output)
    return finalize(fs, root, prefix=opts.prefix, inputs=inputs, num_shards=len(boundaries),
                    early_records=records, summaries=summaries, run_info=run_info)


def build_pipeline(p: beam.Pipeline, opts: AnnotateOptions, refs: list[InputRef],
                   fingerprint: dict, run_info: dict) -> beam.PCollection:
    """Add the annotate stages to ``p``; returns the one-element stats PCollection."""
    fingerprint_json = json.dumps(fingerprint, sort_keys=True)
    probed = (
        p
        | "Inputs" >> beam.Create(refs, reshuffle=True)
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
    boundaries = (
        deduped.kept
        | "Keys" >> beam.Map(lambda c: c.key)
        | "AllKeys" >> beam.combiners.ToList()
        | "Boundaries" >> beam.Map(lambda keys: shard_boundaries(sorted(keys), opts.shard_size))
    )
    planned = (
        deduped.kept
        | "AssignShard" >> beam.Map(_assign, beam.pvalue.AsSingleton(boundaries))
        | "GroupPlan" >> beam.GroupByKey()
        | "PlanShards" >> beam.ParDo(PlanShardFn(opts, fingerprint_json)).with_outputs("done", main="todo")
    )
    decoded = (
        planned.todo
        | "Spread" >> beam.Reshuffle()
        | "Decode" >> beam.ParDo(DecodeFn(opts)).with_outputs("failed", main="ok")
    )
    annotated = (
        decoded.ok
        | "Batch" >> beam.BatchElements(min_batch_size=opts.batch_size, max_batch_size=opts.batch_size)
        | "Annotate" >> beam.ParDo(AnnotateFn(opts))
    )
    written = (
        (annotated, decoded.failed)
        | "Join" >> beam.Flatten()
        | "GroupShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteShardFn(opts))
    )
    summaries = (written, planned.done) | "AllShards" >> beam.Flatten()
    records = (probed.records, deduped.records) | "EarlyRecords" >> beam.Flatten()
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
