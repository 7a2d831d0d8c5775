"""Acquisition as a plain function: bad plan input fails before anything moves or is written."""

from __future__ import annotations

import pytest

from corrflow.catalog.tiled import open_catalog
from corrflow.config.settings import load_settings
from corrflow.flows.acquire import run_tomography
from corrflow.flows.models import DEFAULT_SAMPLE
from corrflow.plans import PlanValidationError, TomoScanRequest
from corrflow.plans.metadata import Sample


def test_a_scan_beyond_the_rotation_limits_is_refused_by_the_preflight_before_any_file_or_run(tmp_path):
    settings = load_settings(data_root=tmp_path)
    settings.ensure_directories()
    # Valid as a request (no instrument needed) but not on this beamline: the rotation stops at 360 deg.
    parameters = TomoScanRequest(start_deg=300.0, num_projections=10, exposure_s=0.01)
    with pytest.raises(PlanValidationError, match="exceed the rotation limits"):
        run_tomography(settings, DEFAULT_SAMPLE.model_copy(update={"name": "bad-input"}), parameters)
    assert not any(settings.beamline_storage.rglob("*.h5")), "no detector file may be written"
    with open_catalog(settings) as catalog:
        assert len(catalog.runs) == 0, "no run may be recorded"


def test_request_level_validation_names_the_field():
    with pytest.raises(ValueError, match="exposure_s"):
        TomoScanRequest(num_projections=10, exposure_s=0)
    with pytest.raises(ValueError, match="name"):
        Sample(name="../../etc", proposal="p", user="u")


def test_the_tomography_request_fields_are_the_plan_keywords():
    import inspect

    from corrflow.plans import tomo_scan

    from corrflow.plans import micrograph, tomo_fly_scan
    from corrflow.plans.requests import MicrographRequest, TomoFlyScanRequest

    for plan, model in ((tomo_scan, TomoScanRequest), (tomo_fly_scan, TomoFlyScanRequest), (micrograph, MicrographRequest)):
        keywords = {p.name: p for p in inspect.signature(plan).parameters.values() if p.kind is p.KEYWORD_ONLY}
        assert set(model.model_fields) == set(keywords) - {"sample", "parent_uids", "md"}
        # One definition: the plan's defaults are the model's.
        assert {name: keywords[name].default for name in model.model_fields} == model().model_dump()


def test_the_chain_space_counts_frames_transfer_and_volume_on_each_storage_and_the_nxtomo_as_links():
    from corrflow.flows.acquire import chain_bytes_by_site

    scan = TomoScanRequest(num_projections=100, exposure_s=0.01, num_darks=5, num_flats=5)
    frames = 110 * 32 * 128 * 2
    assert chain_bytes_by_site(scan, frame_shape_px=(32, 128), itemsize=2) == {
        "beamline": frames, "compute": frames + 32 * 128 * 128 * 4, "microscope": 32 * 128 * 128 * 4,
    }
    wide = scan.model_copy(update={"rotation_range_deg": 360.0, "axis_offset_um": 160.0})
    assert chain_bytes_by_site(wide, frame_shape_px=(32, 128), itemsize=2)["microscope"] == 32 * 256 * 256 * 4


@pytest.mark.fault("disk full")
def test_a_scan_whose_chain_would_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The file system is made to look nearly full (the free-space figure is patched; a storage that
    really fills up mid-scan is in test_disk_full.py): the frames alone would fit, their transfer and
    volume would not."""
    import corrflow.plans.preflight as preflight
    from corrflow.flows.acquire import StorageSpaceError, chain_bytes_by_site

    settings = load_settings(data_root=tmp_path)
    settings.ensure_directories()
    scan = TomoScanRequest(num_projections=20, exposure_s=0.01, num_darks=1, num_flats=1)
    needed = chain_bytes_by_site(scan, frame_shape_px=(32, 128), itemsize=2)
    frames_only = needed["beamline"]
    fake_free = preflight.DISK_RESERVE_BYTES + frames_only + 1  # room for the frames, not for the chain
    monkeypatch.setattr(preflight, "free_bytes", lambda path: (fake_free, tmp_path))
    with pytest.raises(StorageSpaceError, match="beamline \\+ compute \\+ microscope storage"):
        run_tomography(settings, DEFAULT_SAMPLE, scan)
    assert not any(p.is_file() for p in settings.beamline_storage.rglob("*"))
    with open_catalog(settings) as catalog:
        assert len(catalog.runs) == 0
