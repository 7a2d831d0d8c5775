"""The production RunEngine: the one every acquisition runs on (flows, demo, chain, queue, dry-run).

:func:`make_run_engine` wires it to the catalog (through the resume filter) and to the progress
callbacks, and, given an instrument and its :class:`~corrflow.config.settings.ProtectionSettings`,
installs the protections that instrument has devices for (:func:`instrument_protections`): the
beam-current suspender (a ring-current monitor), the temperature-excursion suspender (a heater) and
the Channel Access connection watcher (EPICS devices). Each run records its interruptions in its
``interruptions`` stream, and a run whose suspender is already tripped is held before its first
message (:func:`~corrflow.plans.interruptions.hold_while_tripped`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from bluesky import RunEngine

from corrflow.catalog.filters import CompletenessCheck, ResumedRunFilter
from corrflow.config.settings import ProtectionSettings
from corrflow.plans.interruptions import (
    ConnectionWatcher,
    EpicsDisconnectedError,
    SuspendTemperatureExcursion,
    beam_current_suspender,
    hold_while_tripped,
)
from corrflow.report import progress


class StorageFullError(OSError):
    """A run failed because a storage it writes to ran out of space; ``run_uids`` are its runs."""

    def __init__(self, reason: str, run_uids: tuple[str, ...] = ()) -> None:
        super().__init__(errno.ENOSPC, reason)
        self.reason, self.run_uids = reason, tuple(run_uids)

    def __str__(self) -> str:
        return self.reason

    def __reduce__(self) -> Any:  # OSError pickles its (errno, strerror) args, not ours
        return type(self), (self.reason, self.run_uids)


def is_storage_full(cause: BaseException | None) -> bool:
    """Whether ``cause`` (or what it was raised from) is a write that found no space left.

    An in-process writer raises ``OSError(ENOSPC)``; an areaDetector IOC reports the same failure
    only as text (``WriteMessage``), which the EPICS detector passes on.
    """
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return True
        if os.strerror(errno.ENOSPC) in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def storage_full_text(cause: BaseException | str) -> str:
    """``storage full: no space left on device writing <file>`` (HDF5's own message is a page long)."""
    text = str(cause)
    filename = getattr(cause, "filename", None) or next(iter(re.findall(r"filename = '([^']+)'", text)), None)
    return f"storage full: no space left on device writing {filename}" if filename else f"storage full: {text}"


class EventCounter:
    """Counts events of a stream and reports them as progress (a RunEngine callback)."""

    def __init__(self, stage: str, total: int, *, stream_name: str = "primary") -> None:
        self.stage, self.total, self.stream_name = stage, total, stream_name
        self._descriptors: set[str] = set()
        self.count = 0

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor" and doc.get("name") == self.stream_name:
            self._descriptors.add(doc["uid"])
        elif name == "event" and doc["descriptor"] in self._descriptors:
            self.count += 1
            progress.report(self.stage, self.count, self.total)
        elif name == "event_page" and doc["descriptor"] in self._descriptors:
            self.count += len(doc["seq_num"])
            progress.report(self.stage, self.count, self.total)


def producer_metadata() -> dict[str, Any]:
    """Who writes the run: host, process id and, inside a Prefect flow run, the run of that process.

    Recorded in every start document (``producer``) so that a run left without a stop document
    can be traced to the process that died (:mod:`corrflow.catalog.reconcile`). ``flow_run_id`` is
    the root flow run of the process (the one its worker started, whose state says whether the
    process lives); ``stage_flow_run_id`` the (sub-)flow run that acquires.
    """
    producer: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    if "prefect" in sys.modules:  # only inside Prefect: importing it costs seconds (the dry-run CLI)
        from prefect.runtime import flow_run

        if flow_run.id is not None:
            producer["flow_run_id"] = str(flow_run.root_flow_run_id or flow_run.id)
            producer["flow_run_name"] = str(flow_run.name)
            producer["stage_flow_run_id"] = str(flow_run.id)
    return producer


def instrument_protections(instrument: Any, protections: ProtectionSettings) -> list[Any]:
    """The suspenders (and connection watcher) ``protections`` ask for that ``instrument`` can feed.

    ``instrument`` is a :class:`~corrflow.devices.beamline.Beamline` or a
    :class:`~corrflow.devices.sem.Microscope`: a beam suspender needs its ``beam`` monitor (EPICS
    mode; the simulated source has constant flux), the temperature suspender its ``heater``, the
    watcher EPICS devices (``mode == "epics"``).
    """
    suspenders: list[Any] = []
    beam = getattr(instrument, "beam", None)
    if beam is not None and protections.beam_suspend_below_mA is not None:
        suspenders.append(
            beam_current_suspender(
                beam.current_mA,
                suspend_below_mA=protections.beam_suspend_below_mA,
                resume_above_mA=protections.beam_resume_above_mA,
                sleep_s=protections.beam_settle_s,
            )
        )
    heater = getattr(instrument, "heater", None)
    if heater is not None and protections.temperature_excursion:
        suspenders.append(SuspendTemperatureExcursion(heater))
    if getattr(instrument, "mode", "sim") == "epics":
        suspenders.append(ConnectionWatcher(instrument.devices(), reconnect_timeout_s=protections.reconnect_timeout_s))
    return suspenders


class ProductionRunEngine(RunEngine):
    """A RunEngine that installs its protections for each call and holds a plan while one is tripped.

    The suspenders are installed when a plan starts and removed when it ends (so their
    subscriptions do not outlive the acquisition), and every call runs the plan behind
    :func:`~corrflow.plans.interruptions.hold_while_tripped`. The reason given to ``abort`` is
    the stop document's reason, and a run that fails while the connection watcher has lost PVs
    (a device's read of a dead IOC can fail before the watcher hears of the disconnect) is closed
    with the disconnect as its reason and raises :class:`EpicsDisconnectedError`. A run that fails
    on a device's failed status is closed with that failure's cause in its reason (bluesky's own
    reason names the status only), and one whose cause is a full storage raises
    :class:`StorageFullError`.
    """

    def __init__(self, *args: Any, protections: list[Any] | None = None, settle_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protections = list(protections or [])
        self.settle_s = settle_s
        self.record_interruptions = True  # every suspension and resumption lands in the run
        self._call_started = 0.0
        self._disconnect_reason: str | None = None
        self._failed_causes: list[tuple[str, BaseException]] = []  # (repr of the failed status, its cause)
        self._storage_full_reason: str | None = None

    def _status_object_completed(self, ret: Any, fut: Any, pardon_failures: Any) -> None:
        if not ret.success and not pardon_failures.is_set():
            try:
                cause = ret.exception(timeout=0)
            except Exception as exc:  # noqa: BLE001 - a status that cannot say why still failed
                cause = exc
            if cause is not None:
                self._failed_causes.append((repr(ret), cause))
        super()._status_object_completed(ret, fut, pardon_failures)

    def _reason_with_cause(self, reason: str) -> str:
        for status, cause in self._failed_causes:
            if status in reason and str(cause) not in reason:
                if is_storage_full(cause):
                    self._storage_full_reason = storage_full_text(cause)
                    return f"{self._storage_full_reason} (the plan failed with: {reason})"
                return f"{reason}: {type(cause).__name__}: {cause}"
        return reason

    def _storage_full_reason_of(self, reason: str) -> str:
        """A failure's reason, led by the full storage when that is what it was (a device that
        raised rather than failed a status, e.g. a detector whose IOC could not flush its file)."""
        if self._storage_full_reason is None and os.strerror(errno.ENOSPC) in reason:
            self._storage_full_reason = storage_full_text(reason)
            return f"{self._storage_full_reason} (the plan failed with: {reason})"
        return reason

    async def _close_run(self, msg: Any) -> Any:
        # bluesky's run_decorator closes an aborted run with the (empty) text of RequestAbort, so the
        # reason given to abort() (a cancellation, a lost worker) would never reach the stop document.
        if not msg.kwargs.get("reason") and self._reason and msg.kwargs.get("exit_status") in ("abort", "fail"):
            msg = msg._replace(kwargs={**msg.kwargs, "reason": self._reason})
        if msg.kwargs.get("exit_status") == "fail" and self._failed_causes:
            msg = msg._replace(kwargs={**msg.kwargs, "reason": self._reason_with_cause(str(msg.kwargs.get("reason", "")))})
        if msg.kwargs.get("exit_status") == "fail":
            msg = msg._replace(kwargs={**msg.kwargs, "reason": self._storage_full_reason_of(str(msg.kwargs.get("reason", "")))})
        if msg.kwargs.get("exit_status") == "fail" and not str(msg.kwargs.get("reason", "")).startswith("EPICS disconnect"):
            lost = await self._lost_connections()
            if lost is not None:
                self._disconnect_reason = f"{lost} (the plan failed with: {msg.kwargs.get('reason', '')})"
                msg = msg._replace(kwargs={**msg.kwargs, "reason": self._disconnect_reason})
        return await super()._close_run(msg)

    async def _lost_connections(self, *, grace_s: float = 1.0) -> str | None:
        """What the connection watcher lost during this call, if anything.

        A device whose IOC dies can fail its own read or write a moment before Channel Access
        tells the watcher that the circuit closed; the disconnect is the cause, so it is what the
        stop document names. Waits up to ``grace_s`` for the watcher to hear of it.
        """
        watchers = [s for s in self.protections if isinstance(s, ConnectionWatcher)]
        if not watchers:
            return None
        deadline = time.monotonic() + grace_s
        while True:
            for watcher in watchers:
                disconnects = [pv for t, kind, pv in watcher.events if kind == "disconnect" and t >= self._call_started]
                if watcher.lost or disconnects:
                    lost = watcher.describe_lost() if watcher.lost else f"EPICS disconnect: {', '.join(sorted(set(disconnects)))}"
                    return lost
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    def __call__(self, plan: Any, *args: Any, **kwargs: Any) -> Any:
        for suspender in self.protections:
            self.install_suspender(suspender)
        self._call_started, self._disconnect_reason = time.time(), None
        self._failed_causes, self._storage_full_reason = [], None
        try:
            return super().__call__(hold_while_tripped(plan, self.protections, settle_s=self.settle_s), *args, **kwargs)
        except Exception as exc:
            if self._disconnect_reason is not None and not isinstance(exc, EpicsDisconnectedError):
                raise EpicsDisconnectedError(self._disconnect_reason) from exc
            if self._storage_full_reason is not None or is_storage_full(exc):
                reason = self._storage_full_reason or storage_full_text(exc)
                raise StorageFullError(reason, tuple(self._run_start_uids)) from exc
            raise
        finally:
            for suspender in self.protections:
                self.remove_suspender(suspender)


def make_run_engine(
    *callbacks: Callable[[str, dict[str, Any]], None],
    catalog_writer: Callable[[str, dict[str, Any]], Any] | None = None,
    instrument: Any = None,
    protections: ProtectionSettings | None = None,
) -> ProductionRunEngine:
    """The production RunEngine, with ``callbacks`` subscribed and the catalog's writer behind a resume filter.

    Parameters
    ----------
    callbacks
        Document callbacks that see every document as emitted (progress, live displays).
    catalog_writer
        The catalog's ``TiledWriter``: subscribed through
        :class:`~corrflow.catalog.filters.ResumedRunFilter`, so a paused or suspended run that
        resumes is catalogued with one event per ``seq_num`` and images that match them, then
        :class:`~corrflow.catalog.filters.CompletenessCheck`, so a run is catalogued ``success``
        only when it took every event its plan declared (``planned_events``).
    instrument, protections
        The instrument the plans run on and its protection settings
        (``settings.beamline.protections``): :func:`instrument_protections` picks what to install.

    Notes
    -----
    No SIGINT handler is installed (``context_managers=[]``): flows run it from Prefect's worker
    threads, where signal handlers cannot be set; Prefect's own cancellation stops the run.
    Every start document records its :func:`producer_metadata`.
    """
    from corrflow.acquisition.cancellation import register_engine

    suspenders = [] if instrument is None else instrument_protections(instrument, protections or ProtectionSettings())
    settle_s = (protections or ProtectionSettings()).beam_settle_s if any(
        not isinstance(s, ConnectionWatcher | SuspendTemperatureExcursion) for s in suspenders
    ) else 0.0
    engine = ProductionRunEngine(
        {"producer": producer_metadata()}, context_managers=[], protections=suspenders, settle_s=settle_s
    )
    if catalog_writer is not None:
        engine.subscribe(ResumedRunFilter(CompletenessCheck(catalog_writer), engine=engine))
    for callback in callbacks:
        engine.subscribe(callback)
    register_engine(engine)  # a cancelled flow run aborts it: motors stopped, stop document 'abort'
    return engine
