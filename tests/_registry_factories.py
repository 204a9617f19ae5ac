"""Test options for every registered annotator: seeded random weights of the
real architectures, written to a folder. A newly registered annotator must
add a factory here, or ``test_registry.py`` fails and says so."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

Factory = Callable[[Path], dict]


def _lllyasviel(folder: Path) -> dict:
    from _neural_fixtures import save_weights

    target = folder / "annotators-weights"
    if not (target / "ControlNetHED.pth").exists():
        save_weights(str(target))
    return {"weights": str(target), "device": "cpu"}


def _dpt(folder: Path) -> dict:
    from _hf_fixtures import make_dpt_hybrid

    target = folder / "dpt"
    if not (target / "config.json").exists():
        make_dpt_hybrid(str(target))
    return {"model": str(target), "device": "cpu"}


def _upernet(folder: Path) -> dict:
    from _hf_fixtures import make_upernet_convnext

    target = folder / "upernet"
    if not (target / "config.json").exists():
        make_upernet_convnext(str(target))
    return {"model": str(target), "device": "cpu"}


def _blip(folder: Path) -> dict:
    from _hf_fixtures import make_blip

    target = folder / "blip"
    if not (target / "config.json").exists():
        make_blip(str(target))
    return {"model": str(target), "device": "cpu", "max_new_tokens": 5, "min_new_tokens": 1, "num_beams": 1}


FACTORIES: dict[str, Factory] = {
    "canny": lambda folder: {},
    "hough": lambda folder: {},
    "hed": _lllyasviel,
    "mlsd": _lllyasviel,
    "openpose": _lllyasviel,
    "depth": _dpt,
    "normal": _dpt,
    "seg": _upernet,
    "caption": _blip,
}


def options_for(name: str, folder: Path) -> dict:
    if name not in FACTORIES:
        raise KeyError(
            f"annotator {name!r} is registered but tests/_registry_factories.py has no factory for it; "
            "add one that builds seeded random weights of its real architecture"
        )
    os.makedirs(folder, exist_ok=True)
    return FACTORIES[name](folder)
