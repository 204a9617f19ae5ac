"""Every registered annotator, tested through the registry's front door.

Parametrised over ``list_annotators()``: an annotator added to the registry is
tested here automatically (and fails until it has a test factory)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import annotators
from _images import photo
from _registry_factories import options_for
from annotators import Annotation, UnknownAnnotatorError, create_annotator, list_annotators


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("registry-weights")


@pytest.fixture(scope="module")
def images():
    # Two real photos of different content (and one non-square) at small sizes.
    return [np.ascontiguousarray(photo("astronaut")[::4, ::4]), np.ascontiguousarray(photo("coffee")[::4, ::4])]


def test_builtin_set_is_complete():
    assert set(list_annotators()) >= {
        "canny", "hough", "hed", "mlsd", "openpose", "depth", "normal", "seg", "caption",
    }


@pytest.mark.parametrize("name", list_annotators())
def test_annotator_contract(name, weights_dir, images):
    cls = annotators.get_annotator_class(name)
    assert cls.name == name and cls.members and cls.version
    annotator = create_annotator(name, **options_for(name, weights_dir))
    json.dumps(annotator.describe())  # recorded in every sample's metadata
    annotator.setup()
    annotator.setup()  # idempotent
    keys = ["k0", "k1"]
    out = annotator.annotate_batch(images, keys)
    assert len(out) == len(images)
    for image, ann in zip(images, out):
        assert isinstance(ann, Annotation)
        assert set(ann.members) == set(annotator.describe()["members"])
        json.dumps(ann.meta)
        for member, value in ann.members.items():
            if member.endswith(".png"):
                assert value.shape[:2] == image.shape[:2], member
                assert value.dtype in (np.uint8, np.uint16)
                assert value.ndim == 2 or value.shape[2] == 3
            elif member.endswith(".json"):
                json.dumps(value)
            elif member == "txt":
                assert isinstance(value, str)
    # One image at a time gives the same result as the batch: exactly for
    # the CPU annotators; for networks up to a quantisation step on a few
    # pixels, since float kernels sum in a batch-size-dependent order and a
    # value at a rounding edge can land one level apart.
    single = annotator.annotate_batch(images[1:], keys[1:])[0]
    for member, value in out[1].members.items():
        if member.endswith(".png"):
            if not cls.uses_gpu:
                np.testing.assert_array_equal(single.members[member], value)
                continue
            diff = np.abs(single.members[member].astype(np.int64) - value.astype(np.int64))
            assert diff.max() <= 1, member
            assert np.count_nonzero(diff) <= max(1, diff.size // 1000), member
        else:
            assert single.members[member] == value


@pytest.mark.parametrize("name", list_annotators())
def test_unknown_options_are_rejected_with_the_valid_ones(name):
    with pytest.raises(TypeError) as err:
        create_annotator(name, definitely_not_an_option=1)
    assert "valid options" in str(err.value)


def test_typo_lists_valid_names():
    with pytest.raises(UnknownAnnotatorError) as err:
        create_annotator("hde")
    message = str(err.value)
    assert "hed" in message and all(n in message for n in list_annotators())


@pytest.mark.parametrize("thickness", [1, 2, 3])
def test_hough_draws_the_pixels_of_one_cv2_line_per_segment(thickness):
    """All segments are drawn in one OpenCV call; the pixels are those of
    drawing each segment with cv2.line (also segments leaving the image)."""
    import cv2

    from annotators.hough import draw_lines

    rng = np.random.default_rng(thickness)
    for n in (0, 1, 7, 150):
        lines = rng.integers(-8, 72, (n, 4)).astype(np.int32)
        want = np.zeros((64, 48), np.uint8)
        for x1, y1, x2, y2 in lines.tolist():
            cv2.line(want, (x1, y1), (x2, y2), 255, thickness, lineType=cv2.LINE_8)
        np.testing.assert_array_equal(draw_lines((64, 48), lines, thickness), want)
