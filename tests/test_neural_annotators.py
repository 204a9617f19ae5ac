"""HED, M-LSD and OpenPose: faithful to controlnet-aux with the same (seeded
random) weights, batch-invariant, and clear about missing weights."""

from __future__ import annotations

import colorsys
import dataclasses
import json
import os
import subprocess
import sys
import types
import warnings

import cv2
import numpy as np
import pytest
import torch
from skimage import data

sys.path.insert(0, os.path.dirname(__file__))
import _neural_fixtures as fx  # noqa: E402

from annotators import MissingWeightsError, create_annotator  # noqa: E402
from annotators import weights as W  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    nets = fx.save_weights(str(folder))
    return str(folder), nets


def _photos() -> list[np.ndarray]:
    """Real photos at sizes controlnet-aux's resize_image leaves unchanged."""
    return [
        cv2.resize(data.astronaut(), (192, 128), interpolation=cv2.INTER_AREA),
        np.ascontiguousarray(data.chelsea()[:256:2, :384:2]),
        cv2.resize(data.coffee(), (256, 192), interpolation=cv2.INTER_AREA),
    ]


def _reference(name: str, folder: str, nets: dict):
    if name == "hed":
        from controlnet_aux.hed import HEDdetector

        return HEDdetector(nets["ControlNetHED.pth"])
    if name == "mlsd":
        from controlnet_aux.mlsd import MLSDdetector

        return MLSDdetector(nets["mlsd_large_512_fp32.pth"])
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.face import Face
    from controlnet_aux.open_pose.hand import Hand

    return OpenposeDetector(
        Body(os.path.join(folder, "body_pose_model.pth")),
        Hand(os.path.join(folder, "hand_pose_model.pth")),
        Face(os.path.join(folder, "facenet.pth")),
    )


def _ref_call(det, image, **kw):
    side = min(image.shape[:2])
    out = det(image, detect_resolution=side, image_resolution=side, output_type="np", **kw)
    assert out.shape[:2] == image.shape[:2]
    return out


def _pixel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels that differ in any channel."""
    a = a if a.ndim == 3 else a[..., None]
    b = b if b.ndim == 3 else b[..., None]
    return float(np.any(a != b, axis=-1).mean())


# --------------------------------------------------------------------------
# Faithful outputs, parametrised over the three annotators.


def _patch_forward(monkeypatch, module: str, cls_name: str, forward) -> None:
    """Replace a controlnet-aux network's forward in both copies of its
    class: controlnet_aux's own (the reference detectors) and the private
    import our annotators build their networks from (annotators._aux)."""
    import importlib

    from annotators._aux import aux_module

    for m in (importlib.import_module(f"controlnet_aux.{module}"), aux_module(module)):
        monkeypatch.setattr(getattr(m, cls_name), "forward", forward)


@pytest.mark.parametrize("name", ["hed", "mlsd", "openpose"])
def test_matches_controlnet_aux_with_same_weights(name, weights_dir, monkeypatch):
    folder, nets = weights_dir
    ref = _reference(name, folder, nets)
    ours = create_annotator(name, weights=folder, device="cpu", precision="fp32")
    # the real body network is slow on two CPU cores: two photos suffice there
    for image in _photos()[: 2 if name == "openpose" else 3]:
        got = ours(image) if name != "openpose" else None
        if name == "hed":
            want = _ref_call(ref, image)[..., 0]
            hed = got.members["hed.png"]
            assert hed.shape == image.shape[:2] and hed.dtype == np.uint8
            assert want.std() > 20, "weights should give a map with contrast"
            assert np.abs(hed.astype(int) - want.astype(int)).mean() <= 2.0
        elif name == "mlsd":
            want = _ref_call(ref, image, thr_v=0.1, thr_d=0.1)[..., 0]
            assert (want > 0).mean() > 0.005, "reference should decode real lines"
            assert got.meta["lines"] > 0
            assert _pixel_diff(got.members["mlsd.png"], want) <= 0.01
        else:
            # Random body weights: the raw maps are noise, but the network
            # input (BGR, INTER_AREA to scale 0.5 of 368, padding) must match.
            from controlnet_aux.open_pose.model import bodypose_model

            from annotators._aux import aux_module

            seen = []
            # ours builds the network from its own import of the same file
            classes = (bodypose_model, aux_module("open_pose.model").bodypose_model)
            for cls in classes:
                def spy(self, x, real=cls.forward):
                    seen.append(x.detach().float().clone())
                    return real(self, x)

                monkeypatch.setattr(cls, "forward", spy)
            want = _ref_call(ref, image)
            got = ours(image)
            monkeypatch.undo()
            assert len(seen) == 2 and seen[0].shape == seen[1].shape
            step = (seen[0] - seen[1]).abs() * 256
            assert step.max() <= 1.0 + 1e-4 and (step > 0.5).float().mean() < 0.01
            assert got.members["openpose.png"].shape == image.shape
            assert _pixel_diff(got.members["openpose.png"], want) <= 0.01


def test_hed_safe_and_scribble_match(weights_dir):
    folder, nets = weights_dir
    ref = _reference("hed", folder, nets)
    ours = create_annotator("hed", weights=folder, device="cpu", safe=True, scribble=True)
    assert ours.members == ("hed.png", "scribble.png")
    image = _photos()[1]
    got = ours(image)
    want = _ref_call(ref, image, safe=True)[..., 0]
    assert set(np.unique(got.members["hed.png"])) <= {0, 127, 255}
    assert np.abs(got.members["hed.png"].astype(int) - want).mean() <= 2.0
    scribble = _ref_call(ref, image, safe=True, scribble=True)[..., 0]
    assert 0.01 < (scribble > 0).mean() < 0.99
    assert _pixel_diff(got.members["scribble.png"], scribble) <= 0.01


def _skeleton_images():
    base = cv2.resize(data.astronaut(), (256, 192), interpolation=cv2.INTER_AREA)
    return [(scene, fx.mark(base, scene)) for scene in fx.SCENES]


def _keypoints_px(pose, w, h) -> np.ndarray:
    return np.array([[k.x * w, k.y * h] if k is not None else [np.nan, np.nan] for k in pose.body.keypoints])


@pytest.mark.parametrize("scene", sorted(fx.SCENES))
def test_openpose_detections_match_on_synthetic_skeletons(scene, weights_dir, monkeypatch):
    """Network output replaced on both sides by heatmaps/PAFs of known
    skeletons: peaks, limb association and drawing are compared on real
    detections (one person, several, partly occluded)."""
    folder, nets = weights_dir
    image = dict(_skeleton_images())[scene]
    h, w = image.shape[:2]
    _patch_forward(monkeypatch, "open_pose.model", "bodypose_model", fx.synthetic_body_forward(h, w))
    ref = _reference("openpose", folder, nets)
    ours = create_annotator("openpose", weights=folder, device="cpu")

    want_map = _ref_call(ref, image)
    want = ref.detect_poses(image)
    got = ours(image)

    truth = fx.SCENES[scene]
    assert len(want) == len(truth), "the synthetic scene should be detected in full"
    assert got.meta["people"] == len(want)
    visible = sum(int((~np.isnan(p[:, 0])).sum()) for p in truth)
    assert got.meta["keypoints"] == visible
    assert _pixel_diff(got.members["openpose.png"], want_map) <= 0.01
    assert (want_map.sum(-1) > 0).mean() > 0.01

    doc = got.members["openpose.json"]
    json.dumps(doc)
    assert doc["canvas_width"] == w and doc["canvas_height"] == h
    ours_kp = [np.array(p["pose_keypoints_2d"]).reshape(18, 3) for p in doc["people"]]
    for pose, mine in zip(want, ours_kp):
        ref_kp = _keypoints_px(pose, w, h)
        present = ~np.isnan(ref_kp[:, 0])
        np.testing.assert_array_equal(present, mine[:, 2] > 0)
        assert np.abs(ref_kp[present] - mine[present, :2]).max() <= 2.0
    # and the detections are where the skeletons were drawn (within a few px)
    for mine in ours_kp:
        dists = [np.nanmax(np.abs(t * [w, h] - mine[:, :2])[mine[:, 2] > 0]) for t in truth]
        assert min(dists) < 8.0


def test_openpose_hands_and_face_match(weights_dir, monkeypatch):
    """Hands and face on the one-person scene, every network replaced by
    synthetic maps on both sides (the real ones at 736 px are too slow here)."""
    if "matplotlib" not in sys.modules:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            # controlnet-aux imports matplotlib only for hsv_to_rgb when drawing hands
            shim = types.ModuleType("matplotlib")
            shim.colors = types.SimpleNamespace(hsv_to_rgb=lambda hsv: np.array(colorsys.hsv_to_rgb(*hsv)))
            monkeypatch.setitem(sys.modules, "matplotlib", shim)
    folder, nets = weights_dir
    image = dict(_skeleton_images())[40]
    h, w = image.shape[:2]
    _patch_forward(monkeypatch, "open_pose.model", "bodypose_model", fx.synthetic_body_forward(h, w))
    _patch_forward(monkeypatch, "open_pose.model", "handpose_model", fx.synthetic_hand_forward)
    _patch_forward(monkeypatch, "open_pose.face", "FaceNet", fx.synthetic_face_forward)
    ref = _reference("openpose", folder, nets)
    ours = create_annotator("openpose", weights=folder, device="cpu", hands=True, face=True)

    want_map = _ref_call(ref, image, include_hand=True, include_face=True)
    want = ref.detect_poses(image, include_hand=True, include_face=True)
    got = ours(image)
    assert len(want) == 1 and want[0].left_hand and want[0].right_hand and want[0].face
    assert _pixel_diff(got.members["openpose.png"], want_map) <= 0.01
    person = got.members["openpose.json"]["people"][0]
    for side, ref_hand in (("left", want[0].left_hand), ("right", want[0].right_hand)):
        mine = np.array(person[f"hand_{side}_keypoints_2d"]).reshape(21, 3)
        ref_px = np.array([[k.x * w, k.y * h] for k in ref_hand])
        found = ref_px[:, 0] >= 0
        np.testing.assert_array_equal(found, mine[:, 2] > 0)
        assert np.abs(ref_px[found] - mine[found, :2]).max() <= 2.0
    face = np.array(person["face_keypoints_2d"]).reshape(70, 3)
    assert got.meta["face_keypoints"] == int((face[:, 2] > 0).sum()) > 50
    assert got.meta["hand_keypoints"] > 30


# --------------------------------------------------------------------------
# Batching.


@pytest.mark.parametrize("name", ["hed", "mlsd", "openpose"])
def test_batch_equals_one_at_a_time(name, weights_dir, monkeypatch):
    folder, _ = weights_dir
    if name == "openpose":
        _patch_forward(monkeypatch, "open_pose.model", "bodypose_model", fx.synthetic_body_forward(192, 256))
        images = [im for _, im in _skeleton_images()] + [_photos()[0]]
    else:
        images = _photos() + [_photos()[1][::-1].copy()]  # two sizes, mixed order
    opts = {"scribble": True} if name == "hed" else {}
    ann = create_annotator(name, weights=folder, device="cpu", **opts)
    batch = ann.annotate_batch(images, ["k"] * len(images))
    assert len(batch) == len(images)
    for image, got in zip(images, batch):
        one = ann(image)
        assert got.meta == one.meta
        for member, value in one.members.items():
            if isinstance(value, np.ndarray):
                assert value.shape[:2] == image.shape[:2]
                np.testing.assert_array_equal(got.members[member], value)
            else:
                assert got.members[member] == value
    if name == "openpose":
        assert [b.meta["people"] for b in batch] == [len(fx.SCENES[s]) for s in fx.SCENES] + [0]


def test_chunked_pipeline_equals_unchunked(weights_dir):
    """HED's pipelined path (chunks of 2 and 3, with chunks still in flight
    while earlier ones are finished) gives exactly the outputs of one chunk."""
    folder, _ = weights_dir
    images = _photos() + [_photos()[1][::-1].copy(), _photos()[0][:, ::-1].copy()]
    whole = create_annotator("hed", weights=folder, device="cpu", chunk_size=len(images), scribble=True)
    want = whole.annotate_batch(images)
    for chunk in (2, 3):
        ann = create_annotator("hed", weights=folder, device="cpu", chunk_size=chunk, scribble=True)
        got = ann.annotate_batch(images)
        assert len(got) == len(images)
        for g, w_ in zip(got, want):
            assert g.meta == w_.meta
            assert g.members.keys() == w_.members.keys()
            for member, value in w_.members.items():
                np.testing.assert_array_equal(g.members[member], value)


def test_other_detect_resolution_keeps_the_sample_size(weights_dir):
    folder, _ = weights_dir
    image = np.ascontiguousarray(data.chelsea()[:150:, :200])
    for name in ("hed", "mlsd", "openpose"):
        got = create_annotator(name, weights=folder, device="cpu", detect_resolution=128)(image)
        png = got.members[f"{name}.png"]
        assert png.shape[:2] == image.shape[:2] and png.dtype == np.uint8


def test_openpose_without_people_shares_one_read_only_black_canvas(weights_dir):
    folder, _ = weights_dir
    op = create_annotator("openpose", weights=folder, device="cpu")
    coffee, cat = (np.ascontiguousarray(im[:96, :128]) for im in (data.coffee(), data.chelsea()))
    a, b = op.annotate_batch([coffee, cat])
    assert a.meta["people"] == b.meta["people"] == 0  # random weights find nobody
    canvas = a.members["openpose.png"]
    assert canvas is b.members["openpose.png"]
    assert canvas.shape == (96, 128, 3) and not canvas.any()
    with pytest.raises(ValueError):
        canvas[0, 0] = 255  # nobody can draw into the shared canvas
    other = op.annotate_batch([np.ascontiguousarray(data.coffee()[:64, :64])])[0].members["openpose.png"]
    assert other.shape == (64, 64, 3) and not other.any()


# --------------------------------------------------------------------------
# Weights and the registry.


@pytest.mark.parametrize(
    "name,opts,missing",
    [
        ("hed", {}, "ControlNetHED.pth"),
        ("mlsd", {}, "mlsd_large_512_fp32.pth"),
        ("openpose", {}, "body_pose_model.pth"),
        ("openpose", {"hands": True, "face": True}, "hand_pose_model.pth, facenet.pth"),
    ],
)
def test_missing_weights_name_file_and_place(name, opts, missing, tmp_path, weights_dir, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    folder, _ = weights_dir
    if name == "openpose" and opts:
        # body present, hand and face missing: both named at once
        import shutil

        shutil.copy(os.path.join(folder, "body_pose_model.pth"), empty / "body_pose_model.pth")
    ann = create_annotator(name, weights=str(empty), device="cpu", **opts)
    with pytest.raises(MissingWeightsError) as err:
        ann.setup()
    msg = str(err.value)
    assert missing in msg and str(empty) in msg and "controlset weights fetch" in msg
    assert "\n" not in msg
    # without a folder: the Hugging Face cache is searched (here an empty one)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError) as err:
        create_annotator(name, device="cpu").setup()
    assert "Hugging Face cache" in str(err.value) and W.REPO_ID in str(err.value)


def test_hf_cache_is_used_and_checked(tmp_path, weights_dir, monkeypatch):
    """A file in the hub cache layout is found without --weights, and checked
    against the content hash it is stored under."""
    folder, _ = weights_dir
    src = os.path.join(folder, "mlsd_large_512_fp32.pth")
    repo = tmp_path / "hub" / "models--lllyasviel--Annotators"
    digest = W.sha256_of(src)
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    blob = repo / "blobs" / digest
    blob.write_bytes(open(src, "rb").read())
    (snap / "mlsd_large_512_fp32.pth").symlink_to(blob)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    ann = create_annotator("mlsd", device="cpu")
    ann.setup()
    assert ann(_photos()[0]).members["mlsd.png"].shape == (128, 192)
    # a corrupted blob fails the check
    W._VERIFIED.clear()
    data_ = bytearray(blob.read_bytes())
    data_[-1] ^= 1
    blob.write_bytes(bytes(data_))
    with pytest.raises(W.WeightsChecksumError):
        create_annotator("mlsd", device="cpu").setup()


def test_state_dicts_load_safely(tmp_path):
    t = {"a": torch.arange(3.0)}
    torch.save(t, tmp_path / "x.pth")
    assert torch.equal(W.load_state_dict(tmp_path / "x.pth")["a"], t["a"])
    from safetensors.torch import save_file

    save_file(t, str(tmp_path / "x.safetensors"))
    assert torch.equal(W.load_state_dict(tmp_path / "x.safetensors")["a"], t["a"])
    torch.save({"a": types.SimpleNamespace(evil=1)}, tmp_path / "bad.pth")
    with pytest.raises(Exception):
        W.load_state_dict(tmp_path / "bad.pth")  # weights_only refuses arbitrary objects


def test_registry_level_behaviour():
    ann = create_annotator("openpose", hands=True, weights="/w", precision="bf16")
    assert ann.members == ("openpose.png", "openpose.json") and ann.uses_gpu
    assert ann.params["hands"] is True and ann.params["weights"] == "/w"
    json.dumps(ann.describe())
    assert create_annotator("mlsd").params["thr_v"] == 0.1 == create_annotator("mlsd").params["thr_d"]
    assert create_annotator("hed").members == ("hed.png",)
    with pytest.raises(TypeError, match="valid options"):
        create_annotator("hed", scrible=True)
    with pytest.raises(ValueError):
        create_annotator("mlsd", precision="fp64")
    # listing/creating annotators does not import torch or controlnet_aux
    code = (
        "import sys, annotators; annotators.create_annotator('openpose'); "
        "print(any(m in sys.modules for m in ('torch', 'controlnet_aux')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_weights_cli(tmp_path, weights_dir):
    folder, _ = weights_dir
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "controlset", "weights", *a], capture_output=True, text=True, env=env
    )
    out = run("list", "--weights", folder)
    assert out.returncode == 0
    assert os.path.join(folder, "ControlNetHED.pth") in out.stdout
    out = run("list")
    assert out.returncode == 0 and out.stdout.count("MISSING") == 5
    out = run("fetch", "hed")
    assert out.returncode == 2 and "HF_HUB_OFFLINE" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = run("fetch", "nonsense")
    assert out.returncode == 2 and "valid" in out.stderr


# --------------------------------------------------------------------------
# OpenPose association on crowded maps, and its fixed-size device outputs.


def _crowded_maps(geo, seed: int):
    """Sparse random heatmaps (~50 peaks per part) and random part-affinity
    fields: ~47000 candidate limbs, several hundred passing, dozens of
    people assembled, merged and dropped (and more peaks than the device
    outputs have room for at first)."""
    g = torch.Generator().manual_seed(seed)
    heat = ((torch.rand((1, 19, geo.oh, geo.ow), generator=g) - 0.9).clamp(min=0) * 8).float()
    paf = ((torch.rand((1, 38, geo.oh, geo.ow), generator=g) * 2 - 1) * 1.5).float()
    return paf, heat


@pytest.mark.parametrize("seed", [0, 1])
def test_openpose_association_matches_reference_on_crowded_maps(seed, weights_dir, monkeypatch):
    """controlnet-aux's own peak search, limb scoring, matching and person
    assembly against ours on crowded maps. Both sides get the same network
    maps; the reference's OpenCV float32 resampling of those maps is replaced
    by the same linear maps in float64 (``resize_matrix``), so that borderline
    float32 roundings cannot hide or fake a difference in the association."""
    from controlnet_aux.open_pose import body as ref_body
    from controlnet_aux.open_pose import util as ref_util

    from annotators import openpose as OP

    folder, _ = weights_dir
    h, w = 128, 192
    geo = OP.BodyGeometry(h, w)
    paf, heat = _crowded_maps(geo, seed)
    _patch_forward(monkeypatch, "open_pose.model", "bodypose_model",
                   lambda self, x: (paf.to(x.dtype), heat.to(x.dtype)))

    def exact(original, size_of):
        def resize(x, *args, **kw):
            if x.ndim != 3 or x.shape[2] not in (19, 38):
                return original(x, *args, **kw)  # the image itself
            ho, wo = x.shape[:2]
            ht, wt = size_of(ho, wo, *args, **kw)
            interp = OP.smart_interp((ho, wo), (ht, wt))
            my, mx = OP.resize_matrix(ho, int(ht), interp), OP.resize_matrix(wo, int(wt), interp)
            return np.einsum("yi,ijc,xj->yxc", my, x.astype(np.float64), mx, optimize=True)

        return resize

    monkeypatch.setattr(ref_util, "smart_resize_k", exact(ref_util.smart_resize_k, lambda ho, wo, fx, fy: (ho * fy, wo * fx)))
    monkeypatch.setattr(ref_util, "smart_resize", exact(ref_util.smart_resize, lambda ho, wo, s: s))
    image = _photos()[0]
    assert image.shape[:2] == (h, w)
    candidate, subset = ref_body.Body(os.path.join(folder, "body_pose_model.pth"))(image)
    assert len(candidate) > 18 * 30 and len(subset) >= 20, "the maps should be crowded"

    ours = create_annotator("openpose", weights=folder, device="cpu")
    doc = ours(image).members["openpose.json"]
    assert len(doc["people"]) == len(subset)
    for row, person in zip(subset, doc["people"]):
        kp = np.array(person["pose_keypoints_2d"]).reshape(18, 3)
        for part in range(18):
            if row[part] < 0:
                assert kp[part, 2] == 0
            else:
                x, y, score = candidate[int(row[part])][:3]
                assert (kp[part, 0], kp[part, 1]) == (x, y)
                assert abs(kp[part, 2] - round(score, 4)) <= 1e-4


@pytest.mark.parametrize("name", ["mlsd", "openpose"])
def test_chunks_do_not_change_outputs(name, weights_dir, monkeypatch):
    """Pipeline chunks of 1 and 2 images give the same outputs as one chunk
    (OpenPose on skeleton maps, so chunks hold people and empty images)."""
    folder, _ = weights_dir
    if name == "openpose":
        _patch_forward(monkeypatch, "open_pose.model", "bodypose_model", fx.synthetic_body_forward(192, 256))
        images = [im for _, im in _skeleton_images()] + [_photos()[0]]
    else:
        images = _photos() + [_photos()[0][:, ::-1].copy()]
    want = create_annotator(name, weights=folder, device="cpu", chunk_size=len(images)).annotate_batch(images)
    if name == "openpose":
        assert sum(w_.meta["people"] for w_ in want) > 0
    for chunk in (1, 2):
        got = create_annotator(name, weights=folder, device="cpu", chunk_size=chunk).annotate_batch(images)
        for g, w_ in zip(got, want):
            assert g.meta == w_.meta
            for member, value in w_.members.items():
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(g.members[member], value)
                else:
                    assert g.members[member] == value


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_openpose_peak_bound_skips_only_parts_without_peaks(seed):
    """The cheap per-part bound never hides a peak: the pruned search finds
    exactly the peaks of a full-resolution search of every part map, on maps
    scaled so that many parts sit just below or just above the threshold."""
    import torch.nn.functional as F

    from annotators import openpose as OP

    geo = OP.BodyGeometry(96, 128)
    g = torch.Generator().manual_seed(seed)
    heat = torch.rand((3, 19, geo.oh, geo.ow), generator=g)
    scale = 0.06 + 0.1 * torch.rand((3, 19, 1, 1), generator=g)  # maxima around the 0.1 threshold
    heat = heat / heat.amax(dim=(-2, -1), keepdim=True) * scale
    x, z, bound = OP.peak_bounds(heat, geo)
    full = torch.as_tensor(geo.blur_y, dtype=torch.float32) @ z  # every part at image resolution
    assert bool((full.abs().amax(dim=(-2, -1)) <= bound).all())
    skipped = int((bound <= OP.PEAK_THRESHOLD).sum())
    assert 0 < skipped < 3 * 18, "the maps should put parts on both sides of the bound"

    p = F.pad(full, (1, 1, 1, 1))
    c = p[..., 1:-1, 1:-1]
    mask = ((c >= p[..., :-2, 1:-1]) & (c >= p[..., 2:, 1:-1]) & (c >= p[..., 1:-1, :-2])
            & (c >= p[..., 1:-1, 2:]) & (c > OP.PEAK_THRESHOLD))
    want = mask.nonzero().numpy()
    got = OP.find_peaks(heat, geo)
    assert len(want) > 0
    np.testing.assert_array_equal(got[:, :4].astype(np.int64), want)


def test_sparse_neighbour_test_equals_the_dense_peak_test():
    """The four-neighbour test at above-threshold pixels finds exactly the
    pixels of the dense test over zero-padded maps, in the same order, with
    plateaus (ties) and peaks on every border."""
    import torch.nn.functional as F

    from annotators.openpose import PEAK_THRESHOLD, _at_least_neighbours

    g = torch.Generator().manual_seed(3)
    b = torch.rand(5, 23, 31, generator=g) * 0.3
    b[0, 0, :] = 0.5  # a plateau along the top border
    b[1, :, -1] = 0.4  # and down the right one
    b[2, 10:12, 10:12] = 0.9  # a 2x2 plateau inside
    b[3, -1, 0] = 0.8  # a corner
    b = (b * 64).round() / 64  # more ties
    p = F.pad(b, (1, 1, 1, 1))
    c = p[..., 1:-1, 1:-1]
    dense = ((c >= p[..., :-2, 1:-1]) & (c >= p[..., 2:, 1:-1]) & (c >= p[..., 1:-1, :-2])
             & (c >= p[..., 1:-1, 2:]) & (c > PEAK_THRESHOLD)).nonzero()
    ch, y, x = (b > PEAK_THRESHOLD).nonzero().unbind(1)
    keep = _at_least_neighbours(b, ch, y, x)
    sparse = torch.stack([ch[keep], y[keep], x[keep]], 1)
    assert len(dense) > 20
    assert torch.equal(sparse, dense)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["hed", "mlsd", "openpose"])
def test_cuda_graphs_match_eager_on_gpu(name, weights_dir):
    """On a GPU the networks replay CUDA graphs by default: outputs as the
    eager forward's, also for a batch padded up to a graph's size."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    folder, _ = weights_dir
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions differ by batch size
    try:
        eager = create_annotator(name, weights=folder, device="cuda", precision="fp32", cuda_graphs=False)
        graphs = create_annotator(name, weights=folder, device="cuda", precision="fp32")
        images = [_photos()[0], _photos()[1], _photos()[0][::-1].copy()]  # 3 images: a graph of 4
        if name == "openpose":
            eager.setup()
            graphs.setup()
            x = torch.rand((3, 3, 96, 128), device="cuda") - 0.5
            for a, b in zip(eager.forward(x), graphs.forward(x)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            # the body stage (pre-processing to peak bounds) as one graph
            dsize = eager.detect_size(*images[0].shape[:2])
            e, g = eager.launch_bodies(images, dsize), graphs.launch_bodies(images, dsize)
            for key in ("paf", "heat", "z"):
                torch.testing.assert_close(g[key], e[key], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(g["bound"].arrays()["bound"], e["bound"].arrays()["bound"],
                                       rtol=1e-4, atol=1e-4)
        want = eager.annotate_batch(images)
        for _ in range(2):  # the second replay overwrites the first's buffers
            got = graphs.annotate_batch(images)
            for g, w_ in zip(got, want):
                assert g.meta == w_.meta
                for member, value in w_.members.items():
                    if isinstance(value, np.ndarray):
                        diff = np.abs(g.members[member].astype(int) - value.astype(int))
                        assert diff.mean() <= 1.0 and (diff > 0).mean() <= 0.01, member
                    else:
                        assert g.members[member] == value
        runs = list(graphs.__dict__.get("_graphed_forwards", {}).values())
        assert runs and all(r.error is None and r.captured >= 1 for r in runs), [r.error for r in runs]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def test_network_modules_import_without_the_whole_controlnet_aux():
    """The networks' files are imported on their own, under a private name,
    without controlnet_aux's package ``__init__`` (which imports every
    detector, timm and skimage among them); concurrent callers get one fully
    imported module; controlnet_aux itself, and its modules, still import as
    always afterwards."""
    code = """
import pickle, sys, threading
from annotators._aux import aux_module
got = []
threads = [threading.Thread(target=lambda: got.append(aux_module("hed").ControlNetHED_Apache2)) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
assert len(got) == 8 and len(set(got)) == 1, got
hed = got[0]
aux_module("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large()
aux_module("open_pose.model").bodypose_model()
aux_module("open_pose.face").FaceNet()
heavy = sorted(m for m in ("timm", "skimage", "controlnet_aux", "controlnet_aux.leres") if m in sys.modules)
assert not heavy, heavy
assert type(pickle.loads(pickle.dumps(hed()))) is hed
import controlnet_aux.open_pose.body, controlnet_aux.open_pose.hand, controlnet_aux.open_pose.face
from controlnet_aux import HEDdetector, MLSDdetector, OpenposeDetector
import controlnet_aux
assert "timm" in sys.modules and controlnet_aux.__version__
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("options", [{}, {"hands": True, "face": True}])
def test_openpose_loads_in_a_fresh_process(weights_dir, options):
    """OpenPose (with hands and face too) sets up in a process that has not
    imported controlnet_aux, through the private import of its networks."""
    folder, _ = weights_dir
    code = f"""
import sys
from annotators import create_annotator
a = create_annotator("openpose", weights={folder!r}, device="cpu", **{options!r})
a.import_code()
a.setup()
assert "controlnet_aux" not in sys.modules
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_networks_are_built_from_their_files_without_random_initialisation(monkeypatch):
    """build_loaded makes the layers on the meta device and hands them the
    file's tensors (no random fill first); a buffer the file lacks falls back
    to a normal build, so nothing is ever left on the meta device."""
    import torch

    from annotators import weights as W

    class Net(torch.nn.Module):
        def __init__(self, extra_buffer: bool = False) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)
            if extra_buffer:  # not in any state dict: only a normal build makes it
                self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    torch.manual_seed(0)
    state = Net().state_dict()
    fills = []
    real_uniform = torch.nn.init.kaiming_uniform_

    def counting_uniform(tensor, *a, **kw):
        fills.append(tensor.device.type)
        return real_uniform(tensor, *a, **kw)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counting_uniform)
    net = W.build_loaded(Net, state)
    assert set(fills) <= {"meta"}  # no random numbers were drawn for real tensors
    for name, tensor in net.state_dict().items():
        assert not tensor.is_meta and torch.equal(tensor, state[name]), name

    fills.clear()
    with_buffer = W.build_loaded(lambda: Net(extra_buffer=True), state)
    assert "cpu" in fills  # the fallback built it normally
    assert torch.equal(with_buffer.scale, torch.full((4,), 2.0))
    assert torch.equal(with_buffer.conv.weight, state["conv.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        W.build_loaded(Net, {k: v for k, v in state.items() if k != "bn.weight"})

    class WithTable(Net):  # a plain tensor attribute, made in __init__ (on meta in a meta build)
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.arange(4.0)

    table_net = W.build_loaded(WithTable, state)
    assert not table_net.table.is_meta and torch.equal(table_net.table, torch.arange(4.0))


def test_device_warmup_runs_on_its_thread_and_reports(caplog):
    """The warm-up runs its operations in every precision asked and calls back
    with the seconds; a device that cannot be used is a logged warning, not
    an error, and nothing is called back."""
    from annotators._torch import start_device_warmup, warm_device

    assert warm_device("cpu", (torch.float32, torch.bfloat16)) > 0
    done: list[float] = []
    thread = start_device_warmup("cpu", (torch.float32,), done=done.append)
    assert thread.name == "controlset-warmup" and thread.daemon
    thread.join(60)
    assert len(done) == 1 and done[0] > 0
    failed: list[float] = []
    with caplog.at_level("WARNING", logger="annotators._torch"):
        start_device_warmup("no-such-device", done=failed.append).join(60)
    assert not failed
    assert any("warming up no-such-device failed" in r.getMessage() for r in caplog.records)


def test_workers_warm_up_only_a_gpu(weights_dir, tmp_path, monkeypatch):
    """A worker warms up the GPU its neural annotators run on (traced as
    ``device_warm``), and nothing when they run on the CPU or none is neural."""
    from pipelines.beam import TRACE_ENV, _start_warmup

    folder, _ = weights_dir
    trace_file = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(trace_file))
    assert _start_warmup(None, [create_annotator("canny")]) is None
    assert _start_warmup(None, [create_annotator("hed", weights=folder, device="cpu")]) is None
    if not torch.cuda.is_available():
        assert not trace_file.exists()
        return
    thread = _start_warmup(None, [create_annotator("hed", weights=folder)])
    thread.join(120)
    events = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert [e["event"] for e in events] == ["device_warm"] and events[0]["seconds"] > 0


@pytest.mark.gpu
def test_device_warmup_on_gpu_leaves_the_callers_stream(weights_dir):
    """On a GPU the warm-up runs on a side stream of its own and waits for it;
    a network run afterwards on the caller's stream is unaffected."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from annotators._torch import warm_device

    before = torch.cuda.current_stream()
    assert warm_device("cuda", (torch.bfloat16, torch.float32)) > 0
    assert torch.cuda.current_stream() == before
    folder, _ = weights_dir
    a = create_annotator("hed", weights=folder, device="cuda")
    b = create_annotator("hed", weights=folder, device="cpu", precision="fp32")
    img = _photos()[0]
    got, want = a(img).members["hed.png"].astype(int), b(img).members["hed.png"].astype(int)
    assert np.abs(got - want).mean() < 3.0


def test_shared_lock_lets_warm_ups_overlap_but_not_a_capture():
    """The capture lock: warm-ups (shared) run side by side; a capture
    (exclusive) runs alone, and once it waits no new warm-up starts."""
    import threading
    import time

    from annotators._torch import SharedLock

    lock = SharedLock()
    inside, peak, log = [0], [0], []
    guard = threading.Lock()

    def warm(i):
        with lock.shared():
            with guard:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.2)
            with guard:
                inside[0] -= 1
                log.append(("warm", i))

    def capture():
        with lock.exclusive():
            with guard:
                log.append(("capture-start", inside[0]))
            time.sleep(0.1)
            log.append(("capture-end", None))

    first = [threading.Thread(target=warm, args=(i,)) for i in range(3)]
    for t in first:
        t.start()
    time.sleep(0.05)
    cap = threading.Thread(target=capture)
    cap.start()
    time.sleep(0.05)
    late = threading.Thread(target=warm, args=(9,))  # arrives while the capture waits
    late.start()
    for t in (*first, cap, late):
        t.join(10)
    assert peak[0] == 3  # the first three overlapped
    order = [e[0] if e[0] != "warm" else f"warm{e[1]}" for e in log]
    start = order.index("capture-start")
    assert log[start][1] == 0  # no warm-up inside the capture
    assert set(order[:start]) == {"warm0", "warm1", "warm2"}
    assert order[start + 1:] == ["capture-end", "warm9"]


def _warm_opts(folder: str, device: str, **kw):
    from pipelines.options import AnnotateOptions

    return AnnotateOptions(inputs=("unused",), output="unused", resolution=64, shard_size=6, **kw,
                           annotators=(("canny", {}), ("hed", {"weights": folder, "device": device}),
                                       ("mlsd", {"weights": folder, "device": device})))


def test_warm_batch_annotates_a_made_up_first_batch_with_the_gpu_annotators(weights_dir, tmp_path, monkeypatch,
                                                                          caplog):
    """The warm-up batch: the first batch's shape (the run's batch size, at
    most a shard; ``resolution`` square), neural annotators only, traced; an
    annotator that fails in it is a warning and is left to its first real
    batch; none starts once a shard wants the models; not for ``--crop
    none``. On the CPU a worker does not run it by itself."""
    import threading

    import pipelines.beam as pb

    folder, _ = weights_dir
    trace_file = tmp_path / "trace.jsonl"
    monkeypatch.setattr(pb, "_TRACE_FAILED", False)
    monkeypatch.setenv(pb.TRACE_ENV, str(trace_file))
    calls = []
    real = pb.run_annotator

    def spy(annotator, images, keys, batch_size=None):
        calls.append((annotator.name, [im.shape for im in images], len(set(keys)), batch_size))
        return real(annotator, images, keys, batch_size)

    monkeypatch.setattr(pb, "run_annotator", spy)
    opts = _warm_opts(folder, "cpu")
    models = pb.LoadedAnnotators(opts, wanted=threading.Event())
    assert calls == []  # the CPU needs no warming up
    assert models.warm_batch(opts) == ["hed", "mlsd"]
    n = min(pb.beam_batch_size(opts), opts.shard_size)
    sizes = pb.annotator_batch_sizes(opts, models.annotators)
    assert sorted(calls) == [(name, [(64, 64, 3)] * n, n, sizes[name]) for name in ("hed", "mlsd")]
    events = [json.loads(line) for line in trace_file.read_text().splitlines()]
    warm = [e for e in events if e["event"] == "warm_batch"]
    assert len(warm) == 1 and warm[0]["images"] == n and warm[0]["seconds"] > 0
    assert sorted(warm[0]["annotators"]) == ["hed", "mlsd"] and warm[0]["skipped"] == []
    assert models.warm_batch(_warm_opts(folder, "cpu", crop="none")) == []
    wanted = threading.Event()
    wanted.set()
    assert models.warm_batch(opts, stop=(wanted,)) == []  # a shard is waiting: nothing starts
    assert len(calls) == 2

    def hed_breaks(annotator, *args, **kwargs):
        if annotator.name == "hed":
            raise RuntimeError("no device")
        return real(annotator, *args, **kwargs)

    monkeypatch.setattr(pb, "run_annotator", hed_breaks)
    with caplog.at_level("WARNING", logger=pb.log.name):
        assert models.warm_batch(opts) == ["mlsd"]
    assert any("warm-up batch of hed failed (RuntimeError: no device)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("gpu_threads", [1, 2])
def test_warm_batch_starts_no_annotator_once_stopped(gpu_threads, weights_dir, monkeypatch):
    """Annotators start their warm-up one by one as GPU threads free up: a
    stop set during the first one leaves the annotators not yet started
    (at most one per other GPU thread may already be running)."""
    import threading

    import pipelines.beam as pb

    folder, _ = weights_dir
    opts = dataclasses.replace(_warm_opts(folder, "cpu"), gpu_threads=gpu_threads, annotators=(
        ("hed", {"weights": folder, "device": "cpu"}), ("mlsd", {"weights": folder, "device": "cpu"}),
        ("openpose", {"weights": folder, "device": "cpu"})))
    models = pb.LoadedAnnotators(opts)
    assert (models.gpu_pool is not None) == (gpu_threads > 1)
    stop = threading.Event()
    started = []
    real = pb.run_annotator

    def first_stops(annotator, *args, **kwargs):
        started.append(annotator.name)
        stop.set()
        return real(annotator, *args, **kwargs)

    monkeypatch.setattr(pb, "run_annotator", first_stops)
    warmed = models.warm_batch(opts, stop=(threading.Event(), stop))
    assert warmed == started and warmed[0] == "hed" and len(warmed) <= gpu_threads
    assert "openpose" not in warmed


def test_warm_batch_runs_only_when_loading_ahead_on_a_gpu(weights_dir, monkeypatch):
    """The constructor runs the warm-up batch only for models loaded ahead
    of the shards (``wanted`` given), with a GPU being warmed up (faked
    here: a finished thread) and ``warm_batch`` on; a teardown's
    :func:`stop_warm_ups` and a cancelled preload stop it."""
    import threading

    import pipelines.beam as pb

    folder, _ = weights_dir
    ran = []
    monkeypatch.setattr(pb.LoadedAnnotators, "warm_batch", lambda self, opts, stop=(): ran.append(stop) or [])

    def fake_gpu_warmup(gpu_index, annotators):
        t = threading.Thread(target=lambda: None)
        t.start()
        return t

    opts = _warm_opts(folder, "cpu")
    pb.LoadedAnnotators(opts, wanted=threading.Event())
    assert ran == []  # no GPU
    monkeypatch.setattr(pb, "_start_warmup", fake_gpu_warmup)
    pb.LoadedAnnotators(opts)
    pb.LoadedAnnotators(dataclasses.replace(opts, warm_batch=False), wanted=threading.Event())
    assert ran == []  # loaded on demand, or turned off
    wanted, cancel = threading.Event(), threading.Event()
    pb.LoadedAnnotators(opts, cancel=cancel, wanted=wanted)
    assert ran == [(wanted, cancel)]
    # a preload's events: a shard taking the models, a teardown and discarding all stop it
    run = dataclasses.replace(opts, run_id="warm-teardown-test")
    pb.preload_annotators(run)
    preload = pb._PRELOADS[pb._preload_key(run)]
    try:
        preload.future.result(120)
        assert not preload.wanted.is_set()
        pb.stop_warm_ups()
        assert preload.wanted.is_set()
    finally:
        pb.discard_preloads(run.run_id)
    assert preload.cancel.is_set() and ran[-1] == (preload.wanted, preload.cancel)


def test_a_shard_taking_preloaded_models_stops_the_warm_up(weights_dir):
    """``loaded_annotators`` tells the preload that a shard is waiting (its
    warm-up batch starts no further annotator) and returns its models."""
    import pipelines.beam as pb

    folder, _ = weights_dir
    opts = dataclasses.replace(_warm_opts(folder, "cpu"), run_id="warm-stop-test")
    pb.preload_annotators(opts)
    preload = pb._PRELOADS[pb._preload_key(opts)]
    assert not preload.wanted.is_set()
    try:
        models = pb.loaded_annotators(opts)
        assert preload.wanted.is_set() and models is preload.future.result()
    finally:
        pb.discard_preloads(opts.run_id)


@pytest.mark.gpu
def test_warm_batch_leaves_the_first_real_batch_only_replays(weights_dir):
    """On a GPU a worker's models come with their graphs captured at the
    first batch's shape: the first real batch captures nothing more, and its
    outputs are those of models that were not warmed up."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import gc
    import threading

    import pipelines.beam as pb
    from annotators._torch import GraphedForward
    from pipelines.stages import Candidate, Decoded
    from pipelines.sources import Location

    def graphs() -> dict[int, GraphedForward]:
        return {id(g): g for g in gc.get_objects() if isinstance(g, GraphedForward)}

    folder, _ = weights_dir
    opts = _warm_opts(folder, "cuda")
    before = graphs()
    warmed = pb.LoadedAnnotators(opts, wanted=threading.Event())  # loading ahead of the shards
    mine = {k: g for k, g in graphs().items() if k not in before}  # the warmed models' forwards
    cold = pb.LoadedAnnotators(_warm_opts(folder, "cuda", warm_batch=False))
    n = min(pb.beam_batch_size(opts), opts.shard_size)
    photo = cv2.resize(data.astronaut(), (64, 64), interpolation=cv2.INTER_AREA)
    batch = [Decoded(Candidate(f"k{i}", "x", Location(""), "", None, 64, 64), np.roll(photo, i, axis=1),
                     (0, 0, 64, 64), 1) for i in range(n)]
    sizes = pb.annotator_batch_sizes(opts, warmed.annotators)
    counts = {k: g.captured for k, g in mine.items()}
    assert len(counts) >= 2 and all(c >= 1 for c in counts.values()), counts  # hed's and mlsd's, while loading
    assert all(g.error is None for g in mine.values())
    got = pb.annotate_decoded(batch, warmed.annotators, sizes, None, warmed.pool, warmed.gpu_pool)
    assert {k: g.captured for k, g in mine.items()} == counts  # the first real batch only replays
    want = pb.annotate_decoded(batch, cold.annotators, sizes, None, cold.pool, cold.gpu_pool)
    for (_, g), (_, w) in zip(got, want):
        for name in ("hed", "mlsd"):
            for member, value in w[name].members.items():
                if isinstance(value, np.ndarray):
                    diff = np.abs(g[name].members[member].astype(int) - value.astype(int))
                    assert diff.mean() <= 1.0, (name, member)
