"""Probing inputs (read bytes, content key, image header): one group of the
probe stage at a time, serially and on the worker's threads, from local
files and from an object store simulated by an in-memory fsspec filesystem
that waits a fixed time on every open (a bucket's first-byte latency).

    python bench/bench_probe.py --files 512 --latency-ms 20 --threads 8

The simulated store shows what threads do for latency-bound reads; it is
not a measurement of any real bucket.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _slow_filesystem(latency_s: float):
    """An in-memory fsspec filesystem (protocol ``slowmem``) whose every
    open first sleeps ``latency_s`` (releasing the GIL, as a network wait does)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class SlowMemory(MemoryFileSystem):
        protocol = ("slowmem",)
        store: dict = {}
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            if isinstance(path, str) and path.startswith("slowmem://"):
                path = path[len("slowmem://"):]
            return MemoryFileSystem._strip_protocol(path)

        def _open(self, path, *args, **kwargs):
            time.sleep(latency_s)
            return super()._open(path, *args, **kwargs)

    fsspec.register_implementation("slowmem", SlowMemory, clobber=True)
    return SlowMemory()


def main(argv: list[str] | None = None) -> dict:
    import numpy as np
    from PIL import Image
    from skimage import data

    from pipelines.beam import PROBE_GROUP
    from pipelines.options import AnnotateOptions
    from pipelines.sources import InputRef
    from pipelines.stages import probe_input

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=512)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="controlset-probe-"))
    fs = _slow_filesystem(args.latency_ms / 1000)
    base = data.astronaut()
    local, remote = [], []
    for i in range(args.files):
        im = base.copy()
        im[:4, :4] = np.random.default_rng(i).integers(0, 255, (4, 4, 3), dtype=np.uint8)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(im).save(path, quality=92)
        fs.pipe(f"/bucket/img{i:05d}.jpg", path.read_bytes())
        local.append(InputRef(str(path), "image"))
        remote.append(InputRef(f"slowmem:///bucket/img{i:05d}.jpg", "image"))
    opts = AnnotateOptions(inputs=(str(folder),), output=str(folder / "out"), annotators=(("canny", {}),))

    def probe(ref):
        return list(probe_input(ref, opts))

    pool = ThreadPoolExecutor(max_workers=args.threads)

    def rate(refs, threaded: bool) -> float:
        t = time.perf_counter()
        for i in range(0, len(refs), PROBE_GROUP):
            group = refs[i : i + PROBE_GROUP]
            out = list(pool.map(probe, group)) if threaded else [probe(r) for r in group]
            assert all(len(o) == 1 and not hasattr(o[0], "reason") for o in out)
        return round(len(refs) / (time.perf_counter() - t), 1)

    rate(local[:64], False)  # warm-up: imports, page cache
    rows = {
        "local_serial_files_per_s": rate(local, False),
        f"local_{args.threads}_threads_files_per_s": rate(local, True),
        "remote_serial_files_per_s": rate(remote, False),
        f"remote_{args.threads}_threads_files_per_s": rate(remote, True),
    }
    summary = {
        "benchmark": "probe",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["bench/bench_probe.py"] + (argv if argv is not None else sys.argv[1:])),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "files": args.files,
        "group": PROBE_GROUP,
        "simulated_latency_ms": args.latency_ms,
        **rows,
    }
    print(json.dumps(summary, indent=2))
    pool.shutdown()
    shutil.rmtree(folder, ignore_errors=True)
    fs.rm("/bucket", recursive=True)
    return summary


if __name__ == "__main__":
    main()
