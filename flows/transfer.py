"""The transfer stages, every file sha256-verified (:mod:`corrflow.transfer`):

- :func:`transfer_stage`: a run's raw files, beamline storage -> compute facility;
- :func:`volume_shipment_stage`: the reconstructed volume (its provenance inside), compute facility
  -> microscope site, so that registration and the ROI hand-off read a copy on the microscope's own
  storage; the catalog product records both locations.

Each is catalogued once verified: ``/processed/<run uid>-transfer`` (the manifest of what landed)
and the volume product's ``locations``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corrflow.catalog.tiled import open_catalog, product_key, record_product
from corrflow.config.settings import Settings
from corrflow.flows.models import ExperimentRequest, ReconstructedVolume, ShippedVolume, StoredFile, TomographyRun, TransferredRun
from corrflow.report import progress
from corrflow.transfer.verified import MANIFEST_NAME, transfer_files

#: Manifest of a shipped volume, beside it at the microscope site.
VOLUME_MANIFEST = "volume-manifest.json"


def transfer_stage(settings: Settings, request: ExperimentRequest, *, tomography: TomographyRun) -> TransferredRun:
    """Copy a run's raw files to ``<compute_storage>/<run_uid>/`` and verify each one's sha256.

    The files keep their paths relative to the beamline storage root; a manifest of sizes and
    hashes is written last. ``settings.transfer.backend`` picks how the bytes travel: a mounted
    filesystem (``local``), SSH/SFTP or Globus (:mod:`corrflow.transfer.backends`).
    """
    run_uid = tomography.run_uid
    destination = settings.compute_storage / run_uid
    relative = [stored.path for stored in tomography.files]
    progress.report("transfer", 0, len(relative))
    if settings.transfer.backend == "local":
        root = settings.beamline_storage
        manifest = transfer_files([root / path for path in relative], source_root=root, destination_root=destination)
    else:
        from corrflow.transfer.backends import transfer_run_files

        manifest = transfer_run_files(settings, relative, destination_root=destination)
    progress.report("transfer", len(relative), len(relative), detail=f"{manifest.total_bytes / 1e6:.1f} MB verified")
    landed = tuple(StoredFile(site="compute", path=f"{run_uid}/{f.relative_path}") for f in manifest.files)
    # The one place a raw path is rebased: the beamline's relative path below this run's landing area.
    nxtomo = StoredFile(site="compute", path=f"{run_uid}/{tomography.nxtomo.path}")
    key = product_key(run_uid, "transfer")
    with open_catalog(settings) as catalog:
        record_product(
            catalog,
            key,
            {
                "kind": "transfer",
                "parent_run_uids": [run_uid],
                "backend": settings.transfer.backend,
                "source_nxtomo_path": str(settings.beamline_storage / tomography.nxtomo.path),
                "destination": str(destination),
                "manifest": str(destination / MANIFEST_NAME),
                "files": [{"path": f.relative_path, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in manifest.files],
                "total_bytes": manifest.total_bytes,
                "seconds": manifest.seconds,
            },
        )
    print(f"run {run_uid}: {len(landed)} files, {manifest.total_bytes / 1e6:.1f} MB verified at {destination}")
    return TransferredRun(
        catalog_key=key,
        files=landed,
        nxtomo=nxtomo,
        manifest=StoredFile(site="compute", path=f"{run_uid}/{MANIFEST_NAME}"),
        total_bytes=manifest.total_bytes,
        seconds=manifest.seconds,
    )


def ship_volume_to_microscope(settings: Settings, run_uid: str, volume_path: Path) -> ShippedVolume:
    """Copy ``volume_path`` to ``<microscope_storage>/<run_uid>/``, verify it, record it in the catalog.

    The copy is made and verified by :func:`corrflow.transfer.verified.transfer_files` (``.part``
    file, byte-for-byte read-back, atomic rename; an identical copy already there is kept, a
    different one re-sent), then the catalog product ``/processed/<run_uid>-volume`` gets
    ``locations``: the compute and the microscope path, each with the sha256. The volume's
    provenance travels inside it (``/entry/process/provenance``).

    Raises
    ------
    TransferError
        The volume is not under the compute storage, is missing, or the copy does not verify.
    KeyError
        The catalog has no product ``<run_uid>-volume`` (the reconstruction registers it).
    """
    from corrflow.transfer.verified import TransferError

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
    local = destination_root.resolve() / copied.relative_path
    shipped = ShippedVolume(
        file=StoredFile.under(settings, "microscope", local),
        source=StoredFile.under(settings, "compute", source),
        sha256=copied.sha256,
        size_bytes=copied.size_bytes,
        manifest=StoredFile.under(settings, "microscope", destination_root / VOLUME_MANIFEST),
        seconds=manifest.seconds,
    )
    key = product_key(run_uid, "volume")
    with open_catalog(settings) as catalog:
        if key not in catalog.processed:
            raise KeyError(f"the catalog has no product {key!r} for the volume {source}")
        locations: dict[str, Any] = {
            "compute": {"path": str(source), "sha256": copied.sha256},
            "microscope": {"path": str(local), "sha256": copied.sha256, "manifest": str(destination_root.resolve() / VOLUME_MANIFEST)},
        }
        catalog.processed[key].update_metadata(metadata={"locations": locations})
    progress.report("ship volume", 1, 1, detail=f"{copied.size_bytes / 1e6:.1f} MB verified")
    return shipped


def volume_shipment_stage(
    settings: Settings, request: ExperimentRequest, *, tomography: TomographyRun, reconstruction: ReconstructedVolume
) -> ShippedVolume:
    """The volume to the microscope site: what registration and the hand-off then read."""
    shipped = ship_volume_to_microscope(settings, tomography.run_uid, reconstruction.file.local_path(settings))
    print(f"volume of run {tomography.run_uid} at the microscope: {shipped.file.path} (sha256 {shipped.sha256[:16]}..., verified)")
    return shipped
