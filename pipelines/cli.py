"""``controlset annotate``, ``controlset preview`` and ``controlset validate``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from schemas.errors import UsageError
from schemas.files import read_yaml_mapping

# Options shared by every neural annotator that accepts them.
_COMMON_NEURAL = ("weights", "device", "precision")


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_annotator_options(
    names: list[str], sets: list[str], common: dict[str, Any], config: dict[str, Any] | None = None
) -> tuple[tuple[str, dict[str, Any]], ...]:
    """(name, options) pairs from ``--annotators``, ``--set NAME.OPT=VALUE``,
    the common ``--weights/--device/--precision`` flags and a config file's
    ``annotators:`` mapping (flags win over the file)."""
    from annotators import get_annotator_class

    per: dict[str, dict[str, Any]] = {n: dict((config or {}).get(n) or {}) for n in names}
    for item in sets:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UsageError(f"--set expects NAME.OPTION=VALUE, got {item!r}")
        lhs, value = item.split("=", 1)
        name, option = lhs.split(".", 1)
        if name not in per:
            raise UsageError(f"--set {item!r} names annotator {name!r}, which is not selected")
        per[name][option] = _parse_value(value)
    out = []
    for name in names:
        try:
            accepted = get_annotator_class(name).option_names()
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        options = per[name]
        for opt, value in common.items():
            if value is not None and opt in accepted:
                options.setdefault(opt, value)
        out.append((name, options))
    return tuple(out)


def _gpu_count(value: str | None) -> int:
    if value is None:
        return 0
    if value == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise UsageError("--gpus all: no CUDA GPU is visible")
        return n
    if not value.isdigit():
        raise UsageError(f"--gpus expects a number or 'all', got {value!r}")
    return int(value)


def _annotator_batches(items: list[str]) -> tuple[tuple[str, int], ...]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--annotator-batch expects NAME=N with N >= 1, got {item!r}")
        out.append((name, int(value)))
    return tuple(out)


def _annotator_names(text: str) -> list[str]:
    from annotators import list_annotators

    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list_annotators()
    if not names:
        raise UsageError("--annotators needs at least one name")
    return names


def _load_config(path: str | None) -> dict[str, Any]:
    return read_yaml_mapping(path) if path else {}


def cmd_annotate(args: argparse.Namespace, extra: list[str]) -> int:
    from pipelines.options import AnnotateOptions
    from pipelines.run import run_annotate

    config = _load_config(args.config)
    names = _annotator_names(args.annotators or ",".join(config.get("annotators", {}) or ["canny"]))
    annotators = parse_annotator_options(
        names, args.set or [],
        {"weights": args.weights, "device": args.device, "precision": args.precision},
        config.get("annotators") if isinstance(config.get("annotators"), dict) else None,
    )
    from pipelines.beam import unknown_beam_args

    unknown = unknown_beam_args(extra)
    if unknown:
        raise UsageError(f"unrecognized arguments (neither controlset nor Beam options): {' '.join(unknown)}")
    if args.gpus is not None and _gpu_count(args.gpus) == 0 and args.workers_per_gpu > 1:
        raise UsageError("--workers-per-gpu needs a GPU; --gpus 0 gives none")
    try:
        opts = AnnotateOptions(
            inputs=tuple(args.inputs),
            output=args.output,
            annotators=annotators,
            resolution=args.resolution,
            crop=args.crop,
            shard_size=args.shard_size,
            prefix=args.prefix,
            min_size=args.min_size,
            max_aspect=args.max_aspect,
            batch_size=args.batch_size,
            annotator_batch_sizes=_annotator_batches(args.annotator_batch or []),
            gates=tuple(args.gate or []) + tuple(config.get("gates") or []),
            gpus=_gpu_count(args.gpus),
            workers_per_gpu=args.workers_per_gpu,
            near_duplicates=args.near_duplicates,
            reduced_jpeg_decode=not args.full_jpeg_decode,
            warm_batch=not args.no_warm_batch,
            io_threads=args.io_threads,
            gpu_threads=args.gpu_threads,
            cpu_threads=args.cpu_threads,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    stats = run_annotate(opts, extra)
    print_summary(stats, args.output)
    return 0


def print_summary(stats: dict[str, Any], output: str) -> None:
    rate = stats["inputs"] / stats["seconds"] if stats.get("seconds") else 0.0
    print(
        f"controlset: {stats['inputs']} inputs -> {stats['written']} written, "
        f"{stats['filtered']} filtered, {stats['failed']} failed "
        f"in {stats.get('seconds', 0):.1f}s ({rate:.1f} inputs/s)"
    )
    for label, key in (("filtered", "filtered_by_reason"), ("failed", "failed_by_reason")):
        if stats.get(key):
            reasons = ", ".join(f"{r}: {n}" for r, n in stats[key].items())
            print(f"  {label}: {reasons}")
    counters = stats.get("counters", {})
    timed = {k[3:]: v for k, v in counters.items() if k.startswith("ms_")}
    loads = {k[8:]: v for k, v in counters.items() if k.startswith("load_ms_")}
    if timed:
        total = sum(timed.values()) or 1
        print("  annotator        seconds   share   loading (s)")
        for name, ms in sorted(timed.items(), key=lambda kv: -kv[1]):
            load = f"{loads[name] / 1000:13.1f}" if name in loads else ""
            print(f"  {name:<14} {ms / 1000:9.1f}   {100 * ms / total:4.0f}%{load}")
    waits = [(label, counters.get(f"stage_ms_{key}", 0)) for key, label in
             (("annotate", "annotating"), ("wait_decode", "waiting for decoding"),
              ("wait_encode", "waiting for encoding"))]
    if any(ms for _, ms in waits):
        print("  shard threads: " + ", ".join(f"{label} {ms / 1000:.1f}s" for label, ms in waits))
    stages = [("inputs", "probed"), ("decoded", "decoded"), ("decode_failed", "decode failed"),
              ("annotated", "annotated"), ("annotate_failed", "annotate failed"), ("gated", "gated"),
              ("shards_written", "shards written")]
    line = ", ".join(f"{label} {counters[k]}" for k, label in stages if counters.get(k))
    if line:
        print(f"  stages: {line}")
    if counters.get("caption_notes"):
        print(f"  captions: {counters['caption_notes']} input caption(s) not used as given "
              "(too large, unreadable or not UTF-8; see caption_note in the samples' json)")
    skipped = counters.get("shards_skipped", 0)
    note = f", {skipped} already complete and kept" if skipped else ""
    print(f"  {stats['shards']} shard(s){note} in {output} (stats.json, failures.parquet, filtered.parquet)")


def cmd_preview(args: argparse.Namespace, extra: list[str]) -> int:
    from pipelines.preview import make_contact_sheet

    path = make_contact_sheet(args.dataset, args.output, samples=args.samples, cell=args.cell)
    print(f"preview written to {path}")
    return 0


def cmd_validate(args: argparse.Namespace, extra: list[str]) -> int:
    from pipelines.validate import validate_dataset

    report = validate_dataset(args.dataset)
    for problem in report.problems:
        print(f"problem: {problem}")
    print(report.summary())
    return 0 if report.ok else 1


def cmd_sample_photos(args: argparse.Namespace, extra: list[str]) -> int:
    from pipelines.samples import write_sample_photos

    paths = write_sample_photos(args.folder)
    print(f"{len(paths)} sample photos (with captions) written to {args.folder}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "annotate",
        help="build WebDataset shards of images and their control conditions",
        description=(
            "Read images (folders, globs, fsspec URLs, WebDataset tars), normalise them, run the "
            "selected annotators and write WebDataset shards with manifests, failure records and "
            "stats.json. Any further --option is passed to Apache Beam (e.g. --runner, "
            "--direct_running_mode=multi_processing, --direct_num_workers=N)."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folder, glob, file or fsspec URL")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder or URL")
    p.add_argument("--annotators", default=None,
                   help="comma-separated annotator names, or 'all' (default: canny)")
    p.add_argument("--set", action="append", metavar="NAME.OPTION=VALUE",
                   help="annotator option, e.g. canny.random_thresholds=true (repeatable)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML with an 'annotators' mapping of options")
    p.add_argument("--resolution", type=int, default=512, help="output short side (default 512)")
    p.add_argument("--crop", choices=("center", "none"), default="center",
                   help="center: square crop (default); none: keep aspect, sides multiples of 64")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default 'shard')")
    p.add_argument("--min-size", type=int, default=256, help="filter images whose shorter side is smaller")
    p.add_argument("--max-aspect", type=float, default=3.0, help="filter images with a larger aspect ratio")
    p.add_argument("--near-duplicates", type=int, default=0, metavar="BITS",
                   help="also drop near-duplicates: perceptual hashes within BITS of a kept image "
                        "(e.g. 2; default 0 = exact duplicates only)")
    p.add_argument("--full-jpeg-decode", action="store_true",
                   help="decode every JPEG at full size (default: large JPEGs are decoded at 1/2, 1/4 or 1/8 "
                        "scale while their crop keeps at least twice the output's pixels per side; "
                        "several times faster, about 0.1 grey level apart on average)")
    p.add_argument("--no-warm-batch", action="store_true",
                   help="do not annotate a made-up batch on each GPU worker while the inputs are planned "
                        "(by default it takes CUDA graph capture and first-call costs off the first real batch)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per pipeline batch (default: the largest annotator batch size, at most half a shard)")
    p.add_argument("--annotator-batch", action="append", metavar="NAME=N",
                   help="batch size of one annotator on the device, e.g. caption=64 (repeatable)")
    p.add_argument("--gate", action="append", metavar="NAME.FIELD>=N",
                   help="yield gate on annotator metadata, e.g. 'mlsd.lines>16', 'openpose.keypoints>=8' "
                        "(repeatable; failing images are filtered with reason gate:NAME.FIELD)")
    p.add_argument("--weights", default=None, help="folder with annotator weights (neural annotators)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--io-threads", type=int, default=0, metavar="N",
                   help="decode/encode threads per worker process, also probing remote inputs (default: "
                        "half the CPUs of this machine per local worker, 2 to 8, at most 4 with GPU annotators; "
                        "set it for remote runners)")
    p.add_argument("--gpu-threads", type=int, default=2, metavar="N",
                   help="GPU annotators that run side by side in a worker, so one's host-side work overlaps "
                   "another's kernels (default 2; 1: one after another)")
    p.add_argument("--cpu-threads", type=int, default=0, metavar="N",
                   help="threads per worker that share the CPU annotators' images (Canny, Hough) while the "
                   "GPU works (default: the same rule as --io-threads)")
    p.add_argument("--gpus", default=None, metavar="N|all",
                   help="one worker process per GPU on this host (DirectRunner), none sharing a GPU unless "
                        "--workers-per-gpu says so")
    p.add_argument("--workers-per-gpu", type=int, default=1, metavar="N",
                   help="worker processes sharing each GPU (default 1; with 2, each has its own models and "
                        "interpreter lock, which keeps the GPU busier when host-side Python is the limit; "
                        "implies --gpus 1 if --gpus is not given)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="default: bf16 on GPU, fp32 on CPU")
    p.set_defaults(func=cmd_annotate, passthrough=True)

    p = sub.add_parser("preview", help="contact sheet of a few samples of a dataset")
    p.add_argument("dataset", metavar="OUT", help="folder written by 'controlset annotate'")
    p.add_argument("-o", "--output", default=None, help="PNG path (default OUT/preview.png)")
    p.add_argument("-n", "--samples", type=int, default=6, help="number of samples (default 6)")
    p.add_argument("--cell", type=int, default=192, help="cell size in pixels (default 192)")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("sample-photos", help="write scikit-image's sample photos to a folder, to try things")
    p.add_argument("folder", metavar="DIR")
    p.set_defaults(func=cmd_sample_photos)

    p = sub.add_parser("validate", help="check shards, manifests and stats of a dataset")
    p.add_argument("dataset", metavar="OUT", help="folder written by 'controlset annotate'")
    p.set_defaults(func=cmd_validate)
