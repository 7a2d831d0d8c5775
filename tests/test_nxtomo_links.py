"""The production NXtomo export links the detector frames (an HDF5 virtual dataset) instead of
copying them: the scan is stored once, outside readers see the same frames, the file and its
detector files travel together, and a missing or changed detector file is refused, never read as
zeros or reconstructed."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from corrflow.catalog.tiled import open_catalog
from corrflow.config.settings import load_settings
from corrflow.flows.acquire import run_tomography
from corrflow.flows.models import DEFAULT_SAMPLE, ExperimentRequest
from corrflow.formats.nexus import NXtomoError, linked_files, read_nxtomo
from corrflow.plans.requests import TomoScanRequest

SCAN = TomoScanRequest(num_projections=24, exposure_s=0.01, num_darks=2, num_flats=3)
DATA = "/entry/instrument/detector/data"


@pytest.fixture(scope="module")
def acquired(tmp_path_factory):
    settings = load_settings(data_root=tmp_path_factory.mktemp("links"), compute={"dask_workers": 1})
    settings.ensure_directories()
    run = run_tomography(settings, DEFAULT_SAMPLE.model_copy(update={"name": "linked-01"}), SCAN)
    return settings, run


def test_the_nxtomo_links_the_detector_frames_and_holds_the_same_frames_as_the_catalog(acquired):
    settings, run = acquired
    nxtomo = run.nxtomo.local_path(settings)
    with h5py.File(nxtomo, "r") as f:
        assert f[DATA].is_virtual and f[DATA].shape == (SCAN.n_frames, 32, 128)
    detector_files = [stored.local_path(settings) for stored in run.files if stored.path.endswith(".h5")]
    assert sorted(linked_files(nxtomo)) == sorted(detector_files)
    frames_bytes = SCAN.n_frames * 32 * 128 * 2
    assert nxtomo.stat().st_size < frames_bytes / 4, "the frames are not copied"
    with open_catalog(settings) as catalog:
        entry = catalog.runs[run.run_uid]
        expected = np.concatenate([np.asarray(entry[s]["xray_detector_image"].read()) for s in ("dark", "flat", "primary")])
    scan = read_nxtomo(nxtomo)
    np.testing.assert_array_equal(scan.data, expected)
    assert list(scan.image_key) == [2] * 2 + [1] * 3 + [0] * 24


def test_an_outside_reader_and_a_moved_copy_see_the_same_frames(acquired, tmp_path):
    from nexusformat.nexus import nxload

    settings, run = acquired
    nxtomo = run.nxtomo.local_path(settings)
    moved = tmp_path / "elsewhere"
    shutil.copytree(nxtomo.parent, moved)
    original = read_nxtomo(nxtomo).data
    np.testing.assert_array_equal(read_nxtomo(moved / nxtomo.name).data, original)
    root = nxload(str(moved / nxtomo.name), "r")
    np.testing.assert_array_equal(np.asarray(root["entry/data/data"].nxdata), original)


@pytest.mark.fault("bad raw data")
def test_an_nxtomo_whose_detector_file_is_missing_is_refused_by_the_reader_and_the_reconstruction(acquired, tmp_path):
    from corrflow.compute.volume import VolumeInputError, reconstruct_nxtomo

    settings, run = acquired
    nxtomo = run.nxtomo.local_path(settings)
    copy = tmp_path / "incomplete"
    shutil.copytree(nxtomo.parent, copy)
    gone = copy / linked_files(nxtomo)[-1].name
    gone.unlink()
    with pytest.raises(NXtomoError, match=gone.name):
        read_nxtomo(copy / nxtomo.name)
    with pytest.raises(VolumeInputError, match=gone.name):
        reconstruct_nxtomo(copy / nxtomo.name, tmp_path / "volume.nxs")
    assert not (tmp_path / "volume.nxs").exists()


@pytest.mark.fault("corruption after transfer")
def test_a_detector_file_changed_after_its_verified_transfer_is_refused_by_the_reconstruction_stage(acquired, prefect_harness):
    from corrflow.flows.reconstruct import InputMismatchError, reconstruction_stage
    from corrflow.flows.transfer import transfer_stage

    settings, run = acquired
    request = ExperimentRequest(sample=DEFAULT_SAMPLE.model_copy(update={"name": "linked-01"}))
    transfer = transfer_stage(settings, request, tomography=run)
    landed = transfer.nxtomo.local_path(settings)
    projections = max(linked_files(landed), key=lambda p: p.stat().st_size)
    with h5py.File(projections, "r+") as f:  # bit rot on the compute storage, after the verified transfer
        f["/entry/data/data"][3, 10, 10] += 1
    with pytest.raises(InputMismatchError, match=projections.name):
        reconstruction_stage(settings, request, tomography=run, transfer=transfer)
    assert not list(landed.parent.glob("*_volume.nxs*"))
