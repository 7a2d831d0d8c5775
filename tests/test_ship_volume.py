"""The reconstructed volume travels to the microscope site, sha256-verified, and the microscope's
stages read that copy (the whole chain through real workers: tests/test_chain.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from corrflow.catalog.tiled import open_catalog, register_product
from corrflow.flows.transfer import VOLUME_MANIFEST, ship_volume_to_microscope
from corrflow.config.settings import Settings, load_settings
from corrflow.formats.checksums import sha256_file
from corrflow.transfer.verified import TransferError
from corrflow.compute.volume import read_provenance

RUN_UID = "3f6c0d9e-volume-ship-test"


def _write_volume(path: Path) -> Path:
    """A small volume file laid out as corrflow.compute.volume writes one, with its provenance."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    with h5py.File(path, "w-") as f:
        data = f.create_group("entry/data")
        data.create_dataset("data", data=rng.normal(size=(6, 16, 16)).astype(np.float32))
        for axis in ("z", "y", "x"):
            data.create_dataset(axis, data=np.arange(16, dtype=np.float64) * 8.0)
        f.create_group("entry/process").create_dataset(
            "provenance", data=json.dumps({"input_run_uid": RUN_UID, "input_sha256": "ab" * 32, "filter_name": "shepp-logan"})
        )
    return path


@pytest.fixture
def compute_volume(tmp_path: Path) -> Iterator[tuple[Settings, Path]]:
    settings = load_settings(data_root=tmp_path)
    settings.ensure_directories()
    volume = _write_volume(settings.compute_storage / RUN_UID / "s1_volume.nxs")
    with open_catalog(settings) as catalog:
        register_product(
            catalog, volume, key=f"{RUN_UID}-volume", dataset="/entry/data/data",
            metadata={"kind": "reconstruction", "parent_run_uids": [RUN_UID], "provenance": read_provenance(volume)},
        )
    yield settings, volume


def test_the_volume_is_copied_to_the_microscope_storage_verified_and_catalogued(compute_volume):
    settings, volume = compute_volume
    shipped = ship_volume_to_microscope(settings, RUN_UID, volume)

    local = shipped.volume_path
    assert local.is_file() and local.is_relative_to(settings.microscope_storage.resolve())
    assert local == settings.microscope_storage.resolve() / RUN_UID / volume.name
    assert sha256_file(local) == sha256_file(volume) == shipped.sha256
    assert read_provenance(local) == read_provenance(volume)  # the provenance travels inside
    manifest = json.loads((local.parent / VOLUME_MANIFEST).read_text())
    assert [(f["relative_path"], f["sha256"]) for f in manifest["files"]] == [(volume.name, shipped.sha256)]
    with open_catalog(settings) as catalog:
        product = catalog.processed[f"{RUN_UID}-volume"]
        locations = product.metadata["locations"]
        assert locations["compute"] == {"path": str(volume.resolve()), "sha256": shipped.sha256}
        assert locations["microscope"]["path"] == str(local) and locations["microscope"]["sha256"] == shipped.sha256
        assert product.metadata["kind"] == "reconstruction"  # the rest of the record is kept
    # Shipping again is a no-op on the bytes (identical copy kept), and a corrupt copy is re-sent.
    again = ship_volume_to_microscope(settings, RUN_UID, Path(RUN_UID) / volume.name)  # relative to compute storage
    assert again.volume_path == local and again.sha256 == shipped.sha256
    with open(local, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    repaired = ship_volume_to_microscope(settings, RUN_UID, volume)
    assert sha256_file(repaired.volume_path) == sha256_file(volume)
    assert sha256_file(volume) == shipped.sha256  # the compute copy was never touched


def test_only_volumes_of_the_compute_storage_with_a_catalog_product_are_shipped(compute_volume, tmp_path):
    settings, volume = compute_volume
    elsewhere = _write_volume(tmp_path / "elsewhere" / "s1_volume.nxs")
    with pytest.raises(TransferError, match="not under the compute storage"):
        ship_volume_to_microscope(settings, RUN_UID, elsewhere)
    with pytest.raises(KeyError, match="no product"):
        ship_volume_to_microscope(settings, "another-run", volume)


def test_the_microscope_stage_registers_against_its_own_copy(compute_volume, monkeypatch):
    """``micrograph_register`` (the microscope site's deployment): the volume it registers against
    is the copy under the microscope's storage, byte-identical to the compute one."""
    from corrflow.flows import chain
    from corrflow.flows.models import AcquisitionResult, MicrographParameters, RegistrationSummary, Sample

    settings, volume = compute_volume
    monkeypatch.setenv("CORRFLOW_DATA_ROOT", str(settings.data_root))
    read: list[Path] = []

    def register(sample, volume_path, micrograph_run_uid, micrograph):
        read.append(Path(volume_path))
        with h5py.File(volume_path, "r") as f:  # what the registration reads
            assert f["/entry/data/data"].shape == (6, 16, 16)
        return RegistrationSummary(
            sample_from_microscope=np.eye(4).tolist(), scale=1.0, rotation_deg=0.0, translation_um=(0.0, 0.0, 0.0),
            rms_residual_um=0.1, n_matches=5, slice_index=3, section_z_um=20.0, matched_fiducials_um=[],
        )

    # The stage's own steps run for real (shipping, catalog); the instrument and the Prefect
    # machinery around it are stood in for.
    monkeypatch.setattr(chain, "ship_volume", lambda sample, run_uid, path: ship_volume_to_microscope(settings, run_uid, path))
    monkeypatch.setattr(chain, "instrument_slot", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(
        chain, "run_micrograph",
        lambda settings_, sample, micrograph: AcquisitionResult(run_uid="micrograph-1", instrument="sim-sem", files=()),
    )
    monkeypatch.setattr(chain, "register", register)
    result = chain.micrograph_register.fn(
        Sample(name="s1"), tomography_run_uid=RUN_UID, volume_path=str(volume), micrograph=MicrographParameters()
    )
    (path,) = read
    assert path.is_relative_to(settings.microscope_storage.resolve()) and path != volume
    assert sha256_file(path) == sha256_file(volume) == result["volume_sha256"]
    assert result["volume_path"] == str(path)
