"""End to end: every annotator in one Beam run on a GPU, against the chain of
reference per-image annotators (controlnet-aux detectors and transformers'
per-image inference) on a subset, in the same run.

Random weights of the real architectures (nothing is downloaded). Reports
images/s of the whole pipeline (decode, all annotators, encode, write), GPU
utilisation sampled with nvidia-smi, and each annotator's share of time.

    python bench/bench_e2e.py --images 2000              # one GPU
    python bench/bench_e2e.py --images 2000 --gpus 2     # a worker process per GPU
    python bench/bench_e2e.py --images 4000 --gpus 2 --modes one,processes
    python bench/bench_e2e.py --images 4000 --gpus 1 --workers-per-gpu 2 --modes one,processes
    python bench/bench_e2e.py --smoke                    # tiny CPU check

Each pipeline runs in a fresh Python process, as ``controlset annotate``
would, and is timed from that process's start to its end: interpreter
start, imports, Beam start-up, model loading and graph capture included.
Several modes run back to back on the same inputs and models, so they
compare within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

ANNOTATORS = ("canny", "hough", "mlsd", "hed", "openpose", "depth", "normal", "seg", "caption")


def build_models(folder: Path, tiny: bool, beams: int = 3) -> dict[str, dict]:
    """Options per annotator pointing at random weights of the real networks."""
    from bench_hf_annotators import build_blip_large, build_dpt_hybrid, build_upernet_convnext_small
    from bench_neural_annotators import save_random_weights

    weights = folder / "annotators"
    weights.mkdir(parents=True, exist_ok=True)
    nets = save_random_weights(str(weights))
    dpt = build_dpt_hybrid(str(folder / "dpt"), tiny)
    seg = build_upernet_convnext_small(str(folder / "seg"), tiny)
    blip = build_blip_large(str(folder / "blip"), tiny)
    return {
        "canny": {}, "hough": {},
        "mlsd": {"weights": str(weights)}, "hed": {"weights": str(weights)},
        "openpose": {"weights": str(weights)},
        "depth": {"model": dpt}, "normal": {"model": dpt}, "seg": {"model": seg},
        "caption": {"model": blip, "max_new_tokens": 20, "min_new_tokens": 20, "num_beams": beams},
        "_nets": nets,
    }


def write_inputs(folder: Path, count: int, side: int) -> None:
    """``count`` JPEGs of real photos, each made distinct by a seeded 4x4
    patch; written on a thread pool (resizing and JPEG encoding release the
    GIL), so large runs do not spend minutes on set-up."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from skimage import data

    base = []
    for im in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()):
        im = im[..., :3]
        k = side / min(im.shape[:2])
        base.append(cv2.resize(im, (round(im.shape[1] * k), round(im.shape[0] * k)), interpolation=cv2.INTER_AREA))
    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        im = base[i % len(base)].copy()
        im[:4, :4] = np.random.default_rng(i).integers(0, 255, (4, 4, 3), dtype=np.uint8)  # distinct content keys
        Image.fromarray(im).save(folder / f"img{i:05d}.jpg", quality=92)

    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(count)))


class GpuSampler:
    """Samples each GPU's utilisation with nvidia-smi while a run is in
    progress (every 0.5 s), reported per GPU index: a run on one GPU of a
    host with several must not be averaged with the idle ones."""

    def __init__(self) -> None:
        self.samples: dict[int, list[int]] = {}
        #: (epoch seconds, utilisation) per GPU, for the utilisation of a window
        self.timed: dict[int, list[tuple[float, int]]] = {}
        self.proc = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                index, util = (int(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.setdefault(index, []).append(util)
            self.timed.setdefault(index, []).append((time.time(), util))

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.thread.join(timeout=5)

    def summary(self) -> dict:
        if not self.samples:
            return {}
        per_gpu = {i: round(float(np.mean(v)), 1) for i, v in sorted(self.samples.items())}
        return {"mean_util_percent_per_gpu": per_gpu, "samples_per_gpu": len(next(iter(self.samples.values())))}

    def window(self, start: float, end: float) -> dict[int, float]:
        """Mean utilisation per GPU between two epoch times (e.g. the steady
        state: from every worker's first shard to the last shard)."""
        out = {}
        for i, rows in sorted(self.timed.items()):
            vals = [u for t, u in rows if start <= t <= end]
            if vals:
                out[i] = round(float(np.mean(vals)), 1)
        return out


def steady_rate(out: Path, workers: int = 1) -> float | None:
    """Images/s once every worker has started, loaded its models and
    committed a first shard: the images of the shards committed after the
    first ``workers`` commits, over the time from that commit to the last
    (start-up, model loading and first-batch set-up excluded)."""
    import tarfile

    tars = sorted(out.glob("*.tar"), key=lambda p: p.stat().st_mtime)
    if len(tars) < workers + 2:
        return None
    images = 0
    for t in tars[workers:]:
        with tarfile.open(t) as tf:
            images += sum(1 for m in tf.getmembers() if m.name.endswith(".jpg"))
    span = tars[-1].stat().st_mtime - tars[workers - 1].stat().st_mtime
    return round(images / span, 2) if span > 0 else None


def steady_rate_per_worker(trace_file: Path) -> tuple[float | None, dict[int, float]]:
    """Images/s of each worker process once it committed its first shard
    (from the trace's ``shard_commit`` events: the images of its later
    shards over the time from its first commit to its last), and their sum.
    Workers that committed one shard only are left out (None if all were)."""
    commits: dict[int, list[tuple[float, int]]] = {}
    lines = trace_file.read_text().splitlines() if trace_file.exists() else []
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:  # a line cut short by a killed process
            continue
        if e.get("event") == "shard_commit":
            commits.setdefault(e["pid"], []).append((e["t"], e["written"]))
    rates = {}
    for pid, rows in commits.items():
        rows.sort()
        if len(rows) >= 2 and rows[-1][0] > rows[0][0]:
            rates[pid] = round(sum(n for _, n in rows[1:]) / (rows[-1][0] - rows[0][0]), 2)
    return (round(sum(rates.values()), 2) if rates else None), rates


def commit_times(out: Path, start: float) -> list[float]:
    """Seconds from the run's start (epoch ``start``) to each shard's commit,
    in commit order: the first ``workers`` of them show start-up (imports,
    model loading, graph capture, the first shard), the rest the steady state."""
    return [round(t.stat().st_mtime - start, 1) for t in sorted(out.glob("*.tar"), key=lambda p: p.stat().st_mtime)]


def read_timeline(path: Path, start: float) -> list[dict]:
    """The run's trace events, times in seconds from ``start``, in time order;
    processes numbered 0, 1, ... in order of their first event."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a killed process
            continue
    rows.sort(key=lambda r: r["t"])
    procs: dict[int, int] = {}
    out = []
    for r in rows:
        r["proc"] = procs.setdefault(r.pop("pid"), len(procs))
        r["t"] = round(r["t"] - start, 2)
        out.append(r)
    return out


def startup_milestones(events: list[dict], start: float) -> dict[int, dict[str, float]]:
    """Per process of a timeline (:func:`read_timeline`), the seconds from
    ``start`` at which it started, had imported the annotators' code, had
    loaded every model, had annotated its first batch and had committed its
    first shard (those it reached)."""
    out: dict[int, dict[str, float]] = {}
    for r in events:
        m = out.setdefault(r["proc"], {})
        if "process_started" in r:
            m["started"] = round(r["process_started"] - start, 2)
        key = {"imported": "imported", "loaded": "models_ready", "first_batch_annotated": "first_batch",
               "shard_commit": "first_commit"}.get(r["event"])
        if key == "models_ready":
            m[key] = r["t"]  # the last annotator's
        elif key and key not in m:
            m[key] = r["t"]
    return out


def reference_chain(models: dict, images: list[np.ndarray], device: str) -> float:
    """Images/s of the reference annotators run one image at a time (NaN
    for no images: ``--reference-images 0`` skips the reference)."""
    if not images:
        return float("nan")
    import torch
    from bench_hf_annotators import reference_runner
    from bench_neural_annotators import reference_detector

    from controlnet_aux.util import HWC3  # noqa: F401  (imported for its side effects on detectors)

    nets = models["_nets"]
    dets = {n: reference_detector(n, nets, device) for n in ("hed", "mlsd", "openpose")}
    runners = {
        "depth": reference_runner("depth", models["depth"]["model"], device, {}),
        "seg": reference_runner("seg", models["seg"]["model"], device, {}),
        "caption": reference_runner("caption", models["caption"]["model"], device,
                                    {"max_new_tokens": 20, "min_new_tokens": 20,
                                     "num_beams": models["caption"]["num_beams"]}),
    }

    def one(img):
        h = img.shape[0]
        cv2.Canny(img, 100, 200)
        dets["hed"](img, detect_resolution=h, image_resolution=h)
        dets["mlsd"](img, detect_resolution=h, image_resolution=h)
        dets["openpose"](img, detect_resolution=h, image_resolution=h)
        for r in runners.values():
            r([img])

    one(images[0])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for img in images:
        one(img)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t0)


MODES = ("one", "processes")


def run_child(spec: dict) -> dict:
    """Run one pipeline as ``controlset annotate`` would (in a fresh Python
    process, so its wall-clock includes the interpreter's start and every
    import) and return its stats; the caller times the whole process."""
    spec_file = Path(spec["work"]) / "child-spec.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, CONTROLSET_TRACE=spec["trace"])
    # a baseline checkout runs from its own folder: Beam's worker processes
    # (python -m ...) put their working folder first on their path
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_file)], env=env,
                          cwd=spec.get("code") or None)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline process exited with {proc.returncode}")
    return json.loads(Path(spec["result"]).read_text())


def child_main(spec_file: str) -> None:
    """The pipeline process of :func:`run_child`."""
    spec = json.loads(Path(spec_file).read_text())
    if spec.get("code"):
        # another checkout's pipeline (a baseline), ahead of this one (which
        # this script put first); Beam's worker processes find it first
        # through their working folder, see run_child
        sys.path.insert(0, spec["code"])
    kw = spec["opts"]
    kw["inputs"] = tuple(kw["inputs"])
    kw["annotators"] = tuple((n, o) for n, o in kw["annotators"])
    from pipelines.options import AnnotateOptions
    from pipelines.run import run_annotate

    stats = run_annotate(AnnotateOptions(**kw), spec["beam_args"])
    Path(spec["result"]).write_text(json.dumps(stats))


def run_mode(mode: str, args, work: Path, names: list[str], models: dict, code: str | None = None,
             label: str | None = None, io_threads: int = 0, per_gpu: int = 1, gpus: int = 0,
             cpu_threads: int = 0) -> dict:
    """One pipeline run in ``mode`` (with the pipeline code of the checkout
    ``code``, default this one; ``gpus`` GPUs with ``per_gpu`` worker
    processes each in mode 'processes'): its figures and timeline."""
    label = label or mode
    out = work / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    gpus = gpus if mode != "one" else 0
    opts = {
        "inputs": [str(work / "in")], "output": str(out),
        "annotators": [(n, models[n]) for n in names],
        "resolution": args.resolution, "shard_size": args.shard_size, "gpus": gpus,
        "min_size": min(256, args.side), "gpu_threads": args.gpu_threads,
    }
    if io_threads:
        opts["io_threads"] = io_threads
    if cpu_threads:
        opts["cpu_threads"] = cpu_threads
    if gpus and per_gpu > 1:  # only when asked: a baseline checkout may predate the option
        opts["workers_per_gpu"] = per_gpu
    beam_args: list[str] = []
    if mode == "one" and args.processes:
        beam_args = ["--direct_running_mode=multi_processing", f"--direct_num_workers={args.processes}"]
    elif mode == "one" and args.threads:
        beam_args = ["--direct_running_mode=multi_threading", f"--direct_num_workers={args.threads}"]
    # every process of the run appends its timeline events here (pipelines.beam.trace)
    trace_file = work / f"trace-{mode}.jsonl"
    trace_file.unlink(missing_ok=True)
    spec = {"opts": opts, "beam_args": beam_args, "work": str(work), "trace": str(trace_file),
            "result": str(work / f"result-{mode}.json"), "code": code}
    with GpuSampler() as gpu:
        start_epoch = time.time()
        t0 = time.perf_counter()
        stats = run_child(spec)
        wall = time.perf_counter() - t0
    workers = max(1, gpus * per_gpu or args.processes or args.threads or 1)
    steady = steady_rate(out, workers)
    steady_workers, per_worker = steady_rate_per_worker(trace_file)
    tars = [t.stat() for t in out.glob("*.tar")]
    commits = sorted(st.st_mtime for st in tars)
    shard_bytes = sum(st.st_size for st in tars)
    steady_util = gpu.window(commits[workers - 1], commits[-1]) if len(commits) > workers else {}
    counters = stats.get("counters", {})
    ms = {k[3:]: v for k, v in counters.items() if k.startswith("ms_")}
    stages = {k[len("stage_ms_"):]: round(v / 1000, 2) for k, v in counters.items() if k.startswith("stage_ms_")}
    # model loading, summed over workers (they load side by side)
    loading = {k[len("load_ms_"):]: round(v / 1000, 2) for k, v in counters.items() if k.startswith("load_ms_")}
    events = read_timeline(trace_file, start_epoch)
    # per-batch annotator spans go to --traces only; the timeline is start-up and shards
    timeline = [r for r in events if r["event"] != "annotator_span"]
    if args.traces:  # the raw events (annotator spans included) for a closer look
        Path(args.traces).mkdir(parents=True, exist_ok=True)
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)
        shutil.copy(trace_file, Path(args.traces) / f"trace-{safe}.jsonl")
    print(f"[{label}] timeline (seconds from the start of the pipeline process):", flush=True)
    for row in timeline:
        print("  " + json.dumps(row), flush=True)
    total_ms = sum(ms.values()) or 1
    milestones = startup_milestones(events, start_epoch)
    marks = {r["event"]: r["t"] for r in timeline if r["event"] in ("finalize", "pipeline_done")}
    result = {
        "mode": mode, "label": label, "code": code or "this checkout", "gpus": gpus or 1, "beam_args": beam_args,
        "workers_per_gpu": per_gpu if gpus else 1,
        "written": stats["written"], "failed": stats["failed"], "filtered": stats["filtered"],
        # the shards' size on disk (a large run needs this much free space)
        "shard_bytes": shard_bytes,
        # the whole `controlset annotate` process: interpreter start, imports,
        # Beam start-up, model loading, graph capture, every shard
        "process_seconds": round(wall, 2),
        "images_per_s": round(stats["written"] / wall, 2),
        "run_annotate_seconds": round(stats.get("seconds", float("nan")), 2),
        "steady_images_per_s": steady,
        # the sum of each worker's own steady rate (robust when workers' commits interleave)
        "steady_images_per_s_sum_of_workers": steady_workers,
        "steady_images_per_s_per_worker": per_worker,
        "gpu": gpu.summary(),
        # utilisation while the steady rate was measured
        "steady_util_percent_per_gpu": steady_util,
        "annotator_share_percent": {k: round(100 * v / total_ms, 1)
                                    for k, v in sorted(ms.items(), key=lambda kv: -kv[1])},
        "annotator_seconds": {k: round(v / 1000, 2) for k, v in ms.items()},
        # the shard threads' time: waiting for decoding, annotating, waiting for encoding
        "stage_seconds": stages,
        "load_seconds": loading,
        # seconds from the process's start to each shard's commit
        "commit_seconds": commit_times(out, start_epoch),
        # per process, seconds from the start: process started, code imported,
        # models loaded, first batch annotated, first shard committed
        "startup": milestones,
        # the last shard's summary to the end of the pipeline (worker processes stopping)
        "finalize_to_done_seconds": round(marks["pipeline_done"] - marks["finalize"], 2)
        if len(marks) == 2 else None,
        # the end of the pipeline to the end of the process (its interpreter's exit)
        "done_to_exit_seconds": round(wall - marks["pipeline_done"], 2) if "pipeline_done" in marks else None,
        "timeline": timeline,
    }
    print(f"[{label}] pipeline:", json.dumps({k: v for k, v in result.items() if k != "timeline"}), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
        return {}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--side", type=int, default=576, help="short side of the input JPEGs")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--gpus", default="0",
                    help="GPUs of the 'processes' mode, comma-separated (a run for each): G, or GxW for G GPUs "
                         "with W worker processes each")
    ap.add_argument("--modes", default=None,
                    help="pipeline runs on the same inputs, in order, from: one (one GPU, in process), "
                         "processes (--gpus N, a worker process per GPU); default: one, or processes with --gpus")
    ap.add_argument("--threads", type=int, default=0,
                    help="mode one: DirectRunner threads (0: in process; each worker already decodes and "
                         "encodes on its own thread pool while the GPU works)")
    ap.add_argument("--reference-images", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=500,
                    help="a shard is the unit of parallel work (and its batches are pipelined)")
    ap.add_argument("--annotators", default=",".join(ANNOTATORS))
    ap.add_argument("--caption-beams", type=int, default=3, help="BLIP beam width (the annotator's default: 3)")
    ap.add_argument("--processes", type=int, default=0,
                    help="mode one: N worker processes on the one GPU, each with its own models")
    ap.add_argument("--gpu-threads", type=int, default=2,
                    help="GPU annotators side by side per worker (the pipeline's --gpu-threads)")
    ap.add_argument("--baseline-code", default=None, metavar="DIR",
                    help="another checkout of the project: each mode also runs with its pipeline, "
                         "alternating with this one's (baseline, current, baseline, current, ...)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode (and per checkout)")
    ap.add_argument("--io-threads", default="",
                    help="comma-separated decode/encode thread counts per worker to run each mode with, "
                         "each N or N/M (M: CPU-annotator threads) (default: the pipeline's own defaults)")
    ap.add_argument("--workers-per-gpu", default="1",
                    help="comma-separated worker processes per GPU to run mode 'processes' with "
                         "(the pipeline's --workers-per-gpu; default 1)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--keep", default=None, help="keep the work folder here")
    ap.add_argument("--traces", default=None, metavar="DIR",
                    help="copy each run's trace events (start-up steps, annotator spans) here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.side, args.resolution, args.reference_images = 16, 160, 128, 2
    # "G" runs G GPUs with each --workers-per-gpu value; "GxW" G GPUs with W workers each
    gpu_runs: list[tuple[int, int | None]] = []
    for v in filter(None, args.gpus.split(",")):
        g, _, w = v.partition("x")
        if int(g) > 0:
            gpu_runs.append((int(g), int(w) if w else None))
    gpu_counts = sorted({g for g, _ in gpu_runs})
    modes = [m for m in (args.modes or ("processes" if gpu_counts else "one")).split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
        if m != "one" and not gpu_counts:
            ap.error(f"mode {m!r} needs --gpus N")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.keep or tempfile.mkdtemp(prefix="controlset-e2e-"))
    t0 = time.perf_counter()
    models = build_models(work / "models", tiny=args.smoke, beams=args.caption_beams)
    write_inputs(work / "in", args.images, args.side)
    setup_s = time.perf_counter() - t0
    names = [n for n in args.annotators.split(",") if n]
    runs = {}
    # "N": N decode/encode threads; "N/M": and M CPU-annotator threads
    io_list = [tuple(int(x) for x in (v.split("/") + ["0"])[:2]) for v in args.io_threads.split(",") if v] \
        or [(0, 0)]
    per_gpu_list = [int(v) for v in args.workers_per_gpu.split(",") if v] or [1]
    for m in modes:
        for r in range(args.repeat):
            for io, cpu in io_list:
                pairs = [(g, w) for g, fixed in gpu_runs for w in ([fixed] if fixed else per_gpu_list)]
                for gpus, per_gpu in pairs if m == "processes" else [(0, 1)]:
                    tag = (f"@io{io}" if io else "") + (f"c{cpu}" if cpu else "") + (f"@g{gpus}" if len(gpu_counts) > 1 else "") \
                        + (f"@w{per_gpu}" if per_gpu > 1 else "")
                    if args.baseline_code:
                        label = f"{m}{tag}@baseline#{r + 1}"
                        runs[label] = run_mode(m, args, work, names, models,
                                               str(Path(args.baseline_code).resolve()), label, io, per_gpu, gpus,
                                               cpu)
                    label = f"{m}{tag}#{r + 1}" if args.repeat > 1 or args.baseline_code else f"{m}{tag}"
                    runs[label] = run_mode(m, args, work, names, models, None, label, io, per_gpu, gpus, cpu)
    ref_images = [np.asarray(cv2.resize(cv2.imread(str(p))[..., ::-1], (args.resolution, args.resolution)))
                  for p in sorted((work / "in").glob("*.jpg"))[: args.reference_images]]
    try:
        ref_rate = reference_chain(models, [np.ascontiguousarray(i) for i in ref_images], device)
    except Exception as exc:  # report the pipeline figures even if a reference fails
        print(f"reference chain failed: {type(exc).__name__}: {exc}", flush=True)
        ref_rate = float("nan")
    for r in runs.values():
        r["speedup_vs_reference_chain"] = round(r["images_per_s"] / ref_rate, 1) if ref_rate == ref_rate else None
    summary = {
        "benchmark": "end_to_end_all_annotators",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["bench/bench_e2e.py"] + (argv if argv is not None else sys.argv[1:])),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "gpus_visible": torch.cuda.device_count(),
        "cpus": os.cpu_count(),
        "weights": "seeded random, real architectures" + (" (tiny configs)" if args.smoke else ""),
        "annotators": names,
        "images": args.images,
        "caption_beams": args.caption_beams,
        "gpu_threads": args.gpu_threads,
        "resolution": args.resolution,
        "runs": runs,
        "reference_chain_images_per_s": round(ref_rate, 3),
        "reference_images": len(ref_images),
        "setup_seconds": round(setup_s, 1),
    }
    print(json.dumps(summary, indent=2), flush=True)
    print("summary:", flush=True)
    for m, r in runs.items():
        print(f"  {m:20s} gpus {r['gpus']}: {r['images_per_s']:7.1f} img/s wall ({r['process_seconds']:.1f} s), "
              f"steady {r['steady_images_per_s_sum_of_workers']} (per worker "
              f"{list(r['steady_images_per_s_per_worker'].values())}), first commit "
              f"{r['commit_seconds'][0] if r['commit_seconds'] else None} s, finalize to done "
              f"{r['finalize_to_done_seconds']} s, done to exit {r['done_to_exit_seconds']} s, "
              f"steady utilisation {r['steady_util_percent_per_gpu']}, gpu {r['gpu']}", flush=True)
        for proc, m_ in sorted(r["startup"].items()):
            if len(m_) > 1:
                print(f"    process {proc}: " + ", ".join(f"{k} {v}" for k, v in m_.items()), flush=True)
    print(f"  reference chain: {ref_rate:.3f} img/s", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
