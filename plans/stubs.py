"""Plan stubs: the building blocks the corrflow plans are made of (bluesky's stubs -> plans layering).

Stubs open no run of their own; they are composed inside a plan's run. Each detector staging is
one HDF5 file and one StreamResource, so a stub that takes a stream of frames stages the detector
around exactly that stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.protocols import Movable, Readable
from bluesky.utils import Msg, MsgGenerator

from corrflow.devices.hdf5_stream import StreamingDetector
from corrflow.devices.epics_heater import EpicsHeater
from corrflow.devices.heater import Heater
from corrflow.plans.validation import PlanValidationError

__all__ = ["frames_at_positions", "repeated_frames", "set_temperature", "wait_until_passed"]


def repeated_frames(
    detector: StreamingDetector, readables: Sequence[Readable], *, stream: str, num_frames: int
) -> MsgGenerator[None]:
    """Stage ``detector`` (a new file), take ``num_frames`` events in ``stream``, unstage.

    Every event holds the detector's scalars and a reading of each of ``readables``; a
    checkpoint before each frame lets a paused run resume from the frame it stopped at.
    """

    @bpp.stage_decorator([detector])
    def frames() -> MsgGenerator[None]:
        for _ in range(num_frames):
            yield from bps.checkpoint()
            yield from bps.trigger_and_read([detector, *readables], name=stream)

    return (yield from frames())


def frames_at_positions(
    detector: StreamingDetector,
    readables: Sequence[Readable],
    *,
    motor: Movable,
    positions: Sequence[float],
    stream: str,
) -> MsgGenerator[None]:
    """Stage ``detector``, then for each position move ``motor`` there and take one event in ``stream``."""

    @bpp.stage_decorator([detector])
    def frames() -> MsgGenerator[None]:
        for position in positions:
            yield from bps.checkpoint()
            yield from bps.mv(motor, position)
            yield from bps.trigger_and_read([detector, *readables], name=stream)

    return (yield from frames())


def set_temperature(heater: Heater | EpicsHeater, temperature_K: float) -> MsgGenerator[None]:
    """Check the setpoint now, then (when run) set it and wait until the temperature has settled.

    Raises
    ------
    PlanValidationError
        ``temperature_K`` is not a number or outside the heater's limits (when called).
    """
    try:
        heater.check_value(temperature_K)
    except ValueError as exc:
        raise PlanValidationError("set_temperature", [str(exc)]) from None
    return bps.mv(heater, float(temperature_K))


def wait_until_passed(motor: Any, position: float, *, direction: float = 1.0, timeout_s: float) -> MsgGenerator[None]:
    """Wait until ``motor``'s readback has passed ``position`` moving in ``direction`` (> 0: up).

    For starting a detector when a continuously moving axis reaches the first angle of a fly
    scan. Works on any ophyd positioner (its ``readback`` subscription), simulated or EPICS.

    Raises
    ------
    bluesky.utils.WaitForTimeoutError
        The position was not passed within ``timeout_s`` seconds (wall clock).
    """
    sign = 1.0 if direction > 0 else -1.0

    def passed_future() -> asyncio.Future[float]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()

        def resolve(value: float) -> None:
            if not future.done():
                future.set_result(value)

        def on_readback(value: Any = None, **kwargs: Any) -> None:
            if value is not None and sign * (float(value) - position) >= 0:
                loop.call_soon_threadsafe(resolve, float(value))

        token = motor.subscribe(on_readback, event_type=motor.SUB_READBACK, run=True)
        future.add_done_callback(lambda _: motor.unsubscribe(token))
        return future

    yield Msg("wait_for", None, [passed_future], timeout=timeout_s)
