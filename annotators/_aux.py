"""Import one of controlnet-aux's network modules without running its
packages' ``__init__``.

``import controlnet_aux`` imports every detector the package has (Anyline,
LeReS, ZoeDepth, SAM, mediapipe's face mesh, ...), and with them timm,
torchvision's detection models and torch's compiler stack: about 2 s on a
development machine and 8 s in a fresh process on a GPU host, paid by every
worker process before its first shard. The networks used here live in files
that need little more than torch, so only those files are imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any

_LOCK = threading.RLock()


def aux_module(name: str) -> ModuleType:
    """The module ``controlnet_aux.<name>`` (e.g. ``"open_pose.model"``),
    imported without executing the packages above it.

    Each parent package not yet imported is registered as a deferred
    package: the real module object with its search path, whose ``__init__``
    runs the first time anything other than an imported submodule is asked
    of it (``from controlnet_aux import HEDdetector`` works as always, and
    finds this module already imported)."""
    full = f"controlnet_aux.{name}"
    module = sys.modules.get(full)
    if module is not None:
        return module
    with _LOCK:
        parts = full.split(".")
        for i in range(1, len(parts)):
            package = ".".join(parts[:i])
            if package in sys.modules:
                continue
            # the parent is in sys.modules already, so finding this spec
            # imports nothing
            spec = importlib.util.find_spec(package)
            if spec is None or spec.submodule_search_locations is None:
                raise ImportError(f"controlnet-aux is not installed (no package {package!r}); "
                                  "pip install controlnet-aux")
            module = sys.modules[package] = _deferred_package(spec)
            if i > 1:  # as the import system binds a submodule to its parent
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], module)
        return importlib.import_module(full)


def _deferred_package(spec) -> ModuleType:
    """A package module whose ``__init__`` has not run yet; the first lookup
    of a name it lacks runs it (PEP 562 module ``__getattr__``)."""
    module = importlib.util.module_from_spec(spec)
    state = {"ran": False}

    def __getattr__(attr: str) -> Any:
        with _LOCK:
            if state["ran"]:
                raise AttributeError(f"module {spec.name!r} has no attribute {attr!r}")
            state["ran"] = True
            del module.__dict__["__getattr__"]
            spec.loader.exec_module(module)
        return getattr(module, attr)

    module.__getattr__ = __getattr__
    return module
