"""A beam dump at point 10 of 50, restored: the run read back from Tiled has one event per seq_num
and every image sits with its own event (simulated beamline, in-process catalog).

Moments of the dump, each a way bluesky re-takes a point when it resumes from the last checkpoint:

- ``after_save``: point 10's event was already emitted; the rewind emits it again (same seq_num)
  with a second frame in the detector file;
- ``before_save``: point 10's frame was read (and announced) but its event not yet saved; the
  rewind takes the frame again, and the first one stays in the file with no event of its own;
- ``before_read``: point 10's frame was exposed but not yet read. The re-read announces the stale
  frame and the re-take in one ``stream_datum`` and bluesky fails the run (a detector issue in
  ``devices/hdf5_stream.py``: a ``read()`` must announce only the frame of its event).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import h5py
import numpy as np
import pytest
from bluesky.utils import Msg, single_gen
from ophyd import Signal

from corrflow.catalog.tiled import Catalog, external_file_paths, open_catalog, tiled_writer
from corrflow.catalog.filters import ResumedRunFilter, view_sources, with_view_sources
from corrflow.devices.beamline import build_beamline
from corrflow.plans import tomo_scan
from corrflow.plans.interruptions import beam_current_suspender, unique_events
from corrflow.acquisition.runengine import make_run_engine
from corrflow.config.settings import Settings, load_settings
from corrflow.simulators import SimulatedWorld

SAMPLE = {"name": "AlSi10Mg-7", "proposal": "P-2026-001", "user": "ada"}
POINTS = 50
DUMP_AT = 10
BEAM_OFF_S = 0.5


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Catalog]]:
    settings = load_settings(data_root=tmp_path_factory.mktemp("resume"))
    settings.ensure_directories()
    with open_catalog(settings) as catalog:
        yield settings, catalog


def _dump_beam_at_point(plan, current: Signal, detector, *, moment: str, point: int):
    """``plan`` with the beam lost at ``point`` (1-based) of the primary stream, for BEAM_OFF_S.

    The loss is followed by a short wait inside the plan, so the suspender's request reaches the
    RunEngine at that exact place, whatever the machine's load.
    """
    seen = {"create": 0, "save": 0}

    def dump() -> Iterator[Msg]:
        current.put(0.0)

        def restore() -> None:
            time.sleep(BEAM_OFF_S)
            current.put(200.0)

        threading.Thread(target=restore, daemon=True).start()
        yield from bps.sleep(0.2)

    def mutate(msg: Msg):
        if msg.command == "create" and msg.kwargs.get("name") == "primary":
            seen["create"] += 1
            if moment == "before_read" and seen["create"] == point:  # exposed, not yet read
                return _chain(dump(), single_gen(msg)), None
        if seen["create"] != point:
            return None, None
        if moment == "before_save" and msg.command == "read" and msg.obj is detector:
            return None, dump()  # the frame is read and announced in the open bundle
        if moment == "after_save" and msg.command == "save":
            seen["save"] += 1
            if seen["save"] == 1:
                return None, dump()
        return None, None

    return bpp.plan_mutator(plan, mutate)


def _chain(*plans):
    for plan in plans:
        yield from plan


def _frames_by_seq_num(docs, stream: str) -> dict[int, tuple[Path, int]]:
    """seq_num -> (detector file, frame index), from the *last* stream_datum announcing it."""
    descriptors = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == stream}
    resources = {d["uid"]: Path(d["uri"].removeprefix("file://localhost")) for n, d in docs if n == "stream_resource"}
    frames = {}
    for name, doc in docs:
        if name == "stream_datum" and doc["descriptor"] in descriptors:
            seq_nums = range(doc["seq_nums"]["start"], doc["seq_nums"]["stop"])
            indices = range(doc["indices"]["start"], doc["indices"]["stop"])
            for seq_num, index in zip(seq_nums, indices, strict=True):
                frames[seq_num] = (resources[doc["stream_resource"]], index)
    return frames


@pytest.mark.parametrize(
    "moment",
    [
        "after_save",
        "before_save",
        "before_read",
    ],
)
def test_beam_dump_at_point_10_of_50_is_catalogued_with_50_unique_events_and_their_own_frames(catalog, moment):
    settings, cat = catalog
    beamline = build_beamline(settings, SimulatedWorld(settings.simulation), data_dir=settings.beamline_storage / moment)
    current = Signal(name="ring_current_mA", value=200.0)
    docs: list[tuple[str, dict]] = []
    engine = make_run_engine(lambda name, doc: docs.append((name, doc)), catalog_writer=tiled_writer(cat.runs, settings))
    engine.record_interruptions = True
    engine.install_suspender(beam_current_suspender(current, suspend_below_mA=100.0, resume_above_mA=190.0, sleep_s=0.1))
    plan = tomo_scan(beamline, num_projections=POINTS, exposure_s=0.01, num_darks=1, num_flats=1, sample=SAMPLE)
    (uid,) = engine(_dump_beam_at_point(plan, current, beamline.detector, moment=moment, point=DUMP_AT))

    # What the RunEngine emitted: point 10 taken twice, the detector file holds 51 frames.
    primary_seq_nums = [
        d["seq_num"] for n, d in docs
        if n == "event" and d["descriptor"] in {x["uid"] for m, x in docs if m == "descriptor" and x["name"] == "primary"}
    ]
    if moment == "after_save":
        assert primary_seq_nums.count(DUMP_AT) == 2, "the dump did not land between point 10's save and the next checkpoint"
    else:
        assert primary_seq_nums == list(range(1, POINTS + 1))
    emitted = _frames_by_seq_num(docs, "primary")
    (detector_file,) = {path for path, _ in emitted.values()}
    with h5py.File(detector_file, "r", swmr=True) as f:
        file_frames = f["/entry/data/data"][()]
    assert len(file_frames) == POINTS + 1, "point 10 was not re-taken"
    assert emitted[DUMP_AT][1] == DUMP_AT  # the re-take (index 10) is the copy kept, not the first (index 9)

    # What the catalog holds, read back from Tiled.
    run = cat.runs[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    primary = run["primary"]
    seq_nums = np.asarray(primary["seq_num"].read()).tolist()
    assert seq_nums == list(range(1, POINTS + 1))
    angles = np.asarray(primary["sample_stage_rotation"].read())
    np.testing.assert_allclose(angles, np.arange(POINTS) * 180.0 / POINTS, atol=1e-6)
    images = np.asarray(primary["xray_detector_image"].read())
    assert images.shape[0] == POINTS
    for row, seq_num in enumerate(seq_nums):
        assert np.array_equal(images[row], file_frames[emitted[seq_num][1]]), f"image of seq_num {seq_num} is another frame"
    # The last copy is the one catalogued, as unique_events keeps it.
    last = {e["seq_num"]: e for e in unique_events(docs, stream="primary")}
    np.testing.assert_allclose(np.asarray(primary["time"].read()), [last[s]["time"] for s in seq_nums])
    interruptions = np.asarray(run["interruptions"]["interruption"].read()).tolist()
    assert len(interruptions) == 1 and "ring_current_mA" in interruptions[0] and "below 100.0" in interruptions[0]
    # The detector file is untouched (stale frame included); the catalog reaches it through a view,
    # and the files of the run listed for a transfer include both.
    files = with_view_sources(external_file_paths(run))
    assert detector_file in files
    views = [p for p in files if view_sources(p)]
    # One view per announced data key of the file: the image and the angle the camera recorded.
    assert [view_sources(p) for p in views] == [[detector_file], [detector_file]]
    # Each event's angle is the one the camera wrote with that frame, re-taken frames included.
    np.testing.assert_allclose(np.asarray(primary["xray_detector_rotation_angle"].read()), angles, atol=1e-9)
    # Dark and flat streams: one frame each, catalogued as they were.
    for stream in ("dark", "flat"):
        assert np.asarray(run[stream]["seq_num"].read()).tolist() == [1]


def test_an_uninterrupted_run_reaches_the_catalog_unchanged(catalog):
    settings, cat = catalog
    beamline = build_beamline(settings, SimulatedWorld(settings.simulation), data_dir=settings.beamline_storage / "plain")
    docs: list[tuple[str, dict]] = []
    engine = make_run_engine(lambda name, doc: docs.append((name, doc)), catalog_writer=tiled_writer(cat.runs, settings))
    (uid,) = engine(tomo_scan(beamline, num_projections=8, exposure_s=0.01, num_darks=1, num_flats=1, sample=SAMPLE))
    run = cat.runs[uid]
    assert np.asarray(run["primary"]["seq_num"].read()).tolist() == list(range(1, 9))
    assert not any(view_sources(p) for p in external_file_paths(run)), "no view without a re-take"
    (start,) = [d for n, d in docs if n == "start"]
    assert run.metadata["start"]["producer"] == start["producer"] and start["producer"]["pid"] > 0


def test_without_a_run_engine_the_filter_holds_events_to_the_stop_and_keeps_the_last_copy():
    received: list[tuple[str, dict]] = []
    flt = ResumedRunFilter(lambda name, doc: received.append((name, doc)))
    flt("start", {"uid": "r", "time": 0.0})
    flt("descriptor", {"uid": "d", "run_start": "r", "name": "primary", "data_keys": {}, "time": 0.0})
    for seq_num, t in [(1, 1.0), (2, 2.0), (2, 3.0), (3, 4.0)]:
        flt("event", {"uid": f"e{t}", "descriptor": "d", "seq_num": seq_num, "time": t, "data": {}, "timestamps": {}})
    assert [n for n, _ in received] == ["start", "descriptor"]
    flt("stop", {"uid": "s", "run_start": "r", "time": 5.0, "exit_status": "success"})
    assert [(d["seq_num"], d["time"]) for n, d in received if n == "event"] == [(1, 1.0), (2, 3.0), (3, 4.0)]
    assert received[-1][0] == "stop" and flt.replaced_events == 1
