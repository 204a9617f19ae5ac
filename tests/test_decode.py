import io

import numpy as np
import pytest
from PIL import Image

from _images import bad_crc_png, bomb_png, exif_rotated_jpeg, jpeg_bytes, photo, png_bytes
from pipelines.decode import DecodeError, apply_geometry, decode_rgb, plan_geometry, probe_image


def test_exif_orientation_is_applied_and_reported():
    arr = photo("coffee")  # 400 x 600 (h x w)
    data = exif_rotated_jpeg(arr, 6)  # "rotate 90 CW to display"
    header = probe_image(data)
    assert (header.width, header.height) == (400, 600)
    rgb, _ = decode_rgb(data)
    assert rgb.shape == (600, 400, 3)
    plain, _ = decode_rgb(jpeg_bytes(arr))
    expected = np.rot90(plain, k=-1)  # 90 degrees clockwise
    assert np.abs(rgb.astype(int) - expected.astype(int)).mean() < 3


def test_16bit_gray_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256 * 300).reshape(256, 300).astype(np.uint16)
    rgb, _ = decode_rgb(png_bytes(Image.fromarray(ramp)))
    assert rgb.dtype == np.uint8 and rgb.shape == (256, 300, 3)
    assert rgb.min() == 0 and rgb.max() == 255
    assert abs(rgb.mean() - 127.5) < 2  # clipping would push most pixels to 255


def test_cmyk_becomes_matching_rgb():
    arr = photo("coffee")
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, format="JPEG", quality=95)
    rgb, header = decode_rgb(buf.getvalue())
    assert header.mode == "CMYK"
    assert np.abs(rgb.astype(int) - arr.astype(int)).mean() < 8


def test_palette_transparency_and_rgba_composite_on_white():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 32:, 3] = 255  # left half transparent
    rgb, _ = decode_rgb(png_bytes(Image.fromarray(rgba, "RGBA")))
    assert (rgb[:, :32] == 255).all()
    assert (rgb[:, 32:] == (200, 0, 0)).all()
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([10, 20, 30] + [250, 0, 0] * 255)
    pal.paste(1, (8, 0, 16, 16))
    rgb, _ = decode_rgb(png_bytes(pal, transparency=0))
    assert (rgb[:, :8] == 255).all() and (rgb[:, 8:] == (250, 0, 0)).all()


def test_la_and_l_modes():
    la = Image.fromarray(np.dstack([np.full((8, 8), 40, np.uint8), np.full((8, 8), 0, np.uint8)]), "LA")
    rgb, _ = decode_rgb(png_bytes(la))
    assert (rgb == 255).all()
    rgb, _ = decode_rgb(png_bytes(Image.fromarray(np.full((8, 8), 40, np.uint8))))
    assert (rgb == 40).all()


def test_animation_uses_first_frame():
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (10, 240)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    rgb, header = decode_rgb(buf.getvalue())
    assert header.frames == 2
    assert rgb.mean() < 40


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty_file"),
        (b"plain text", "not_an_image"),
        (bomb_png(), "decompression_bomb"),
    ],
)
def test_header_failures_have_reasons(data, reason):
    with pytest.raises(DecodeError) as err:
        probe_image(data)
    assert err.value.reason == reason


def test_truncated_and_bad_crc_fail_with_decode_error():
    good = jpeg_bytes(photo("astronaut"))
    probe_image(good[: len(good) // 3])  # the header alone is fine
    with pytest.raises(DecodeError) as err:
        decode_rgb(good[: len(good) // 3])
    assert err.value.reason == "decode_error"
    with pytest.raises(DecodeError) as err:
        probe_image(bad_crc_png(photo("chelsea")))
    assert err.value.reason == "decode_error"


def test_bomb_limit_follows_pil_setting(monkeypatch):
    data = png_bytes(Image.fromarray(np.zeros((100, 100), np.uint8)))
    probe_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(DecodeError) as err:
        probe_image(data)
    assert err.value.reason == "decompression_bomb"


def test_center_crop_geometry():
    box, size = plan_geometry(600, 400, 512, "center")
    assert box == (100, 0, 500, 400) and size == (512, 512)
    img = np.zeros((400, 600, 3), np.uint8)
    img[:, 100:500] = 255  # only the crop is white
    out = apply_geometry(img, box, size)
    assert out.shape == (512, 512, 3) and out.min() == 255


def test_no_crop_keeps_aspect_in_multiples_of_64():
    box, size = plan_geometry(1000, 700, 512, "none")
    assert box == (0, 0, 1000, 700)
    assert size[1] == 512 and size[0] % 64 == 0 and abs(size[0] / size[1] - 1000 / 700) < 0.1
    with pytest.raises(ValueError):
        plan_geometry(10, 10, 512, "diagonal")


def _large(name: str, w: int, h: int) -> np.ndarray:
    import cv2

    return cv2.resize(photo(name), (w, h), interpolation=cv2.INTER_CUBIC)


def test_large_jpegs_decode_at_a_reduced_scale_with_the_full_size_in_the_header():
    from pipelines.decode import draft_size

    data = jpeg_bytes(_large("astronaut", 2400, 1800))
    need = draft_size(2400, 1800, 256, "center")
    assert need == (683, 512)  # 2 x 256 px across the 1800 px crop: libjpeg picks 1/2 (1200 x 900)
    rgb, header = decode_rgb(data, need)
    assert (header.width, header.height) == (2400, 1800)
    assert rgb.shape == (900, 1200, 3)
    assert draft_size(2400, 1800, 512, "center") is None  # 1800 px < 4 x 512: no reduction
    assert draft_size(600, 400, 128, "center") is None  # only 1/2 would do, and not by 2x: full
    png, _ = decode_rgb(png_bytes(Image.fromarray(photo("coffee"))), (100, 100))
    assert png.shape == (400, 600, 3)  # other formats always decode in full


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("crop,size", [("center", (4007, 3005)), ("none", (3000, 2000))])
def test_reduced_decode_gives_nearly_the_same_sample(orientation, crop, size, tmp_path):
    from pipelines.options import AnnotateOptions
    from pipelines.sources import Location
    from pipelines.stages import Candidate, decode_candidate
    from schemas import content_key

    from _images import exif_rotated_jpeg

    # 4007 x 3005 at 1/4: the last stored column and row are partial pixels,
    # which come first where the orientation flips an axis
    arr = _large("chelsea", *size)
    data = exif_rotated_jpeg(arr, orientation) if orientation != 1 else jpeg_bytes(arr)
    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    header = probe_image(data)
    cand = Candidate(content_key(data), str(path), Location(str(path)), "", None, header.width, header.height)
    out = {}
    for reduced in (False, True):
        opts = AnnotateOptions(inputs=(str(path),), output=str(tmp_path / "o"), resolution=256, crop=crop,
                               reduced_jpeg_decode=reduced)
        out[reduced] = decode_candidate(cand, opts)
    full, fast = out[False], out[True]
    # the reduced sample shows whole reduced pixels: its box is within a
    # reduced pixel (4 full ones here) of the planned one, and recorded as such
    assert all(abs(a - b) <= 4 for a, b in zip(fast.crop_box, full.crop_box))
    from pipelines.decode import draft_size

    reduced, _ = decode_rgb(data, draft_size(header.width, header.height, 256, crop))
    assert reduced.shape[1] * 2 <= header.width + 3 and reduced.shape[0] * 2 <= header.height + 3  # reduced
    assert fast.image.shape == full.image.shape
    full_rgb, _ = decode_rgb(data)
    same_box = apply_geometry(full_rgb, fast.crop_box, (fast.image.shape[1], fast.image.shape[0]))
    diff = np.abs(fast.image.astype(int) - same_box.astype(int))
    assert diff.mean() < 0.6 and np.percentile(diff, 99) <= 4


def test_reduced_decode_is_recorded_in_the_plan():
    from pipelines.options import AnnotateOptions

    a = AnnotateOptions(inputs=("x",), output="y")
    b = AnnotateOptions(inputs=("x",), output="y", reduced_jpeg_decode=False)
    assert a.fingerprint({}) != b.fingerprint({})  # a rerun with the other setting rewrites shards
    assert "reduced_jpeg_decode" not in b.fingerprint({})  # full decodes: as before the option existed


def test_damaged_files_of_any_format_raise_only_decode_errors():
    # image libraries raise SyntaxError, KeyError, IndexError, TypeError ...
    # for damaged headers; each must become a DecodeError (one bad file never
    # stops a run)
    from pipelines.decode import perceptual_hash

    frames = [Image.fromarray(np.full((24, 32, 3), v, np.uint8)) for v in (10, 120, 240)]
    originals = []
    for fmt, kw in (("TIFF", {"save_all": True, "append_images": frames[1:]}),
                    ("GIF", {"save_all": True, "append_images": frames[1:]}),
                    ("PNG", {}), ("JPEG", {}), ("WEBP", {}), ("BMP", {})):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, **kw)
        originals.append(buf.getvalue())
    rng = np.random.default_rng(0)
    tried = 0
    for data in originals:
        for _ in range(60):
            damaged = bytearray(data)
            for pos in rng.integers(0, min(len(data), 200), size=3):
                damaged[pos] = int(rng.integers(0, 256))
            for fn in (probe_image, decode_rgb, perceptual_hash):
                tried += 1
                try:
                    fn(bytes(damaged))
                except DecodeError:
                    pass
    assert tried == 6 * 60 * 3


def test_a_file_changed_after_probing_is_a_failure_not_a_sample_under_the_old_key(tmp_path):
    from pipelines.options import AnnotateOptions
    from pipelines.sources import Location
    from pipelines.stages import Candidate, decode_candidate
    from schemas import FailureRecord, content_key

    path = tmp_path / "a.jpg"
    data = jpeg_bytes(photo("coffee"))
    path.write_bytes(data)
    header = probe_image(data)
    cand = Candidate(content_key(data), str(path), Location(str(path)), "", None, header.width, header.height)
    opts = AnnotateOptions(inputs=(str(path),), output=str(tmp_path / "o"), resolution=128)
    assert not isinstance(decode_candidate(cand, opts), FailureRecord)
    path.write_bytes(jpeg_bytes(photo("chelsea")))  # replaced between probing and decoding
    record = decode_candidate(cand, opts)
    assert isinstance(record, FailureRecord) and record.reason == "changed_since_probe"
    assert record.key == cand.key
