"""controlnet-aux's network modules, imported on their own.

``import controlnet_aux`` imports every detector the package has (Anyline,
LeReS, ZoeDepth, SAM, mediapipe's face mesh, ...), and with them timm,
skimage and torchvision's detection models: about 2 s on a development
machine and several seconds more in a fresh worker process on a GPU host,
paid by every worker before its first shard. The networks used here live in
files that need little more than torch, so only those files are imported.

They are imported under a private package name (:data:`PRIVATE`) whose
package modules point at controlnet-aux's folders but never run their
``__init__``. ``controlnet_aux`` itself is left alone: importing it, or any
of its modules, elsewhere in the process works as always (and gets its own
copies of the classes; weights load through ``state_dict``, so which copy a
network is built from makes no difference). Two consequences: patching or
type-checking controlnet_aux's classes does not reach these networks (tests
patch both copies), and a whole pickled network cannot be loaded in another
process (nothing here pickles networks; weights travel as state dicts).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType

#: The private package that controlnet-aux's files are imported under.
PRIVATE = "_controlset_controlnet_aux"

_LOCK = threading.Lock()
_DONE: dict[str, ModuleType] = {}


def aux_module(name: str) -> ModuleType:
    """controlnet-aux's module ``name`` (e.g. ``"hed"``, ``"open_pose.model"``,
    ``"mlsd.models.mbv2_mlsd_large"``), imported without the ``__init__`` of
    the packages above it. Thread-safe: a module is returned only once it is
    fully imported. Meant for the files that define networks: a package
    above one of them stays an empty stand-in here, and a module that
    relies on its package's ``__init__`` for its import order
    (``open_pose.body``) does not import this way."""
    with _LOCK:
        module = _DONE.get(name)
        if module is None:
            module = _DONE[name] = _import(name)
        return module


def _import(name: str) -> ModuleType:
    try:
        spec = importlib.util.find_spec("controlnet_aux")  # finds the folder; runs nothing
    except (ImportError, ValueError):  # ValueError: a stand-in module without a spec
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("controlnet-aux is not installed; pip install controlnet-aux")
    root = list(spec.submodule_search_locations)[0]
    parts = name.split(".")
    for i in range(len(parts)):
        package = ".".join([PRIVATE, *parts[:i]])
        if package not in sys.modules:
            # a package module that is never executed: only its search path,
            # so the import system finds the files (and relative imports
            # inside them resolve) under the private name
            stand_in = ModuleType(package)
            stand_in.__path__ = [os.path.join(root, *parts[:i])]
            stand_in.__package__ = package
            sys.modules[package] = stand_in
    return importlib.import_module(f"{PRIVATE}.{name}")
