"""Bookkeeping shared by devices whose ``set()`` completes only after a value has settled.

One status is pending at a time: a new ``set()`` or ``stop()`` takes it out and completes it
(fails it, unless ``stop(success=True)``), and the background waiter completes it only if it is
still the pending one. Heaters (simulated and EPICS) use it and share :class:`TemperatureSetpointMixin`;
their wait loops differ (simulated clock vs Channel Access readbacks), so those stay in each device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from typing import Any

from ophyd.status import DeviceStatus

from corrflow.devices.signals import finite


class SettlingStatusMixin:
    """Mix into an ophyd ``Device``; call :meth:`_init_settling` in ``__init__``."""

    name: str

    def _init_settling(self) -> None:
        self._lock = threading.Lock()
        self._interrupt: threading.Event | None = None
        self._pending: DeviceStatus | None = None

    def _start_settling(self, status: DeviceStatus, waiter: Callable[..., None], *args: object) -> None:
        """Make ``status`` the pending one and run ``waiter(*args, interrupt, status)`` on a thread."""
        self._cancel_pending()
        interrupt = threading.Event()
        with self._lock:
            self._interrupt, self._pending = interrupt, status
        threading.Thread(
            target=waiter, args=(*args, interrupt, status), name=f"{self.name}-settle", daemon=True
        ).start()

    def _cancel_pending(self, *, success: bool = False) -> None:
        with self._lock:
            interrupt, status = self._interrupt, self._pending
            self._interrupt = self._pending = None
        if interrupt is not None:
            interrupt.set()
        if status is not None and not status.done:
            if success:
                status.set_finished()
            else:
                status.set_exception(RuntimeError(f"{self.name}: stopped before the temperature settled"))

    def _finish_if_pending(self, status: DeviceStatus) -> None:
        """Complete ``status`` if it is still pending (a new set()/stop() may have taken it)."""
        with self._lock:
            owner = self._pending is status
            if owner:
                self._interrupt = self._pending = None
        if owner and not status.done:
            status.set_finished()  # after a timeout the status keeps its timeout error


class TemperatureSetpointMixin:
    """The positioner surface both heaters share: ``position`` and ``check_value`` in K.

    The device provides ``name``, a ``setpoint`` signal and ``limits`` (allowed setpoints, K).
    """

    name: str
    setpoint: Any
    limits: tuple[float, float]

    @property
    def position(self) -> float:
        """The current setpoint (K), as for a positioner."""
        return float(self.setpoint.get())

    def check_value(self, temperature_K: Any) -> None:
        """Raise ``ValueError`` unless ``temperature_K`` is a finite setpoint within :attr:`limits`."""
        try:
            finite(temperature_K)
        except ValueError as exc:
            raise ValueError(f"{self.name}: temperature_K: {exc}") from None
        low, high = self.limits
        if not low <= temperature_K <= high:
            raise ValueError(f"{self.name}: temperature_K {temperature_K} K is outside [{low}, {high}] K")
