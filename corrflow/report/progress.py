"""Progress of long stages, through logging.

Flows call :func:`report` ; it logs on the ``corrflow.report.progress`` logger (with the numbers as
structured fields) and, inside a Prefect run, on the run's logger so the dashboard shows it too.
The CLI attaches :class:`StageProgress`, which draws the numbers as progress bars. Logging keeps the
two apart: flows never hold a reference to a display, and nothing global is passed through Prefect.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

PROGRESS_LOGGER = "corrflow.progress"
_logger = logging.getLogger(PROGRESS_LOGGER)


def report(stage: str, done: int, total: int, *, detail: str = "") -> None:
    """Report that ``done`` of ``total`` units of ``stage`` are complete."""
    message = f"{stage}: {done}/{total}" + (f" ({detail})" if detail else "")
    _logger.info(message, extra={"corrflow_stage": stage, "corrflow_done": done, "corrflow_total": total})
    try:
        from prefect.context import get_run_context
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger
    except ImportError:  # pragma: no cover - prefect is a hard dependency
        return
    try:
        get_run_context()
    except MissingContextError:
        return
    # Only milestones go to the dashboard, not every frame.
    if done == total or done == 0 or total <= 20 or done % max(1, total // 10) == 0:
        get_run_logger().info(message)


class StageProgress(logging.Handler):
    """A rich progress display fed by :func:`report` (use as a context manager)."""

    def __init__(self, console) -> None:
        super().__init__(level=logging.INFO)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console,
        )
        self._tasks: dict[str, int] = {}
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        stage = getattr(record, "corrflow_stage", None)
        if stage is None:
            return
        done, total = record.corrflow_done, record.corrflow_total
        with self._lock:
            if stage not in self._tasks:
                self._tasks[stage] = self._progress.add_task(stage, total=total)
            self._progress.update(self._tasks[stage], completed=done, total=total)

    def finish(self) -> None:
        with self._lock:
            for task_id in self._tasks.values():
                task = self._progress.tasks[task_id]
                self._progress.update(task_id, completed=task.total)

    def __enter__(self) -> StageProgress:
        _logger.addHandler(self)
        _logger.setLevel(logging.INFO)
        # The bars show them; the same lines printed by a console handler up the tree would scroll them away.
        self._propagate, _logger.propagate = _logger.propagate, False
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()
        _logger.removeHandler(self)
        _logger.propagate = self._propagate
