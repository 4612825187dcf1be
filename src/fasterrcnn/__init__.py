"""Faster R-CNN (Ren et al. 2015) as a Lightning + Hydra experiment workbench.

``from fasterrcnn import Detector`` is the Python API for notebooks (:mod:`fasterrcnn.api`);
it is imported on first use, so ``import fasterrcnn`` itself stays light (no torch, no Lightning).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first asked for (PEP 562).
_LAZY = {"Detector": "fasterrcnn.api", "Detections": "fasterrcnn.api", "PredictError": "fasterrcnn.api"}
__all__ = ["Detections", "Detector", "PredictError", "__version__"]

if TYPE_CHECKING:
    from fasterrcnn.api import Detections, Detector, PredictError


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # asked once
        return value
    raise AttributeError(f"module 'fasterrcnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
