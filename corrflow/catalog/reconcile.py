"""Close the catalog entries of acquisitions whose process died: a stop document that says so.

A run's stop document is written by the process that acquires it. If that process dies (a
killed worker, a lost node), the run in ``/runs`` keeps its start document and whatever events
reached the catalog, and never gets a stop: readers see it as "still running" forever.
:func:`reconcile_runs` finds such runs and, once their producer is known to be gone, adds a stop
document ``exit_status="fail"`` whose ``reason`` says what happened, e.g.
``"acquisition process lost (flow run 1c0e... Crashed)"``. Events, streams and files are never
touched: the stop document is added to the run's metadata (Tiled keeps the previous metadata as a
revision).

Who produced a run is recorded in its start document (``producer``: host, pid and, inside
Prefect, the flow run; :func:`corrflow.acquisition.runengine.producer_metadata`). A run without a stop
document is closed when it is older than ``grace_s`` and

- its Prefect flow run is in a final state (Crashed, Failed, Cancelled, or even Completed: no
  process is left to write the stop), or
- it was produced on this host by a process that no longer exists, or
- its producer cannot be checked (no ``producer`` record, another host and no flow run, a flow run
  this Prefect server does not know) and it is older than ``unverifiable_after_s``, if given.

Runs whose producer is alive or unknown are left alone, and reported.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from corrflow.catalog.tiled import Catalog

__all__ = [
    "DEFAULT_GRACE_S",
    "ReconciledRun",
    "prefect_flow_run_state",
    "reconcile_runs",
]

#: Runs younger than this are never closed: their writer may be between two documents.
DEFAULT_GRACE_S = 60.0
#: Prefect state types after which the flow run's process writes nothing more.
FINAL_STATE_TYPES = frozenset({"CRASHED", "FAILED", "CANCELLED", "COMPLETED"})

FlowRunState = tuple[str, str] | None  # (state type, state name) or None when the server does not know the run


@dataclass(frozen=True)
class ReconciledRun:
    """What :func:`reconcile_runs` found and did for one run without a stop document.

    Attributes
    ----------
    uid
        Run (start document) uid.
    instrument
        ``start.identification.instrument``, if recorded.
    age_s
        Seconds since the run started.
    action
        ``"closed"`` (stop document written), ``"would close"`` (dry run) or ``"kept"``.
    reason
        Why: the stop document's ``reason`` when closed, else why the run was left open.
    flow_run_id
        The producing Prefect flow run, if recorded.
    """

    uid: str
    instrument: str | None
    age_s: float
    action: Literal["closed", "would close", "kept"]
    reason: str
    flow_run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def prefect_flow_run_state(flow_run_id: str) -> FlowRunState:
    """The state (type, name) of a flow run on this process's Prefect API; None if it does not know it.

    Raises
    ------
    prefect.exceptions.PrefectHTTPStatusError, httpx.HTTPError
        The API cannot be asked (unreachable, refused): the caller must not guess.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        run_id = uuid.UUID(flow_run_id)
    except ValueError:
        return None
    with get_client(sync_client=True) as client:
        try:
            flow_run = client.read_flow_run(run_id)
        except ObjectNotFound:
            return None
    state = flow_run.state
    if state is None:
        return None
    return state.type.value, state.name


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process with that pid
    return True


def _verdict(
    start: dict[str, Any],
    *,
    age_s: float,
    flow_run_state: Callable[[str], FlowRunState],
    unverifiable_after_s: float | None,
) -> tuple[bool, str, str | None]:
    """(close it?, reason, flow run id) for a run without a stop document, old enough to judge."""
    producer = start.get("producer") or {}
    flow_run_id = producer.get("flow_run_id")
    host, pid = producer.get("host"), producer.get("pid")
    local_process_gone = host == socket.gethostname() and isinstance(pid, int) and not _process_exists(pid)
    if flow_run_id:
        state = flow_run_state(str(flow_run_id))
        if state is not None:
            state_type, state_name = state
            if state_type in FINAL_STATE_TYPES:
                return True, f"acquisition process lost (flow run {flow_run_id} {state_name})", flow_run_id
            if local_process_gone:
                return True, f"acquisition process lost (process {pid} on {host} is gone; flow run {flow_run_id} still {state_name})", flow_run_id
            return False, f"flow run {flow_run_id} is {state_name}: its process may still write the run", flow_run_id
    if local_process_gone:
        return True, f"acquisition process lost (process {pid} on {host} is gone)", flow_run_id
    if host == socket.gethostname() and isinstance(pid, int):
        return False, f"process {pid} on this host still runs", flow_run_id
    what = f"flow run {flow_run_id} unknown to this Prefect server" if flow_run_id else (
        f"produced on {host}, no flow run recorded" if producer else "no producer recorded"
    )
    if unverifiable_after_s is not None and age_s >= unverifiable_after_s:
        return True, f"acquisition process lost ({what}; no stop document after {age_s / 3600:.1f} h)", flow_run_id
    return False, f"producer cannot be checked ({what})", flow_run_id


def _num_events(run: Any) -> dict[str, int]:
    """Events per stream that reached the catalog (the stop document's ``num_events``)."""
    counts = {}
    for stream in run:
        node = run[stream]
        counts[stream] = len(node["seq_num"].read()) if "seq_num" in node else 0
    return counts


def reconcile_runs(
    catalog: Catalog,
    *,
    instrument: str | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    unverifiable_after_s: float | None = None,
    dry_run: bool = False,
    flow_run_state: Callable[[str], FlowRunState] = prefect_flow_run_state,
    now: float | None = None,
) -> list[ReconciledRun]:
    """Close the runs without a stop document whose producer is gone (see the module docstring).

    Parameters
    ----------
    catalog
        The catalog (:func:`corrflow.catalog.tiled.open_catalog`).
    instrument
        Only runs of this instrument (``start.identification.instrument``); default all.
    grace_s
        Runs that started less than this long ago are left alone (s, >= 0).
    unverifiable_after_s
        Also close runs whose producer cannot be checked once they are this old (s); default never.
    dry_run
        Report what would be closed, write nothing.
    flow_run_state
        How to ask for a flow run's state (default: this process's Prefect API).
    now
        The current time (``time.time()``); for tests.

    Returns
    -------
    list[ReconciledRun]
        One entry per run without a stop document, oldest first.

    Raises
    ------
    ValueError
        On a negative ``grace_s`` or ``unverifiable_after_s``.
    """
    from tiled.queries import Key

    if not grace_s >= 0:
        raise ValueError(f"grace_s must be >= 0, got {grace_s}")
    if unverifiable_after_s is not None and not unverifiable_after_s >= 0:
        raise ValueError(f"unverifiable_after_s must be >= 0, got {unverifiable_after_s}")
    now = time.time() if now is None else now
    runs = catalog.runs
    if instrument is not None:
        runs = runs.search(Key("start.identification.instrument") == instrument)
    found = []
    # Not KeyPresent("stop", exists=False): in tiled 0.2.20 that query matches every run, finished
    # ones included (tests/test_reconcile.py), so the stop is checked here, run by run.
    for uid, run in runs.items():
        if run.metadata.get("stop"):
            continue
        start = dict(run.metadata["start"])
        found.append((float(start.get("time", 0.0)), uid, run, start))
    results = []
    for started, uid, run, start in sorted(found, key=lambda item: item[0]):
        age_s = now - started
        run_instrument = (start.get("identification") or {}).get("instrument")
        flow_run_id = (start.get("producer") or {}).get("flow_run_id")
        if age_s < grace_s:
            results.append(ReconciledRun(uid, run_instrument, age_s, "kept", f"started {age_s:.0f} s ago (grace {grace_s:.0f} s)", flow_run_id))
            continue
        close, reason, flow_run_id = _verdict(start, age_s=age_s, flow_run_state=flow_run_state, unverifiable_after_s=unverifiable_after_s)
        if not close:
            results.append(ReconciledRun(uid, run_instrument, age_s, "kept", reason, flow_run_id))
            continue
        if dry_run:
            results.append(ReconciledRun(uid, run_instrument, age_s, "would close", reason, flow_run_id))
            continue
        run = catalog.runs[uid]  # fresh metadata: the producer may have finished meanwhile after all
        if run.metadata.get("stop"):
            continue
        stop = {
            "uid": str(uuid.uuid4()),
            "run_start": uid,
            "time": time.time(),
            "exit_status": "fail",
            "reason": reason,
            "num_events": _num_events(run),
            "reconciled_by": "corrflow.catalog.reconcile",
        }
        # A metadata update only: events, streams and detector files stay exactly as acquired.
        run.update_metadata(metadata={"stop": stop})
        results.append(ReconciledRun(uid, run_instrument, age_s, "closed", reason, flow_run_id))
    return results
