"""A RunEngine wired to the catalog, for flows and the CLI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bluesky import RunEngine

from corrflow import progress


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


def make_run_engine(*callbacks: Callable[[str, dict[str, Any]], None]) -> RunEngine:
    """A RunEngine with ``callbacks`` subscribed.

    No SIGINT handler is installed (``context_managers=[]``): flows run it from Prefect's worker
    threads, where signal handlers cannot be set; Prefect's own cancellation stops the run.
    """
    from corrflow.cancellation import register_engine

    engine = RunEngine({}, context_managers=[])
    for callback in callbacks:
        engine.subscribe(callback)
    register_engine(engine)  # a cancelled flow run aborts it: motors stopped, stop document 'abort'
    return engine
