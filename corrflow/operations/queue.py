"""The experiment queue: one queue per instrument, one experiment at a time, priority then submission order.

Entries live in a SQL database (``settings.queue_database_url``: SQLite under ``data_root`` by
default, PostgreSQL in production), so the queue survives a restart of the Prefect server, of the
workers and of the dispatcher. An experiment is a *plan* (``tomography`` at the beamline,
``micrograph`` at the microscope), its parameters and the sample metadata; they are validated when
they are submitted, not when the instrument gets to them hours later.

Ordering and exclusivity come from two mechanisms that do not depend on each other:

* the instrument's Prefect global concurrency limit (1 slot, ``instrument-<name>``), held by the
  dispatcher with a *lease* while it claims and runs an experiment. A dispatcher that dies loses
  the lease when it expires, so a crashed worker never blocks the instrument for good;
* the claim itself, made inside that slot and inside one database transaction that first locks
  the instrument's row: the highest priority wins, then the earliest submission.

Because claims only happen while holding the slot, an entry still marked ``running`` at claim time
was left by a dispatcher that died: it is marked ``interrupted`` (never re-run blindly: a half-done
scan on a real sample needs an operator's decision) and the next entry is claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from corrflow.config.settings import Settings

EntryState = Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]
FINAL_STATES: frozenset[str] = frozenset({"completed", "failed", "cancelled", "interrupted"})

_metadata = sa.MetaData()
entries = sa.Table(
    "corrflow_queue_entries",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),  # submission order
    sa.Column("instrument", sa.String(64), nullable=False, index=True),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("plan", sa.String(64), nullable=False),
    sa.Column("parameters", sa.Text, nullable=False),  # JSON
    sa.Column("sample", sa.Text, nullable=False),  # JSON
    sa.Column("submitted_by", sa.String(64), nullable=False),
    sa.Column("submitted_at", sa.Float, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("flow_run_id", sa.String(64)),
    sa.Column("message", sa.Text),
)
instruments = sa.Table(
    "corrflow_queue_instruments",
    _metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("touched_at", sa.Float, nullable=False),
)


class QueueError(ValueError):
    """A queue request is invalid (unknown entry, wrong state, bad priority); the message says which."""


@dataclass(frozen=True)
class QueueEntry:
    id: int
    instrument: str
    priority: int
    plan: str
    parameters: dict[str, Any]
    sample: dict[str, Any]
    submitted_by: str
    submitted_at: float
    state: EntryState
    started_at: float | None = None
    finished_at: float | None = None
    flow_run_id: str | None = None
    message: str | None = None

    @classmethod
    def _from_row(cls, row: Any) -> QueueEntry:
        data = dict(row._mapping)
        data["parameters"] = json.loads(data["parameters"])
        data["sample"] = json.loads(data["sample"])
        return cls(**data)


def _run(coro: Any) -> Any:
    """Run a coroutine from synchronous code (flows, the CLI): the queue API is synchronous."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside an event loop (e.g. an async caller): run in a helper thread.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class ExperimentQueue:
    """The queue in one database. Every method opens and closes its own connection (no state kept)."""

    def __init__(self, database_url: str) -> None:
        if not database_url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                f"database_url must be sqlite+aiosqlite:// or postgresql+asyncpg://, got {database_url!r}"
            )
        self.database_url = database_url

    @classmethod
    def from_settings(cls, settings: Settings) -> ExperimentQueue:
        return cls(settings.queue_database_url)

    @contextlib.asynccontextmanager
    async def _engine(self) -> Any:
        connect_args: dict[str, Any] = {}
        if self.database_url.startswith("sqlite"):
            connect_args = {"timeout": 30}  # wait for another writer's lock instead of failing
            path = self.database_url.split(":///", 1)[1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine: AsyncEngine = create_async_engine(self.database_url, connect_args=connect_args)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_metadata.create_all)
            yield engine
        finally:
            await engine.dispose()

    # -- submit / read / cancel ---------------------------------------------------------
    def submit(
        self,
        *,
        instrument: str,
        plan: str,
        parameters: Mapping[str, Any],
        sample: Mapping[str, Any],
        priority: int = 0,
        submitted_by: str = "local-user",
    ) -> QueueEntry:
        """Append an experiment; higher ``priority`` runs first, equal priorities in submission order.

        The caller validates plan and parameters (see :func:`corrflow.flows.experiment_queue.validate_experiment`).
        """
        if not -1000 <= priority <= 1000:
            raise QueueError(f"priority must be in [-1000, 1000], got {priority}")
        if not instrument:
            raise QueueError("instrument must not be empty")

        async def go() -> QueueEntry:
            async with self._engine() as engine, engine.begin() as conn:
                await _ensure_instrument(conn, instrument)
                result = await conn.execute(
                    entries.insert()
                    .values(
                        instrument=instrument,
                        priority=int(priority),
                        plan=plan,
                        parameters=json.dumps(dict(parameters), sort_keys=True),
                        sample=json.dumps(dict(sample), sort_keys=True),
                        submitted_by=submitted_by,
                        submitted_at=time.time(),
                        state="queued",
                    )
                    .returning(*entries.c)
                )
                return QueueEntry._from_row(result.one())

        return _run(go())

    def get(self, entry_id: int) -> QueueEntry:
        async def go() -> QueueEntry:
            async with self._engine() as engine, engine.connect() as conn:
                row = (await conn.execute(sa.select(entries).where(entries.c.id == entry_id))).one_or_none()
            if row is None:
                raise QueueError(f"no queue entry {entry_id}")
            return QueueEntry._from_row(row)

        return _run(go())

    def list(self, *, instrument: str | None = None, include_finished: bool = False) -> list[QueueEntry]:
        """Entries in the order they will run: running first, then queued by (priority desc, id)."""

        async def go() -> list[QueueEntry]:
            query = sa.select(entries)
            if instrument is not None:
                query = query.where(entries.c.instrument == instrument)
            if not include_finished:
                query = query.where(entries.c.state.in_(("queued", "running")))
            running_first = sa.case((entries.c.state == "running", 0), (entries.c.state == "queued", 1), else_=2)
            query = query.order_by(running_first, entries.c.priority.desc(), entries.c.id)
            async with self._engine() as engine, engine.connect() as conn:
                return [QueueEntry._from_row(r) for r in (await conn.execute(query)).all()]

        return _run(go())

    def cancel(self, entry_id: int, *, reason: str = "cancelled by user") -> QueueEntry:
        """Cancel a queued entry. A running one is cancelled by cancelling its flow run (see the CLI)."""

        async def go() -> QueueEntry:
            async with self._engine() as engine, engine.begin() as conn:
                row = (await conn.execute(sa.select(entries).where(entries.c.id == entry_id))).one_or_none()
                if row is None:
                    raise QueueError(f"no queue entry {entry_id}")
                if row.state != "queued":
                    raise QueueError(f"entry {entry_id} is {row.state}, only queued entries can be withdrawn")
                result = await conn.execute(
                    entries.update()
                    .where(entries.c.id == entry_id, entries.c.state == "queued")
                    .values(state="cancelled", finished_at=time.time(), message=reason)
                    .returning(*entries.c)
                )
                updated = result.one_or_none()
                if updated is None:  # claimed between the read and the update
                    raise QueueError(f"entry {entry_id} started meanwhile; cancel its flow run instead")
                return QueueEntry._from_row(updated)

        return _run(go())

    # -- dispatch side --------------------------------------------------------------------
    def claim_next(self, instrument: str, *, flow_run_id: str | None = None) -> tuple[QueueEntry | None, list[int]]:
        """Mark the next entry of ``instrument`` running and return it (None if the queue is empty).

        Must be called while holding the instrument's concurrency slot; entries still ``running``
        then were left by a dispatcher that died and are marked ``interrupted`` (their ids are
        returned as the second element).
        """

        async def go() -> tuple[QueueEntry | None, list[int]]:
            async with self._engine() as engine, engine.begin() as conn:
                # Lock the instrument's row first: serialises claims on PostgreSQL (row lock) and
                # takes SQLite's write lock before reading (no read-then-upgrade deadlock).
                await _ensure_instrument(conn, instrument)
                now = time.time()
                stale = await conn.execute(
                    entries.update()
                    .where(entries.c.instrument == instrument, entries.c.state == "running")
                    .values(state="interrupted", finished_at=now, message="its dispatcher died (lease expired)")
                    .returning(entries.c.id)
                )
                stale_ids = [r.id for r in stale.all()]
                row = (
                    await conn.execute(
                        sa.select(entries.c.id)
                        .where(entries.c.instrument == instrument, entries.c.state == "queued")
                        .order_by(entries.c.priority.desc(), entries.c.id)
                        .limit(1)
                    )
                ).one_or_none()
                if row is None:
                    return None, stale_ids
                claimed = await conn.execute(
                    entries.update()
                    .where(entries.c.id == row.id, entries.c.state == "queued")
                    .values(state="running", started_at=now, flow_run_id=flow_run_id)
                    .returning(*entries.c)
                )
                return QueueEntry._from_row(claimed.one()), stale_ids

        return _run(go())

    def finish(self, entry_id: int, state: EntryState, *, message: str | None = None) -> QueueEntry:
        if state not in FINAL_STATES:
            raise QueueError(f"state must be one of {sorted(FINAL_STATES)}, got {state!r}")

        async def go() -> QueueEntry:
            async with self._engine() as engine, engine.begin() as conn:
                result = await conn.execute(
                    entries.update()
                    .where(entries.c.id == entry_id, entries.c.state == "running")
                    .values(state=state, finished_at=time.time(), message=message)
                    .returning(*entries.c)
                )
                row = result.one_or_none()
                if row is None:
                    raise QueueError(f"entry {entry_id} is not running")
                return QueueEntry._from_row(row)

        return _run(go())


async def _ensure_instrument(conn: Any, instrument: str) -> None:
    touched = await conn.execute(
        instruments.update().where(instruments.c.name == instrument).values(touched_at=time.time())
    )
    if touched.rowcount == 0:
        try:
            async with conn.begin_nested():
                await conn.execute(instruments.insert().values(name=instrument, touched_at=time.time()))
        except sa.exc.IntegrityError:  # inserted concurrently by another submitter: lock it instead
            await conn.execute(
                instruments.update().where(instruments.c.name == instrument).values(touched_at=time.time())
            )


# -- the instrument slot ------------------------------------------------------------------
_held_slots: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("corrflow_held_slots", default=frozenset())


@contextlib.contextmanager
def instrument_slot(settings: Settings, instrument: str, *, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the instrument's global concurrency slot (leased, renewed while held).

    Re-entrant within one thread of execution: an experiment run by the dispatcher (which already
    holds the slot) does not wait for itself. The limit must exist (``corrflow deploy`` creates
    it): a missing limit is an error, not Prefect's silent warning.
    """
    from prefect.concurrency.sync import concurrency

    from corrflow.operations.deploy import instrument_limit_name

    if instrument in _held_slots.get():
        yield
        return
    with concurrency(
        instrument_limit_name(instrument),
        occupy=1,
        timeout_seconds=timeout_s,
        lease_duration=settings.queue.lease_s,
        strict=True,
    ):
        token = _held_slots.set(_held_slots.get() | {instrument})
        try:
            yield
        finally:
            _held_slots.reset(token)


def dispatch(
    settings: Settings,
    queue: ExperimentQueue,
    instrument: str,
    run_entry: Callable[[QueueEntry], Any],
    *,
    until_empty: bool = True,
    slot_timeout_s: float | None = None,
    flow_run_id: str | None = None,
    log: Callable[[str], None] = print,
) -> list[QueueEntry]:
    """Run queued experiments of ``instrument`` one at a time; returns the entries it finished.

    Each experiment is claimed and run while holding the instrument's slot. Several dispatchers
    may run at once (a schedule and a submit trigger): they take turns on the slot and each turn
    claims the current head of the queue, so the order is priority, then submission, whatever
    the number of dispatchers.
    """
    done: list[QueueEntry] = []
    while True:
        with instrument_slot(settings, instrument, timeout_s=slot_timeout_s):
            entry, stale = queue.claim_next(instrument, flow_run_id=flow_run_id)
            for entry_id in stale:
                log(f"queue entry {entry_id} on {instrument} was interrupted (its dispatcher died)")
            if entry is None:
                return done
            log(f"queue entry {entry.id} on {instrument}: {entry.plan} (priority {entry.priority}) starts")
            try:
                run_entry(entry)
            except Exception as exc:
                done.append(queue.finish(entry.id, "failed", message=f"{type(exc).__name__}: {exc}"))
                log(f"queue entry {entry.id} failed: {exc}")
            except BaseException:
                # Cancellation or interpreter exit: record it (unless `queue cancel` already did), then propagate.
                with contextlib.suppress(QueueError):
                    queue.finish(entry.id, "cancelled", message="the run was cancelled or its process stopped")
                raise
            else:
                done.append(queue.finish(entry.id, "completed"))
        if not until_empty:
            return done
