"""Cancelling an acquisition from the dashboard or the CLI aborts the RunEngine cleanly.

Prefect cancels a deployment run by sending SIGTERM to the flow-run process (after its control
channel told the process the intent is "cancel"); Prefect's own SIGTERM handler then raises
``TerminationSignal`` in the main thread. Left alone, that exception unwinds out of
``RunEngine.__call__`` while the RunEngine's loop thread is still driving motors, the catalog
client is closed under it, and the run never gets its stop document. Here:

* the acquisition runs in a helper thread (:func:`run_abortable`); the termination lands in the
  main thread, which aborts the RunEngines (``RunEngine.abort``: every movable it touched gets
  ``stop()``, the run closes with ``exit_status="abort"`` through the still-open catalog
  client), waits for the helper thread, then lets the termination go on (the run is Cancelled);
* RunEngines are found through :func:`register_engine` (to be called by
  :func:`corrflow.acquisition.runengine.make_run_engine`); until then :func:`live_engines` finds them;
* :func:`cancel_flow_run` asks the server to cancel a run (what the dashboard's button does).

Prefect's SIGTERM handler is never replaced: Prefect acknowledges a cancel request only while
its own handler is installed (otherwise the run ends Crashed instead of Cancelled).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

_engines: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_termination_reason: str | None = None


def set_termination_reason(reason: str) -> None:
    """Say why this process is about to be terminated (e.g. its worker is gone); an interrupted
    :func:`run_abortable` closes its run with this reason instead of its own."""
    global _termination_reason
    _termination_reason = reason


def register_engine(engine: Any) -> Any:
    """Remember ``engine`` so a cancellation can abort it; returns it (for chaining)."""
    with _lock:
        _engines.add(engine)
    return engine


def registered_engines() -> list[Any]:
    with _lock:
        return list(_engines)


def live_engines() -> list[Any]:
    """The registered RunEngines; if none were registered, every RunEngine alive in this process.

    The fallback (a scan of the garbage collector's objects, ~0.1 s, only when a termination
    arrives) covers engines built by code that does not register them.
    """
    engines = registered_engines()
    if engines:
        return engines
    import gc

    from bluesky import RunEngine

    return [obj for obj in gc.get_objects() if isinstance(obj, RunEngine)]


def abort_engines(engines: Iterable[Any], *, reason: str) -> int:
    """Abort every engine that is running or paused; returns how many were aborted."""
    from bluesky.utils import TransitionError

    aborted = 0
    for engine in engines:
        if engine.state in ("running", "paused", "pausing"):
            try:
                engine.abort(reason=reason)
                aborted += 1
            except TransitionError:  # finished between the check and the abort
                continue
    return aborted


def run_abortable(function: Callable[[], T], *, reason: str = "flow run cancelled", join_timeout_s: float = 20.0) -> T:
    """Run an acquisition so that terminating the process aborts its RunEngine cleanly first.

    ``function`` (which builds and runs a RunEngine, e.g. ``run_tomography``) runs in a helper
    thread while the calling (main) thread waits. Prefect's SIGTERM handler, Ctrl-C or any other
    exception delivered to the main thread then interrupts only the wait: the RunEngines are
    aborted (motors stopped, stop document with ``exit_status="abort"`` written through the
    still-open catalog client), the helper thread is joined, and the exception is re-raised so
    the process ends the way its supervisor expects (Prefect: the run becomes Cancelled).

    No signal handler is replaced: Prefect only accepts a cancel request while its own SIGTERM
    handler is installed.
    """
    outcome: dict[str, Any] = {}
    context = contextvars.copy_context()  # the flow-run context, for logging and progress

    def target() -> None:
        try:
            outcome["value"] = context.run(function)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="corrflow-acquisition", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except BaseException:
        engines = live_engines()
        reason = _termination_reason or reason
        count = abort_engines(engines, reason=reason)
        logger.warning("interrupted: aborted %d RunEngine(s) (%s); closing the run before exiting", count, reason)
        deadline = time.monotonic() + join_timeout_s
        worker.join(join_timeout_s)
        # RunEngine.__call__ can return a moment before the loop thread has emitted the stop
        # document: wait until every engine is idle (set after its cleanup).
        while any(engine.state != "idle" for engine in engines) and time.monotonic() < deadline:
            time.sleep(0.01)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def cancel_flow_run(flow_run_id: str) -> None:
    """Ask the Prefect server to cancel a flow run (its worker then terminates the process)."""
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    async def go() -> None:
        async with get_client() as client:
            result = await client.set_flow_run_state(UUID(flow_run_id), Cancelling(message="cancelled by corrflow"), force=True)
            if result.status.value != "ACCEPT":
                raise RuntimeError(f"the server refused to cancel flow run {flow_run_id}: {result.details}")

    asyncio.run(go())
