"""depth, normal, seg and caption annotators on tiny seeded random-weight
models of the real transformers architectures, loaded as local model
folders (never the network), checked against transformers' own per-image
inference and against ControlNet's normal algorithm in controlnet-aux."""

from __future__ import annotations

import contextlib
import json
import math
import os
import functools
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from annotators import MissingWeightsError, create_annotator  # noqa: E402
from annotators import hf_models  # noqa: E402
from annotators.caption import choose_caption  # noqa: E402
from annotators.depth import normalize_depth, normals_from_depth  # noqa: E402
from annotators.seg import ade20k_palette  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _hf_fixtures as fx  # noqa: E402

pytestmark = pytest.mark.timeout(300)

KEYS = ["k0", "k1", "k2"]
CAPTION = dict(num_beams=3, max_new_tokens=10, min_new_tokens=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    torch.manual_seed(0)
    out = {
        "dpt": fx.make_dpt_hybrid(str(root / "dpt")),
        "upernet": fx.make_upernet_convnext(str(root / "upernet")),
        "blip": fx.make_blip(str(root / "blip")),
    }
    yield out
    hf_models.clear_shared()


@pytest.fixture(scope="module")
def images():
    return fx.photos(96)


def _torch_image(image: np.ndarray):
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------ pre-processing


def _processors():
    from transformers import BlipImageProcessor, ConvNextImageProcessor, DPTImageProcessor

    return {
        "dpt": DPTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        "depth-anything-like": DPTImageProcessor(
            size={"height": 70, "width": 70}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3
        ),
        "convnext-warp": ConvNextImageProcessor(size={"shortest_edge": 384}),
        "convnext-crop": ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875),
        "blip": BlipImageProcessor(size={"height": 48, "width": 48}),
    }


@pytest.mark.parametrize("name", list(_processors()))
def test_batch_preprocessor_matches_image_processor(name, images):
    proc = _processors()[name]
    pre = hf_models.BatchPreprocessor(proc)
    for idx, pixels in hf_models.model_batches(images, pre, torch.device("cpu")):
        for j, i in enumerate(idx):
            ref = proc(images=_torch_image(images[i]), return_tensors="pt")["pixel_values"][0]
            assert pixels[j].shape == ref.shape, name
            torch.testing.assert_close(pixels[j], ref, atol=1e-5, rtol=0)


def test_model_batches_groups_by_model_input_size(images):
    pre = hf_models.BatchPreprocessor(_processors()["blip"])
    groups = hf_models.model_batches(images, pre, torch.device("cpu"))
    # every image lands on 48x48, so the mixed-size batch is one forward batch
    assert len(groups) == 1 and sorted(groups[0][0]) == [0, 1, 2]
    pre = hf_models.BatchPreprocessor(_processors()["depth-anything-like"])
    groups = hf_models.model_batches(images, pre, torch.device("cpu"))
    assert sorted(i for idx, _ in groups for i in idx) == [0, 1, 2] and len(groups) == 2


# --------------------------------------------------------------------- depth


@functools.lru_cache(maxsize=None)
def _reference_model(folder: str, model_class: str):
    """transformers' own processor and model for a folder, loaded directly."""
    from transformers import AutoImageProcessor, AutoProcessor

    cls = getattr(transformers, model_class)
    loader = AutoProcessor if model_class.startswith("Blip") else AutoImageProcessor
    return loader.from_pretrained(folder), cls.from_pretrained(folder).eval()


def _reference_depth(folder: str, image: np.ndarray) -> np.ndarray:
    """transformers' own per-image inference + ControlNet's normalisation."""
    proc, model = _reference_model(folder, "AutoModelForDepthEstimation")
    with torch.no_grad():
        outputs = model(**proc(images=image, return_tensors="pt"))
    depth = proc.post_process_depth_estimation(outputs, target_sizes=[image.shape[:2]])[0]["predicted_depth"]
    d = depth.numpy().astype(np.float32)
    d = d - d.min()
    d = d / d.max()
    return (d * 255.0).clip(0, 255).astype(np.uint8)


def _close_maps(a: np.ndarray, b: np.ndarray, max_diff: int = 1, min_equal: float = 0.99) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
    assert diff.max() <= max_diff, diff.max()
    assert (diff == 0).mean() >= min_equal, (diff == 0).mean()


def test_depth_batched_equals_single_and_transformers(models, images):
    depth = create_annotator("depth", model=models["dpt"], device="cpu")
    batch = depth.annotate_batch(images, KEYS)
    assert json.dumps(depth.describe())
    for image, key, ann in zip(images, KEYS, batch):
        m = ann.members["depth.png"]
        assert m.shape == image.shape[:2] and m.dtype == np.uint8
        assert m.min() == 0 and m.max() == 255 and len(np.unique(m)) > 50
        assert ann.meta["depth_max"] > ann.meta["depth_min"]
        single = depth(image, key).members["depth.png"]
        _close_maps(m, single)
        _close_maps(m, _reference_depth(models["dpt"], image))


def test_depth_16_bit(models, images):
    d8 = create_annotator("depth", model=models["dpt"], device="cpu").annotate_batch(images, KEYS)
    d16 = create_annotator("depth", model=models["dpt"], device="cpu", bits=16).annotate_batch(images, KEYS)
    for a, b in zip(d8, d16):
        m16 = b.members["depth.png"]
        assert m16.dtype == np.uint16 and m16.min() == 0 and m16.max() == 65535
        assert len(np.unique(m16)) > len(np.unique(a.members["depth.png"]))
        # same normalised depth at a finer step: truncations agree within one 8-bit level
        assert np.abs(m16.astype(np.int64) // 257 - a.members["depth.png"]).max() <= 1
    with pytest.raises(ValueError, match="bits"):
        create_annotator("depth", bits=12)


def test_normalize_depth_flat_map_is_black():
    flat = torch.full((1, 8, 8), 3.0)
    assert int(normalize_depth(flat).max()) == 0


def _controlnet_aux_normal(depth: np.ndarray, bg_th: float) -> np.ndarray:
    """controlnet-aux's MidasDetector normal map for a given raw depth map:
    its network is replaced by a module returning that depth, so the whole
    post-processing is controlnet-aux's own."""
    from controlnet_aux.midas import MidasDetector

    class FixedDepth(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.d = torch.nn.Parameter(torch.from_numpy(d)[None], requires_grad=False)

        def forward(self, x):
            return self.d

    h, w = depth.shape
    detector = MidasDetector(FixedDepth(depth.astype(np.float32)))
    image = np.zeros((h, w, 3), np.uint8)
    _, normal = detector(
        image, bg_th=bg_th, depth_and_normal=True, detect_resolution=h, image_resolution=h, output_type="np"
    )
    return normal


@pytest.mark.parametrize("bg_th", [0.4, 0.1])
def test_normals_follow_controlnet(models, images, bg_th):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    proc = AutoImageProcessor.from_pretrained(models["dpt"])
    model = AutoModelForDepthEstimation.from_pretrained(models["dpt"]).eval()
    with torch.no_grad():
        raw = model(**proc(images=images[0], return_tensors="pt")).predicted_depth  # 1x64x64
    # at the model's grid, and at a 128 px map (64-multiples keep controlnet-aux from resizing)
    for depth in (raw, torch.nn.functional.interpolate(raw[:, None], size=(128, 128), mode="bicubic")[:, 0]):
        ours = normals_from_depth(depth, a=2 * math.pi, bg_th=bg_th)[0].numpy()
        ref = _controlnet_aux_normal(depth[0].numpy(), bg_th)
        _close_maps(ours, ref, max_diff=1, min_equal=0.995)
        rel = (depth[0] - depth.min()) / (depth.max() - depth.min())
        background = (rel < bg_th).numpy()
        assert 0 < background.mean() < 1
        # flat background faces the camera: reversed channels put z first
        assert (ours[background] == [255, 127, 127]).all()

    # end to end: a 64 px image is annotated at the model's grid, no resize
    normal = create_annotator("normal", model=models["dpt"], device="cpu", bg_th=bg_th)
    small = fx.photos(64)[2]
    with torch.no_grad():
        raw_small = model(**proc(images=small, return_tensors="pt")).predicted_depth
    _close_maps(normal(small, "s").members["normal.png"], _controlnet_aux_normal(raw_small[0].numpy(), bg_th),
                min_equal=0.995)


def test_normal_batched_equals_single(models, images):
    normal = create_annotator("normal", model=models["dpt"], device="cpu")
    batch = normal.annotate_batch(images, KEYS)
    for image, key, ann in zip(images, KEYS, batch):
        m = ann.members["normal.png"]
        assert m.shape == image.shape[:2] + (3,) and m.dtype == np.uint8
        _close_maps(m, normal(image, key).members["normal.png"])


def test_depth_and_normal_share_one_forward(models, images):
    depth = create_annotator("depth", model=models["dpt"], device="cpu")
    normal = create_annotator("normal", model=models["dpt"], device="cpu")
    depth.setup()
    normal.setup()
    assert depth._model is normal._model
    calls = []
    hook = depth._model.net.register_forward_hook(lambda *a: calls.append(1))
    try:
        batch = list(images)
        keys = ["a", "b", "c"]
        d = depth.annotate_batch(batch, keys)
        n_after_depth = len(calls)
        n = normal.annotate_batch(batch, keys)
        # every image is resized to the model's 64x64: one forward for the batch
        assert n_after_depth == 1
    finally:
        hook.remove()
    assert len(calls) == n_after_depth  # normal reused the prediction
    normal.annotate_batch(batch, ["x", "y", "z"])  # other keys: runs again
    assert len(d) == len(n) == 3


# ----------------------------------------------------------------- weights


def test_missing_local_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(MissingWeightsError) as err:
        create_annotator("depth", model=str(missing), device="cpu").setup()
    assert str(missing) in str(err.value) and "\n" not in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(MissingWeightsError) as err:
        create_annotator("seg", model=str(empty), device="cpu").setup()
    assert str(empty) in str(err.value) and "notes.txt" in str(err.value)


def test_missing_repo_offline_names_cache_and_fix(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for name, repo in (("depth", "Intel/dpt-hybrid-midas"), ("seg", "openmmlab/upernet-convnext-small"),
                       ("caption", "Salesforce/blip-image-captioning-large")):
        with pytest.raises(MissingWeightsError) as err:
            create_annotator(name, device="cpu").setup()
        msg = str(err.value)
        assert repo in msg and str(cache) in msg and f"huggingface-cli download {repo}" in msg
        assert "HF_HUB_OFFLINE" in msg and "\n" not in msg
    # an alias resolves to its repo id in the message
    with pytest.raises(MissingWeightsError, match="Intel/dpt-large"):
        create_annotator("depth", model="dpt-large", device="cpu").setup()


def test_repo_id_loads_from_hub_cache_offline(models, images, tmp_path, monkeypatch):
    """A repo id found in the standard cache layout loads with no network."""
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / "models--test-org--tiny-dpt"
    shutil.copytree(models["dpt"], repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    from_cache = create_annotator("depth", model="test-org/tiny-dpt", device="cpu")
    from_folder = create_annotator("depth", model=models["dpt"], device="cpu")
    a = from_cache(images[0], "c").members["depth.png"]
    b = from_folder(images[0], "c").members["depth.png"]
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------- seg


def _reference_seg(folder: str, image: np.ndarray) -> np.ndarray:
    proc, model = _reference_model(folder, "AutoModelForSemanticSegmentation")
    with torch.no_grad():
        logits = model(**proc(images=image, return_tensors="pt")).logits
    # what transformers' post_process_semantic_segmentation does (ConvNeXt's
    # processor has none): bilinear resize to the image, arg-max over classes
    resized = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return resized[0].argmax(0).numpy()


def test_seg_batched_equals_single_and_transformers(models, images):
    seg = create_annotator("seg", model=models["upernet"], device="cpu")
    batch = seg.annotate_batch(images, KEYS)
    palette = ade20k_palette()
    for image, key, ann in zip(images, KEYS, batch):
        ids = ann.members["seg_ids.png"]
        colour = ann.members["seg.png"]
        assert ids.shape == image.shape[:2] and ids.dtype == np.uint8 and ids.max() < 150
        assert colour.shape == image.shape[:2] + (3,) and colour.dtype == np.uint8
        np.testing.assert_array_equal(colour, palette[ids])
        assert len(np.unique(ids)) > 3  # the random model is not degenerate
        single = seg(image, key).members["seg_ids.png"]
        assert (single == ids).mean() >= 0.999
        assert (_reference_seg(models["upernet"], image) == ids).mean() >= 0.99
        # classes present: exactly the ids in the map, largest first, with their areas
        meta = ann.meta
        assert sorted(meta["class_ids"]) == sorted(np.unique(ids).tolist())
        assert meta["classes"] == [f"class{i}" for i in meta["class_ids"]]
        counts = np.bincount(ids.ravel(), minlength=150)
        assert meta["class_fractions"] == sorted(meta["class_fractions"], reverse=True)
        assert meta["class_fractions"][0] == pytest.approx(counts.max() / ids.size, abs=1e-6)
        assert sum(meta["class_fractions"]) == pytest.approx(1.0, abs=1e-4)
    assert json.dumps([a.meta for a in batch])


def test_ade20k_palette_is_controlnets():
    from controlnet_aux.util import ade_palette

    np.testing.assert_array_equal(ade20k_palette(), np.array(ade_palette(), dtype=np.uint8))
    assert ade20k_palette().shape == (150, 3)


def test_seg_refuses_a_cropping_processor(models, tmp_path):
    folder = tmp_path / "cropping"
    shutil.copytree(models["upernet"], folder)
    cfg_path = folder / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["size"] = {"shortest_edge": 128}  # < 384: ConvNeXt resizes then centre-crops
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="crops"):
        create_annotator("seg", model=str(folder), device="cpu").setup()


# ------------------------------------------------------------------ caption


def _reference_caption(folder: str, image: np.ndarray, prefix: str) -> str:
    proc, model = _reference_model(folder, "BlipForConditionalGeneration")
    inputs = proc(images=image, text=prefix or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **CAPTION)
    return proc.decode(out[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("prefix", ["", "a photo of"])
def test_caption_batched_equals_single_and_transformers(models, images, prefix):
    cap = create_annotator("caption", model=models["blip"], device="cpu", prefix=prefix, **CAPTION)
    batch = cap.annotate_batch(images, KEYS)
    texts = [a.members["txt"] for a in batch]
    assert all(isinstance(t, str) and t for t in texts)
    assert len(set(texts)) > 1  # captions depend on the image
    for image, key, ann in zip(images, KEYS, batch):
        assert cap(image, key).members["txt"] == ann.members["txt"]
        assert ann.members["txt"] == _reference_caption(models["blip"], image, prefix)
        if prefix:
            assert ann.members["txt"].startswith(prefix)
        gen = ann.meta["generation"]
        assert gen["num_beams"] == 3 and gen["max_new_tokens"] == 10 and gen["prefix"] == prefix
        assert ann.meta["generated_caption"] == ann.members["txt"]
    assert json.dumps([a.meta for a in batch])


def test_choose_caption_policies():
    text, meta = choose_caption("a red car", "a car on a road", "generated")
    assert text == "a car on a road" and meta["caption_source"] == "generated"
    assert meta["input_caption"] == "a red car" and meta["generated_caption"] == "a car on a road"
    text, meta = choose_caption("  a red car ", "a car on a road", "keep_input")
    assert text == "a red car" and meta["caption_source"] == "input"
    for missing in (None, "", "   "):
        text, meta = choose_caption(missing, "a car", "keep_input")
        assert text == "a car" and meta["caption_source"] == "generated" and meta["input_caption"] is None
    with pytest.raises(ValueError, match="policy"):
        choose_caption("x", "y", "merge")
    cap = create_annotator("caption", policy="keep_input")
    assert cap.choose("given", "made")[0] == "given"
    with pytest.raises(ValueError):
        create_annotator("caption", min_new_tokens=30, max_new_tokens=20)


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_bf16_on_gpu_close_to_fp32(models, images):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    fp32 = create_annotator("depth", model=models["dpt"], device="cuda", precision="fp32")
    bf16 = create_annotator("depth", model=models["dpt"], device="cuda", precision="bf16")
    for a, b in zip(fp32.annotate_batch(images, KEYS), bf16.annotate_batch(images, KEYS)):
        diff = np.abs(a.members["depth.png"].astype(int) - b.members["depth.png"].astype(int))
        assert np.mean(diff <= 8) > 0.95
    seg32 = create_annotator("seg", model=models["upernet"], device="cuda", precision="fp32")
    seg16 = create_annotator("seg", model=models["upernet"], device="cuda", precision="bf16")
    for a, b in zip(seg32.annotate_batch(images, KEYS), seg16.annotate_batch(images, KEYS)):
        assert (a.members["seg_ids.png"] == b.members["seg_ids.png"]).mean() > 0.9
    # fused ViT attention and bf16 weights on the GPU: captions as in fp32 but for near ties
    cap32 = create_annotator("caption", model=models["blip"], device="cuda", precision="fp32", **CAPTION)
    cap16 = create_annotator("caption", model=models["blip"], device="cuda", precision="bf16", **CAPTION)
    t32 = [a.members["txt"] for a in cap32.annotate_batch(images, KEYS)]
    t16 = [a.members["txt"] for a in cap16.annotate_batch(images, KEYS)]
    assert all(t16) and sum(a == b for a, b in zip(t32, t16)) >= 2


@pytest.mark.gpu
def test_fast_upsampling_on_gpu_in_bf16(models, images):
    """On the GPU in bf16 (the defaults), the matrix-product upsampling gives
    the maps of torch's bilinear kernels but for bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from annotators.depth import DepthModel
    from annotators.seg import SegModel

    cuda = torch.device("cuda")
    plain = DepthModel(models["dpt"], cuda, torch.bfloat16, fast_upsampling=False)
    fast = DepthModel(models["dpt"], cuda, torch.bfloat16)
    assert fast.upsamplers >= 1
    for a, b in zip(plain.predict(images, KEYS), fast.predict(images, KEYS)):
        scale = float(a.abs().max()) or 1.0
        assert float((a - b).abs().max()) / scale < 0.02
    plain = SegModel(models["upernet"], cuda, torch.bfloat16, fast_upsampling=False)
    fast = SegModel(models["upernet"], cuda, torch.bfloat16)
    assert fast.fast_upsampling
    pixels = hf_models.model_batches(images, plain.preprocess, cuda, torch.bfloat16)[0][1]
    with torch.inference_mode():
        a, b = plain.forward(pixels), fast.forward(pixels)
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.98


# -------------------------------------------------- reduced precision, layout


def _depth_maps(annotator, images):
    return [a.members["depth.png"].astype(int) for a in annotator.annotate_batch(images, KEYS)]


def test_bf16_weights_close_to_fp32_on_cpu(models, images):
    """bf16 casts the weights (no autocast); the maps stay close to fp32."""
    from annotators.depth import _depth_model

    model = _depth_model(models["dpt"], "cpu", "bf16")
    dtypes = {p.dtype for p in model.net.parameters()}
    assert dtypes == {torch.bfloat16, torch.float32}
    head_convs = [m for m in model.net.head.modules() if isinstance(m, torch.nn.Conv2d)]
    # only the 1-channel output convolution stays fp32, so the depth keeps its fine steps
    assert [c.weight.dtype for c in head_convs][-1] == torch.float32
    assert all(c.weight.dtype == torch.bfloat16 for c in head_convs[:-1])

    fp32 = create_annotator("depth", model=models["dpt"], device="cpu", precision="fp32")
    bf16 = create_annotator("depth", model=models["dpt"], device="cpu", precision="bf16")
    for a, b in zip(_depth_maps(fp32, images), _depth_maps(bf16, images)):
        diff = np.abs(a - b)
        assert diff.max() <= 12 and (diff <= 2).mean() > 0.75
    # the output is not rounded to bf16: the 16-bit map has far more levels than bf16 could give
    d16 = create_annotator("depth", model=models["dpt"], device="cpu", precision="bf16", bits=16)
    assert len(np.unique(d16(images[0], "x").members["depth.png"])) > 2000

    n32 = create_annotator("normal", model=models["dpt"], device="cpu", precision="fp32")
    n16 = create_annotator("normal", model=models["dpt"], device="cpu", precision="bf16")
    for a, b in zip(n32.annotate_batch(images, KEYS), n16.annotate_batch(images, KEYS)):
        diff = np.abs(a.members["normal.png"].astype(int) - b.members["normal.png"].astype(int))
        assert diff.max() <= 16 and (diff <= 4).mean() > 0.99

    s32 = create_annotator("seg", model=models["upernet"], device="cpu", precision="fp32")
    s16 = create_annotator("seg", model=models["upernet"], device="cpu", precision="bf16")
    s16.setup()
    assert {p.dtype for p in s16._model.net.parameters()} == {torch.bfloat16}
    for a, b in zip(s32.annotate_batch(images, KEYS), s16.annotate_batch(images, KEYS)):
        assert (a.members["seg_ids.png"] == b.members["seg_ids.png"]).mean() > 0.97

    c32 = create_annotator("caption", model=models["blip"], device="cpu", precision="fp32", **CAPTION)
    c16 = create_annotator("caption", model=models["blip"], device="cpu", precision="bf16", **CAPTION)
    c16.setup()
    assert {p.dtype for p in c16._model.net.parameters()} == {torch.bfloat16}
    t32 = [a.members["txt"] for a in c32.annotate_batch(images, KEYS)]
    t16 = [a.members["txt"] for a in c16.annotate_batch(images, KEYS)]
    # a beam may flip on a near tie; most captions must agree exactly
    assert sum(a == b for a, b in zip(t32, t16)) >= 2


def test_channels_last_layout_gives_the_same_maps(models, images):
    """The GPU layout (NHWC convolutions), forced on the CPU, changes nothing."""
    from annotators.depth import DepthModel
    from annotators.seg import SegModel

    cpu = torch.device("cpu")
    plain = DepthModel(models["dpt"], cpu, torch.float32, channels_last=False)
    nhwc = DepthModel(models["dpt"], cpu, torch.float32, channels_last=True)
    assert nhwc.net.head.head[0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain.predict(images, KEYS), nhwc.predict(images, KEYS)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    plain = SegModel(models["upernet"], cpu, torch.float32, channels_last=False)
    nhwc = SegModel(models["upernet"], cpu, torch.float32, channels_last=True)
    assert nhwc.net.auxiliary_head is None  # training-only head dropped
    pixels = hf_models.model_batches(images[:1], plain.preprocess, cpu)[0][1]
    with torch.inference_mode():
        torch.testing.assert_close(
            plain.net(pixel_values=pixels).logits,
            nhwc.net(pixel_values=pixels.contiguous(memory_format=torch.channels_last)).logits,
            rtol=1e-4, atol=1e-4,
        )


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape,size,scale", [((12, 12), (24, 24), 2.0), ((7, 9), (13, 20), None),
                                              ((32, 24), (128, 96), None), ((5, 6), (10, 12), 2.0)])
def test_bilinear_resize_equals_interpolate(channels_last, align_corners, shape, size, scale):
    """The matrix-product bilinear resize gives F.interpolate's values, in
    the input's memory layout."""
    import torch.nn.functional as F

    from annotators._torch import bilinear_resize

    x = torch.randn(2, 5, *shape, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if scale is not None:
        ref = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=align_corners)
    else:
        ref = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    out = bilinear_resize(x, size, align_corners, scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_fast_upsampling_gives_the_same_maps(models, images):
    """Depth's head and seg's logits upsampled by matrix products (the GPU
    default), forced on the CPU, give the same predictions."""
    from annotators.depth import DepthModel
    from annotators.seg import SegModel

    cpu = torch.device("cpu")
    plain = DepthModel(models["dpt"], cpu, torch.float32, channels_last=True, fast_upsampling=False)
    fast = DepthModel(models["dpt"], cpu, torch.float32, channels_last=True, fast_upsampling=True)
    assert plain.upsamplers == 0 and fast.upsamplers >= 1
    assert not any(isinstance(m, torch.nn.Upsample) for m in fast.net.modules())
    for a, b in zip(plain.predict(images, KEYS), fast.predict(images, KEYS)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    plain = SegModel(models["upernet"], cpu, torch.float32, fast_upsampling=False)
    fast = SegModel(models["upernet"], cpu, torch.float32, fast_upsampling=True)
    pixels = hf_models.model_batches(images[:2], plain.preprocess, cpu)[0][1]
    with torch.inference_mode():
        a, b = plain.forward(pixels), fast.forward(pixels)
    assert a.shape == b.shape == (2, 150, *pixels.shape[2:])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_fast_upsampling_applies_to_upernet_only(tmp_path, images):
    """Another ADE20K model (SegFormer: a decode head but no backbone, logits
    at a quarter of the input size) keeps its own forward with the fast path
    asked for, and runs."""
    from annotators.seg import SegModel

    cpu = torch.device("cpu")
    folder = fx.make_segformer(str(tmp_path / "segformer"))
    m = SegModel(folder, cpu, torch.float32, fast_upsampling=True)
    assert not m.fast_upsampling
    pixels = hf_models.model_batches(images[:2], m.preprocess, cpu)[0][1]
    with torch.inference_mode():
        logits = m.forward(pixels)
        plain = m.net(pixel_values=pixels).logits
    torch.testing.assert_close(logits, plain)


def test_only_plain_bilinear_upsampling_modules_are_swapped():
    """Modules whose semantics BilinearUpsample does not reproduce stay."""
    from annotators._torch import BilinearUpsample, replace_bilinear_upsampling

    class Custom(torch.nn.Upsample):
        def forward(self, x):
            return super().forward(x) * 2

    hooked = torch.nn.Upsample(scale_factor=2, mode="bilinear")
    hooked.register_forward_hook(lambda m, a, o: o)
    net = torch.nn.Sequential(
        torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),  # swapped
        torch.nn.UpsamplingBilinear2d(scale_factor=2),  # swapped
        torch.nn.Upsample(scale_factor=1.5, mode="bilinear", recompute_scale_factor=True),
        torch.nn.Upsample(scale_factor=2, mode="nearest"),
        Custom(scale_factor=2, mode="bilinear"),
        hooked,
    )
    x = torch.randn(1, 2, 5, 7)
    with torch.no_grad():
        before = net(x)
    assert replace_bilinear_upsampling(net) == 2
    assert [type(m).__name__ for m in net] == ["BilinearUpsample", "BilinearUpsample", "Upsample", "Upsample",
                                               "Custom", "Upsample"]
    assert isinstance(net[0], BilinearUpsample)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


def test_compiled_models_with_fast_upsampling_compile(models, images):
    """Inside torch.compile the resize is F.interpolate (the compiler makes
    its own kernel), so compile=True keeps working with the fast path."""
    from annotators.depth import DepthModel

    torch._dynamo.reset()
    cpu = torch.device("cpu")
    fast = DepthModel(models["dpt"], cpu, torch.float32, fast_upsampling=True)
    assert fast.upsamplers >= 1
    eager = fast.predict(images[:2], ["a", "b"])
    # dynamo's tracing (where building the matrices failed) without inductor's slow C++ build
    fast.enable_compile(backend="eager")
    compiled = fast.predict(images[:2], ["c", "d"])
    assert fast.compiled.active, fast.compiled.error
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_fused_vision_attention_equals_eager(models, images):
    from annotators.caption import CaptionModel, fuse_vision_attention

    cpu = torch.device("cpu")
    eager = CaptionModel(models["blip"], cpu, torch.float32, fused=False)
    fused = CaptionModel(models["blip"], cpu, torch.float32, fused=True)
    layers = len(fused.net.vision_model.encoder.layers)
    assert fuse_vision_attention(eager.net.text_decoder) == 0  # only BLIP's ViT attention qualifies
    pixels = hf_models.model_batches(images, eager.preprocess, cpu)[0][1]
    with torch.inference_mode():
        a = eager.net.vision_model(pixel_values=pixels).last_hidden_state
        b = fused.net.vision_model(pixel_values=pixels).last_hidden_state
    assert layers >= 2
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and captions through the fused encoder are transformers' own
    cap = create_annotator("caption", model=models["blip"], device="cpu", **CAPTION)
    cap.setup()
    cap._model = fused
    for image, ann in zip(images, cap.annotate_batch(images, KEYS)):
        assert ann.members["txt"] == _reference_caption(models["blip"], image, "")


def test_fetch_packs_one_copy():
    a = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    b = torch.randn(5, 3)
    c = torch.arange(6, dtype=torch.int64).reshape(2, 3).t()  # not contiguous
    d = torch.empty(0, 4)
    ra, rb, rc, rd = hf_models.fetch(a, b, c, d)
    np.testing.assert_array_equal(ra, a.numpy())
    np.testing.assert_array_equal(rb, b.numpy())
    np.testing.assert_array_equal(rc, c.numpy())
    assert rd.shape == (0, 4) and rb.dtype == np.float32 and rc.dtype == np.int64
    assert all(r.ctypes.data % r.dtype.itemsize == 0 for r in (ra, rb, rc))


def test_class_counts_match_per_image_bincount():
    from annotators.seg import class_counts

    ids = torch.randint(0, 150, (4, 17, 23), generator=torch.Generator().manual_seed(0))
    ids[2] = 149  # one class covering a whole image
    counts = class_counts(ids, 150)
    assert counts.shape == (4, 150) and counts.dtype == torch.int32
    for row, c in zip(ids, counts):
        torch.testing.assert_close(c, torch.bincount(row.flatten(), minlength=150).to(torch.int32))


# ------------------------------------------- pieces, copies back, compile


def test_split_chunks_and_batch_buckets():
    from annotators._torch import batch_bucket
    from annotators.weights import chunk_size

    assert hf_models.split_chunks(range(40), 32) == [list(range(20)), list(range(20, 40))]
    assert hf_models.split_chunks([5, 3, 9], 2) == [[5, 3], [9]]
    assert hf_models.split_chunks([], 4) == []
    for n in range(1, 70):
        pieces = hf_models.split_chunks(range(n), 16)
        assert [i for p in pieces for i in p] == list(range(n))
        assert max(map(len, pieces)) <= 16 and max(map(len, pieces)) - min(map(len, pieces)) <= 1
        b = batch_bucket(n)
        assert b >= n and b & (b - 1) == 0 and b < 2 * n
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert chunk_size(None, 48, cpu, 16) == 48  # nothing to overlap on the CPU
    assert chunk_size(None, 48, gpu, 16) == 16
    assert chunk_size(4, 48, cpu, 16) == 4


def test_fetch_async_matches_fetch():
    a = torch.arange(30, dtype=torch.uint8).reshape(2, 5, 3)
    b = torch.randn(2, 2)
    c = torch.arange(6, dtype=torch.int32)
    pending = hf_models.fetch_async(a, b, c)
    assert pending.ready()
    for x, y in zip(pending.arrays(), hf_models.fetch(a, b, c)):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype
    assert hf_models.fetch_async().arrays() == []


def test_pieces_give_the_same_maps(models, images):
    """A batch split into pieces (the GPU default) annotates as one batch does."""
    keys = ["p0", "p1", "p2"]
    for name, folder, member in (("depth", models["dpt"], "depth.png"), ("normal", models["dpt"], "normal.png"),
                                 ("seg", models["upernet"], "seg_ids.png")):
        whole = create_annotator(name, model=folder, device="cpu")
        pieces = create_annotator(name, model=folder, device="cpu", chunk_size=2)
        assert pieces.params["chunk_size"] == 2 and pieces.params["compile"] is False
        for a, b in zip(whole.annotate_batch(images, KEYS), pieces.annotate_batch(images, keys)):
            if name == "seg":
                assert (a.members[member] == b.members[member]).mean() >= 0.999
                assert a.meta["class_ids"][:3] == b.meta["class_ids"][:3]
            else:
                _close_maps(a.members[member], b.members[member])
    with pytest.raises(ValueError, match="chunk_size"):
        create_annotator("seg", chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        create_annotator("depth", chunk_size=0)


def test_depth_then_normal_in_pieces_share_one_forward(models, images):
    depth = create_annotator("depth", model=models["dpt"], device="cpu", chunk_size=1)
    normal = create_annotator("normal", model=models["dpt"], device="cpu", chunk_size=2)
    depth.setup()
    calls = []
    hook = depth._model.net.register_forward_hook(lambda *a: calls.append(1))
    try:
        depth.annotate_batch(images, ["q0", "q1", "q2"])
        assert len(calls) == 3  # one forward pass per piece of one image
        normal.annotate_batch(images, ["q0", "q1", "q2"])
        assert len(calls) == 3  # the normals reuse all three predictions
    finally:
        hook.remove()


def test_depth_and_normal_from_two_threads_share_forwards_over_several_batches(models, images):
    """A pipeline batch reaching depth and normal as two annotator batches,
    the two annotators on two threads at once: every image goes through the
    model once, and the maps are those of each annotator alone."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.stages import run_annotator

    depth = create_annotator("depth", model=models["dpt"], device="cpu")
    normal = create_annotator("normal", model=models["dpt"], device="cpu")
    depth.setup()
    batch = images + [im[::-1].copy() for im in images]
    keys = [f"t{i}" for i in range(len(batch))]
    calls = []
    hook = depth._model.net.register_forward_hook(
        lambda m, a, kw, out: calls.append(int(kw["pixel_values"].shape[0])), with_kwargs=True)
    try:
        with ThreadPoolExecutor(2) as pool:
            fd = pool.submit(run_annotator, depth, batch, keys, 3)
            fn = pool.submit(run_annotator, normal, batch, keys, 3)
            got_depth, got_normal = fd.result(), fn.result()
    finally:
        hook.remove()
    assert sum(calls) == len(batch)
    hf_models.clear_shared()
    alone = create_annotator("normal", model=models["dpt"], device="cpu").annotate_batch(batch, keys)
    for a, b in zip(got_normal, alone):
        np.testing.assert_array_equal(a.members["normal.png"], b.members["normal.png"])
    assert all(a.members["depth.png"].shape == im.shape[:2] for a, im in zip(got_depth, batch))


def test_class_counts_sync_free_equals_bincount():
    from annotators.seg import class_counts

    ids = torch.randint(0, 150, (3, 19, 11), generator=torch.Generator().manual_seed(1))
    ids[1, :5] = 0
    torch.testing.assert_close(class_counts(ids, 150, sync_free=True), class_counts(ids, 150, sync_free=False))


def test_seg_splits_batches_past_the_upsample_limit(models, images):
    from annotators.seg import SegModel

    m = SegModel(models["upernet"], torch.device("cpu"), torch.float32)
    pixels = hf_models.model_batches(images, m.preprocess, torch.device("cpu"))[0][1]
    calls = []
    hook = m.net.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.inference_mode():
            whole = m.forward(pixels)
            h, w = pixels.shape[2:]
            m.max_logits = 150 * h * w  # one image per pass
            assert m.max_batch(h, w) == 1
            split = m.forward(pixels)
    finally:
        hook.remove()
    assert calls == [1] * 4
    torch.testing.assert_close(whole, split, rtol=1e-4, atol=1e-4)


def test_compile_falls_back_to_eager_with_a_warning(models, images, caplog):
    """A compiler that fails leaves the annotator working, eagerly, with one warning."""
    import logging

    from annotators._torch import CompiledForward
    from annotators.depth import DepthModel

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    cpu = torch.device("cpu")
    eager = DepthModel(models["dpt"], cpu, torch.float32)
    failing = DepthModel(models["dpt"], cpu, torch.float32)
    failing.enable_compile(backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="annotators._torch"):
        a = failing.predict(images, KEYS)
    assert not failing.compiled.active and "no compiler here" in failing.compiled.error
    assert sum("running it eagerly" in r.getMessage() for r in caplog.records) == 1
    for x, y in zip(a, eager.predict(images, KEYS)):
        torch.testing.assert_close(x, y)
    # padding to the bucket size and back, through a compiled function
    double = CompiledForward(lambda x: x * 2, "doubler", backend="eager")
    x = torch.arange(12.0).reshape(3, 4)
    torch.testing.assert_close(double(x), x * 2)
    assert double.active
    torch._dynamo.reset()


def test_depth_forward_splits_a_batch_too_large_for_one_pass(models, images):
    """More images than one pass takes (CUDA's NHWC upsampling refuses
    tensors of INT_MAX elements) run as several passes with the same
    predictions."""
    from annotators.depth import DepthModel

    cpu = torch.device("cpu")
    m = DepthModel(models["dpt"], cpu, torch.float32)
    side = m.net.config.image_size
    pixels = torch.rand(5, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = m.forward(pixels)
        channels = m.net.config.fusion_hidden_size // 2
        assert m.max_pass(side, side) == (2**31 - 1) // (channels * side * side)
        m.MAX_ELEMENTS = channels * side * side * 4 - 1  # room for three images a pass
        assert m.max_pass(side, side) == 3
        calls = []
        eager = m._eager_forward
        m._eager_forward = lambda p: (calls.append(p.shape[0]), eager(p))[1]
        parts = m.forward(pixels)
    # passes of the largest power of two within the limit: padded (graphs,
    # compile) to the next power of two, they stay within it
    assert calls == [2, 2, 1]
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)


def test_compiled_depth_forward_equals_eager(models, images):
    """The padded, compiled forward (dynamo graph, no code generation) gives
    eager's predictions: three images run as a padded batch of four."""
    from annotators.depth import DepthModel

    torch._dynamo.reset()
    cpu = torch.device("cpu")
    eager = DepthModel(models["dpt"], cpu, torch.float32)
    compiled = DepthModel(models["dpt"], cpu, torch.float32)
    compiled.enable_compile(backend="aot_eager")
    for a, b in zip(eager.predict(images, KEYS), compiled.predict(images, KEYS)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert compiled.compiled.active
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_compiled_seg_equals_eager(models, images):
    """``compile=True`` (inductor's generated kernels) gives eager's maps; the
    option is recorded in params. About 40 s on two cores (code generation)."""
    from annotators.seg import _seg_model

    torch._dynamo.reset()
    hf_models.clear_shared()
    eager = create_annotator("seg", model=models["upernet"], device="cpu")
    expected = [a.members["seg_ids.png"] for a in eager.annotate_batch(images, KEYS)]
    hf_models.clear_shared()
    compiled = create_annotator("seg", model=models["upernet"], device="cpu", compile=True)
    assert compiled.params["compile"] is True
    got = compiled.annotate_batch(images, ["c0", "c1", "c2"])
    assert compiled._model is _seg_model(models["upernet"], "cpu", None)
    assert compiled._model.compiled.active, compiled._model.compiled.error
    for ids, ann in zip(expected, got):
        assert (ann.members["seg_ids.png"] == ids).mean() >= 0.999
    hf_models.clear_shared()
    torch._dynamo.reset()


@pytest.mark.gpu
def test_pieces_copies_and_compile_on_gpu(models, images):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # asynchronous copies back: views of page-locked memory with the right bytes
    t = torch.arange(1000, device="cuda", dtype=torch.int32)
    (host,) = hf_models.fetch_async(t).arrays()
    np.testing.assert_array_equal(host, np.arange(1000, dtype=np.int32))
    # TF32 convolutions (torch's default) differ by batch size at the 1e-3
    # level; without them the pieces must agree as on the CPU
    with _no_tf32():
        for name, folder, member in _map_annotators(models):
            hf_models.clear_shared()
            whole = create_annotator(name, model=folder, device="cuda", precision="fp32", chunk_size=8)
            pieces = create_annotator(name, model=folder, device="cuda", precision="fp32", chunk_size=1)
            ref = whole.annotate_batch(images, KEYS)
            got = pieces.annotate_batch(images, ["g0", "g1", "g2"])
            hf_models.clear_shared()
            compiled = create_annotator(name, model=folder, device="cuda", precision="fp32", compile=True)
            got_compiled = compiled.annotate_batch(images, ["h0", "h1", "h2"])
            assert compiled._model.compiled.active, compiled._model.compiled.error
            _maps_agree(name, member, ref, got, got_compiled)


@contextlib.contextmanager
def _no_tf32():
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        hf_models.clear_shared()


def _map_annotators(models) -> list[tuple[str, str, str]]:
    """(annotator, model folder, member) of the map-making annotators."""
    return [("depth", models["dpt"], "depth.png"), ("normal", models["dpt"], "normal.png"),
            ("seg", models["upernet"], "seg_ids.png")]


def _maps_agree(name: str, member: str, want: list, *others: list) -> None:
    for i, a in enumerate(want):
        for other in others:
            if name == "seg":
                assert (a.members[member] == other[i].members[member]).mean() >= 0.99
            else:
                _close_maps(a.members[member], other[i].members[member], max_diff=2, min_equal=0.98)


@pytest.mark.gpu
def test_cuda_graphs_match_eager_on_gpu(models, images):
    """The default forward on a GPU replays CUDA graphs; its maps equal the
    eager forward's, also for a batch padded up to a graph's size and after
    later replays overwrote the graph's buffers."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with _no_tf32():
        for name, folder, member in _map_annotators(models):
            hf_models.clear_shared()
            eager = create_annotator(name, model=folder, device="cuda", precision="fp32", cuda_graphs=False)
            want = eager.annotate_batch(images, KEYS)
            hf_models.clear_shared()
            graphs = create_annotator(name, model=folder, device="cuda", precision="fp32", chunk_size=4)
            assert graphs.params["cuda_graphs"] is True
            got = graphs.annotate_batch(images, ["q0", "q1", "q2"])  # 3 images padded to a graph of 4
            again = graphs.annotate_batch(images[::-1], ["r0", "r1", "r2"])[::-1]
            runs = list(graphs._model.__dict__.get("_graphed_forwards", {}).values())
            assert runs and all(r.error is None and r.captured >= 1 for r in runs), [r.error for r in runs]
            _maps_agree(name, member, want, got, again)
