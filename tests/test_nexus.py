"""NXtomo writing and reading: required structure, round trip, no overwrite, checks on read."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from nexusformat.nexus import nxload

from corrflow.formats import nexus
from corrflow.formats.nexus import NXtomoError, read_nxtomo, write_nxtomo

ROWS, COLS = 6, 10


def _scan_arrays(n_darks=2, n_flats=3, n_projections=8):
    rng = np.random.default_rng(3)
    n = n_darks + n_flats + n_projections
    image_key = np.array([2] * n_darks + [1] * n_flats + [0] * n_projections)
    angles = np.concatenate([np.zeros(n_darks + n_flats), np.linspace(0.0, 180.0, n_projections, endpoint=False)])
    x = np.concatenate([np.zeros(n_darks), np.full(n_flats, 1536.0), np.zeros(n_projections)])
    return dict(
        data=rng.integers(0, 60000, size=(n, ROWS, COLS), dtype=np.uint16),
        image_key=image_key,
        rotation_angle_deg=angles,
        x_translation_um=x,
        y_translation_um=np.zeros(n),
        z_translation_um=np.full(n, 5.0),
        pixel_size_um=8.0,
        distance_mm=120.0,
        energy_keV=25.0,
        count_time_s=0.1,
        sample_name="AlSi10Mg-7",
        title="tomo_scan of AlSi10Mg-7",
        metadata={
            "identification": {"proposal": "P-1", "sample_name": "AlSi10Mg-7", "user": "ada"},
            "references": {"frame": "beamline_sample", "parent_uids": ["run-1"]},
            "settings": {"parameters": {"exposure_s": 0.1}, "units": {"exposure_s": "s"}},
        },
    )


def test_nxtomo_has_the_required_structure(tmp_path):
    arrays = _scan_arrays()
    path = write_nxtomo(tmp_path / "scan.nxs", **arrays)
    assert path == tmp_path / "scan.nxs"
    with h5py.File(path, "r") as f:
        classes = {
            "/entry": "NXentry",
            "/entry/instrument": "NXinstrument",
            "/entry/instrument/source": "NXsource",
            "/entry/instrument/detector": "NXdetector",
            "/entry/sample": "NXsample",
            "/entry/control": "NXmonitor",
            "/entry/data": "NXdata",
        }
        for name, nx_class in classes.items():
            assert f[name].attrs["NX_class"] == nx_class, name
        assert f["/entry/definition"][()].decode() == "NXtomo"
        assert f["/entry/instrument/source/probe"][()].decode() == "x-ray"
        detector = f["/entry/instrument/detector"]
        assert detector["data"].shape == (13, ROWS, COLS) and detector["data"].dtype == np.uint16
        assert detector["data"].chunks == (1, ROWS, COLS)
        assert detector["image_key"][()].tolist() == arrays["image_key"].tolist()
        assert detector["x_pixel_size"].attrs["units"] == "um" and detector["x_pixel_size"][()] == 8.0
        assert detector["distance"].attrs["units"] == "mm" and detector["distance"][()] == 120.0
        assert detector["count_time"].attrs["units"] == "s"
        sample = f["/entry/sample"]
        assert sample["rotation_angle"].attrs["units"] == "degree"
        for axis in "xyz":
            assert sample[f"{axis}_translation"].attrs["units"] == "um"
        assert f["/entry/control/data"].shape == (13,)
        nxdata = f["/entry/data"]
        assert nxdata.attrs["signal"] == "data"
        # Hard links: the same HDF5 objects, not copies.
        assert nxdata["data"] == detector["data"]
        assert nxdata["rotation_angle"] == sample["rotation_angle"]
        assert nxdata["image_key"] == detector["image_key"]
        assert f["/entry/corrflow_metadata"].attrs["NX_class"] == "NXcollection"
    root = nxload(str(path))
    assert root.entry.nxclass == "NXentry"
    assert str(root.entry.definition) == "NXtomo"
    assert root.entry.data.nxsignal.nxname == "data"
    assert root.entry.data.nxsignal.shape == (13, ROWS, COLS)
    assert root.entry.instrument.detector.nxclass == "NXdetector"
    assert root.entry.sample.rotation_angle.attrs["units"] == "degree"


def test_round_trip_keeps_data_geometry_and_metadata(tmp_path):
    arrays = _scan_arrays()
    scan = read_nxtomo(write_nxtomo(tmp_path / "scan.nxs", **arrays))
    np.testing.assert_array_equal(scan.data, arrays["data"])
    np.testing.assert_array_equal(scan.image_key, arrays["image_key"])
    np.testing.assert_allclose(scan.rotation_angle_deg, arrays["rotation_angle_deg"])
    np.testing.assert_allclose(scan.x_translation_um, arrays["x_translation_um"])
    np.testing.assert_allclose(scan.z_translation_um, 5.0)
    np.testing.assert_allclose(scan.count_time_s, 0.1)
    assert (scan.pixel_size_um, scan.distance_mm, scan.energy_keV) == (8.0, 120.0, 25.0)
    assert scan.sample_name == "AlSi10Mg-7" and scan.title == "tomo_scan of AlSi10Mg-7"
    assert scan.metadata == arrays["metadata"]
    assert scan.projections.shape == (8, ROWS, COLS)
    assert scan.flats.shape == (3, ROWS, COLS) and scan.darks.shape == (2, ROWS, COLS)
    np.testing.assert_allclose(scan.projection_angles_deg, np.linspace(0.0, 180.0, 8, endpoint=False))


@pytest.mark.fault("no overwrite")
def test_refuses_to_overwrite_and_leaves_no_partial_files(tmp_path):
    path = tmp_path / "scan.nxs"
    write_nxtomo(path, **_scan_arrays())
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_nxtomo(path, **_scan_arrays(n_projections=4))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nxs"]


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    original = nexus._dataset

    def failing(parent, name, value, *, units):
        if name == "rotation_angle":
            raise OSError("disk full")
        return original(parent, name, value, units=units)

    monkeypatch.setattr(nexus, "_dataset", failing)
    with pytest.raises(OSError, match="disk full"):
        write_nxtomo(tmp_path / "scan.nxs", **_scan_arrays())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": np.zeros((13, ROWS, COLS), dtype=np.float32)}, "uint16"),
        ({"data": np.zeros((ROWS, COLS), dtype=np.uint16)}, "data"),
        ({"image_key": np.zeros(12)}, "image_key"),
        ({"image_key": np.full(13, 7)}, "image_key"),
        ({"rotation_angle_deg": np.zeros(5)}, "rotation_angle_deg"),
        ({"x_translation_um": np.full(13, np.nan)}, "x_translation_um"),
        ({"pixel_size_um": 0.0}, "pixel_size_um"),
        ({"energy_keV": -1.0}, "energy_keV"),
        ({"metadata": {"identification": {}}}, "references"),
    ],
)
def test_bad_inputs_are_refused_before_writing(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        write_nxtomo(tmp_path / "scan.nxs", **{**_scan_arrays(), **changes})
    assert list(tmp_path.iterdir()) == []


def _corrupt(path, edit):
    with h5py.File(path, "r+") as f:
        edit(f)


@pytest.mark.parametrize(
    ("edit", "dataset"),
    [
        (lambda f: f.__delitem__("/entry/sample/rotation_angle"), "/entry/sample/rotation_angle"),
        (
            lambda f: (
                f.__delitem__("/entry/sample/rotation_angle"),
                f.create_dataset("/entry/sample/rotation_angle", data=np.zeros(5)).attrs.__setitem__("units", "degree"),
            ),
            "/entry/sample/rotation_angle",
        ),
        (lambda f: f["/entry/sample/rotation_angle"].attrs.__setitem__("units", "rad"), "/entry/sample/rotation_angle"),
        (lambda f: f["/entry/instrument/detector/image_key"].__setitem__(0, 9), "/entry/instrument/detector/image_key"),
        (lambda f: f["/entry/instrument/detector/image_key"].__setitem__(slice(None), 1), "no frame as a projection"),
        (lambda f: f["/entry/instrument/detector"].attrs.__setitem__("NX_class", "NXcollection"), "/entry/instrument/detector"),
        (lambda f: f["/entry/sample/x_translation"].__setitem__(3, np.inf), "/entry/sample/x_translation"),
    ],
)
@pytest.mark.fault("bad raw data")
def test_read_checks_name_the_faulty_dataset(tmp_path, edit, dataset):
    path = write_nxtomo(tmp_path / "scan.nxs", **_scan_arrays())
    _corrupt(path, edit)
    with pytest.raises(NXtomoError, match=dataset):
        read_nxtomo(path)


def test_read_refuses_a_file_that_is_not_nxtomo(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_group("entry").attrs["NX_class"] = "NXentry"
        f["/entry/definition"] = "NXmx"
    with pytest.raises(NXtomoError, match="NXtomo"):
        read_nxtomo(path)
    with pytest.raises(FileNotFoundError):
        read_nxtomo(tmp_path / "missing.nxs")


def test_a_simulated_scan_converts_to_nxtomo(tmp_path):
    from bluesky import RunEngine

    from corrflow.devices.beamline import build_beamline
    from corrflow.formats.nexus import write_nxtomo_from_documents
    from corrflow.plans import tomo_scan
    from corrflow.config.settings import load_settings
    from corrflow.simulators import SimulatedWorld

    settings = load_settings(data_root=tmp_path)
    beamline = build_beamline(settings, SimulatedWorld(settings.simulation))
    docs = []
    RunEngine({})(
        tomo_scan(
            beamline,
            num_projections=5,
            exposure_s=0.05,
            num_darks=2,
            num_flats=3,
            sample={"name": "s-1", "proposal": "P-1", "user": "ada"},
        ),
        lambda name, doc: docs.append((name, doc)),
    )
    path = write_nxtomo_from_documents(tmp_path / "s-1.nxs", docs)
    scan = read_nxtomo(path)
    assert scan.image_key.tolist() == [2, 2, 1, 1, 1, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(scan.projection_angles_deg, [0.0, 36.0, 72.0, 108.0, 144.0])
    np.testing.assert_allclose(scan.x_translation_um[scan.image_key == 1], 1.5 * 128 * 8.0)
    np.testing.assert_allclose(scan.count_time_s, 0.05)
    assert scan.pixel_size_um == 8.0 and scan.energy_keV == 25.0
    start = docs[0][1]
    assert scan.metadata["identification"] == start["identification"]
    assert scan.metadata["references"]["source_run_uid"] == start["uid"]
    # The frames are the detector's own, in acquisition order.
    resources = [d for n, d in docs if n == "stream_resource" and d["data_key"] == start["nxtomo"]["image_data_key"]]
    recorded = []
    for resource in resources:
        with h5py.File(resource["uri"].removeprefix("file://localhost"), "r") as f:
            recorded.append(f["/entry/data/data"][()])
    np.testing.assert_array_equal(scan.data, np.concatenate(recorded))
    assert scan.darks.mean() < 150 < scan.flats.mean()


def test_offset_centre_scan_records_its_axis_offset(tmp_path):
    """Half acquisition: ``sample/rotation_axis_offset`` (um) and ``detector/field_of_view`` = "Half",
    given explicitly or taken from the scan's own ``axis_offset_um`` setting; a centred scan says "Full"."""
    arrays = _scan_arrays()
    centred = read_nxtomo(write_nxtomo(tmp_path / "centred.nxs", **arrays))
    assert centred.axis_offset_um == 0.0 and not centred.half_acquisition
    explicit = read_nxtomo(write_nxtomo(tmp_path / "explicit.nxs", **arrays, axis_offset_um=-160.0))
    assert explicit.axis_offset_um == -160.0 and explicit.half_acquisition
    settings = {"parameters": {"exposure_s": 0.1, "axis_offset_um": 160.0}, "units": {"exposure_s": "s", "axis_offset_um": "um"}}
    path = write_nxtomo(tmp_path / "from_settings.nxs", **{**arrays, "metadata": {**arrays["metadata"], "settings": settings}})
    assert read_nxtomo(path).axis_offset_um == 160.0
    with h5py.File(path, "r") as f:
        assert f["/entry/instrument/detector/field_of_view"][()].decode() == "Half"
        assert f["/entry/sample/rotation_axis_offset"].attrs["units"] == "um"
    with h5py.File(tmp_path / "centred.nxs", "r") as f:
        assert f["/entry/instrument/detector/field_of_view"][()].decode() == "Full"
    with pytest.raises(ValueError, match="axis_offset_um"):
        write_nxtomo(tmp_path / "bad.nxs", **arrays, axis_offset_um=float("nan"))
    assert not (tmp_path / "bad.nxs").exists()
