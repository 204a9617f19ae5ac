"""End-to-end runs of the annotate pipeline on real and hostile files."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from _images import jpeg_bytes, photo, tree_bytes, write_photos, write_tar
from pipelines.options import AnnotateOptions
from pipelines.run import run_annotate
from pipelines.validate import validate_dataset

ROOT = Path(__file__).resolve().parents[1]


def annotate(inputs, out, beam_args=(), **kw) -> dict:
    kw.setdefault("annotators", (("canny", {}), ("hough", {})))
    opts = AnnotateOptions(inputs=tuple(str(i) for i in inputs), output=str(out), **kw)
    return run_annotate(opts, list(beam_args))


def outcome_by_source(out: Path) -> dict[str, str]:
    """source -> 'written' or its failure/filter reason, checking no source
    appears twice."""
    outcomes: dict[str, str] = {}
    rows = []
    for manifest in sorted(out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].parquet")):
        rows += [(r["source"], "written") for r in pq.read_table(manifest).to_pylist()]
    for name in ("failures.parquet", "filtered.parquet"):
        rows += [(r["source"], r["reason"]) for r in pq.read_table(out / name).to_pylist()]
    for source, outcome in rows:
        assert source not in outcomes, f"{source} recorded twice"
        outcomes[source] = outcome
    return outcomes


@pytest.fixture(scope="module")
def hostile_run(hostile_dir, tmp_path_factory):
    folder, expected = hostile_dir
    out = tmp_path_factory.mktemp("hostile-out")
    stats = annotate([folder], out, shard_size=4)
    return folder, expected, out, stats


def test_every_input_is_accounted_for(hostile_run):
    folder, expected, out, stats = hostile_run
    outcomes = outcome_by_source(out)
    assert {Path(s).name: o for s, o in outcomes.items()} == expected
    assert stats["inputs"] == len(expected)
    assert stats["inputs"] == stats["written"] + stats["filtered"] + stats["failed"]
    on_disk = json.loads((out / "stats.json").read_text())
    for field in ("inputs", "written", "filtered", "failed"):
        assert isinstance(on_disk[field], int) and on_disk[field] == stats[field]
    assert on_disk["filtered_by_reason"] == {"aspect_ratio": 1, "duplicate": 1, "too_small": 1}
    assert on_disk["failed_by_reason"] == {
        "decode_error": 2, "decompression_bomb": 1, "empty_file": 1, "not_an_image": 1,
    }


def test_shards_read_back_with_webdataset(hostile_run):
    folder, expected, out, stats = hostile_run
    tars = sorted(str(p) for p in out.glob("*.tar"))
    assert [Path(t).name for t in tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("rgb8"))
    assert len(samples) == stats["written"] == sum(1 for o in expected.values() if o == "written")
    # Shards are planned at a fixed size (the remainder last); a sample that
    # fails to decode after planning is recorded in its shard's failures file.
    planned = []
    for t in tars:
        n = len(list(wds.WebDataset([t], shardshuffle=False)))
        failures = Path(t).with_suffix(".failures.parquet")
        planned.append(n + (pq.read_metadata(failures).num_rows if failures.exists() else 0))
    assert planned == [4, 4, 2]
    by_source = {}
    for s in samples:
        meta = s["json"]
        assert "." not in s["__key__"] and meta["key"] == s["__key__"]
        assert s["jpg"].shape == (512, 512, 3)
        for cond in ("canny.png", "hough.png"):
            assert s[cond].shape[:2] == (512, 512)
        assert meta["annotators"]["canny"]["low_threshold"] == 100
        assert meta["annotators"]["canny"]["version"] == "1"
        assert isinstance(meta["annotators"]["hough"]["lines"], int)
        assert meta["schema_version"] == 1 and meta["resolution"] == 512
        by_source[Path(meta["source"]).name] = (s, meta)
    astro, meta = by_source["astronaut.jpg"]
    assert astro["txt"] == "an astronaut in an orange suit"
    assert meta["caption_source"] == "sidecar"
    rotated = by_source["rotated.jpg"][1]
    assert (rotated["original_width"], rotated["original_height"]) == (400, 600)
    assert rotated["crop_box"] == [0, 100, 400, 500]
    rgba = by_source["rgba.png"][0]["jpg"]
    assert rgba[:, :200].min() > 240  # transparent half composited on white
    gray16 = by_source["gray16.png"][0]["jpg"]
    assert 100 < gray16.mean() < 160  # scaled, not clipped to white
    assert "фото кошки 猫.png" in by_source and "my.holiday.photo.v2.jpg" in by_source
    assert by_source["animated.gif"][1]["frames"] == 2


def test_validate_accepts_and_catches_damage(hostile_run, tmp_path):
    folder, expected, out, stats = hostile_run
    assert validate_dataset(str(out)).ok
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    data = (damaged / "shard-000001.tar").read_bytes()
    (damaged / "shard-000001.tar").write_bytes(data[: len(data) // 2])
    report = validate_dataset(str(damaged))
    assert not report.ok
    assert any("shard-000001" in p for p in report.problems)
    # a tar that still reads but is not the one the manifest describes
    padded = tmp_path / "padded"
    shutil.copytree(out, padded)
    with open(padded / "shard-000000.tar", "ab") as f:
        f.write(b"\0" * 10240)
    report = validate_dataset(str(padded))
    assert [p for p in report.problems if "shard-000000.tar" in p and "manifest says" in p]


def test_rerun_is_byte_identical_and_skips_finished_shards(hostile_run, tmp_path):
    folder, expected, out, stats = hostile_run
    before = tree_bytes(out, "*")
    again = annotate([folder], out, shard_size=4)
    assert again["counters"]["shards_skipped"] == 3
    assert again["counters"].get("shards_written", 0) == 0
    assert tree_bytes(out, "*") == before
    fresh = tmp_path / "fresh"
    annotate([folder], fresh, shard_size=4)
    assert tree_bytes(fresh) == tree_bytes(out)  # same inputs -> same shard bytes
    for name in ("failures.parquet", "filtered.parquet"):
        assert pq.read_table(fresh / name).equals(pq.read_table(out / name))


def test_changed_options_rewrite_shards_and_drop_stale_ones(photos_dir, tmp_path):
    out = tmp_path / "out"
    annotate([photos_dir], out, shard_size=2)
    assert len(list(out.glob("*.tar"))) == 3
    stats = annotate([photos_dir], out, shard_size=2, annotators=(("canny", {"low_threshold": 50}),))
    assert stats["counters"]["shards_written"] == 3
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False).decode())
    assert all("hough.png" not in s and s["json"]["annotators"]["canny"]["low_threshold"] == 50 for s in samples)
    stats = annotate([photos_dir], out, shard_size=5)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert validate_dataset(str(out)).ok


def test_random_canny_thresholds_are_seeded_by_key(photos_dir, tmp_path):
    opts = (("canny", {"random_thresholds": True, "seed": 7}),)
    a = annotate([photos_dir], tmp_path / "a", annotators=opts)
    b = annotate([photos_dir], tmp_path / "b", annotators=opts)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    metas = [s["json"] for s in wds.WebDataset(str(tmp_path / "a" / "shard-000000.tar"), shardshuffle=False).decode()]
    used = {(m["annotators"]["canny"]["low_threshold"], m["annotators"]["canny"]["high_threshold"]) for m in metas}
    assert len(used) > 1  # thresholds vary across samples
    assert all(50 <= lo <= 150 and lo <= hi <= 250 for lo, hi in used)


def test_no_crop_keeps_aspect(photos_dir, tmp_path):
    annotate([photos_dir / "coffee.jpg"], tmp_path / "o", crop="none", resolution=256)
    (s,) = list(wds.WebDataset(str(tmp_path / "o" / "shard-000000.tar"), shardshuffle=False).decode("rgb8"))
    assert s["jpg"].shape == (256, 384, 3) and s["canny.png"].shape[:2] == (256, 384)
    assert s["json"]["crop_box"] == [0, 0, 600, 400]


def test_tar_input_with_captions_and_unsafe_members(tmp_path):
    src = tmp_path / "in.tar"
    write_tar(
        src,
        [
            ("a/sample1", {"jpg": jpeg_bytes(photo("chelsea")), "txt": b"a cat"}),
            ("a/sample2", {"png": _png(photo("coffee"))}),
            ("b/nopic", {"txt": b"caption without an image", "cls": b"3"}),
        ],
        unsafe=["../escape.jpg", "/abs/path.jpg"],
    )
    out = tmp_path / "out"
    stats = annotate([src], out)
    outcomes = outcome_by_source(out)
    assert outcomes == {
        f"{src}#a/sample1": "written",
        f"{src}#a/sample2": "written",
        f"{src}#b/nopic": "no_image_member",
        f"{src}#../escape.jpg": "unsafe_tar_member",
        f"{src}#/abs/path.jpg": "unsafe_tar_member",
    }
    assert stats["inputs"] == 5
    captions = {s["json"]["source"]: s["txt"] for s in wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).decode()}
    assert captions == {f"{src}#a/sample1": "a cat", f"{src}#a/sample2": ""}
    assert not (tmp_path / "escape.jpg").exists()


def test_bad_captions_cost_only_themselves_and_are_noted(tmp_path, capsys):
    """A caption that is not UTF-8, too large or unreadable never costs its
    image: the sample is written, and its json says what happened to the
    caption (sidecar files and tar members alike); counts reconcile."""
    from pipelines.cli import print_summary
    from pipelines.stages import MAX_CAPTION_BYTES

    src = tmp_path / "in"
    src.mkdir()
    huge = b"x" * (MAX_CAPTION_BYTES + 1)
    for name, pic, caption in [("latin1", "astronaut", "caf\xe9 au lait".encode("latin-1")),
                               ("huge", "coffee", huge), ("fine", "chelsea", b"a cat")]:
        (src / f"{name}.jpg").write_bytes(jpeg_bytes(photo(pic)))
        (src / f"{name}.txt").write_bytes(caption)
    write_tar(tmp_path / "in.tar", [
        ("t/latin1", {"jpg": jpeg_bytes(photo("camera")), "txt": b"\xff\xfe bad"}),
        ("t/huge", {"jpg": jpeg_bytes(photo("chelsea")[::-1]), "txt": huge}),
    ])
    out = tmp_path / "out"
    stats = annotate([src, tmp_path / "in.tar"], out)
    assert stats["written"] == stats["inputs"] == 5 and stats["failed"] == stats["filtered"] == 0
    got = {}
    for tar in sorted(out.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False).decode():
            got[s["json"]["source"][len(str(tmp_path)) + 1:]] = (s["txt"], s["json"].get("caption_note"),
                                                           s["json"]["caption_source"])
    assert got["in/fine.jpg"] == ("a cat", None, "sidecar")
    text, note, source = got["in/latin1.jpg"]
    assert text == "caf\ufffd au lait" and "not UTF-8" in note and source == "sidecar"
    assert got["in/huge.jpg"][0] == "" and got["in/huge.jpg"][1].startswith("caption too large, not used: ")
    assert str(MAX_CAPTION_BYTES) in got["in/huge.jpg"][1]
    assert "not UTF-8" in got["in.tar#t/latin1"][1] and got["in.tar#t/latin1"][2] == "tar"
    assert got["in.tar#t/huge"][0] == "" and got["in.tar#t/huge"][1].startswith("caption too large, not used: ")
    assert stats["counters"]["caption_notes"] == 4
    print_summary(stats, str(out))
    assert "4 input caption(s) not used as given" in capsys.readouterr().out


def test_a_caption_grown_by_replacement_survives_reannotation(tmp_path):
    """Undecodable bytes become U+FFFD (three bytes each): a caption under
    the 1 MiB input limit can be written larger than it; re-annotating those
    shards keeps the sample, its caption and its note."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(photo("astronaut")))
    (src / "a.txt").write_bytes(b"\xff" * 400_000)
    first = tmp_path / "first"
    annotate([src], first)
    (shard,) = sorted(first.glob("*.tar"))
    (sample,) = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert len(sample["txt"]) == 1_200_000 and "not UTF-8" in json.loads(sample["json"])["caption_note"]
    again = tmp_path / "again"
    stats = annotate([shard], again, annotators=(("hough", {}),))
    assert stats["written"] == 1 and stats["failed"] == 0
    (sample2,) = list(wds.WebDataset(str(sorted(again.glob("*.tar"))[0]), shardshuffle=False))
    assert sample2["txt"] == sample["txt"]
    meta = json.loads(sample2["json"])
    assert "not UTF-8" in meta["caption_note"] and {"canny", "hough"} <= set(meta["annotators"])


def test_an_unreadable_caption_is_no_caption_with_a_note():
    from pipelines.stages import read_caption

    def broken(limit):
        raise OSError("input/output error")

    assert read_caption(broken, "x.txt") == (None, "caption unreadable: OSError: input/output error")
    assert read_caption(lambda limit: b"  fine \n", "y.txt") == ("fine", None)


def test_controlset_shards_are_valid_input(hostile_run, tmp_path):
    folder, expected, out, stats = hostile_run
    again = annotate([out / "shard-000000.tar"], tmp_path / "re", annotators=(("canny", {}),))
    assert again["written"] == 4 and again["failed"] == 0


def test_broken_tar_is_one_failure(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.tar").write_bytes(b"\0" * 100 + b"not a tar at all" * 50)
    (tmp_path / "in" / "ok.jpg").write_bytes(jpeg_bytes(photo("astronaut")))
    stats = annotate([tmp_path / "in"], tmp_path / "out")
    assert stats["written"] == 1 and stats["failed"] == 1
    assert stats["failed_by_reason"] == {"bad_tar": 1}


def test_fsspec_urls_in_and_out(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/imgs/x/astronaut.jpg", jpeg_bytes(photo("astronaut")))
    fs.pipe("/imgs/x/astronaut.txt", b"memory caption")
    fs.pipe("/imgs/y/coffee.jpg", jpeg_bytes(photo("coffee")))
    stats = annotate(["memory://imgs"], "memory://out", annotators=(("canny", {}),))
    assert stats["written"] == 2
    data = fs.cat("/out/shard-000000.tar")
    (tmp_path / "copy.tar").write_bytes(data)
    samples = list(wds.WebDataset(str(tmp_path / "copy.tar"), shardshuffle=False).decode())
    sources = sorted(s["json"]["source"] for s in samples)
    assert sources == ["memory://imgs/x/astronaut.jpg", "memory://imgs/y/coffee.jpg"]
    glob_stats = annotate(["memory://imgs/*/*.jpg"], "memory://out2", annotators=(("canny", {}),))
    assert glob_stats["written"] == 2
    assert fs.cat("/out2/shard-000000.tar") == data  # same content, same bytes


def test_local_files_are_opened_directly_and_urls_through_fsspec(tmp_path, monkeypatch):
    import fsspec

    from pipelines import sources
    from pipelines.sources import FileTooLargeError, Location, local_path, read_bytes, read_location

    img = tmp_path / "a b.jpg"
    data = jpeg_bytes(photo("coffee"))
    img.write_bytes(data)
    assert local_path(str(img)) == str(img)
    assert local_path(f"file://{img}") == str(img) == local_path(f"local://{img}")
    assert local_path("memory://x/a.jpg") is None
    assert local_path(f"simplecache::file://{img}") is None
    assert local_path("s3://bucket/a.jpg") is None
    odd = tmp_path / "a::b.jpg"  # found as a local file, so read as one
    odd.write_bytes(data)
    assert local_path(str(odd)) == str(odd) and read_bytes(str(odd)) == data
    monkeypatch.setenv("HOME", str(tmp_path))
    assert local_path("~/a b.jpg") == str(img) and read_bytes("~/a b.jpg") == data  # as fsspec reads it
    fsspec.filesystem("memory").pipe("/direct/a.jpg", data)
    opened = []
    real_open = fsspec.open
    monkeypatch.setattr(sources.fsspec, "open", lambda url, *a, **k: opened.append(url) or real_open(url, *a, **k))
    # local paths and file:// URLs never reach fsspec; the same bytes and limits either way
    for url in (str(img), f"file://{img}", "memory://direct/a.jpg"):
        assert read_bytes(url) == data
        assert read_bytes(url, len(data)) == data
        with pytest.raises(FileTooLargeError):
            read_bytes(url, len(data) - 1)
    assert read_location(Location(f"file://{img}", offset=3, size=10)) == data[3:13]
    assert read_location(Location("memory://direct/a.jpg", offset=3, size=10)) == data[3:13]
    with pytest.raises(OSError, match="short read"):
        read_location(Location(str(img), offset=len(data) - 4, size=10))
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tmp_path / "missing.jpg"))
    assert opened == ["memory://direct/a.jpg"] * 4


def test_multiprocessing_runner_gives_identical_shards(photos_dir, tmp_path, monkeypatch):
    import json

    from apache_beam.runners.portability.fn_api_runner import worker_handlers as wh

    import pipelines.beam as pb

    annotate([photos_dir], tmp_path / "single", shard_size=2)
    beams_close_all = wh.WorkerHandlerManager.close_all
    monkeypatch.setattr(pb, "_TRACE_FAILED", False)
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("CONTROLSET_TRACE", str(trace))  # the worker processes' too
    # Beam raises a worker's non-zero exit code on the thread that waits for
    # its process, where nothing else would see it
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(repr(args.exc_value)))
    stats = annotate(
        [photos_dir], tmp_path / "multi", shard_size=2,
        beam_args=["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    )
    assert thread_errors == []
    assert stats["written"] == 6
    assert tree_bytes(tmp_path / "multi") == tree_bytes(tmp_path / "single")
    # when the pipeline ended, both worker processes were told to stop before
    # Beam waited for the first one to exit; Beam's own close is back after it
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    events = [r["event"] for r in rows]
    assert [r["told"] for r in rows if r["event"] == "workers_stopping"] == [2]
    assert events.index("finalize") < events.index("workers_stopping") < events.index("workers_stopped") \
        < events.index("pipeline_done")
    launcher = rows[0]["pid"]
    workers = {r["pid"] for r in rows} - {launcher}
    assert len(workers) == 2
    # a worker's first event says when its process started: after the run
    # began (the launcher here is the test process, whose first event may
    # have gone to another test's trace; /proc's clock ticks are 10 ms)
    firsts = {pid: next(r for r in rows if r["pid"] == pid) for pid in workers}
    assert rows[0]["event"] == "run_start"
    assert all(firsts[w]["process_started"] > rows[0]["t"] - 0.05 for w in workers)
    # the launcher saw each told worker's process exit (with code 0: no
    # thread error above); a worker that ran shards ended fast once its
    # interpreter began to exit
    exited = [i for i, r in enumerate(rows) if r["event"] == "worker_exited"]
    assert len(exited) == 2
    assert all(events.index("workers_stopping") < i < events.index("workers_stopped") for i in exited)
    shard_workers = {r["pid"] for r in rows if r["event"] == "shard_teardown"}
    assert shard_workers and shard_workers <= workers
    fast = {r["pid"] for r in rows if r["event"] == "process_exit" and r.get("fast")}
    assert fast == shard_workers
    assert wh.WorkerHandlerManager.close_all is beams_close_all
    assert "CONTROLSET_WORKER_FAST_EXIT" not in os.environ


def test_workers_sharing_a_gpu_give_identical_shards(photos_dir, tmp_path, monkeypatch):
    import tempfile

    # --workers-per-gpu 2 without --gpus: two worker processes claiming the
    # one GPU's two slots (no annotator here uses it)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the worker processes' too
    monkeypatch.setattr(tempfile, "tempdir", None)
    annotate([photos_dir], tmp_path / "single", shard_size=2)
    stats = annotate([photos_dir], tmp_path / "shared", shard_size=2, workers_per_gpu=2)
    assert stats["written"] == 6
    assert tree_bytes(tmp_path / "shared") == tree_bytes(tmp_path / "single")
    # the run's GPU claims are gone with it
    assert not list((tmp_path / "tmp").glob("controlset-gpus-*"))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlset", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, **kw)


def test_sigkill_midway_leaves_no_partial_tar_and_rerun_completes(tmp_path):
    src = tmp_path / "in"
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"]
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):  # distinct images so nothing is deduplicated
        arr = photo(names[i % len(names)]).copy()
        arr[:8, :8] = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        (src / f"img{i:03d}.jpg").write_bytes(jpeg_bytes(arr))
    out = tmp_path / "out"
    args = ["annotate", str(src), "-o", str(out), "--annotators", "canny,hough", "--shard-size", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "controlset", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and any(p.suffix == ".tar" for p in out.iterdir()):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    finished = sorted(out.glob("*.tar"))
    assert len(finished) < 12
    for tar in finished:  # every visible tar is complete
        assert len(list(wds.WebDataset(str(tar), shardshuffle=False))) == 4
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    reference = tmp_path / "reference"
    assert _cli("annotate", str(src), "-o", str(reference), "--annotators", "canny,hough",
                "--shard-size", "4").returncode == 0
    assert tree_bytes(out) == tree_bytes(reference)
    assert validate_dataset(str(out)).ok


def test_cli_usage_errors_are_one_clear_line(tmp_path, photos_dir):
    r = _cli("annotate", str(tmp_path / "missing"), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert len([line for line in r.stderr.splitlines() if "error" in line]) == 1
    r = _cli("annotate", str(photos_dir), "-o", str(tmp_path / "o"), "--annotators", "canny,houg")
    assert r.returncode == 2 and "Did you mean 'hough'" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("annotate", str(photos_dir), "-o", str(blocker / "sub"))
    assert r.returncode == 2 and "output" in r.stderr
    r = _cli("annotate", str(photos_dir), "-o", str(tmp_path / "o"), "--resolutin", "5")
    assert r.returncode == 2 and "--resolutin" in r.stderr
    r = _cli("annotate", str(photos_dir), "-o", str(tmp_path / "o"), "--set", "canny.lo=3")
    assert r.returncode == 2 and "valid options" in r.stderr


def test_cli_annotate_preview_validate(tmp_path, photos_dir):
    out = tmp_path / "o"
    r = _cli("annotate", str(photos_dir), "-o", str(out), "--annotators", "canny,hough", "--shard-size", "4",
             "--resolution", "256", "--set", "canny.random_thresholds=true")
    assert r.returncode == 0, r.stderr
    assert "6 inputs -> 6 written, 0 filtered, 0 failed" in r.stdout
    r = _cli("validate", str(out))
    assert r.returncode == 0 and "2 shard(s), 6 sample(s): OK" in r.stdout
    sheet = tmp_path / "sheet.png"
    r = _cli("preview", str(out), "-o", str(sheet), "-n", "3", "--cell", "100")
    assert r.returncode == 0, r.stderr
    with Image.open(sheet) as im:
        assert im.size == (100 * 3 + 200, 24 + 100 * 3)  # image + 2 conditions + caption
        arr = np.asarray(im.convert("L"))
    assert arr[24:124, 0:100].std() > 20  # a real photo in the first cell
    (out / "shard-000001.parquet").unlink()
    r = _cli("validate", str(out))
    assert r.returncode == 1 and "manifest" in r.stdout


def test_file_names_that_are_not_utf8_are_written_escaped(tmp_path):
    import os

    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    good = os.path.join(os.fsencode(src), b"caf\xe9.jpg")  # Latin-1 name: not UTF-8
    small = os.path.join(os.fsencode(src), b"tiny\xff.jpg")
    with open(good, "wb") as f:
        f.write(jpeg_bytes(photo("astronaut")))
    with open(small, "wb") as f:
        f.write(jpeg_bytes(photo("astronaut")[:64, :64]))
    out = tmp_path / "out"
    stats = annotate([src], out)
    assert stats["written"] == 1 and stats["filtered_by_reason"] == {"too_small": 1} and stats["reconciled"]
    (sample,) = wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).decode()
    assert sample["json"]["source"].endswith("caf\\xe9.jpg")
    (row,) = pq.read_table(out / "filtered.parquet").to_pylist()
    assert row["source"].endswith("tiny\\xff.jpg")


def test_resume_does_not_take_a_tar_from_another_plan(photos_dir, tmp_path):
    out = tmp_path / "out"
    first = annotate([photos_dir], out, resolution=128, shard_size=4)
    tars_128 = tree_bytes(out, "*.tar")
    manifests_128 = {p.name: p.read_bytes() for p in out.glob("shard-*.parquet") if "failures" not in p.name}
    annotate([photos_dir], out, resolution=96, shard_size=4)
    # a crash after the new tars were renamed but before their manifests:
    # the old plan's manifests would still stand beside the new tars
    for name, data in manifests_128.items():
        (out / name).write_bytes(data)
    again = annotate([photos_dir], out, resolution=128, shard_size=4)
    assert again["counters"].get("shards_skipped", 0) == 0  # the 96 px tars are not taken as done
    assert tree_bytes(out, "*.tar") == tars_128 and again["written"] == first["written"]
    assert validate_dataset(str(out)).ok
    rerun = annotate([photos_dir], out, resolution=128, shard_size=4)
    assert rerun["counters"]["shards_skipped"] == first["shards"]  # intact shards still resume


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_size_limit_holds_for_members_of_plain_and_compressed_tars(suffix, tmp_path):
    import gzip

    small, big = jpeg_bytes(photo("coffee")[:300, :300]), jpeg_bytes(photo("astronaut"), quality=98)
    assert len(small) < 40_000 < len(big)
    plain = tmp_path / "in.tar"
    write_tar(plain, [("a", {"jpg": small, "txt": b"small"}), ("b", {"jpg": big, "txt": b"big"})])
    src = plain
    if suffix == ".tar.gz":
        src = tmp_path / "in.tar.gz"
        src.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
        plain.unlink()
    stats = annotate([src], tmp_path / "out", max_file_bytes=40_000)
    assert stats["written"] == 1 and stats["failed_by_reason"] == {"file_too_large": 1}
    assert stats["reconciled"]


def test_files_that_are_not_inputs_are_recorded_not_dropped(tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "cat.jpg").write_bytes(jpeg_bytes(photo("chelsea")))
    (src / "cat.txt").write_text("a cat")  # its caption: not an input of its own
    (src / "orphan.txt").write_text("no image")
    (src / "sub" / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    stats = annotate([src], tmp_path / "out")
    assert stats["inputs"] == 4 and stats["written"] == 1 and stats["reconciled"]
    assert stats["filtered_by_reason"] == {"not_an_input": 3}
    rows = pq.read_table(tmp_path / "out" / "filtered.parquet").to_pylist()
    notes = {Path(r["source"]).name: r["message"] for r in rows}
    assert set(notes) == {"orphan.txt", "phone.heic", ".DS_Store"}
    assert "'.heic'" in notes["phone.heic"] and "without an image" in notes["orphan.txt"]
    with pytest.raises(Exception, match="no images or tar shards"):
        annotate([src / "orphan.txt"], tmp_path / "none")


def test_links_repeated_members_and_split_keys_in_tars_are_recorded(tmp_path):
    import tarfile

    good, other = jpeg_bytes(photo("coffee")), jpeg_bytes(photo("chelsea"))
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tf:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        add("a.jpg", good)
        link = tarfile.TarInfo("l.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        add("b.jpg", other)
        add("b.jpg", good)  # the same member name twice
        add("c.jpg", other)
        add("d.jpg", good[:100])
        add("c.txt", b"caption of c, apart from its image")
    stats = annotate([path], tmp_path / "out")
    # a, and c's first part (its image; the caption that comes later is recorded)
    assert stats["written"] == 2 and stats["reconciled"]
    assert stats["failed_by_reason"] == {"bad_tar_sample": 3, "decode_error": 1}
    rows = pq.read_table(tmp_path / "out" / "failures.parquet").to_pylist()
    messages = {r["source"].split("#")[1]: r["message"] for r in rows}
    assert "link" in messages["l.jpg"] and "twice" in messages["b"] and "appears again" in messages["c"]


def test_a_folder_that_cannot_be_listed_is_recorded(tmp_path, monkeypatch):
    src = tmp_path / "in"
    (src / "locked").mkdir(parents=True)
    (src / "locked" / "x.jpg").write_bytes(jpeg_bytes(photo("coffee")))
    (src / "ok.jpg").write_bytes(jpeg_bytes(photo("chelsea")))
    real_scandir = os.scandir

    def scandir(path="."):
        # as for a folder without read permission (root here can read anything)
        if not isinstance(path, int) and os.fsdecode(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    stats = annotate([src], tmp_path / "out")
    assert stats["written"] == 1 and stats["filtered_by_reason"] == {"not_an_input": 1} and stats["reconciled"]
    (row,) = pq.read_table(tmp_path / "out" / "filtered.parquet").to_pylist()
    assert row["source"].endswith("locked") and "cannot be listed" in row["message"]
