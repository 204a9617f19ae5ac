"""One registry, one front door: ``create_annotator(name, **options)``."""

from __future__ import annotations

import difflib
from typing import Any, TypeVar

from annotators.base import Annotator

_REGISTRY: dict[str, type[Annotator]] = {}

A = TypeVar("A", bound=type[Annotator])


class UnknownAnnotatorError(ValueError):
    """Raised for a name that is not registered; the message lists valid names."""


def register_annotator(cls: A) -> A:
    """Class decorator adding an :class:`Annotator` subclass to the registry."""
    name = cls.name
    if not name or "." in name or "/" in name or "," in name:
        raise ValueError(f"invalid annotator name {name!r} on {cls.__name__}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"annotator {name!r} is already registered by {_REGISTRY[name].__name__}")
    if not cls.members:
        raise ValueError(f"annotator {name!r} declares no members")
    _REGISTRY[name] = cls
    return cls


def list_annotators() -> list[str]:
    """Registered annotator names, sorted."""
    return sorted(_REGISTRY)


def get_annotator_class(name: str) -> type[Annotator]:
    """The class registered under ``name``; a typo lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownAnnotatorError(
            f"unknown annotator {name!r}.{hint} Valid names: {', '.join(list_annotators())}"
        ) from None


def create_annotator(name: str, **options: Any) -> Annotator:
    """Create the annotator registered as ``name`` with the given options.

    Unknown options raise ``TypeError`` naming the valid ones, so a typo in a
    config file fails before any data is processed.
    """
    cls = get_annotator_class(name)
    valid = cls.option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"annotator {name!r} has no option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )
    return cls(**options)
