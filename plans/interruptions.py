"""Interruptions: suspenders for beam loss and furnace excursions, a watch on EPICS connections,
and the document bookkeeping a resumed run needs.

- :func:`beam_current_suspender`: bluesky's ``SuspendFloor`` on the ring current (suspend below a
  threshold, resume above a higher one after a wait), or ``SuspendBoolLow`` on a beam-permit signal.
- :class:`SuspendTemperatureExcursion`: suspends while the furnace's measured temperature is more
  than ``tolerance_K`` away from its *current* setpoint, and resumes once it has been back for
  the heater's settle time (install it around acquisition at a setpoint, not while the furnace
  ramps on purpose). Works on the simulated and the EPICS heater alike.
- :class:`ConnectionWatcher`: bluesky suspenders watch values only; a dead IOC changes no value.
  The watcher follows the connection state of every EPICS signal of the given devices: on a
  disconnect it suspends the run (the RunEngine stops every motor it moved) and, if the PVs are not
  back within ``reconnect_timeout_s``, fails it with a reason naming them (stop document
  ``exit_status="fail"``); if they come back, the run resumes from its last checkpoint.
- :func:`hold_while_tripped`: a plan preprocessor that holds a plan before its first message while
  a suspender is already tripped (bluesky can miss a suspender that trips before the run starts:
  bluesky issue #1970), and fails it if lost EPICS connections do not come back in time.
- :func:`unique_events`: a resumed run re-emits the events after its last checkpoint with the same
  ``seq_num``; storage keeps the last copy of each.

Install suspenders and the watcher with ``RE.install_suspender(s)`` (or ``bpp.suspend_wrapper``); set ``RE.record_interruptions = True`` to record every suspension and
resumption in the run's ``interruptions`` stream.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
from bluesky import RunEngine
from bluesky.suspenders import SuspenderBase, SuspendBoolLow, SuspendFloor
from bluesky.utils import MsgGenerator
from ophyd import Device, Signal
from ophyd.signal import EpicsSignalBase

__all__ = [
    "ConnectionWatcher",
    "EpicsDisconnectedError",
    "SuspendTemperatureExcursion",
    "beam_current_suspender",
    "beam_permit_suspender",
    "hold_while_tripped",
    "unique_events",
]


def beam_current_suspender(
    current: Signal,
    *,
    suspend_below_mA: float,
    resume_above_mA: float | None = None,
    sleep_s: float = 5.0,
) -> SuspendFloor:
    """Suspend while the ring current is below ``suspend_below_mA``.

    Parameters
    ----------
    current
        The monitored ring-current signal (mA), e.g. ``beamline.beam.current_mA``.
    suspend_below_mA
        Suspend when the current drops below this (mA, > 0).
    resume_above_mA
        Resume once it is back above this (mA, >= ``suspend_below_mA``); default the same.
    sleep_s
        Wait this long after the current is back before resuming (s, >= 0): optics and beam
        position need time to stabilise after a refill.

    Raises
    ------
    ValueError
        On non-finite or inconsistent thresholds.
    """
    resume = suspend_below_mA if resume_above_mA is None else resume_above_mA
    if not (math.isfinite(suspend_below_mA) and suspend_below_mA > 0):
        raise ValueError(f"suspend_below_mA must be > 0, got {suspend_below_mA}")
    if not (math.isfinite(resume) and resume >= suspend_below_mA):
        raise ValueError(f"resume_above_mA must be >= suspend_below_mA ({suspend_below_mA}), got {resume}")
    if not (math.isfinite(sleep_s) and sleep_s >= 0):
        raise ValueError(f"sleep_s must be >= 0, got {sleep_s}")
    return SuspendFloor(
        current,
        suspend_below_mA,
        resume_thresh=resume,
        sleep=sleep_s,
        tripped_message=f"ring current below {suspend_below_mA} mA (beam lost)",
    )


def beam_permit_suspender(permit: Signal, *, sleep_s: float = 5.0) -> SuspendBoolLow:
    """Suspend while a boolean beam-permit signal is low (e.g. a front-end interlock)."""
    if not (math.isfinite(sleep_s) and sleep_s >= 0):
        raise ValueError(f"sleep_s must be >= 0, got {sleep_s}")
    return SuspendBoolLow(permit, sleep=sleep_s, tripped_message="beam permit withdrawn")


class SuspendTemperatureExcursion(SuspenderBase):
    """Suspend while the measured temperature is off its setpoint by more than ``tolerance_K``.

    Resumes once the temperature has stayed within ``resume_fraction * tolerance_K`` of the
    setpoint for ``settle_s`` (the heater's settle criterion), then after ``sleep_s``.

    Parameters
    ----------
    heater
        A furnace with ``readback`` (measured, K, monitored), ``setpoint`` (K), ``tolerance_K``
        and ``settle_s`` signals and ``now_s()`` (the time base of ``settle_s``): the simulated
        :class:`~corrflow.devices.heater.Heater` (simulated seconds) or the
        :class:`~corrflow.devices.epics_heater.EpicsHeater` (wall-clock seconds).
    tolerance_K
        Allowed |measured - setpoint| (K, > 0); default the heater's ``tolerance_K``.
    resume_fraction
        Resume once back within ``resume_fraction * tolerance_K`` (0 < f <= 1; hysteresis so
        noise at the edge does not toggle the run).
    settle_s
        How long the temperature must stay back in that band before the run resumes (s, >= 0,
        in the heater's time base); default the heater's ``settle_s``. A reading outside the
        band starts the count again.
    sleep_s
        Wall-clock wait after that, before resuming (s).

    Notes
    -----
    The suspender sees the temperature through the readback's monitor callbacks: EPICS
    monitors, or the simulated heater's own monitor thread. Readings come at the monitor's rate,
    so the settle time is measured between readings (to within one update interval).
    """

    def __init__(
        self,
        heater: Device,
        *,
        tolerance_K: float | None = None,
        resume_fraction: float = 0.8,
        settle_s: float | None = None,
        sleep_s: float = 0.0,
    ) -> None:
        tolerance = float(heater.tolerance_K.get()) if tolerance_K is None else float(tolerance_K)
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise ValueError(f"tolerance_K must be > 0, got {tolerance}")
        if not 0 < resume_fraction <= 1:
            raise ValueError(f"resume_fraction must be in (0, 1], got {resume_fraction}")
        settle = float(heater.settle_s.get()) if settle_s is None else float(settle_s)
        if not (math.isfinite(settle) and settle >= 0):
            raise ValueError(f"settle_s must be >= 0, got {settle}")
        super().__init__(heater.readback, sleep=sleep_s, tripped_message=f"temperature off setpoint by > {tolerance} K")
        self._heater = heater
        self._tolerance_K = tolerance
        self._resume_K = resume_fraction * tolerance
        self._settle_s = settle
        self._back_since_s: float | None = None  # heater time the current stretch in the band began

    def _deviation_K(self, value: Any) -> float:
        return abs(float(value) - float(self._heater.setpoint.get()))

    def _should_suspend(self, value: Any) -> bool:
        if value is not None and self._deviation_K(value) > self._tolerance_K:
            self._back_since_s = None  # the settle time counts from the last excursion
            return True
        return False

    def _should_resume(self, value: Any) -> bool:
        # Called (under the suspender's lock) for every reading not out of tolerance.
        if value is None or self._deviation_K(value) > self._resume_K:
            self._back_since_s = None
            return False
        now_s = float(self._heater.now_s())
        if self._back_since_s is None:
            self._back_since_s = now_s
        return now_s - self._back_since_s >= self._settle_s

    def _get_justification(self) -> str:
        if not self.tripped:
            return ""
        return (
            f"SuspendTemperatureExcursion: {self._heater.name} is more than {self._tolerance_K} K "
            f"from its setpoint {self._heater.setpoint.get()} K"
        )


class EpicsDisconnectedError(RuntimeError):
    """EPICS PVs a run depends on stayed disconnected; the message names them."""


def _reason(suspender: Any) -> str:
    if isinstance(suspender, ConnectionWatcher):
        return suspender.describe_lost()
    return suspender._get_justification() or type(suspender).__name__  # bluesky's own wording


def hold_while_tripped(
    plan: MsgGenerator[Any], suspenders: Sequence[Any], *, settle_s: float = 0.0, poll_s: float = 0.1
) -> MsgGenerator[Any]:
    """Hold ``plan`` before its first message while any of ``suspenders`` is tripped.

    Only ``sleep`` messages are yielded while holding: nothing moves, no run is opened, and a
    pause, abort or cancel acts as on any plan. Once every suspender is clear, waits ``settle_s``
    more (as a suspender waits after its signal is back), then runs the plan. A
    :class:`ConnectionWatcher` tripped for longer than its ``reconnect_timeout_s`` fails the plan with
    :class:`EpicsDisconnectedError` naming the lost PVs, as it would fail a running plan.
    """
    started = time.monotonic()
    announced = False
    while True:
        tripped = [s for s in suspenders if s.tripped]
        if not tripped:
            break
        if not announced:
            print("holding the plan before its first motion: " + "; ".join(_reason(s) for s in tripped))
            announced = True
        for watcher in tripped:
            if isinstance(watcher, ConnectionWatcher) and time.monotonic() - started >= watcher.reconnect_timeout_s:
                raise EpicsDisconnectedError(
                    f"{watcher.describe_lost()} before the run started, for more than {watcher.reconnect_timeout_s} s"
                )
        yield from bps.sleep(poll_s)
    if announced:
        print(f"suspenders clear: the plan starts in {settle_s} s")
        yield from bps.sleep(settle_s)
    return (yield from plan)


class ConnectionWatcher:
    """Suspend a run when EPICS signals of ``devices`` disconnect; fail it if they stay down.

    Parameters
    ----------
    devices
        Devices (or signals) whose EPICS signals are watched.
    reconnect_timeout_s
        How long a disconnect may last before the run fails (s, >= 0; 0 fails at once).
    sleep_s
        Wait after everything is reconnected before resuming (s).

    Notes
    -----
    Channel Access sees a disconnect when the IOC's TCP circuit closes (a killed IOC: at once)
    or when its beacons stop (a hung host: ~30 s, ``EPICS_CA_CONN_TMO``). The watcher then asks
    the RunEngine to suspend, with a justification naming the lost PVs (recorded in the
    ``interruptions`` stream when ``RE.record_interruptions``); suspending stops every device the
    plan moved. If the PVs come back, the run resumes from its last checkpoint; if not within
    ``reconnect_timeout_s``, the suspension ends by raising :class:`EpicsDisconnectedError` into
    the plan, so the stop document says ``exit_status="fail"`` and gives the reason
    (``RunEngine.abort(reason)`` would lose it: bluesky's ``run_wrapper`` closes aborted runs
    without one). The watcher is installed like a suspender (``watcher.install(RE)``), so a run
    started while PVs are down waits for them too. It never blocks a Channel Access callback.
    """

    def __init__(self, devices: Iterable[Device | EpicsSignalBase], *, reconnect_timeout_s: float = 10.0, sleep_s: float = 0.0) -> None:
        if not (math.isfinite(reconnect_timeout_s) and reconnect_timeout_s >= 0):
            raise ValueError(f"reconnect_timeout_s must be >= 0, got {reconnect_timeout_s}")
        if not (math.isfinite(sleep_s) and sleep_s >= 0):
            raise ValueError(f"sleep_s must be >= 0, got {sleep_s}")
        self.reconnect_timeout_s = float(reconnect_timeout_s)
        self.sleep_s = float(sleep_s)
        self._signals: list[EpicsSignalBase] = []
        for device in devices:
            if isinstance(device, EpicsSignalBase):
                self._signals.append(device)
            else:
                self._signals.extend(
                    item.item for item in device.walk_signals(include_lazy=False) if isinstance(item.item, EpicsSignalBase)
                )
        if not self._signals:
            raise ValueError("ConnectionWatcher: the devices hold no EPICS signal to watch")
        self._lock = threading.Lock()
        self._down: dict[str, str] = {}  # pv name -> signal name
        self._timer: threading.Timer | None = None
        self._event: asyncio.Event | None = None  # released when the suspension ends
        self._failure: str | None = None
        self.RE: RunEngine | None = None
        self.events: list[tuple[float, str, str]] = []
        """``(time.time(), "disconnect" | "reconnect" | "suspend" | "fail", detail)`` in order."""

    # -- the suspender interface the RunEngine uses -----------------------------------------
    def install(self, RE: RunEngine, *, event_type: str | None = None) -> None:
        """Start watching for ``RE`` (called by ``RE.install_suspender(watcher)``)."""
        self.RE = RE
        for signal in self._signals:
            signal.subscribe(self._on_metadata, event_type=signal.SUB_META, run=False)
        # Signals already down when installed count as lost.
        for signal in self._signals:
            if not signal.connected:
                self._on_metadata(obj=signal, connected=False)

    def remove(self) -> None:
        """Stop watching (called by ``RE.remove_suspender(watcher)``); releases a suspension."""
        for signal in self._signals:
            signal.clear_sub(self._on_metadata)
        with self._lock:
            self._cancel_timer_locked()
            self._release_locked(failure=None)
        self.RE = None

    @property
    def tripped(self) -> bool:
        return bool(self.lost)

    def get_futures(self) -> tuple[list[Any], str]:
        """What a run about to start must wait for (the RunEngine asks every suspender)."""
        with self._lock:
            if not self._down or self.RE is None:
                return [], ""
            event = self._ensure_event_locked()
        return [event.wait], self.describe_lost()

    # -- state -----------------------------------------------------------------------------------
    @property
    def lost(self) -> dict[str, str]:
        """PVs currently disconnected: ``{pv name: signal name}``."""
        with self._lock:
            return dict(self._down)

    def describe_lost(self) -> str:
        """A sentence naming what is disconnected (for justifications and failure reasons)."""
        lost = self.lost
        if not lost:
            return "all EPICS signals connected"
        names = sorted(lost)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"EPICS disconnect: {len(names)} PV(s) lost ({shown})"

    def _on_metadata(self, *args: Any, obj: EpicsSignalBase, connected: bool | None = None, **kwargs: Any) -> None:
        # Runs on ophyd's dispatcher thread: never blocks, never calls into Channel Access.
        if connected is None:
            return
        pvname = getattr(obj, "pvname", obj.name)
        with self._lock:
            if not connected and pvname not in self._down:
                first = not self._down
                self._down[pvname] = obj.name
                self.events.append((time.time(), "disconnect", pvname))
                if first:
                    self._suspend_locked()
            elif connected and pvname in self._down:
                del self._down[pvname]
                self.events.append((time.time(), "reconnect", pvname))
                if not self._down:
                    self._cancel_timer_locked()
                    self._release_locked(failure=None, delay_s=self.sleep_s)

    # -- suspension --------------------------------------------------------------------------------
    def _ensure_event_locked(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
            self._failure = None
        return self._event

    def _suspend_locked(self) -> None:
        RE = self.RE
        if RE is None:
            return
        fresh = self._event is None
        event = self._ensure_event_locked()
        self._timer = threading.Timer(self.reconnect_timeout_s, self._fail_if_still_down)
        self._timer.daemon = True
        self._timer.start()
        if fresh and RE.state.is_running:
            justification = self.describe_lost_locked()
            self.events.append((time.time(), "suspend", justification))
            RE.request_suspend(event.wait, post_plan=self._after_suspension, justification=justification)

    def describe_lost_locked(self) -> str:
        names = sorted(self._down)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"EPICS disconnect: {len(names)} PV(s) lost ({shown})"

    def _after_suspension(self) -> MsgGenerator[None]:
        # A generator function: its body runs when the suspension ends, not when it begins.
        failure = self._failure
        self._failure = None
        if failure is not None:
            raise EpicsDisconnectedError(failure)
        yield from ()

    def _release_locked(self, *, failure: str | None, delay_s: float = 0.0) -> None:
        event, self._event = self._event, None
        if event is None:
            return
        self._failure = failure
        RE = self.RE
        if RE is None:
            return
        loop = RE.loop
        if delay_s > 0:
            loop.call_soon_threadsafe(lambda: loop.call_later(delay_s, event.set))
        else:
            loop.call_soon_threadsafe(event.set)

    def _cancel_timer_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail_if_still_down(self) -> None:
        with self._lock:
            if not self._down:
                return
            reason = f"{self.describe_lost_locked()}; not back within {self.reconnect_timeout_s} s"
            self.events.append((time.time(), "fail", reason))
            self._timer = None
            self._release_locked(failure=reason)


def unique_events(documents: Iterable[tuple[str, Mapping[str, Any]]], *, stream: str | None = None) -> list[Mapping[str, Any]]:
    """The events of a run, one per ``(descriptor, seq_num)``, keeping the last copy, in order.

    A run that was suspended and resumed re-emits the events taken after its last checkpoint
    with the same ``seq_num``: the last copy is the one taken after the resume.

    Parameters
    ----------
    documents
        ``(name, doc)`` pairs of one run (``event_page`` documents are unpacked).
    stream
        Only events of this stream (descriptor ``name``); default all streams.
    """
    streams: dict[str, str] = {}  # descriptor uid -> stream name, in order of appearance
    latest: dict[tuple[str, int], Mapping[str, Any]] = {}
    for name, doc in documents:
        if name == "descriptor":
            streams[doc["uid"]] = doc.get("name", "primary")
        elif name in ("event", "event_page"):
            events = [doc] if name == "event" else _unpack_page(doc)
            for event in events:
                if stream is not None and streams.get(event["descriptor"]) != stream:
                    continue
                latest[(event["descriptor"], int(event["seq_num"]))] = event
    rank = {uid: k for k, uid in enumerate(streams)}
    return [latest[key] for key in sorted(latest, key=lambda key: (rank.get(key[0], len(rank)), key[1]))]


def _unpack_page(page: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    n = len(page["seq_num"])
    return [
        {
            "descriptor": page["descriptor"],
            "seq_num": page["seq_num"][i],
            "uid": page["uid"][i],
            "time": page["time"][i],
            "data": {key: values[i] for key, values in page["data"].items()},
            "timestamps": {key: values[i] for key, values in page["timestamps"].items()},
        }
        for i in range(n)
    ]
