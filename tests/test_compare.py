"""The comparison bench on CPU: fidelity metric, the alternative conditioning
methods, the shapes task and a reduced ``controlset compare`` run."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch

from schemas.errors import UsageError
from training.fidelity import FidelityMeter, edge_scores, mask_iou

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "bench", "compare_tiny.yaml")


# -- the fidelity metric -----------------------------------------------------


def _photo_edges() -> np.ndarray:
    import skimage.data

    img = cv2.resize(skimage.data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)
    return cv2.Canny(img, 100, 200)


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(a)
    h, w = a.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out


def test_edge_f1_perfect_shifted_and_empty():
    edges = _photo_edges()
    assert edges.any()
    same = edge_scores(edges, edges)
    assert same.f1 == 1.0 and same.precision == 1.0 and same.recall == 1.0 and same.chamfer == 0.0
    # Shifted by one pixel: within a 2 px tolerance every edge still matches,
    # except the few that left the image.
    near = edge_scores(_shift(edges, 1, 1), edges, tolerance=2)
    assert near.precision == 1.0 and near.recall > 0.97 and near.f1 > 0.98
    assert 0 < near.chamfer <= 1.5
    # With no tolerance the same shift is mostly a miss.
    assert edge_scores(_shift(edges, 1, 1), edges, tolerance=0).f1 < 0.5
    empty = np.zeros_like(edges)
    assert edge_scores(empty, edges).f1 == 0.0 and edge_scores(edges, empty).f1 == 0.0
    assert edge_scores(empty, edges).chamfer == pytest.approx(np.hypot(128, 128))
    assert edge_scores(empty, empty).f1 == 1.0


def test_edge_f1_known_values():
    target = np.zeros((64, 64), np.uint8)
    target[10, 5:55] = 255
    target[40, 5:55] = 255
    pred = np.zeros_like(target)
    pred[10, 5:55] = 255  # one of the two lines: precision 1, recall 1/2
    s = edge_scores(pred, target)
    assert s.precision == 1.0 and s.recall == pytest.approx(0.5) and s.f1 == pytest.approx(2 / 3)
    # A line 5 px away: outside a 2 px tolerance, Chamfer distance 5.
    far = np.zeros_like(target)
    far[15, 5:55] = 255
    s = edge_scores(far, pred)
    assert s.f1 == 0.0 and s.chamfer == pytest.approx(5.0, abs=0.05)
    # Float maps in [0, 1] and 3-channel maps are read the same way.
    assert edge_scores(np.stack([pred / 255.0] * 3, -1), target).f1 == pytest.approx(2 / 3)


def test_mask_iou():
    a = np.zeros((20, 20), np.uint8)
    b = np.zeros((20, 20), np.uint8)
    a[0:10, 0:10] = 255
    b[5:15, 0:10] = 255
    assert mask_iou(a, b) == pytest.approx(50 / 150)
    assert mask_iou(a, a) == 1.0 and mask_iou(a, np.zeros_like(a)) == 0.0
    labels = np.zeros((4, 4, 3), np.uint8)
    labels[:2] = (255, 0, 0)
    labels[2:] = (0, 0, 255)
    other = labels.copy()
    other[:, :2] = (0, 255, 0)
    # red 2/4, blue 2/4, green 0/4 (only in the prediction) -> mean 1/3
    assert mask_iou(other, labels) == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_fidelity_meter_runs_the_annotator():
    import skimage.data

    meter = FidelityMeter("canny")
    photo = cv2.resize(skimage.data.coffee(), (96, 96), interpolation=cv2.INTER_AREA)
    cond = cv2.Canny(photo, 100, 200)
    flat = np.full_like(photo, 128)
    assert meter.score([photo], [cond])["fidelity"] == 1.0
    assert meter.score([flat], [cond])["f1"] == 0.0
    both = meter.score([photo, flat], [cond, cond])
    assert both["f1"] == pytest.approx(0.5) and set(both) >= {"precision", "recall", "chamfer", "fidelity"}


# -- the task ----------------------------------------------------------------


def _members(tar: str) -> list[dict]:
    import webdataset as wds

    return [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            for s in wds.WebDataset(tar, shardshuffle=False)]


def test_shapes_task_shards(tmp_path):
    import pyarrow.parquet as pq

    from training.data import SampleSpec, ShardStream, make_loader
    from training.tasks import COLOURS, SHAPES, write_shapes_task

    paths = write_shapes_task(str(tmp_path), n_train=10, n_val=3, size=64, per_shard=4)
    assert [os.path.basename(p) for p in paths["train"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sum(pq.read_table(p[:-4] + ".parquet").num_rows for p in paths["train"]) == 10
    again = write_shapes_task(str(tmp_path / "again"), n_train=10, n_val=3, size=64, per_shard=4)
    # Deterministic: the same samples, byte for byte (tar headers carry times).
    assert _members(paths["val"][0]) == _members(again["val"][0])
    batch = next(iter(make_loader(ShardStream(paths["train"], SampleSpec(resolution=64, proportion_empty_prompts=0),
                                              4, num_workers=0))))
    for caption in batch["captions"]:
        words = caption.split()
        assert words[1] in COLOURS and words[2] in SHAPES and words[-2] in COLOURS and words[1] != words[-2]
    cond = batch["conditioning"].numpy()
    assert set(np.unique(cond)) <= {0.0, 1.0} and (cond > 0).mean() > 0.005


# -- the methods -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    from training.tiny import write_tiny_base

    return write_tiny_base(str(tmp_path_factory.mktemp("base") / "tiny"))


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600]), torch.randn(2, 77, 32, generator=g),
            (torch.rand(2, 3, 64, 64, generator=g) > 0.9).float())


def _build(name, tiny_base, **kw):
    from training.models import build_method, load_base

    torch.manual_seed(0)
    base = load_base(tiny_base)
    method = build_method(name, base, **kw)
    method.set_phase("locked")
    return base, method


def _trainable(method) -> set[str]:
    return {n for n, p in method.named_parameters() if p.requires_grad}


def test_zero_and_gaussian_connections(tiny_base):
    _, zero = _build("controlnet", tiny_base)
    _, gauss = _build("controlnet_gaussian", tiny_base)
    conns = [c.weight for c in gauss.connections()]
    names = {n for n, p in gauss.named_parameters() if any(p is w for w in conns)}
    assert len(names) == len(gauss.controlnet.controlnet_down_blocks) + 2
    zero_params = dict(zero.named_parameters())
    for n, p in gauss.named_parameters():
        if n in names:
            assert zero_params[n].abs().sum() == 0  # ControlNet: zero convolutions
            std = 1.0 / np.sqrt(p[0].numel())
            assert 0.7 * std < float(p.detach().std()) < 1.3 * std  # variance-preserving Gaussian
        elif n.startswith("controlnet.") and not n.endswith("bias"):
            assert torch.equal(p, zero_params[n]), n  # the same copy of the UNet encoder otherwise
    assert _trainable(gauss) == _trainable(zero) == {n for n in zero_params if n.startswith("controlnet.")}
    _, fixed = _build("controlnet_gaussian", tiny_base, connection_init_std=0.05)
    assert abs(float(fixed.controlnet.controlnet_mid_block.weight.std()) - 0.05) < 0.01
    # Zero connections leave the base unchanged; Gaussian ones do not.
    x, t, text, cond = _inputs()
    with torch.no_grad():
        plain = zero.unet(x, t, encoder_hidden_states=text).sample
        assert torch.equal(zero(x, t, text, cond), plain)
        assert not torch.allclose(gauss(x, t, text, cond), plain, atol=1e-3)


def test_concat_channels(tiny_base):
    from training.models import load_base

    ref = load_base(tiny_base).unet
    base, concat = _build("concat", tiny_base)
    w = concat.unet.conv_in.weight
    assert w.shape == (ref.conv_in.out_channels, 4 + 3 * 8 * 8, 3, 3)
    assert torch.equal(w[:, :4], ref.conv_in.weight) and w[:, 4:].abs().sum() == 0
    assert concat.unet.config.in_channels == 4 + 192
    assert _trainable(concat) == {n for n, _ in concat.named_parameters() if n.startswith("unet.")}
    assert not concat.can_unlock
    x, t, text, cond = _inputs()
    with torch.no_grad():
        assert torch.allclose(concat(x, t, text, cond), ref(x, t, encoder_hidden_states=text).sample, atol=1e-5)
    # The condition reaches the UNet once the new channels have weights.
    with torch.no_grad():
        concat.unet.conv_in.weight[:, 4:].normal_(0, 0.1)
        assert not torch.allclose(concat(x, t, text, cond), concat(x, t, text, torch.zeros_like(cond)))


def test_lite_and_adapter(tiny_base, tmp_path):
    from training.methods import load_lite_encoder

    _, cn = _build("controlnet", tiny_base)
    cn_params = sum(p.numel() for p in cn.parameters() if p.requires_grad)
    x, t, text, cond = _inputs()
    for name, prefixes in (("controlnet_lite", ("control.",)), ("xattn_adapter", ("encoder.", "adapters."))):
        _, m = _build(name, tiny_base, lite_channels=16)
        trainable = _trainable(m)
        assert trainable and all(n.startswith(prefixes) for n in trainable)
        assert not any(n.startswith("unet.") for n in trainable)  # the base stays locked
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) < cn_params / 2
        with torch.no_grad():
            plain = m.unet(x, t, encoder_hidden_states=text).sample
            assert torch.allclose(m(x, t, text, cond), plain, atol=1e-6)  # zero-initialised outputs
        m.set_phase("unlocked")
        assert {n.split(".")[1] for n in _trainable(m) - trainable} == {"up_blocks", "conv_norm_out", "conv_out"}
    # One adapter per cross-attention layer of the UNet.
    n_cross = sum(1 for n in m.unet.attn_processors if n.endswith("attn2.processor"))
    assert len(m.adapters) == n_cross > 0
    with torch.no_grad():
        for a in m.adapters.values():
            a.to_out.weight.normal_(0, 0.5)
        assert not torch.allclose(m(x, t, text, cond), m(x, t, text, torch.zeros_like(cond)), atol=1e-5)
    # The lite encoder's export rebuilds.
    _, lite = _build("controlnet_lite", tiny_base, lite_channels=16)
    with torch.no_grad():
        lite.control.mid_conv.weight.normal_()
    paths = lite.export(str(tmp_path))
    back = load_lite_encoder(str(tmp_path))
    d1, m1 = lite.control(cond)
    d2, m2 = back(cond)
    assert torch.equal(m1, m2) and all(torch.equal(a, b) for a, b in zip(d1, d2))
    assert json.load(open(paths["config"]))["method"] == "controlnet_lite"


def test_unet_method_ignores_the_condition(tiny_base):
    _, m = _build("unet", tiny_base)
    assert _trainable(m) == {n for n, _ in m.named_parameters()}
    x, t, text, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(m(x, t, text, cond), m(x, t, text, torch.zeros_like(cond)))


# -- the bench ---------------------------------------------------------------


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory) -> dict:
    """The tiny bench config through the CLI."""
    from controlset.cli import main

    out = str(tmp_path_factory.mktemp("compare") / "out")
    assert main(["compare", "--config", TINY_CONFIG, "--output-dir", out]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return {"out": out, "results": json.load(f)}


def test_compare_report_files(compare_run):
    from PIL import Image

    from training.compare import load_config

    out, res = compare_run["out"], compare_run["results"]
    assert res["partial"] is False
    labels = [m["label"] for m in load_config(TINY_CONFIG)["methods"]]
    assert [m["label"] for m in res["methods"]] == labels
    report = open(os.path.join(out, "report.md")).read()
    for label in labels:
        assert f"| {label} |" in report
    assert "steps to edge F1 >= 0.5" in report and "peak memory" in report
    for key in ("device", "date", "command"):
        assert res[key]
    fig = Image.open(os.path.join(out, "convergence.png"))
    assert fig.size == (1280, 420) and len(np.unique(np.asarray(fig.convert("RGB")).reshape(-1, 3), axis=0)) > 10
    for m in res["methods"]:
        assert os.path.exists(m["grid"]) and Image.open(m["grid"]).size[0] == 3 * 128  # 64 px tiles shown at 2x
        assert [p["step"] for p in m["curve"]] == [0, 2, 4]
        assert all(0 <= p["fidelity"] <= 1 and np.isfinite(p["heldout_loss"]) for p in m["curve"])
        assert m["step_time_ms"] > 0 and m["trainable_params"] > 0
    overview = Image.open(os.path.join(out, "grids", "overview.png"))
    assert overview.size[0] == (3 + len(labels)) * 128
    assert res["references"]["targets"] > 0.9  # the annotator agrees with its own maps on the targets


def test_compare_numbers_are_consistent(compare_run):
    res = compare_run["results"]
    by = {m["label"]: m for m in res["methods"]}
    zero_init = ["ControlNet", "ControlNet unlocked@2", "Input channels", "ControlNet-lite", "Cross-attn adapter"]
    # Zero-initialised methods start as the base model itself: same samples
    # (fixed evaluation noise), hence the base's fidelity, and the same loss.
    for label in zero_init:
        step0 = by[label]["curve"][0]
        assert step0["fidelity"] == res["references"]["base_without_condition"]
        assert step0["heldout_loss"] == pytest.approx(by["ControlNet"]["curve"][0]["heldout_loss"], rel=1e-5)
    assert by["Gaussian connections"]["curve"][0]["heldout_loss"] != pytest.approx(by["ControlNet"]["curve"][0]["heldout_loss"], rel=1e-5)
    # Trainable parameters: the locked phase, and more once the decoder is unlocked.
    assert by["ControlNet-lite"]["trainable_params"] < by["ControlNet"]["trainable_params"]
    assert by["ControlNet unlocked@2"]["trainable_params_start"] == by["ControlNet"]["trainable_params"]
    assert by["ControlNet unlocked@2"]["trainable_params"] > by["ControlNet"]["trainable_params"]
    # Fidelity is also written into the run's metrics.jsonl at evaluation steps.
    with open(os.path.join(by["ControlNet"]["run_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "fidelity" in r] == [0, 2, 4]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_compare_reuses_base_and_is_seeded(compare_run, tmp_path):
    """A second run with the same recipe reuses the pre-trained base and
    reproduces a method's curve exactly."""
    import yaml

    from training.compare import load_config, run_compare

    cfg = load_config(TINY_CONFIG)
    cfg["methods"] = [m for m in cfg["methods"] if m["label"] == "Input channels"]
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = os.path.join(compare_run["out"], "runs", "input-channels")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    # a finished method with the same recipe is reused, not retrained
    before = os.stat(metrics).st_mtime_ns
    res = run_compare(load_config(str(path)), output_dir=compare_run["out"])
    assert os.stat(metrics).st_mtime_ns == before
    first = next(m for m in compare_run["results"]["methods"] if m["label"] == "Input channels")
    assert res["methods"][0]["curve"] == first["curve"]
    # without its stamp it trains again, from the reused base, to the same curve
    os.remove(os.path.join(run_dir, "result.json"))
    res = run_compare(load_config(str(path)), output_dir=compare_run["out"])
    assert os.stat(metrics).st_mtime_ns != before
    assert res["pretraining"] == compare_run["results"]["pretraining"]
    again = res["methods"][0]
    assert [p["fidelity"] for p in again["curve"]] == [p["fidelity"] for p in first["curve"]]
    assert [p["heldout_loss"] for p in again["curve"]] == pytest.approx([p["heldout_loss"] for p in first["curve"]], rel=1e-6)


def test_compare_methods_in_parallel_workers(compare_run, tmp_path):
    """Methods trained in separate worker processes (here two at once on the
    CPU, as ``methods_per_gpu: 2`` does on one GPU) give the same rows as the
    sequential run."""
    from training.compare import load_config, make_job, run_parallel

    cfg = load_config(TINY_CONFIG)
    first = compare_run["results"]
    entries = [m for m in cfg["methods"] if m["label"] in ("Input channels", "ControlNet-lite")]
    job = make_job(cfg, os.path.join(compare_run["out"], "base", "pretrained"), first["pretraining"],
                   _shards(compare_run["out"]), str(tmp_path / "par"))
    rows: dict[int, dict] = {}
    run_parallel(entries, job, 1, lambda i, r: rows.__setitem__(i, r), per_gpu=2)
    assert sorted(rows) == [0, 1]
    for i, entry in enumerate(entries):
        seq = next(m for m in first["methods"] if m["label"] == entry["label"])
        par = rows[i]
        assert par["label"] == entry["label"] and len(par["_images"]) > 0 and par["shared_gpu_with"] == 1
        assert [p["step"] for p in par["curve"]] == [p["step"] for p in seq["curve"]]
        assert [p["heldout_loss"] for p in par["curve"]] == pytest.approx([p["heldout_loss"] for p in seq["curve"]], rel=1e-4)
        assert os.path.exists(os.path.join(job["out"], "runs", par["run_dir"].split(os.sep)[-1], "result.json"))


def _shards(out: str) -> dict:
    import glob

    return {split: sorted(glob.glob(os.path.join(out, "data", f"{split}-*.tar"))) for split in ("train", "val")}


def test_config_errors_and_unlock_rules(compare_run, tmp_path):
    from controlset.cli import main

    from training.compare import check_config

    with pytest.raises(UsageError, match="unknown method"):
        check_config({"task": {"n_train": 2}, "methods": [{"method": "nope"}]})
    with pytest.raises(UsageError, match="learning_rat"):
        check_config({"task": {"n_train": 2}, "methods": [{"method": "concat", "learning_rat": 1}]})
    with pytest.raises(UsageError, match="duplicate"):
        check_config({"task": {}, "methods": [{"method": "concat"}, {"method": "concat"}]})
    out = compare_run["out"]
    base = os.path.join(out, "base", "pretrained")
    common = ["train", "--base", base, "--shards", os.path.join(out, "data", "train-000000.tar"), "--resolution", "64",
              "--max-train-steps", "1", "--dataloader-num-workers", "0", "--report-to", "none", "--no-export"]
    assert main(common + ["--method", "concat", "--unlock-at", "1", "--output-dir", str(tmp_path / "a")]) == 2
    assert main(common + ["--method", "controlnet_lite", "--controlnet", base, "--output-dir", str(tmp_path / "b")]) == 2
    # Every method trains through the ordinary trainer command line.
    assert main(common + ["--method", "xattn_adapter", "--lite-channels", "16", "--train-batch-size", "2",
                          "--output-dir", str(tmp_path / "c")]) == 0
    assert json.loads(open(tmp_path / "c" / "metrics.jsonl").readline())["step"] == 1


def test_workers_see_the_parents_gpus():
    from training.compare import visible_device

    assert visible_device(0, None) == "0" and visible_device(1, "") == "1"
    assert visible_device(0, "2,3") == "2" and visible_device(1, "2, 3") == "3"
    assert visible_device(1, "GPU-aaaa,GPU-bbbb") == "GPU-bbbb"
