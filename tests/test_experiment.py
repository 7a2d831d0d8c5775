"""The spine end to end: the parent flow under a real (test) Prefect server, scored against the truth."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from corrflow.report import ground_truth
from corrflow.config.settings import load_settings

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def experiment(prefect_harness, data_root: Path) -> dict:
    """The in-process runner, with the settings its caller validated (as `corrflow demo` gives them)."""
    from corrflow.config.settings import activate
    from corrflow.flows.models import ExperimentRequest, Sample
    from corrflow.flows.pipeline import correlative_experiment
    from corrflow.flows.report import read_summary

    settings = load_settings(data_root=data_root)
    activate(settings)
    try:
        products = correlative_experiment(request=ExperimentRequest(sample=Sample(name="spine-test-01")))
    finally:
        activate(None)
    return read_summary(settings, products.tomography.run_uid)


def test_parent_flow_writes_summary_with_every_product(experiment):
    summary = json.loads(Path(experiment["summary_path"]).read_text())
    assert summary == experiment  # the file and the catalog's record are one summary
    assert set(summary["run_uids"]) == {"tomography", "micrograph", "handoff_micrographs"}
    for key in ("raw_nxtomo_path", "volume_path", "report_png", "summary_path"):
        assert Path(summary[key]).is_file(), key
    assert Path(summary["report_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["reconstruction_error"]["nrmse"] > 0  # scored, not left empty
    assert summary["registration_error"]["rms_um"] >= 0


def test_reconstruction_matches_the_phantom_within_the_noise_and_discretisation_bound(experiment, data_root):
    """Bound: error^2 <= floor^2 + noise^2 (+30 %), where
    * floor = FBP of the noise-free analytic line integrals on the same grid (discretisation and
      partial-volume error of FBP itself, no photon noise), and
    * noise = the photon noise measured in the matrix interior of the reconstruction.
    A wrong centre, a mirrored geometry or a scaling error adds a systematic term and fails this.
    """
    from corrflow.processing.fbp import fbp_volume
    from corrflow.simulators.world import SimulatedWorld

    settings = load_settings()
    error = experiment["reconstruction_error"]
    world = SimulatedWorld(settings.simulation)
    model, phantom = world.xray, world.phantom()
    rows, cols = model.shape_px
    px = model.pixel_size_um
    angles = np.linspace(0.0, 180.0, 180, endpoint=False)
    u = (np.arange(cols) - model.axis_column(x_um=0.0)) * px
    z = (np.arange(rows) - (rows - 1) / 2) * px
    sinograms = np.stack([phantom.line_integrals(angle_deg=a, u_um=u, z_um=z) for a in angles], axis=1)
    noiseless = fbp_volume(sinograms, angles, center_px=model.axis_column(x_um=0.0), filter_name="shepp-logan", pixel_size_um=px)
    truth = ground_truth.phantom_on_volume_grid(phantom, shape_zyx=noiseless.shape, voxel_size_um=px)
    floor = ground_truth.reconstruction_error(noiseless, truth)

    noise_relative = error["matrix_noise_per_mm"] / (error["rmse_per_mm"] / error["nrmse"])
    bound = 1.3 * np.hypot(floor.nrmse, noise_relative)
    assert error["nrmse"] <= bound, (error, floor, bound)
    assert abs(error["matrix_mean_error_pct"]) < 2.0  # unbiased: mean of ~1e5 voxels
    assert floor.nrmse < error["nrmse"]  # the noise-free floor is below the real scan's error


def test_rotation_centre_is_found_to_a_fraction_of_a_pixel(experiment):
    from corrflow.simulators.world import SimulatedWorld

    true_centre = SimulatedWorld(load_settings().simulation).xray.axis_column(x_um=0.0)
    assert abs(experiment["reconstruction"]["center_px"] - true_centre) < 0.25


def test_registration_recovers_the_true_microscope_transform(experiment):
    """Bound: in-plane, fiducial centroids in an 8 um-voxel reconstruction are good to ~0.1 voxel
    and a least-squares fit over >= 5 of them is good to ~0.5 um over the field of view (rotation
    ~0.005 deg, scale ~0.05 %). The section height comes from the band-passed rank correlation of the
    micrograph with the volume around it; over 12 micrograph noise realisations it came out at
    20.1-20.9 um (true 20 um) and the total error at 0.72-1.14 um RMS. We require <= 2 um RMS
    (a quarter voxel), rotation <= 0.05 deg, scale <= 0.1 %; a one-voxel height slip (8 um) or a
    0.1 deg rotation error fails."""
    err = experiment["registration_error"]
    assert experiment["registration"]["n_matches"] >= 5
    assert err["rms_um"] <= 2.0, err
    assert err["rotation_error_deg"] <= 0.05, err
    assert err["scale_error_pct"] <= 0.1, err


def test_roi_hand_off_centres_the_largest_pore_on_the_microscope(experiment):
    """Goal (issue #5): <= 1 um in the simulated world. The first pass carries the feature's
    centroid error in 8 um voxels (~0.15 voxel); the corrective move uses the micrograph's 3 um
    pixels, where a blob centroid is good to ~0.1 pixel, so the final error is well under 1 um."""
    handoff = experiment["roi_handoff"]
    assert handoff["roi_radius_um"] > 0
    assert len(handoff["micrograph_run_uids"]) == 2
    assert handoff["first_pass_true_error_um"] < 4.0
    assert handoff["true_error_um"] <= 1.0, handoff
    assert handoff["observed_offset_um"] <= 1.0, handoff


def test_raw_run_reads_back_through_tiled_and_databroker(experiment, data_root):
    from corrflow.catalog.tiled import open_catalog

    uid = experiment["run_uids"]["tomography"]
    with h5py.File(experiment["raw_nxtomo_path"], "r") as nx:
        keys = nx["/entry/instrument/detector/image_key"][()]
        raw_projections = nx["/entry/instrument/detector/data"][keys == 0]
    with open_catalog(load_settings()) as catalog:
        run = catalog.runs[uid]
        start = run.metadata["start"]
        assert start["identification"]["sample_name"] == "spine-test-01"
        assert {"identification", "references", "settings"} <= set(start)
        assert run.metadata["stop"]["exit_status"] == "success"
        projections = np.asarray(run["primary"]["xray_detector_image"].read())
        np.testing.assert_array_equal(projections, raw_projections)
        header = catalog.runs.v1[uid]
        table = header.table("primary")
        assert len(table) == len(raw_projections)
        np.testing.assert_allclose(table["sample_stage_rotation"].to_numpy(), np.linspace(0, 180, 180, endpoint=False), atol=1e-6)
        first = next(iter(header.data("xray_detector_image", stream_name="primary")))
        np.testing.assert_array_equal(np.asarray(first), raw_projections[0])


def test_volume_carries_provenance_of_its_verified_input(experiment):
    from corrflow.formats.checksums import sha256_file
    from corrflow.compute.volume import read_provenance

    record = read_provenance(Path(experiment["volume_path"]))
    manifest = json.loads(Path(experiment["transfer"]["manifest"]).read_text())
    nexus_entry = next(f for f in manifest["files"] if f["relative_path"].endswith("_nxtomo.nxs"))
    assert record["input_run_uid"] == experiment["run_uids"]["tomography"]
    assert record["input_sha256"] == nexus_entry["sha256"] == sha256_file(Path(record["input_file"]))
    assert record["parameters"]["filter_name"] == "shepp-logan"
    assert "corrflow" in record["software"]


def test_volume_is_catalogued_with_provenance_and_reads_back(experiment):
    from corrflow.catalog.tiled import open_catalog

    uid = experiment["run_uids"]["tomography"]
    with h5py.File(experiment["volume_path"], "r") as f:
        on_disk = f["/entry/data/data"][16]
    with open_catalog(load_settings()) as catalog:
        node = catalog.processed[f"{uid}-volume"]
        assert node.metadata["parent_run_uids"] == [uid]
        assert node.metadata["provenance"]["input_run_uid"] == uid
        assert node.metadata["units"] == "1/mm"
        np.testing.assert_array_equal(node[16], on_disk)


def test_flow_run_names_say_sample_and_stage(experiment):
    import asyncio

    from prefect.client.orchestration import get_client

    async def names() -> list[str]:
        async with get_client() as client:
            return [run.name for run in await client.read_flow_runs(limit=50)]

    found = asyncio.run(names())
    from corrflow.flows.pipeline import PIPELINE

    for stage in [*(s.title for s in PIPELINE), "correlative experiment"]:
        assert f"spine-test-01 · {stage}" in found, (stage, found)


def test_the_microscope_stages_read_a_verified_copy_on_the_microscope_storage(experiment):
    """Registration and the hand-off read the volume from the microscope site's storage: a copy
    whose sha256 is the compute one's, listed in the catalog beside the compute location."""
    from corrflow.catalog.tiled import open_catalog
    from corrflow.formats.checksums import sha256_file
    from corrflow.compute.volume import read_provenance

    settings = load_settings()
    compute, shipped = Path(experiment["volume_path"]), experiment["microscope_volume"]
    local = Path(shipped["path"])
    assert local.is_relative_to(settings.microscope_storage.resolve()) and local != compute
    assert sha256_file(local) == sha256_file(compute) == shipped["sha256"]
    assert read_provenance(local) == read_provenance(compute)
    uid = experiment["run_uids"]["tomography"]
    with open_catalog(settings) as catalog:
        locations = catalog.processed[f"{uid}-volume"].metadata["locations"]
    assert locations["microscope"]["path"] == str(local) and locations["compute"]["path"] == str(compute.resolve())
    assert locations["microscope"]["sha256"] == locations["compute"]["sha256"] == shipped["sha256"]


def test_every_product_is_catalogued_with_its_parents(experiment):
    """The catalog holds the whole chain: raw runs, transfer, volume, registration, hand-off and the
    report, each linked to the runs and products it came from."""
    from corrflow.catalog.tiled import open_catalog, plain

    uid = experiment["run_uids"]["tomography"]
    micrograph_uid = experiment["run_uids"]["micrograph"]
    handoff_uids = experiment["run_uids"]["handoff_micrographs"]
    with open_catalog(load_settings()) as catalog:
        records = {kind: plain(catalog.processed[f"{uid}-{kind}"].metadata) for kind in ("transfer", "volume", "registration", "handoff", "report")}
        micrographs = {u: plain(catalog.runs[u].metadata) for u in (micrograph_uid, *handoff_uids)}
    assert records["transfer"]["parent_run_uids"] == [uid]
    assert records["volume"]["parents"] == {"transfer": f"{uid}-transfer"}
    registration = records["registration"]
    assert registration["parent_run_uids"] == [uid, micrograph_uid]
    assert registration["parents"] == {"volume": f"{uid}-volume"}
    assert registration["frames"] == {"from": "microscope_stage", "to": "beamline_sample"}
    assert registration["method"] == "fiducials" and registration["n_matches"] >= 5
    assert registration["sample_from_microscope"] == experiment["registration"]["sample_from_microscope"]
    handoff = records["handoff"]
    assert handoff["parents"] == {"registration": f"{uid}-registration"}
    assert handoff["parent_run_uids"] == [uid, *handoff_uids] and len(handoff_uids) == 2
    assert handoff["true_error_um"] == experiment["roi_handoff"]["true_error_um"]
    assert records["report"]["summary"] == experiment
    assert set(records["report"]["parents"].values()) == {f"{uid}-{k}" for k in ("transfer", "volume", "registration", "handoff")}
    for run in micrographs.values():  # every micrograph follows from the tomography run
        assert run["start"]["references"]["parent_uids"] == [uid], run["start"]["references"]
        assert run["stop"]["exit_status"] == "success"
