"""Plan stubs: the building blocks the corrflow plans are made of (bluesky's stubs -> plans layering).

Stubs open no run of their own; they are composed inside a plan's run. Each detector staging is
one HDF5 file and one StreamResource, so a stub that takes a stream of frames stages the detector
around exactly that stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.protocols import Movable, Readable
from bluesky.utils import MsgGenerator

from corrflow.devices.hdf5_stream import StreamingDetector
from corrflow.devices.heater import Heater
from corrflow.plans.validation import PlanValidationError

__all__ = ["frames_at_positions", "repeated_frames", "set_temperature"]


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


def set_temperature(heater: Heater, temperature_K: float) -> MsgGenerator[None]:
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
