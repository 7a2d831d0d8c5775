"""The reconstructed volume travels to the microscope site, sha256-verified, and the microscope's
stages read that copy: the pipeline table gives registration and the hand-off the shipment's
product as their input (tests/test_pipeline.py), and the chain through real workers records the
copy it registered against (tests/test_chain.py)."""

from __future__ import annotations

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

    local = shipped.file.local_path(settings).resolve()
    assert shipped.file.site == "microscope" and shipped.source.site == "compute"
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
    assert again.file == shipped.file and again.sha256 == shipped.sha256
    with open(local, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    repaired = ship_volume_to_microscope(settings, RUN_UID, volume)
    assert sha256_file(repaired.file.local_path(settings)) == sha256_file(volume)
    assert sha256_file(volume) == shipped.sha256  # the compute copy was never touched


def test_only_volumes_of_the_compute_storage_with_a_catalog_product_are_shipped(compute_volume, tmp_path):
    settings, volume = compute_volume
    elsewhere = _write_volume(tmp_path / "elsewhere" / "s1_volume.nxs")
    with pytest.raises(TransferError, match="not under the compute storage"):
        ship_volume_to_microscope(settings, RUN_UID, elsewhere)
    with pytest.raises(KeyError, match="no product"):
        ship_volume_to_microscope(settings, "another-run", volume)
