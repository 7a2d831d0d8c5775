"""Optional GPU support (CuPy): detection and the array module used by the GPU back-projection.

corrflow never requires a GPU. :func:`gpu_available` says whether CuPy is importable AND a CUDA device
answers; :func:`gpu_unavailable_reason` says why not (for logs and for test skips). The GPU
reconstruction itself is the same array code as the CPU NumPy fallback in
:mod:`corrflow.processing.fbp`, run with ``cupy`` as the array module, so the code that runs on the GPU
is the code the CPU test suite checks against analytic ground truth; only the agreement on a real
device needs a GPU (``tests/test_processing_recon.py`` skips it, with this module's reason, when none is
present). Install with ``pip install "corrflow[gpu]"`` (``cupy-cuda12x``).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

__all__ = ["cupy_module", "gpu_available", "gpu_unavailable_reason"]


@functools.cache
def _probe() -> tuple[ModuleType | None, str]:
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as exc:
        return None, f"CuPy is not installed ({exc}); install corrflow[gpu] for the GPU back-projection"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except cupy.cuda.runtime.CUDARuntimeError as exc:  # no driver, no device: the documented signal
        return None, f"CuPy is installed but no CUDA device is usable ({exc})"
    if count < 1:
        return None, "CuPy is installed but no CUDA device is present"
    return cupy, ""


def gpu_available() -> bool:
    """True when CuPy imports and at least one CUDA device is present (probed once per process)."""
    return _probe()[0] is not None


def gpu_unavailable_reason() -> str:
    """Why :func:`gpu_available` is False (empty string when a GPU is available)."""
    return _probe()[1]


def cupy_module() -> ModuleType:
    """The ``cupy`` module.

    Raises
    ------
    RuntimeError
        No usable GPU; the message says why.
    """
    module, reason = _probe()
    if module is None:
        raise RuntimeError(f"backend='gpu' was requested but no GPU is usable: {reason}")
    return module
