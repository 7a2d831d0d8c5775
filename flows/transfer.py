"""Transfer flows, every file sha256-verified (:mod:`corrflow.transfer.verified`):

- :func:`transfer`: a run's raw files, beamline storage -> compute facility;
- :func:`ship_volume`: a reconstructed volume (its provenance inside), compute facility ->
  microscope site, so that registration and the ROI hand-off read a copy on the microscope's
  own storage; the catalog product records both locations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from corrflow.report import progress
from corrflow.flows._common import flow_settings, run_name
from corrflow.flows.models import Sample, TransferResult
from corrflow.config.settings import Settings
from corrflow.transfer.verified import TransferError, transfer_files

#: Manifest of a shipped volume, beside it at the microscope site.
VOLUME_MANIFEST = "volume-manifest.json"


@flow(name="transfer", flow_run_name=run_name("transfer"), log_prints=True)
def transfer(sample: Sample, files: list[Path], run_uid: str) -> TransferResult:
    """Copy a run's raw files to the compute facility's storage and verify each one's sha256.

    The files keep their paths relative to the beamline storage root, under
    ``<compute_storage>/<run_uid>/``; a manifest of sizes and hashes is written last.
    ``files`` are absolute paths under the beamline storage, or paths relative to it (as another
    facility passes them). ``settings.transfer.backend`` picks how the bytes travel: a mounted
    filesystem (``local``), SSH/SFTP or Globus (:mod:`corrflow.transfer.backends`).
    """
    settings = flow_settings()
    destination = settings.compute_storage / run_uid
    progress.report("transfer", 0, len(files))
    if settings.transfer.backend == "local":
        root = settings.beamline_storage
        manifest = transfer_files(
            [Path(f) if Path(f).is_absolute() else root / f for f in files],
            source_root=root,
            destination_root=destination,
        )
    else:
        from corrflow.transfer.backends import transfer_run_files

        relative = [
            str(Path(f).relative_to(settings.beamline_storage)) if Path(f).is_absolute() else str(f) for f in files
        ]
        manifest = transfer_run_files(settings, relative, destination_root=destination)
    progress.report("transfer", len(files), len(files), detail=f"{manifest.total_bytes / 1e6:.1f} MB verified")
    return TransferResult(
        destination_root=destination,
        files=tuple(destination / f.relative_path for f in manifest.files),
        manifest_path=destination / "manifest.json",
        total_bytes=manifest.total_bytes,
        seconds=manifest.seconds,
    )


class ShippedVolume(BaseModel):
    """A reconstructed volume copied to the microscope site and verified there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    volume_path: Path = Field(description="The copy on the microscope's storage: what its stages read")
    source_path: Path = Field(description="The volume on the compute facility's storage")
    sha256: str = Field(description="sha256 of the volume, equal at both sites")
    size_bytes: int = Field(description="Size of the volume (bytes)")
    manifest_path: Path = Field(description="Transfer manifest beside the copy")
    seconds: float = Field(description="Wall time of the copy and its verification (s)")


def ship_volume_to_microscope(settings: Settings, run_uid: str, volume_path: Path) -> ShippedVolume:
    """Copy ``volume_path`` to ``<microscope_storage>/<run_uid>/``, verify it, record it in the catalog.

    The copy is made and verified by :func:`corrflow.transfer.verified.transfer_files` (``.part`` file,
    byte-for-byte read-back, atomic rename; an identical copy already there is kept, a different
    one re-sent), then the catalog product ``/processed/<run_uid>-volume`` gets ``locations``:
    the compute and the microscope path, each with the sha256. The volume's provenance travels
    inside it (``/entry/process/provenance``).

    Parameters
    ----------
    settings
        Settings of the microscope site (its storage root, the catalog).
    run_uid
        The tomography run the volume was reconstructed from.
    volume_path
        The volume at the compute facility: absolute, or relative to ``settings.compute_storage``.

    Raises
    ------
    TransferError
        The volume is not under the compute storage, is missing, or the copy does not verify.
    KeyError
        The catalog has no product ``<run_uid>-volume`` (the reconstruction registers it).
    """
    from corrflow.catalog.tiled import open_catalog

    compute_root = settings.compute_storage.resolve()
    source = Path(volume_path) if Path(volume_path).is_absolute() else compute_root / volume_path
    source = source.resolve()
    if not source.is_relative_to(compute_root):
        raise TransferError(f"{source} is not under the compute storage {compute_root}")
    destination_root = settings.microscope_storage / run_uid
    progress.report("ship volume", 0, 1)
    manifest = transfer_files(
        [source], source_root=source.parent, destination_root=destination_root, manifest_name=VOLUME_MANIFEST
    )
    (copied,) = manifest.files
    shipped = ShippedVolume(
        volume_path=destination_root.resolve() / copied.relative_path,
        source_path=source,
        sha256=copied.sha256,
        size_bytes=copied.size_bytes,
        manifest_path=destination_root.resolve() / VOLUME_MANIFEST,
        seconds=manifest.seconds,
    )
    key = f"{run_uid}-volume"
    with open_catalog(settings) as catalog:
        if key not in catalog.processed:
            raise KeyError(f"the catalog has no product {key!r} for the volume {source}")
        locations: dict[str, Any] = {
            "compute": {"path": str(source), "sha256": copied.sha256},
            "microscope": {"path": str(shipped.volume_path), "sha256": copied.sha256, "manifest": str(shipped.manifest_path)},
        }
        catalog.processed[key].update_metadata(metadata={"locations": locations})
    progress.report("ship volume", 1, 1, detail=f"{copied.size_bytes / 1e6:.1f} MB verified")
    return shipped


@flow(name="ship-volume", flow_run_name=run_name("ship volume to the microscope"), log_prints=True)
def ship_volume(sample: Sample, run_uid: str, volume_path: Path) -> ShippedVolume:
    """Copy the reconstructed volume from the compute facility to the microscope site, sha256-verified.

    Registration and the ROI hand-off then read the microscope's own copy
    (``<microscope_storage>/<run_uid>/``); the catalog product lists both locations.
    """
    shipped = ship_volume_to_microscope(flow_settings(), run_uid, Path(volume_path))
    print(f"volume of run {run_uid} at the microscope: {shipped.volume_path} (sha256 {shipped.sha256[:16]}..., verified)")
    return shipped
