"""The annotate stage at scale: re-annotation of existing shards, yield gates,
out-of-memory batches split rather than dropped, per-annotator batching and
CPU/GPU overlap, one worker per GPU."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from _images import photo, tree_bytes
from annotators import Annotation, Annotator, create_annotator
from pipelines.options import AnnotateOptions, parse_gate
from pipelines.run import run_annotate
from pipelines.stages import Candidate, Decoded, annotate_decoded, run_annotator
from pipelines.sources import Location
from pipelines.validate import validate_dataset


def annotate(inputs, out, **kw) -> dict:
    kw.setdefault("annotators", (("canny", {}),))
    return run_annotate(AnnotateOptions(inputs=tuple(map(str, inputs)), output=str(out), **kw), [])


def samples(folder: Path) -> dict[str, dict]:
    tars = sorted(str(p) for p in folder.glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}


def test_reannotation_adds_a_member_and_keeps_everything_else(photos_dir, tmp_path):
    first = tmp_path / "first"
    annotate([photos_dir], first, shard_size=4)
    original = tree_bytes(first, "*")
    again = tmp_path / "again"
    stats = annotate(sorted(first.glob("*.tar")), again, annotators=(("hough", {}),), shard_size=4)
    assert stats["written"] == 6 and stats["failed"] == 0
    before, after = samples(first), samples(again)
    assert sorted(before) == sorted(after)  # same keys
    for key, old in before.items():
        new = after[key]
        assert new["jpg"] == old["jpg"] and new["canny.png"] == old["canny.png"] and new["txt"] == old["txt"]
        assert "hough.png" in new
        meta_old, meta_new = json.loads(old["json"]), json.loads(new["json"])
        assert set(meta_new["annotators"]) == {"canny", "hough"}
        assert meta_new["annotators"]["canny"] == meta_old["annotators"]["canny"]
        assert meta_new["source"] == meta_old["source"] and meta_new["crop_box"] == meta_old["crop_box"]
    assert validate_dataset(str(again)).ok
    assert tree_bytes(first, "*") == original  # input shards are never rewritten in place


def test_yield_gates_filter_with_a_reason(photos_dir, tmp_path):
    stats = annotate([photos_dir], tmp_path / "o", annotators=(("canny", {}), ("hough", {})),
                     gates=("hough.lines>=60",))
    kept = samples(tmp_path / "o")
    lines = [json.loads(s["json"])["annotators"]["hough"]["lines"] for s in kept.values()]
    assert all(n >= 60 for n in lines)
    gated = stats["filtered_by_reason"].get("gate:hough.lines", 0)
    assert gated > 0 and stats["written"] + gated == 6
    assert stats["inputs"] == stats["written"] + stats["filtered"] + stats["failed"]


def test_gate_parsing():
    g = parse_gate("openpose.keypoints >= 8")
    assert (g.annotator, g.field, g.op, g.value) == ("openpose", "keypoints", ">=", 8.0)
    assert g.passes({"keypoints": 8}) and not g.passes({"keypoints": 7})
    with pytest.raises(ValueError):
        parse_gate("openpose keypoints 8")
    with pytest.raises(ValueError):
        AnnotateOptions(inputs=("x",), output="y", gates=("bad",))


class _MemoryHungry(Annotator):
    """Edges (a real Canny map) but 'runs out of memory' above 2 images, as a
    GPU does when a batch is too large for it."""

    name = "memory_hungry_test"
    members = ("memory_hungry_test.png",)
    uses_gpu = True
    calls: list[int] = []

    def annotate_batch(self, images, keys=None):
        import torch

        type(self).calls.append(len(images))
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        canny = create_annotator("canny")
        return [Annotation({"memory_hungry_test.png": canny(im).members["canny.png"]}) for im in images]


class _Flaky(Annotator):
    name = "flaky_test"
    members = ("flaky_test.png",)

    def annotate_batch(self, images, keys=None):
        if any(im[0, 0, 0] == 0 for im in images):
            raise ValueError("cannot handle a black corner")
        return [Annotation({"flaky_test.png": im[:, :, 0].copy()}) for im in images]


def _decoded(n: int) -> list[Decoded]:
    out = []
    for i in range(n):
        img = np.ascontiguousarray(photo(["astronaut", "coffee", "chelsea"][i % 3])[:64, :64])
        img[0, 0] = 0 if i == 3 else 200
        c = Candidate(f"k{i}", f"src{i}", Location(f"src{i}"), "", None, 64, 64)
        out.append(Decoded(c, img, (0, 0, 64, 64), 1))
    return out


def test_out_of_memory_batches_are_split_not_dropped():
    _MemoryHungry.calls = []
    batch = _decoded(8)
    hungry = _MemoryHungry()
    results = run_annotator(hungry, [d.image for d in batch], [d.candidate.key for d in batch])
    assert all(isinstance(r, Annotation) for r in results)
    assert _MemoryHungry.calls[0] == 8 and max(_MemoryHungry.calls[1:]) <= 4
    # the next batch starts at the size that fitted: no failing attempts
    _MemoryHungry.calls = []
    again = run_annotator(hungry, [d.image for d in batch], [d.candidate.key for d in batch], batch_size=8)
    assert _MemoryHungry.calls == [2, 2, 2, 2] and all(isinstance(r, Annotation) for r in again)
    expected = [create_annotator("canny")(d.image).members["canny.png"] for d in batch]
    for r, e in zip(results, expected):
        np.testing.assert_array_equal(r.members["memory_hungry_test.png"], e)


@pytest.mark.parametrize("cpu_threads", [2, 5])
def test_one_bad_image_costs_only_itself_and_overlap_gives_same_results(cpu_threads):
    """Also with the CPU annotators' batch cut into slices (5 threads for
    canny and hough: two slices each, of 3 images)."""
    batch = _decoded(6)
    anns = [_Flaky(), create_annotator("canny"), create_annotator("hough")]
    plain = annotate_decoded(batch, anns, batch_sizes={"canny": 4})
    with ThreadPoolExecutor(cpu_threads) as pool:
        timings: dict[str, float] = {}
        overlapped = annotate_decoded(batch, anns, batch_sizes={"canny": 4}, timings=timings, pool=pool)
        with ThreadPoolExecutor(2) as gpu_pool:
            # annotators side by side on the "GPU" threads too (all of them when there is no CPU pool)
            side_by_side = annotate_decoded(batch, anns, batch_sizes={"canny": 4}, pool=pool, gpu_pool=gpu_pool)
            all_threads = annotate_decoded(batch, anns, batch_sizes={"canny": 4}, gpu_pool=gpu_pool)
    assert set(timings) == {"flaky_test", "canny", "hough"}
    for other in (overlapped, side_by_side, all_threads):
        for i, (a, b) in enumerate(zip(plain, other)):
            if i == 3:
                assert a.reason == b.reason == "annotator_error" and "flaky_test" in a.message
                continue
            for name in ("canny", "hough", "flaky_test"):
                for member, value in a[1][name].members.items():
                    np.testing.assert_array_equal(value, b[1][name].members[member])


def test_gpu_claims_are_distinct_per_worker(tmp_path, monkeypatch):
    import tempfile
    import uuid

    import pipelines.beam as pb

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the claim files land in tmp_path
    opts = AnnotateOptions(inputs=("x",), output="y", gpus=2, run_id=f"test-{uuid.uuid4().hex}")
    monkeypatch.setattr(pb, "_CLAIMED_GPU", None)
    first = pb.claim_gpu(opts)
    assert pb.claim_gpu(opts) == first  # a process keeps its GPU
    monkeypatch.setattr(pb, "_CLAIMED_GPU", None)  # as a second worker process
    second = pb.claim_gpu(opts)
    assert {first, second} == {0, 1}
    monkeypatch.setattr(pb, "_CLAIMED_GPU", None)
    with pytest.raises(RuntimeError):
        pb.claim_gpu(opts)
    assert sorted(p.name for p in (tmp_path / f"controlset-gpus-{opts.run_id}").iterdir()) == ["gpu-0", "gpu-1"]


@pytest.mark.parametrize("gpus,per_gpu", [(1, 2), (2, 2), (3, 1)])
def test_gpu_claims_with_workers_sharing_a_gpu(tmp_path, monkeypatch, gpus, per_gpu):
    import tempfile
    import uuid
    from collections import Counter

    import pipelines.beam as pb

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    opts = AnnotateOptions(inputs=("x",), output="y", gpus=gpus, workers_per_gpu=per_gpu,
                           run_id=f"test-{uuid.uuid4().hex}")
    claims = []
    for _ in range(gpus * per_gpu):  # each as its own worker process
        monkeypatch.setattr(pb, "_CLAIMED_GPU", None)
        claims.append((pb.claim_gpu(opts), pb.claimed_rank()))
    # the first workers spread over the GPUs; then each GPU gets exactly per_gpu,
    # ranked 0 .. per_gpu - 1 on it
    assert sorted(g for g, _ in claims[:gpus]) == list(range(gpus))
    assert Counter(g for g, _ in claims) == {g: per_gpu for g in range(gpus)}
    assert sorted(claims) == [(g, r) for g in range(gpus) for r in range(per_gpu)]
    monkeypatch.setattr(pb, "_CLAIMED_GPU", None)
    with pytest.raises(RuntimeError, match="workers-per-gpu"):
        pb.claim_gpu(opts)


def test_workers_per_gpu_option_is_checked_and_kept_out_of_the_fingerprint():
    with pytest.raises(ValueError, match="workers per GPU"):
        AnnotateOptions(inputs=("x",), output="y", workers_per_gpu=0)
    one = AnnotateOptions(inputs=("x",), output="y", gpus=1)
    two = AnnotateOptions(inputs=("x",), output="y", gpus=1, workers_per_gpu=2)
    # how many processes share a GPU never changes what a shard holds
    assert one.fingerprint({}) == two.fingerprint({})


def test_near_duplicates_by_perceptual_hash(photos_dir, tmp_path):
    from PIL import Image

    from _images import jpeg_bytes
    from pipelines.decode import hamming, perceptual_hash

    src = tmp_path / "in"
    src.mkdir()
    for p in photos_dir.glob("*.jpg"):
        (src / p.name).write_bytes(p.read_bytes())
    coffee = photo("coffee")
    Image.fromarray(coffee).resize((450, 300)).save(src / "zz_coffee_small.jpg", quality=70)
    Image.fromarray(coffee).save(src / "zz_coffee.png")
    hashes = {p.name: perceptual_hash(p.read_bytes()) for p in sorted(src.iterdir())}
    distinct = [hamming(hashes[a], hashes[b]) for a in hashes for b in hashes
                if a < b and not {a, b} & {"zz_coffee_small.jpg", "zz_coffee.png", "coffee.jpg"}]
    assert min(distinct) > 10  # different photos are far apart
    assert hamming(hashes["coffee.jpg"], hashes["zz_coffee_small.jpg"]) <= 3
    stats = annotate([src], tmp_path / "o", near_duplicates=3)
    assert stats["written"] == 6
    assert stats["filtered_by_reason"] == {"near_duplicate": 2}
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "o" / "filtered.parquet").to_pylist()
    assert sorted(Path(r["source"]).name for r in rows) == ["zz_coffee.png", "zz_coffee_small.jpg"]
    assert all("coffee.jpg" in r["message"] for r in rows)
    off = annotate([src], tmp_path / "off")
    assert off["written"] == 8  # off by default: only exact duplicates


def test_missing_models_fail_before_any_work(photos_dir, tmp_path, monkeypatch):
    from annotators import MissingWeightsError
    from schemas.errors import UsageError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name, options in (("depth", {"model": str(tmp_path / "nowhere")}), ("caption", {})):
        with pytest.raises(MissingWeightsError) as err:
            annotate([photos_dir], tmp_path / name, annotators=((name, options),))
        assert isinstance(err.value, UsageError)
        assert not (tmp_path / name / "stats.json").exists()
    assert "HF_HUB_OFFLINE=1" in str(err.value) and "Salesforce/blip-image-captioning-large" in str(err.value)


def test_gpu_annotators_start_costliest_first_and_reusers_last():
    """On the GPU threads the annotators start in decreasing order of the
    seconds they have taken so far; one that reuses another's work (normal
    after depth) starts after every other."""
    started: list[str] = []

    def recorder(name: str, after: tuple[str, ...] = ()):
        cls = type(f"_Rec_{name}", (Annotator,), {
            "name": name, "members": (f"{name}.png",), "uses_gpu": True, "run_after": after,
            "annotate_batch": lambda self, images, keys=None: (
                started.append(self.name) or [Annotation({f"{self.name}.png": im[:, :, 0].copy()}) for im in images]),
        })
        return cls()

    anns = [recorder("late_reuser", ("cheap",)), recorder("cheap"), recorder("costly"), recorder("middle")]
    batch = _decoded(2)
    with ThreadPoolExecutor(1) as gpu_pool:  # one thread: the start order is the submission order
        annotate_decoded(batch, anns, gpu_pool=gpu_pool, costs={"costly": 9.0, "middle": 2.0, "cheap": 0.5})
        assert started == ["costly", "middle", "cheap", "late_reuser"]
        started.clear()
        annotate_decoded(batch, anns, gpu_pool=gpu_pool)  # no costs yet: the given order, reusers last
        assert started == ["cheap", "costly", "middle", "late_reuser"]


def test_workers_sharing_a_gpu_start_their_batches_out_of_step():
    """A second worker on the GPU takes the rotation of the costliest-first
    order that, on its GPU threads, runs each network least at the same time
    as the first worker does (two copies of one heavy network at once slow
    each other most). Costs: seconds per batch measured on an H200."""
    from pipelines.stages import _schedule, gpu_start_order

    costs = {"caption": 2.0, "seg": 1.5, "depth": 0.76, "mlsd": 0.6, "hed": 0.4, "openpose": 0.24, "normal": 0.1}

    def ann(name, after=()):
        return type(f"_A_{name}", (Annotator,), {"name": name, "members": (f"{name}.png",), "uses_gpu": True,
                                                  "run_after": after})()

    anns = [ann(n) for n in ("mlsd", "hed", "openpose", "depth", "seg", "caption")] + [ann("normal", ("depth",))]
    names = lambda order: [a.name for a in order]  # noqa: E731
    first = gpu_start_order(anns, anns, costs, rank=0, threads=2)
    assert names(first) == ["caption", "seg", "depth", "mlsd", "hed", "openpose", "normal"]
    second = gpu_start_order(anns, anns, costs, rank=1, threads=2)
    assert sorted(names(second)) == sorted(names(first)) and names(second)[-1] == "normal"

    def same_time(a, b):
        sa, sb = _schedule(a[:-1], costs, 2), _schedule(b[:-1], costs, 2)
        return sum(max(0.0, min(sa[n][1], sb[n][1]) - max(sa[n][0], sb[n][0])) for n in sa)

    # in step, both run every network at once; the rotation less than half of that
    assert same_time(first, first) == pytest.approx(sum(v for k, v in costs.items() if k != "normal"))
    assert same_time(first, second) < 0.4 * same_time(first, first)
    assert names(second)[:2] != names(first)[:2]
    # a third worker avoids both; one worker alone, or one GPU annotator, keeps the order
    third = gpu_start_order(anns, anns, costs, rank=2, threads=2)
    assert names(third) not in (names(first), names(second))
    assert names(gpu_start_order(anns[:1], anns, costs, rank=1, threads=2)) == ["mlsd"]
    # before any cost is known each counts the same, and the ranks still differ
    assert names(gpu_start_order(anns, anns, None, rank=1, threads=2)) != names(gpu_start_order(anns, anns))


def test_batch_sizes_follow_the_device_and_the_shard(monkeypatch):
    """Neural annotators' GPU-sized defaults are capped without a GPU; an
    explicit --annotator-batch is kept; a pipeline batch is at most half a
    shard so that a shard's batches overlap."""
    import pipelines.beam as pb
    from pipelines.options import AnnotateOptions

    anns = [create_annotator("canny"), create_annotator("caption"), create_annotator("hed")]
    opts = AnnotateOptions(inputs=("x",), output="y", annotators=(("canny", {}), ("caption", {}), ("hed", {})),
                           shard_size=1000)
    monkeypatch.setattr(pb, "_cuda_available", lambda: False)
    assert pb.annotator_batch_sizes(opts, anns) == {"caption": pb.CPU_BATCH_SIZE, "hed": pb.CPU_BATCH_SIZE}
    assert pb.beam_batch_size(opts) == 16
    monkeypatch.setattr(pb, "_cuda_available", lambda: True)
    assert pb.annotator_batch_sizes(opts, anns) == {"caption": 256, "hed": 64}
    assert pb.beam_batch_size(opts) == 256
    small = AnnotateOptions(inputs=("x",), output="y", annotators=opts.annotators, shard_size=300,
                            annotator_batch_sizes=(("caption", 8),))
    assert pb.annotator_batch_sizes(small, anns) == {"caption": 8, "hed": 64}
    assert pb.beam_batch_size(small) == 64  # hed's 64: below half a shard (150)
    tiny = AnnotateOptions(inputs=("x",), output="y", annotators=opts.annotators, shard_size=100)
    assert pb.beam_batch_size(tiny) == 50


def _blocking_setup_class(name: str):
    """An annotator whose set-up blocks until released, counting set-ups."""
    import threading

    class Blocking(Annotator):
        members = (f"{name}.png",)
        started = threading.Event()
        release = threading.Event()
        setups: list[str] = []

        def setup(self) -> None:
            type(self).setups.append(self.name)
            type(self).started.set()
            assert type(self).release.wait(30)

        def annotate_batch(self, images, keys=None):
            return [Annotation({f"{name}.png": im[:, :, 0].copy()}) for im in images]

    Blocking.name = name
    return Blocking


def test_probe_groups_keep_every_input_once_in_order_with_each_tar_alone():
    from pipelines.beam import PROBE_GROUP, probe_groups
    from pipelines.sources import InputRef

    refs = [InputRef(f"/d/{i}.jpg", "image") for i in range(PROBE_GROUP + 10)]
    refs[5] = InputRef("/d/a.tar", "tar")
    refs.append(InputRef("/d/b.tar", "tar"))
    groups = probe_groups(refs)
    assert sorted((r.source for g in groups for r in g), key=str) == sorted((r.source for r in refs), key=str)
    assert [g for g in groups if any(r.kind == "tar" for r in g)] == [(refs[5],), (refs[-1],)]
    files = [r for g in groups for r in g if r.kind != "tar"]
    assert files == [r for r in refs if r.kind != "tar"]  # in their order
    assert max(len(g) for g in groups) == PROBE_GROUP and probe_groups([]) == []


def test_the_pipeline_reads_its_inputs_from_a_list_and_stays_small(tmp_path):
    """200000 inputs: the pipeline's definition carries the list's URL, not
    the list (embedded, such a list outgrows Dataflow's job request)."""
    import apache_beam as beam

    from pipelines.beam import build_pipeline, pipeline_options, read_input_groups, write_input_list
    from pipelines.options import AnnotateOptions
    from pipelines.sources import InputRef, open_output_fs

    refs = [InputRef(f"gs://bucket/raw/{i:040x}.jpg", "image", caption=f"gs://bucket/raw/{i:040x}.txt")
            for i in range(200_000)] + [InputRef("gs://bucket/a.tar", "tar"), InputRef("gs://b/x", "skipped", note="n")]
    opts = AnnotateOptions(inputs=("gs://bucket/raw",), output=str(tmp_path / "o"), annotators=(("canny", {}),),
                           run_id="r1")
    fs, root = open_output_fs(opts.output)
    url = write_input_list(fs, root, "r1", refs)
    groups = read_input_groups(url)
    assert [r for g in groups for r in g] == refs and (refs[-2],) in groups  # every input, once, each tar alone
    p = beam.Pipeline(options=pipeline_options([]))
    build_pipeline(p, opts, url, len(refs), {"a": 1}, {"annotators": ["canny"]})
    assert len(p.to_runner_api().SerializeToString()) < 200_000


def test_the_input_list_is_removed_and_a_killed_runs_list_cleaned_up(photos_dir, tmp_path):
    from pipelines.beam import write_input_list
    from pipelines.sources import InputRef, open_output_fs

    out = tmp_path / "o"
    fs, root = open_output_fs(str(out))
    write_input_list(fs, root, "killed", [InputRef("/x.jpg", "image")])  # as a killed run leaves it
    assert [p.name for p in out.iterdir() if p.name.startswith(".controlset-inputs")]
    stats = annotate([photos_dir], out, shard_size=3)
    assert stats["written"] > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".controlset-inputs")]


def test_models_preload_in_the_background_once_and_can_be_cancelled(monkeypatch):
    import threading

    import annotators.registry as registry
    import pipelines.beam as pb

    first, second = _blocking_setup_class("preload_a_test"), _blocking_setup_class("preload_b_test")
    for cls in (first, second):
        monkeypatch.setitem(registry._REGISTRY, cls.name, cls)
    opts = AnnotateOptions(inputs=("x",), output="y", annotators=(("preload_a_test", {}), ("preload_b_test", {})),
                           run_id="preload-test")

    # loading starts on its own thread: preload returns while set-up blocks
    pb.preload_annotators(opts)
    pb.preload_annotators(opts)  # a second probe worker in the process adds nothing
    assert first.started.wait(10)
    first.release.set()
    second.release.set()
    models = pb.loaded_annotators(opts)
    assert pb.loaded_annotators(opts) is models  # taken, not loaded again
    assert first.setups == ["preload_a_test"] and second.setups == ["preload_b_test"]
    assert set(models.load_ms) == {"preload_a_test", "preload_b_test"}
    pb.discard_preloads("another-run")  # another run's end leaves this run's preload alone
    assert pb.loaded_annotators(opts) is models
    pb.discard_preloads(opts.run_id)

    # a run that ends before its models are taken stops the load between two
    # annotators and leaves no thread behind
    first.started.clear()
    first.release.clear()
    second.release.clear()
    pb.preload_annotators(opts)
    assert first.started.wait(10)
    stopper = threading.Thread(target=pb.discard_preloads, args=(opts.run_id,))
    stopper.start()
    stopper.join(0.5)
    assert stopper.is_alive()  # waits for the set-up in progress...
    first.release.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert second.setups == ["preload_b_test"]  # ...and starts no other
    assert not any(t.name == "controlset-preload" for t in threading.enumerate())
    second.release.set()
    fresh = pb.loaded_annotators(opts)  # nothing preloaded: loads now
    assert fresh is not models and second.setups == ["preload_b_test"] * 2


def test_a_failed_preload_is_retried_where_the_models_are_taken(monkeypatch):
    import annotators.registry as registry
    import pipelines.beam as pb

    class FailsOnce(Annotator):
        name = "fails_once_test"
        members = ("fails_once_test.png",)
        setups = 0

        def setup(self) -> None:
            type(self).setups += 1
            if type(self).setups == 1:
                raise RuntimeError("CUDA out of memory (once)")

        def annotate_batch(self, images, keys=None):
            return [Annotation({"fails_once_test.png": im[:, :, 0].copy()}) for im in images]

    monkeypatch.setitem(registry._REGISTRY, FailsOnce.name, FailsOnce)
    opts = AnnotateOptions(inputs=("x",), output="y", annotators=(("fails_once_test", {}),), run_id="fails-once")
    pb.preload_annotators(opts)
    models = pb.loaded_annotators(opts)  # the preload failed: loaded again, now fine
    assert FailsOnce.setups == 2 and [a.name for a in models.annotators] == ["fails_once_test"]
    assert pb.loaded_annotators(opts) is not models  # the failed preload is gone (Shared keeps the models)
    pb.discard_preloads(opts.run_id)


def test_the_pipeline_takes_the_models_its_probe_stage_preloaded(photos_dir, tmp_path, monkeypatch):
    import threading

    import pipelines.beam as pb

    made = []
    real = pb.LoadedAnnotators.__init__

    def counting(self, *args, **kwargs):
        made.append(threading.current_thread().name)
        real(self, *args, **kwargs)

    monkeypatch.setattr(pb.LoadedAnnotators, "__init__", counting)
    stats = annotate([photos_dir], tmp_path / "o", shard_size=3)
    assert stats["shards"] >= 2
    assert made == ["controlset-preload"]  # loaded once, in the background, and used


def test_loading_time_is_counted_per_annotator(photos_dir, tmp_path, capsys):
    from pipelines.cli import print_summary

    stats = annotate([photos_dir], tmp_path / "o", annotators=(("canny", {}), ("hough", {})))
    counters = stats["counters"]
    assert {"load_ms_canny", "load_ms_hough"} <= set(counters)
    assert counters["stage_ms_annotate"] > 0
    print_summary(stats, str(tmp_path / "o"))
    out = capsys.readouterr().out
    assert "loading (s)" in out and "shard threads: annotating" in out


def test_trace_writes_the_runs_timeline(photos_dir, tmp_path, monkeypatch):
    """CONTROLSET_TRACE: every step of the run in order, one event per shard
    started and committed, loading per annotator."""
    import json

    import pipelines.beam as pb

    monkeypatch.setattr(pb, "_TRACE_FAILED", False)
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("CONTROLSET_TRACE", str(trace))
    stats = annotate([photos_dir], tmp_path / "o", shard_size=3, annotators=(("canny", {}), ("hough", {})))
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    events = [r["event"] for r in rows]
    # in one process the models start loading before Beam starts, and local
    # inputs are probed once the annotators' code is imported
    for first, then in [("run_start", "load_start"), ("load_start", "pipeline_start"),
                        ("imported", "pipeline_start"), ("imported", "loaded"),
                        ("run_start", "pipeline_start"), ("pipeline_start", "probe_setup"),
                        ("probe_setup", "probe_bundle"), ("probe_bundle", "shard_start"),
                        ("probe_setup", "shard_setup"), ("shard_setup", "shard_start"),
                        ("shard_start", "shard_commit"), ("shard_commit", "finalize"),
                        ("finalize", "pipeline_done")]:
        assert events.index(first) < events.index(then), (first, then)
    assert sorted(r["annotator"] for r in rows if r["event"] == "loaded") == ["canny", "hough"]
    probed = [r for r in rows if r["event"] == "probe_bundle"]
    assert sum(r["inputs"] for r in probed) == stats["inputs"]
    assert all(r["busy_seconds"] > 0 for r in probed)
    commits = [r for r in rows if r["event"] == "shard_commit"]
    assert len(commits) == stats["shards"] == len([e for e in events if e == "shard_start"])
    assert sum(r["written"] for r in commits) == stats["written"]
    assert all(isinstance(r["t"], float) and r["pid"] == rows[0]["pid"] for r in rows)  # one process


def test_an_unwritable_trace_never_costs_the_run(photos_dir, tmp_path, monkeypatch, caplog):
    import pipelines.beam as pb

    monkeypatch.setattr(pb, "_TRACE_FAILED", False)
    monkeypatch.setenv("CONTROLSET_TRACE", str(tmp_path / "no" / "such" / "folder" / "trace.jsonl"))
    stats = annotate([photos_dir], tmp_path / "o", shard_size=3)
    assert stats["written"] > 0 and stats["failed"] == 0
    assert "cannot write the trace" in caplog.text
    assert not (tmp_path / "no").exists()


def test_tampered_controlset_metadata_costs_only_its_sample(photos_dir, tmp_path):
    import io
    import tarfile

    first = tmp_path / "first"
    annotate([photos_dir], first, shard_size=100)
    (shard,) = sorted(first.glob("*.tar"))
    tampered = tmp_path / "tampered.tar"
    edits = [("original_width", "x"), ("original_height", 2 ** 40), ("crop_box", None)]
    keys_edited = {}
    with tarfile.open(shard) as src, tarfile.open(tampered, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            if ext == "json" and (key in keys_edited or len(keys_edited) < len(edits)):
                field, value = edits[len(keys_edited)] if key not in keys_edited else keys_edited[key]
                keys_edited[key] = (field, value)
                meta = json.loads(data)
                meta[field] = value
                data = json.dumps(meta).encode()
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    stats = annotate([tampered], tmp_path / "again", annotators=(("hough", {}),))
    # the two impossible sizes are failures with a reason; the null crop box
    # (the whole image) and every other sample are written
    assert stats["failed_by_reason"] == {"bad_metadata": 2}
    assert stats["written"] == stats["inputs"] - 2 == 6 - 2
    assert stats["reconciled"]


def _importing_class(name: str, fail: bool = False):
    """An annotator whose import_code blocks until released (and can fail),
    recording the order of import_code and setup calls."""
    import threading

    class Importing(Annotator):
        members = (f"{name}.png",)
        importing = threading.Event()
        release = threading.Event()
        calls: list[str] = []

        def import_code(self) -> None:
            type(self).calls.append("import_code")
            type(self).importing.set()
            assert type(self).release.wait(30)
            if fail:
                raise ImportError("no module named 'imaginary_networks'")

        def setup(self) -> None:
            type(self).calls.append("setup")

        def annotate_batch(self, images, keys=None):
            return [Annotation({f"{name}.png": im[:, :, 0].copy()}) for im in images]

    Importing.name = name
    return Importing


def test_probing_local_inputs_waits_for_the_annotators_imports(monkeypatch):
    """Local inputs: settle_imports returns only once every annotator's code
    is imported (and before any weights load); remote inputs do not wait."""
    import threading

    import annotators.registry as registry
    import pipelines.beam as pb

    first, second = _importing_class("imports_a_test"), _importing_class("imports_b_test")
    for cls in (first, second):
        monkeypatch.setitem(registry._REGISTRY, cls.name, cls)
    names = (("imports_a_test", {}), ("imports_b_test", {}))
    local = AnnotateOptions(inputs=("/data/photos",), output="y", annotators=names, run_id="settle-local")
    remote = AnnotateOptions(inputs=("gs://bucket/photos",), output="y", annotators=names, run_id="settle-remote")
    assert pb.settle_imports(local) is False  # nothing preloading: nothing to wait for

    pb.preload_annotators(local)
    assert first.importing.wait(10)
    waiter = threading.Thread(target=pb.settle_imports, args=(local,))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # still importing: the probe stage waits
    first.release.set()
    assert second.importing.wait(10)
    waiter.join(0.3)
    assert waiter.is_alive()  # every annotator's code, not just the first
    second.release.set()
    waiter.join(10)
    assert not waiter.is_alive()
    pb.loaded_annotators(local)
    # both imported before either set up
    assert first.calls == ["import_code", "setup"] and second.calls == ["import_code", "setup"]
    pb.discard_preloads(local.run_id)

    first.release.clear()
    first.importing.clear()
    pb.preload_annotators(remote)
    assert first.importing.wait(10)
    assert pb.settle_imports(remote) is False  # remote inputs are probed beside the imports
    first.release.set()
    pb.loaded_annotators(remote)
    pb.discard_preloads(remote.run_id)


def test_a_failed_import_releases_the_probe_stage(monkeypatch):
    import annotators.registry as registry
    import pipelines.beam as pb

    cls = _importing_class("imports_fail_test", fail=True)
    monkeypatch.setitem(registry._REGISTRY, cls.name, cls)
    opts = AnnotateOptions(inputs=("/data",), output="y", annotators=(("imports_fail_test", {}),),
                           run_id="settle-fail")
    cls.release.set()
    pb.preload_annotators(opts)
    assert pb.settle_imports(opts, timeout=10) is True  # returns: the failure is the loader's to report
    with pytest.raises(ImportError, match="imaginary_networks"):
        pb.loaded_annotators(opts)  # retried where the models are taken, and fails there
    pb.discard_preloads(opts.run_id)


@pytest.mark.parametrize("args, here", [
    ([], True),
    (["--runner=DirectRunner"], True),
    (["--runner", "directrunner", "--direct_running_mode=multi_threading", "--direct_num_workers=2"], True),
    (["--direct_running_mode=multi_processing", "--direct_num_workers=2"], False),
    (["--runner=DataflowRunner"], False),
    (["--runner=FlinkRunner"], False),
])
def test_models_preload_in_the_launching_process_only_when_it_runs_the_workers(args, here):
    from pipelines.run import runs_in_this_process

    assert runs_in_this_process(args) is here


def test_shards_stream_through_one_pipeline_of_batches(photos_dir, tmp_path, monkeypatch):
    """A worker's shards flow through one pipeline of batches: a shard's last
    batch is annotated, and the shard committed, only after the next shard has
    arrived (so that shard's first batch decodes meanwhile); the bundle's end
    finishes the last one. Shards are the same bytes whatever the batching,
    and every sample is written once."""
    import json

    import pipelines.beam as pb

    monkeypatch.setattr(pb, "_TRACE_FAILED", False)
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("CONTROLSET_TRACE", str(trace))
    streamed = annotate([photos_dir], tmp_path / "a", shard_size=2, batch_size=1)
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    order = [(r["event"], r.get("shard")) for r in rows if r["event"] in ("shard_start", "shard_commit")]
    starts = [s for e, s in order if e == "shard_start"]
    assert len(starts) == streamed["shards"] >= 3
    # each shard but the last is committed after the next one started
    for first, then in zip(starts, starts[1:]):
        assert order.index(("shard_start", then)) < order.index(("shard_commit", first))
    assert sorted(s for e, s in order if e == "shard_commit") == sorted(starts)

    monkeypatch.delenv("CONTROLSET_TRACE")
    whole = annotate([photos_dir], tmp_path / "b", shard_size=2, batch_size=2)
    assert streamed["written"] == whole["written"] == len(samples(tmp_path / "a"))
    assert tree_bytes(tmp_path / "a", "*.tar") == tree_bytes(tmp_path / "b", "*.tar")


def test_a_failed_commit_drops_the_shards_in_flight_and_a_rerun_completes(photos_dir, tmp_path, monkeypatch):
    """A write error mid-stream fails the run without leaving a partial or
    temporary file of any shard in flight; the rerun makes exactly the
    missing shards and the result equals an undisturbed run."""
    from pipelines import writer as W

    real_commit = W.ShardWriter.commit
    calls = []

    def flaky_commit(self, digest):
        calls.append(self.name)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_commit(self, digest)

    monkeypatch.setattr(W.ShardWriter, "commit", flaky_commit)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="disk full"):
        annotate([photos_dir], out, shard_size=2, batch_size=1)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    committed = sorted(p.name for p in out.glob("*.tar"))
    assert len(committed) == 1  # only the shard committed before the failure

    monkeypatch.setattr(W.ShardWriter, "commit", real_commit)
    stats = annotate([photos_dir], out, shard_size=2, batch_size=1)
    clean = annotate([photos_dir], tmp_path / "clean", shard_size=2, batch_size=1)
    assert stats["written"] == clean["written"]
    assert tree_bytes(out, "*.tar") == tree_bytes(tmp_path / "clean", "*.tar")


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_batches_encode_while_later_ones_are_annotated(photos_dir, tmp_path, monkeypatch, ahead):
    """Up to ENCODE_AHEAD annotated batches encode while the next is
    annotated; the oldest is written only when one more is in flight, and
    the shards are the same bytes at any depth."""
    import pipelines.beam as pb

    monkeypatch.setattr(pb, "ENCODE_AHEAD", ahead)
    in_flight = []
    real_write = pb.ShardFn._write_encoded

    def counting_write(self):
        in_flight.append(len(self._encoding))
        return real_write(self)

    monkeypatch.setattr(pb.ShardFn, "_write_encoded", counting_write)
    stats = annotate([photos_dir], tmp_path / "a", shard_size=2, batch_size=1)
    assert stats["written"] == 6
    # six one-image batches: the first write waits until ahead + 1 are in flight
    assert in_flight[0] == max(in_flight) == ahead + 1
    monkeypatch.setattr(pb, "ENCODE_AHEAD", 1)
    monkeypatch.setattr(pb.ShardFn, "_write_encoded", real_write)
    annotate([photos_dir], tmp_path / "b", shard_size=2, batch_size=1)
    assert tree_bytes(tmp_path / "a", "*.tar") == tree_bytes(tmp_path / "b", "*.tar")


def test_default_threads_share_the_cores_and_stay_fewer_for_gpu_runs(photos_dir, tmp_path, monkeypatch):
    import os

    import annotators.registry as registry
    import pipelines.run as run_mod
    from pipelines.options import default_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert [default_threads(w) for w in (1, 2, 4, 8, 16)] == [8, 8, 4, 2, 2]
    assert [default_threads(w, cap=4) for w in (1, 2, 4, 8)] == [4, 4, 4, 2]

    seen = {}

    class Planned(Exception):
        pass

    def capture(p, opts, *a, **kw):
        seen[tuple(n for n, _ in opts.annotators)] = (opts.io_threads, opts.cpu_threads)
        seen["probe"] = opts.probe_threads or opts.io_threads
        raise Planned

    monkeypatch.setattr(run_mod, "build_pipeline", capture)
    monkeypatch.setitem(registry._REGISTRY, _MemoryHungry.name, _MemoryHungry)
    for names in (("canny",), ("canny", _MemoryHungry.name)):
        with pytest.raises(Planned):
            annotate([photos_dir], tmp_path / "out", annotators=tuple((n, {}) for n in names))
    assert seen[("canny",)] == (8, 8)  # CPU annotators only: half the cores
    assert seen[("canny", _MemoryHungry.name)] == (4, 4)  # with a GPU annotator: at most GPU_RUN_THREADS
    assert seen["probe"] == 8  # probing remote inputs (network-bound) keeps the uncapped default
    # explicit values are kept
    with pytest.raises(Planned):
        annotate([photos_dir], tmp_path / "out", annotators=(("canny", {}), (_MemoryHungry.name, {})),
                 io_threads=6, cpu_threads=3)
    assert seen[("canny", _MemoryHungry.name)] == (6, 3)
    assert seen["probe"] == 6  # --io-threads also sets the probing threads


def test_workers_per_gpu_is_for_local_runs(photos_dir, tmp_path):
    from pipelines.run import run_annotate
    from schemas.errors import UsageError

    opts = AnnotateOptions(inputs=(str(photos_dir),), output=str(tmp_path / "out"), workers_per_gpu=2)
    with pytest.raises(UsageError, match="local runs"):
        run_annotate(opts, ["--runner=DataflowRunner"])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("flags, expected", [([], True), (["--no-warm-batch"], False)])
def test_no_warm_batch_flag_reaches_the_options(flags, expected, tmp_path, monkeypatch):
    """``--no-warm-batch`` turns the GPU workers' warm-up batch off; it is
    on by default."""
    import pipelines.run
    from controlset.cli import main

    seen = []

    class Taken(Exception):
        pass

    def take(opts, extra):
        seen.append(opts)
        raise Taken

    monkeypatch.setattr(pipelines.run, "run_annotate", take)
    with pytest.raises(Taken):
        main(["annotate", str(tmp_path), "-o", str(tmp_path / "out"), "--annotators", "canny", *flags])
    assert len(seen) == 1 and seen[0].warm_batch is expected
