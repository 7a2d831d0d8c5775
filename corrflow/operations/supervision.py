"""A flow-run process never outlives the worker that started it.

A Prefect process worker starts each flow run as a child process in a session of its own, so a
worker that dies (``kill -9``, an out-of-memory kill, a crashed host agent) leaves the flow run
carrying on: it keeps heartbeating (Prefect's zombie detection never fires), holds the
instrument's slot, and nothing can cancel it (cancelling asks the dead worker to kill it).

:func:`watch_worker` (started by every flow run, through ``flows._common.flow_settings``) watches,
in a daemon thread, for the process to be re-parented: the worker is gone. It then ends the flow
run the way a cancellation does, with a reason that says why: the RunEngine is aborted (motors
stopped, the run closed ``abort`` with ``worker (pid N) that started flow run ... is gone``), the
instrument slot is released as the stage unwinds, and Prefect records the run ``Crashed`` (by a
termination signal) while its server is still reachable. A process that has not ended
``exit_after_s`` later exits hard.

Only a process that a worker started is watched (``PREFECT__FLOW_RUN_ID`` in its environment):
flows run in the calling process (``corrflow demo``) end with that process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from corrflow.acquisition.cancellation import set_termination_reason

logger = logging.getLogger(__name__)

#: Environment variable Prefect sets for a flow-run process started by a worker or runner.
FLOW_RUN_ENV_VAR = "PREFECT__FLOW_RUN_ID"

_watcher: threading.Thread | None = None
_lock = threading.Lock()


def worker_gone_reason(worker_pid: int, flow_run_id: str) -> str:
    return f"the worker (pid {worker_pid}) that started flow run {flow_run_id} is gone"


def watch_worker(*, poll_s: float = 0.5, exit_after_s: float = 60.0) -> threading.Thread | None:
    """Start (once per process) the watch for this flow-run process's worker; returns the thread.

    Returns None when the process was not started by a worker.
    """
    global _watcher
    flow_run_id = os.environ.get(FLOW_RUN_ENV_VAR)
    if not flow_run_id:
        return None
    with _lock:
        if _watcher is not None and _watcher.is_alive():
            return _watcher
        worker_pid = os.getppid()
        logger.info("flow run %s: watching its worker (pid %d)", flow_run_id, worker_pid)
        _watcher = threading.Thread(
            target=_watch, args=(worker_pid, flow_run_id, poll_s, exit_after_s), name="corrflow-worker-watch", daemon=True
        )
        _watcher.start()
        return _watcher


def _watch(worker_pid: int, flow_run_id: str, poll_s: float, exit_after_s: float) -> None:
    # Re-parenting (to init or a subreaper) is the one signal that cannot be missed or faked by a
    # busy worker: a worker that is merely slow keeps its child.
    while os.getppid() == worker_pid:
        time.sleep(poll_s)
    reason = worker_gone_reason(worker_pid, flow_run_id)
    set_termination_reason(reason)
    _detach_from_worker_pipes()
    # Prefect's own SIGTERM handler turns this into its termination path: the acquisition helper
    # aborts the RunEngine, the stage's slot is released, the run is recorded Crashed.
    os.kill(os.getpid(), signal.SIGTERM)
    logger.error("%s: ending this flow run (acquisition aborted, instrument slot released)", reason)
    time.sleep(exit_after_s)
    logger.error("%s: the flow run did not end within %.0f s of its termination; exiting", reason, exit_after_s)
    os._exit(70)


def _detach_from_worker_pipes() -> None:
    """Point stdout and stderr at /dev/null: they are pipes the dead worker no longer reads, and a
    write to a full one blocks for ever (logs still reach the Prefect server through its API handler)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)
