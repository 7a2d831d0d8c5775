"""Soft signals with units and value checks, the building blocks of the simulated devices.

ophyd's soft :class:`~ophyd.signal.Signal` does not describe its units and accepts any value;
these add both, so every data key in a descriptor says its unit and a wrong configuration value
(a negative exposure, a NaN velocity) fails when it is written, not later inside a frame.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from ophyd.signal import InternalSignal, Signal

__all__ = ["ConfigSignal", "ReadbackSignal", "positive_finite", "finite"]


def finite(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number (``bool`` is not a number here)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ValueError(f"expected a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")


def positive_finite(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    finite(value)
    if not value > 0:
        raise ValueError(f"expected a value > 0, got {value!r}")


class _UnitsMixin:
    """Adds ``units`` to the signal's data key (``describe()``)."""

    def __init__(self, *args: Any, units: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._units = units

    @property
    def units(self) -> str | None:
        return self._units

    def describe(self) -> dict[str, dict[str, Any]]:
        description = super().describe()  # type: ignore[misc]
        if self._units is not None:
            description[self.name]["units"] = self._units  # type: ignore[attr-defined]
        return description


class ConfigSignal(_UnitsMixin, Signal):
    """A writable soft signal with units and an optional value check.

    Parameters
    ----------
    units
        Unit of the value, written into the data key.
    check
        Called with each value written by ``put``/``set``; raises ``ValueError`` to refuse it.
    """

    def __init__(self, *args: Any, check: Callable[[Any], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check = check

    def put(self, value: Any, **kwargs: Any) -> None:
        # Numpy scalars become Python numbers: documents must hold plain JSON types.
        if isinstance(value, np.generic):
            value = value.item()
        super().put(value, **kwargs)

    def check_value(self, value: Any) -> None:
        super().check_value(value)
        if self._check is not None:
            try:
                self._check(value)
            except ValueError as exc:
                raise ValueError(f"{self.name}: {exc}") from None


class ReadbackSignal(_UnitsMixin, InternalSignal):
    """A value only its device writes (``put(value, internal=True)``), e.g. a measured position."""
