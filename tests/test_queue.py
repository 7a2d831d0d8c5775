"""The experiment queue: one at a time per instrument, priority then submission order, durable, CLI."""

from __future__ import annotations

import contextvars
import json
import os
import random
import threading
import time

import pytest
from facility_helpers import POSTGRES_URL, SharedFacility, unique_db

from corrflow.operations.queue import ExperimentQueue, QueueError, dispatch


@pytest.fixture(scope="module")
def facility(request):
    facility = SharedFacility.get(request.config)
    facility.bootstrap()  # creates the instruments' concurrency limits
    with facility.client():
        yield facility


@pytest.fixture
def pg_queue():
    """A queue in its own PostgreSQL database (the production backend), dropped afterwards."""
    from corrflow.operations.server import drop_database, ensure_database

    name = unique_db("cf_test_queue")
    ensure_database(POSTGRES_URL, name)
    try:
        yield ExperimentQueue(f"{POSTGRES_URL}/{name}")
    finally:
        drop_database(POSTGRES_URL, name)


def test_twenty_experiments_run_one_at_a_time_in_priority_then_submission_order(facility, pg_queue):
    settings = facility.settings
    instrument = settings.beamline.name
    rng = random.Random(6)
    submitted = [
        pg_queue.submit(instrument=instrument, plan="noop", parameters={"k": k}, sample={"name": f"s{k:02d}"}, priority=rng.choice([-1, 0, 0, 5, 10]))
        for k in range(20)
    ]
    expected = [e.id for e in sorted(submitted, key=lambda e: (-e.priority, e.id))]
    intervals: list[tuple[int, float, float, str]] = []
    lock = threading.Lock()

    def run_entry(entry) -> None:
        start = time.perf_counter()
        time.sleep(0.05)  # the "experiment": long enough that an overlap would show
        with lock:
            intervals.append((entry.id, start, time.perf_counter(), threading.current_thread().name))

    errors = []

    def dispatcher() -> None:
        try:
            dispatch(settings, pg_queue, instrument, run_entry, log=lambda message: None)
        except Exception as exc:  # asserted below
            errors.append(exc)

    # Three dispatchers compete, as a schedule and two submit triggers would.
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(dispatcher,), name=f"dispatcher-{i}") for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [i[0] for i in sorted(intervals, key=lambda i: i[1])] == expected
    ordered = sorted(intervals, key=lambda i: i[1])
    for (_, _, end, _), (_, next_start, _, _) in zip(ordered, ordered[1:]):
        assert next_start >= end, "two experiments overlapped on one instrument"
    assert len({i[3] for i in intervals}) >= 1
    states = {e.id: e.state for e in pg_queue.list(instrument=instrument, include_finished=True)}
    assert set(states.values()) == {"completed"} and len(states) == 20


def test_queue_survives_restarts_and_interrupted_entries_are_not_rerun(facility, pg_queue):
    settings = facility.settings
    instrument = "test-instrument-restart"
    a = pg_queue.submit(instrument=instrument, plan="noop", parameters={}, sample={"name": "a"}, priority=0)
    b = pg_queue.submit(instrument=instrument, plan="noop", parameters={}, sample={"name": "b"}, priority=3)
    c = pg_queue.submit(instrument=instrument, plan="noop", parameters={}, sample={"name": "c"}, priority=0)
    claimed, _ = pg_queue.claim_next(instrument, flow_run_id="dead-dispatcher")
    assert claimed.id == b.id
    # "Restart": a new queue object, new connections; the dispatcher that claimed b is gone.
    reopened = ExperimentQueue(pg_queue.database_url)
    assert [e.id for e in reopened.list(instrument=instrument)] == [b.id, a.id, c.id]
    entry, stale = reopened.claim_next(instrument)
    assert stale == [b.id] and entry.id == a.id
    assert reopened.get(b.id).state == "interrupted"
    reopened.finish(a.id, "completed")
    assert reopened.cancel(c.id).state == "cancelled"
    assert reopened.list(instrument=instrument) == []
    with pytest.raises(QueueError, match="only queued"):
        reopened.cancel(a.id)


def test_an_experiment_is_validated_when_submitted_not_when_it_runs(tmp_path):
    from corrflow.flows.experiment_queue import submit_experiment
    from corrflow.config.settings import load_settings

    settings = load_settings(data_root=tmp_path)
    with pytest.raises(QueueError, match="num_projections"):
        submit_experiment(settings, plan="tomography", parameters={"tomography": {"num_projections": 1}}, sample={"name": "s1"}, trigger=False)
    with pytest.raises(QueueError, match="plan must be one of"):
        submit_experiment(settings, plan="tomogrpahy", parameters={}, sample={"name": "s1"}, trigger=False)
    with pytest.raises(QueueError, match="sample"):
        submit_experiment(settings, plan="micrograph", parameters={}, sample={"name": "bad name!"}, trigger=False)
    assert ExperimentQueue.from_settings(settings).list() == []


def test_cli_submits_lists_and_cancels(tmp_path):
    from typer.testing import CliRunner

    from corrflow.cli.queue import app

    runner = CliRunner()
    common = ["--data-root", str(tmp_path)]
    ids = []
    for sample, priority in (("low", 0), ("high", 7)):
        result = runner.invoke(
            app, ["submit", "tomography", "--sample", sample, "--priority", str(priority), "-p", "tomography.num_projections=90", "--no-trigger", *common]
        )
        assert result.exit_code == 0, result.output
        ids.append(json.loads(result.output.strip().splitlines()[-1])["id"])
    listed = runner.invoke(app, ["list", "--json", *common])
    rows = [json.loads(line) for line in listed.output.strip().splitlines()]
    assert [r["sample"] for r in rows] == ["high", "low"]
    cancelled = runner.invoke(app, ["cancel", str(ids[0]), *common])
    assert cancelled.exit_code == 0 and json.loads(cancelled.output)["state"] == "cancelled"
    bad = runner.invoke(app, ["submit", "tomography", "--sample", "x", "-p", "tomography.exposure_s=-1", "--no-trigger", *common])
    assert bad.exit_code == 2 and "exposure_s" in bad.output
    stored = ExperimentQueue(f"sqlite+aiosqlite:///{tmp_path / 'queue' / 'queue.db'}").get(ids[1])
    assert stored.parameters == {"tomography": {"num_projections": 90}} and stored.sample["name"] == "high"


def test_the_enqueue_flow_a_schedule_runs_adds_a_validated_entry(facility, tmp_path, monkeypatch):
    """What the enqueue-experiment deployment's schedule runs: the experiment waits its turn."""
    from corrflow.flows.experiment_queue import enqueue_experiment
    from corrflow.flows.models import Sample

    for key in [k for k in os.environ if k.startswith("CORRFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CORRFLOW_DATA_ROOT", str(tmp_path))
    entry_id = enqueue_experiment(
        site="beamline", plan="tomography", sample=Sample(name="nightly-01"), parameters={"tomography": {"num_projections": 90}}, priority=-5
    )
    (entry,) = ExperimentQueue(f"sqlite+aiosqlite:///{tmp_path / 'queue' / 'queue.db'}").list()
    assert entry.id == entry_id and entry.priority == -5 and entry.sample["name"] == "nightly-01"
    assert entry.instrument == facility.settings.beamline.name
    with pytest.raises(QueueError, match="does not run at site"):
        enqueue_experiment.fn(site="microscope", plan="tomography")
