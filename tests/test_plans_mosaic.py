"""Mosaic plans on the simulated instruments: grid layout, tile positions, overlaps that agree."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from bluesky import RunEngine

from corrflow.devices.beamline import build_beamline
from corrflow.devices.sem import build_microscope
from corrflow.plans import PlanValidationError, micrograph_mosaic, xray_mosaic
from corrflow.plans.mosaic import estimate_xray_mosaic, grid_positions
from corrflow.config.settings import load_settings
from corrflow.simulators import SimulatedWorld

SAMPLE = {"name": "AlSi10Mg-7", "proposal": "P-2026-001", "user": "ada"}


def _run(plan):
    docs = []
    RunEngine({})(plan, lambda name, doc: docs.append((name, doc)))
    return docs


def _stream_frames(docs, stream):
    uid = next(d["uid"] for n, d in docs if n == "descriptor" and d["name"] == stream)
    resources = {d["uid"]: d for n, d in docs if n == "stream_resource"}
    datum = next(d for n, d in docs if n == "stream_datum" and d["descriptor"] == uid)
    with h5py.File(resources[datum["stream_resource"]]["uri"].removeprefix("file://localhost"), "r") as f:
        frames = f["/entry/data/data"][()].astype(np.float64)
    events = [d for n, d in docs if n == "event" and d["descriptor"] == uid]
    return frames, events


@pytest.fixture
def instruments(tmp_path):
    settings = load_settings(data_root=tmp_path)
    world = SimulatedWorld(settings.simulation)
    return build_beamline(settings, world), build_microscope(settings, world)


def test_grid_is_centred_snake_ordered_and_overlapping():
    tiles = grid_positions(columns=3, rows=2, tile_size_um=(100.0, 50.0), overlap_fraction=0.2, center_um=(10.0, -5.0))
    np.testing.assert_allclose(tiles, [[-70, -25], [10, -25], [90, -25], [90, 15], [10, 15], [-70, 15]])
    assert grid_positions(columns=1, rows=1, tile_size_um=(1.0, 1.0), overlap_fraction=0.0, center_um=(3.0, 4.0)).tolist() == [[3.0, 4.0]]
    with pytest.raises(ValueError, match="overlap_fraction"):
        grid_positions(columns=2, rows=2, tile_size_um=(1.0, 1.0), overlap_fraction=1.0, center_um=(0.0, 0.0))


def test_xray_mosaic_tiles_overlap_consistently(instruments):
    beamline, _ = instruments
    docs = _run(xray_mosaic(beamline, columns=3, rows=1, overlap_fraction=0.25, exposure_s=0.2, num_darks=2, num_flats=2, sample=SAMPLE))
    assert docs[-1][1]["exit_status"] == "success"
    frames, events = _stream_frames(docs, "primary")
    darks, _ = _stream_frames(docs, "dark")
    flats, _ = _stream_frames(docs, "flat")
    tiles = np.asarray(docs[0][1]["references"]["tiles_um"])
    np.testing.assert_allclose([e["data"]["sample_stage_x"] for e in events], tiles[:, 0])
    attenuation = -np.log((frames - darks.mean(0)) / (flats.mean(0) - darks.mean(0)))
    assert attenuation.max() > 0.3  # the sample is in the tiles
    # Moving the stage by +dx moves the sample by +dx: tile k+1 shows tile k's content dx/pixel
    # columns further right, where the tiles overlap.
    shift = int(round((tiles[1, 0] - tiles[0, 0]) / 8.0))
    assert shift == 96
    overlap_a, overlap_b = attenuation[0][:, : 128 - shift], attenuation[1][:, shift:]
    assert np.corrcoef(overlap_a.ravel(), overlap_b.ravel())[0, 1] > 0.95
    assert beamline.stage.x.position == 0.0 and beamline.shutter.state.get() == "closed"


def test_xray_mosaic_beyond_the_stage_limits_is_refused_before_moving(instruments):
    """A bad argument is refused when the plan is made; tiles beyond the stage (which needs the
    beamline's state) by its preflight when it runs, before any motion and before any run opens."""
    beamline, _ = instruments
    with pytest.raises(PlanValidationError, match="overlap_fraction"):
        xray_mosaic(beamline, columns=2, rows=2, overlap_fraction=1.5, exposure_s=0.1, sample=SAMPLE)
    plan = xray_mosaic(beamline, columns=20, rows=1, exposure_s=0.1, sample=SAMPLE)
    documents = []
    with pytest.raises(PlanValidationError, match="outside its limits"):
        RunEngine({})(plan, lambda name, doc: documents.append(name))
    assert "start" not in documents
    assert beamline.stage.x.position == 0.0
    estimate = estimate_xray_mosaic(beamline, columns=3, rows=2, exposure_s=0.1, sample=SAMPLE)
    assert estimate.n_frames == 6 + 5 + 5


def test_micrograph_mosaic_tiles_overlap_consistently(instruments):
    _, microscope = instruments
    docs = _run(micrograph_mosaic(microscope, columns=2, rows=1, center_x_um=0.0, center_y_um=0.0, overlap_fraction=0.5, sample=SAMPLE))
    frames, events = _stream_frames(docs, "primary")
    tiles = np.asarray(docs[0][1]["references"]["tiles_um"])
    np.testing.assert_allclose([[e["data"]["microscope_stage_x"], e["data"]["microscope_stage_y"]] for e in events], tiles)
    # Pixel column c images stage x + (c - (cols-1)/2) * px: tile 1 (x + dx) shows tile 0's
    # column c + s at its column c, s = dx / px.
    shift = int(round((tiles[1, 0] - tiles[0, 0]) / 3.0))
    a, b = frames[0][:, shift:], frames[1][:, : 256 - shift]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8


def test_micrograph_mosaic_is_checked_against_the_microscope_when_it_runs_not_when_it_is_made(instruments):
    """Made with tiles beyond the stage: nothing is read; run, its preflight refuses it before any motion."""
    from corrflow.plans.mosaic import estimate_micrograph_mosaic

    _, microscope = instruments
    with pytest.raises(PlanValidationError, match="columns x rows"):
        micrograph_mosaic(microscope, columns=200, rows=100, sample=SAMPLE)
    plan = micrograph_mosaic(microscope, columns=3, rows=1, center_x_um=1.0e6, sample=SAMPLE)
    documents = []
    with pytest.raises(PlanValidationError, match="outside its limits"):
        RunEngine({})(plan, lambda name, doc: documents.append(name))
    assert "start" not in documents, "no run was opened"
    assert microscope.stage.x.position == 0.0
    assert estimate_micrograph_mosaic(microscope, columns=3, rows=2, sample=SAMPLE).n_frames == 6
