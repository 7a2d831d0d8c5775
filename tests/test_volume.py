"""NXtomo -> volume: chunked with a measured memory bound, clear errors on bad input, nothing half-written."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from corrflow.formats.nexus import write_nxtomo
from corrflow.simulators import make_phantom, xray_frame
from corrflow.simulators.xray import XrayDetectorModel
from corrflow.compute.volume import VolumeInputError, read_provenance, reconstruct_nxtomo

ROWS, COLS, N_PROJ = 48, 96, 120
PIXEL_UM = 10.0


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> dict:
    """A simulated raw scan: 4 darks, 6 flats, 120 projections of 48 x 96 px."""
    model = XrayDetectorModel(shape_px=(ROWS, COLS), pixel_size_um=PIXEL_UM, incident_photons_per_s=2e4,
                              rotation_axis_offset_px=2.0, seed=1)
    phantom = make_phantom(seed=2, diameter_um=700.0, height_um=400.0)
    rng = np.random.default_rng(0)
    common = dict(y_um=0.0, z_um=0.0, exposure_s=0.5, rng=rng)
    angles = np.linspace(0, 180, N_PROJ, endpoint=False)
    darks = [xray_frame(phantom, model, angle_deg=0, x_um=0, shutter_open=False, **common) for _ in range(4)]
    flats = [xray_frame(phantom, model, angle_deg=0, x_um=5000, shutter_open=True, **common) for _ in range(6)]
    projs = [xray_frame(phantom, model, angle_deg=a, x_um=0, shutter_open=True, **common) for a in angles]
    data = np.stack(darks + flats + projs)
    key = np.array([2] * 4 + [1] * 6 + [0] * N_PROJ)
    rotation = np.concatenate([np.zeros(10), angles])
    return {"data": data, "image_key": key, "rotation": rotation, "center": model.axis_column(x_um=0.0),
            "root": tmp_path_factory.mktemp("volume")}


def _nxtomo(scan: dict, name: str, **overrides) -> Path:
    n = len(scan["data"])
    kwargs = dict(
        data=scan["data"], image_key=scan["image_key"], rotation_angle_deg=scan["rotation"],
        x_translation_um=np.zeros(n), y_translation_um=np.zeros(n), z_translation_um=np.zeros(n),
        pixel_size_um=PIXEL_UM, distance_mm=100.0, energy_keV=25.0, count_time_s=0.5, sample_name="s",
        title="t", metadata={"identification": {}, "references": {}, "settings": {}},
    )
    kwargs.update(overrides)
    return write_nxtomo(scan["root"] / f"{name}.nxs", **kwargs)


def test_chunked_reconstruction_memory_is_bounded_by_the_slab_not_the_scan(scan):
    """Bound (stated in corrflow/compute/volume.py): peak ~ flats/darks means + a few copies of one slab of
    n_proj x chunk_rows x cols float32 + one output slab. For chunk_rows=4 that is ~1 MB here, while
    the raw projections alone are 2.2 MB as uint16 (4.4 MB as float32)."""
    path = _nxtomo(scan, "memory")
    slab_bytes = N_PROJ * 4 * COLS * 4
    frame_bytes = ROWS * COLS * 4
    # Warm-up: one-off allocations that persist (filter tables, caches) are not per-scan memory.
    reconstruct_nxtomo(path, scan["root"] / "vol_warmup.nxs", chunk_rows=4, center_px=scan["center"])
    peaks = {}
    for chunk_rows in (4, ROWS):
        tracemalloc.start()
        reconstruct_nxtomo(path, scan["root"] / f"vol_{chunk_rows}.nxs", chunk_rows=chunk_rows, center_px=scan["center"])
        peaks[chunk_rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    bound = 6 * slab_bytes + 4 * frame_bytes + 4 * (4 * COLS * COLS * 4) + (1 << 20) + 500_000  # + hash buffer, overheads
    assert peaks[4] < bound, (peaks, bound)
    # Memory follows chunk_rows, not the scan. How many slabs are in flight at once depends on the
    # thread scheduling, so the ratio to the whole-scan peak varies with the machine's load (about
    # 0.4 quiet, 0.5 beside two CPU-bound processes); the bound above does not.
    assert peaks[4] < 0.75 * peaks[ROWS], peaks


def test_chunking_does_not_change_the_result(scan):
    path = _nxtomo(scan, "chunks")
    a = reconstruct_nxtomo(path, scan["root"] / "a.nxs", chunk_rows=5, center_px=scan["center"]).path
    b = reconstruct_nxtomo(path, scan["root"] / "b.nxs", chunk_rows=ROWS, center_px=scan["center"]).path
    with h5py.File(a) as fa, h5py.File(b) as fb:
        np.testing.assert_allclose(fa["/entry/data/data"][()], fb["/entry/data/data"][()], rtol=1e-5, atol=1e-5)
    record = read_provenance(a)
    assert record["parameters"]["chunk_rows"] == 5
    assert record["input_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # hashed beside the slabs


def test_automatic_centre_matches_the_true_axis(scan):
    product = reconstruct_nxtomo(_nxtomo(scan, "centre"), scan["root"] / "centre_volume.nxs")
    assert abs(product.center_px - scan["center"]) < 0.1


@pytest.mark.parametrize(
    ("name", "mutate", "message"),
    [
        ("angles", lambda s: {"rotation_angle_deg": s["rotation"][:-3]}, "rotation_angle"),
        ("zero_flat", lambda s: {"data": _with_frames(s, slice(4, 10), 0)}, "flat"),
        ("no_darks", lambda s: {"image_key": np.where(s["image_key"] == 2, 0, s["image_key"])}, "darks"),
    ],
)
def test_bad_raw_data_is_rejected_naming_the_problem_and_nothing_is_left(scan, name, mutate, message):
    try:
        path = _nxtomo(scan, f"bad_{name}", **mutate(scan))
    except ValueError as exc:  # the NXtomo writer may already refuse it: equally clear and earlier
        assert message in str(exc)
        return
    out = scan["root"] / f"bad_{name}_volume.nxs"
    with pytest.raises(ValueError, match=message):
        reconstruct_nxtomo(path, out, center_px=scan["center"])
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


def test_float_raw_data_with_nan_flats_is_rejected(scan):
    """Other software writes float NXtomo data; a NaN in a flat must not propagate into a volume."""
    path = _float_nxtomo_with_nan(scan, "nan_flat", (5, 3, 3))
    out = scan["root"] / "nan_flat_volume.nxs"
    with pytest.raises(ValueError, match="flat"):
        reconstruct_nxtomo(path, out, center_px=scan["center"])
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


def test_centre_outside_the_detector_is_rejected(scan):
    path = _nxtomo(scan, "centre_out")
    with pytest.raises(VolumeInputError, match="outside the detector"):
        reconstruct_nxtomo(path, scan["root"] / "out.nxs", center_px=COLS + 5.0)


def test_existing_volume_is_never_overwritten(scan):
    path = _nxtomo(scan, "exists")
    out = scan["root"] / "exists_volume.nxs"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        reconstruct_nxtomo(path, out, center_px=scan["center"])
    assert out.read_bytes() == b"precious"


def _float_nxtomo_with_nan(scan, name: str, index: tuple[int, int, int]) -> Path:
    """An NXtomo whose detector data are float32 (as other software writes them) with one NaN."""
    path = _nxtomo(scan, name)
    with h5py.File(path, "r+") as f:
        data = f["/entry/instrument/detector/data"][()].astype(np.float32)
        data[index] = np.nan
        del f["/entry/data/data"], f["/entry/instrument/detector/data"]
        f["/entry/instrument/detector/data"] = data
    return path


def _with_frames(scan, index, value):
    data = scan["data"].copy()
    data[index] = value
    return data


# ------------------------------------------------------------------ the slabs on a Dask cluster


def _initial_environment(worker_environ: bytes) -> dict[str, str]:
    """A process's environment as it started (what glibc read), from /proc/<pid>/environ."""
    pairs = (entry.split("=", 1) for entry in worker_environ.decode(errors="replace").split("\0") if "=" in entry)
    return dict(pairs)


def _read_own_environ() -> bytes:
    return Path("/proc/self/environ").read_bytes()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_local_cluster_workers_keep_glibc_malloc_defaults(monkeypatch):
    """Dask's nanny exports MALLOC_TRIM_THRESHOLD_ into its workers, which switches off glibc's
    adaptive mmap threshold (every slab temporary becomes a page-faulted mmap). Ours start without
    it, even when an earlier nanny has left it in this process's environment."""
    from distributed import Client, LocalCluster

    from corrflow.compute.dask_cluster import MALLOC_TRIM_VARIABLE, local_cluster

    monkeypatch.setenv(MALLOC_TRIM_VARIABLE, "65536")  # as a nanny started earlier leaves it
    kwargs = dict(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    with LocalCluster(**kwargs) as plain, Client(plain) as client:
        (environ,) = client.run(_read_own_environ).values()
    assert MALLOC_TRIM_VARIABLE in _initial_environment(environ)  # the premise: Dask still does this
    with local_cluster(**kwargs) as ours, Client(ours) as client:
        (environ,) = client.run(_read_own_environ).values()
    assert MALLOC_TRIM_VARIABLE not in _initial_environment(environ)
    assert os.environ[MALLOC_TRIM_VARIABLE] == "65536"  # put back for whoever set it


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, as a facility's standing cluster (``compute.dask_address``)."""
    from corrflow.compute.dask_cluster import local_cluster

    with local_cluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as running:
        yield running


def test_flow_spreads_the_slabs_over_the_cluster_and_matches_the_in_process_volume(scan, cluster, prefect_harness):
    from distributed import Client, get_task_stream

    from corrflow.flows.models import ReconstructionParameters, Sample
    from corrflow.flows.reconstruct import reconstruct_on_dask
    from corrflow.config.settings import ComputeSettings

    path = _nxtomo(scan, "dask")
    expected = reconstruct_nxtomo(path, scan["root"] / "dask_in_process.nxs", chunk_rows=8, center_px=scan["center"])
    parameters = ReconstructionParameters(center_px=scan["center"], chunk_rows=8)
    with Client(cluster) as client, get_task_stream(client) as stream:
        product = reconstruct_on_dask(
            Sample(name="s"), path, scan["root"] / "dask_volume.nxs", "run-dask", parameters,
            ComputeSettings(dask_address=cluster.scheduler_address),
        )
    slabs = [task for task in stream.data if str(task["key"]).startswith("reconstruct-slab")]
    assert len(slabs) == ROWS // 8
    assert len({task["worker"] for task in slabs}) == 2  # both workers took slabs
    with h5py.File(expected.path) as fa, h5py.File(product.path) as fb:
        np.testing.assert_allclose(fb["/entry/data/data"][()], fa["/entry/data/data"][()], rtol=1e-5, atol=1e-5)
    record = read_provenance(product.path)
    assert record["input_run_uid"] == "run-dask" and record["dask_workers"] == 2
    assert record["input_sha256"] == expected.input_sha256


def test_slabs_in_flight_are_bounded(scan, cluster):
    """The flow holds at most ``max_in_flight`` slabs submitted and not yet written (memory bound)."""
    from distributed import Client

    from corrflow.flows.reconstruct import dask_slabs

    path = _nxtomo(scan, "in_flight")
    outstanding: list[int] = []

    def counting(jobs):
        pulled = 0

        def pull():
            nonlocal pulled
            for job in jobs:
                pulled += 1
                yield job

        for written, (job, slab) in enumerate(mapper(pull())):
            outstanding.append(pulled - written)
            yield job, slab

    with Client(cluster) as client:
        mapper = dask_slabs(client, max_in_flight=2)
        reconstruct_nxtomo(path, scan["root"] / "in_flight_volume.nxs", chunk_rows=4, center_px=scan["center"], map_slabs=counting)
    assert len(outstanding) == ROWS // 4 and max(outstanding) == 2


def test_a_slab_failing_on_a_worker_fails_the_flow_naming_the_rows_and_leaves_no_volume(scan, cluster, prefect_harness):
    from corrflow.flows.models import ReconstructionParameters, Sample
    from corrflow.flows.reconstruct import reconstruct_on_dask
    from corrflow.config.settings import ComputeSettings

    # A corrupt pixel in the last projection, in the last slab only: the others are written first.
    path = _float_nxtomo_with_nan(scan, "nan_projection", (len(scan["data"]) - 1, ROWS - 3, 10))
    out = scan["root"] / "nan_projection_volume.nxs"
    with pytest.raises(VolumeInputError, match=rf"rows {ROWS - 8}\.\.{ROWS - 1}: projections contain NaN"):
        reconstruct_on_dask(
            Sample(name="s"), path, out, "run-nan", ReconstructionParameters(center_px=scan["center"], chunk_rows=8),
            ComputeSettings(dask_address=cluster.scheduler_address),
        )
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


@pytest.mark.fault("corruption after transfer")
def test_an_input_changed_after_its_verified_transfer_is_refused_and_no_volume_is_kept(scan, prefect_harness, tmp_path):
    from corrflow.catalog.tiled import open_catalog
    from corrflow.config.settings import load_settings
    from corrflow.flows.models import ExperimentRequest, StoredFile, TomographyRun, TransferredRun
    from corrflow.flows.reconstruct import InputMismatchError, reconstruction_stage
    from corrflow.transfer.verified import MANIFEST_NAME, transfer_files

    settings = load_settings(data_root=tmp_path, compute={"dask_workers": 1})
    settings.ensure_directories()
    raw = _nxtomo(scan, "transferred")
    source = settings.beamline_storage / "scan" / "transferred.nxs"
    source.parent.mkdir(parents=True)
    source.write_bytes(raw.read_bytes())
    transfer_files([source], source_root=settings.beamline_storage, destination_root=settings.compute_storage / "uid-9")
    landed = settings.compute_storage / "uid-9" / "scan" / "transferred.nxs"
    with h5py.File(landed, "r+") as f:  # bit rot on the compute storage, after the verified transfer
        f["/entry/instrument/detector/data"][20, 10, 10] += 1
    nxtomo = StoredFile.under(settings, "compute", landed)
    transfer = TransferredRun(
        catalog_key="uid-9-transfer", files=(nxtomo,), nxtomo=nxtomo,
        manifest=StoredFile(site="compute", path=f"uid-9/{MANIFEST_NAME}"), total_bytes=landed.stat().st_size, seconds=0.0,
    )
    tomography = TomographyRun(
        run_uid="uid-9", instrument="sim-tomo", files=(StoredFile.under(settings, "beamline", source),),
        nxtomo=StoredFile.under(settings, "beamline", source),
    )
    with pytest.raises(InputMismatchError, match="differs from the transfer manifest"):
        reconstruction_stage(settings, ExperimentRequest(), tomography=tomography, transfer=transfer)
    assert not any(p.name.endswith(("_volume.nxs", ".part")) for p in (settings.compute_storage / "uid-9").iterdir())
    with open_catalog(settings) as catalog:
        assert "uid-9-volume" not in catalog.processed
