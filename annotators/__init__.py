"""Annotators turn an RGB image into ControlNet conditions.

>>> from annotators import create_annotator
>>> canny = create_annotator("canny", low_threshold=100, high_threshold=200)
>>> annotation = canny(image)              # doctest: +SKIP
>>> annotation.members["canny.png"].shape  # doctest: +SKIP

Every annotator is one module registered by name; importing this package
registers the built-in ones. Heavy imports (torch, transformers) happen inside
``setup()``, so listing or creating annotators stays cheap.
"""

from annotators.base import (
    Annotation,
    Annotator,
    AnnotatorError,
    MissingWeightsError,
    check_image,
    key_rng,
)
from annotators.registry import (
    UnknownAnnotatorError,
    create_annotator,
    get_annotator_class,
    list_annotators,
    register_annotator,
)

# Built-in annotators: importing a module registers it.
from annotators import canny as _canny  # noqa: E402,F401
from annotators import hough as _hough  # noqa: E402,F401
from annotators import hed as _hed  # noqa: E402,F401
from annotators import mlsd as _mlsd  # noqa: E402,F401
from annotators import openpose as _openpose  # noqa: E402,F401
from annotators import depth as _depth  # noqa: E402,F401
from annotators import seg as _seg  # noqa: E402,F401
from annotators import caption as _caption  # noqa: E402,F401

__all__ = [
    "Annotation",
    "Annotator",
    "AnnotatorError",
    "MissingWeightsError",
    "UnknownAnnotatorError",
    "check_image",
    "key_rng",
    "create_annotator",
    "get_annotator_class",
    "list_annotators",
    "register_annotator",
]
