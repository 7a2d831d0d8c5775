"""No document lost while the catalog is down: every run's documents are spooled on local disk first.

Policy (the production RunEngine's catalog path, ``make_run_engine(catalog_writer=...)``):

1. Every document the catalog writer is to receive is first appended to the run's spool file,
   ``<data_root>/spool/<run uid>.jsonl`` (one ``{"name": ..., "doc": ...}`` per line, flushed per
   document, ``fsync`` at the start, at each descriptor and at the stop), then handed to the writer.
2. The first time the writer fails (the catalog server is down, the network is cut), the run is
   *spooled*: the acquisition goes on, nothing more is sent to the catalog for that run, and the
   spool keeps every document. A run that reached the catalog whole has its spool file removed at
   its stop.
3. After the plan, :meth:`DocumentSpool.settle` waits for the catalog to answer (up to
   ``settings.catalog.outage_wait_s``), removes the partial run the catalog holds, and writes the
   whole run from the spool through a new writer (:func:`replay_spool_file`): the catalog then holds
   exactly the documents emitted. If the catalog is still down, :class:`CatalogUnavailableError`
   names its address, how long it has been down and the spool file; ``corrflow catalog replay``
   writes the spooled runs once it is back. Nothing acquired is marked good until it is replayed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CatalogUnavailableError", "DocumentSpool", "read_spool_file", "replay_spool_file", "spooled_runs"]

logger = logging.getLogger(__name__)

DocumentCallback = Callable[[str, dict[str, Any]], Any]
_SYNC_AT = frozenset({"start", "descriptor", "stop"})


class CatalogUnavailableError(RuntimeError):
    """The catalog did not take a run's documents; they are kept in a spool file (the message says where)."""


@dataclass
class _Outage:
    since: float
    error: str


@dataclass
class _SpooledRun:
    path: Path
    handle: Any
    outage: _Outage | None = None
    stopped: bool = False


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class DocumentSpool:
    """A document callback that spools every run on disk before handing its documents to ``writer``.

    Parameters
    ----------
    writer
        The catalog's writer (a ``TiledWriter``).
    directory
        Where the spool files go (``settings.spool_dir``), on the acquiring host's disk.
    catalog_address
        The catalog as an operator knows it (a URL, or the embedded catalog's path), for messages.
    """

    def __init__(self, writer: DocumentCallback, *, directory: Path, catalog_address: str) -> None:
        self.writer = writer
        self.directory = Path(directory)
        self.catalog_address = catalog_address
        self._runs: dict[str, _SpooledRun] = {}
        self._run_of_descriptor: dict[str, str] = {}
        self._run_of_resource: dict[str, str] = {}

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        run_uid = self._run_uid(name, doc)
        run = self._runs.get(run_uid) if run_uid is not None else None
        if name == "start":
            run = self._open(doc["uid"])
        if run is None:  # a document of no run this spool opened: straight through
            self.writer(name, doc)
            return
        run.handle.write(json.dumps({"name": name, "doc": doc}, default=_json_default) + "\n")
        run.handle.flush()
        if name in _SYNC_AT:
            os.fsync(run.handle.fileno())
        if run.outage is None:
            try:
                self.writer(name, doc)
            except Exception as exc:  # the catalog is unreachable or refused: the spool keeps the run
                run.outage = _Outage(since=time.time(), error=f"{type(exc).__name__}: {exc}")
                logger.error(
                    "catalog at %s failed on a %s document of run %s (%s); the acquisition goes on and the "
                    "run's documents are spooled in %s", self.catalog_address, name, run_uid, run.outage.error, run.path,
                )
        if name == "stop":
            run.handle.close()
            run.stopped = True
            if run.outage is None:
                run.path.unlink()  # the catalog has the whole run

    def spooled(self, run_uid: str) -> Path | None:
        """The spool file of ``run_uid`` if the catalog missed some of its documents, else None."""
        run = self._runs.get(run_uid)
        return run.path if run is not None and run.outage is not None else None

    def settle(self, run_uid: str, catalog_runs: Any, *, wait_s: float, make_writer: Callable[[], DocumentCallback]) -> bool:
        """Make sure the catalog holds the whole run ``run_uid``; returns True if it had to be replayed.

        Waits up to ``wait_s`` for the catalog to answer, then replays the spool file.

        Raises
        ------
        CatalogUnavailableError
            The catalog is still unreachable: its address, since when, and the spool file.
        """
        run = self._runs.pop(run_uid, None)
        if run is None:
            return False
        if run.outage is None:  # the catalog has every document the spool has
            run.handle.close()
            run.path.unlink(missing_ok=True)
            return False
        deadline = time.monotonic() + wait_s
        last_error = run.outage.error
        while True:
            try:
                replay_spool_file(run.path, catalog_runs, make_writer())
                down_s = time.time() - run.outage.since
                logger.warning("catalog at %s back; run %s replayed from %s (catalog down >= %.1f s)",
                               self.catalog_address, run_uid, run.path, down_s)
                return True
            except Exception as exc:  # still down: try again until the deadline
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                break
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        raise CatalogUnavailableError(
            f"the catalog at {self.catalog_address} has not taken run {run_uid} "
            f"(unreachable since {time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(run.outage.since))}, "
            f"first error {run.outage.error}; last {last_error}). Every document of the run is kept in {run.path}; "
            "`corrflow catalog replay` writes it once the catalog is back."
        )

    # -- internals ----------------------------------------------------------------------------
    def _open(self, run_uid: str) -> _SpooledRun:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{run_uid}.jsonl"
        handle = open(path, "x", encoding="utf-8")  # never appends to (or replaces) another run's spool
        run = self._runs[run_uid] = _SpooledRun(path=path, handle=handle)
        return run

    def _run_uid(self, name: str, doc: dict[str, Any]) -> str | None:
        if name == "start":
            return doc["uid"]
        if name in ("stop", "descriptor"):
            if name == "descriptor":
                self._run_of_descriptor[doc["uid"]] = doc["run_start"]
            return doc["run_start"]
        if name in ("event", "event_page"):
            return self._run_of_descriptor.get(doc["descriptor"])
        if name == "stream_resource":
            run_uid = doc.get("run_start")
            if run_uid:
                self._run_of_resource[doc["uid"]] = run_uid
            return run_uid
        if name == "stream_datum":
            return self._run_of_resource.get(doc["stream_resource"])
        return doc.get("run_start")


def read_spool_file(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The documents of a spool file, in order (a last line cut by a crash is left out)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # torn write: the process died mid-line
            record = json.loads(line)
            yield record["name"], record["doc"]


def replay_spool_file(path: Path, catalog_runs: Any, writer: DocumentCallback) -> str:
    """Write the run spooled in ``path`` to the catalog in place of the partial run it may hold; returns its uid.

    The spool file is removed once the catalog holds the run with its stop document; a run
    spooled without a stop (its process died) is written as far as it goes and keeps its file.
    """
    documents = list(read_spool_file(path))
    if not documents or documents[0][0] != "start":
        raise ValueError(f"{path} is not a spooled run (no start document first)")
    run_uid = documents[0][1]["uid"]
    if run_uid in catalog_runs:  # what reached the catalog before the outage: replaced whole
        catalog_runs.delete_contents(run_uid, recursive=True, external_only=False)
    for name, doc in documents:
        writer(name, doc)
    stopped = documents[-1][0] == "stop"
    if stopped and catalog_runs[run_uid].metadata.get("stop"):
        path.unlink()
    return run_uid


def spooled_runs(directory: Path) -> list[Path]:
    """The spool files in ``directory`` (runs the catalog has not taken yet), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
