"""A RunEngine wired to the catalog, for flows and the CLI."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from bluesky import RunEngine

from corrflow.report import progress
from corrflow.catalog.filters import ResumedRunFilter


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


def make_run_engine(
    *callbacks: Callable[[str, dict[str, Any]], None],
    catalog_writer: Callable[[str, dict[str, Any]], Any] | None = None,
) -> RunEngine:
    """A RunEngine with ``callbacks`` subscribed, and the catalog's writer behind a resume filter.

    Parameters
    ----------
    callbacks
        Document callbacks that see every document as emitted (progress, live displays).
    catalog_writer
        The catalog's ``TiledWriter``: subscribed through
        :class:`~corrflow.catalog.filters.ResumedRunFilter`, so a paused or suspended run that
        resumes is catalogued with one event per ``seq_num`` and images that match them.

    Notes
    -----
    No SIGINT handler is installed (``context_managers=[]``): flows run it from Prefect's worker
    threads, where signal handlers cannot be set; Prefect's own cancellation stops the run.
    Every start document records its :func:`producer_metadata`.
    """
    from corrflow.acquisition.cancellation import register_engine

    engine = RunEngine({"producer": producer_metadata()}, context_managers=[])
    if catalog_writer is not None:
        engine.subscribe(ResumedRunFilter(catalog_writer, engine=engine))
    for callback in callbacks:
        engine.subscribe(callback)
    register_engine(engine)  # a cancelled flow run aborts it: motors stopped, stop document 'abort'
    return engine
