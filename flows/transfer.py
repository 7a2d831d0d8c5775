"""Transfer flow: beamline storage -> compute facility, every file sha256-verified."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from corrflow import progress
from corrflow.flows._common import flow_settings, run_name
from corrflow.flows.models import Sample, TransferResult
from corrflow.transfer import transfer_files


@flow(name="transfer", flow_run_name=run_name("transfer"), log_prints=True)
def transfer(sample: Sample, files: list[Path], run_uid: str) -> TransferResult:
    """Copy a run's raw files to the compute facility's storage and verify each one's sha256.

    The files keep their paths relative to the beamline storage root, under
    ``<compute_storage>/<run_uid>/``; a manifest of sizes and hashes is written last.
    ``files`` are absolute paths under the beamline storage, or paths relative to it (as another
    facility passes them). ``settings.transfer.backend`` picks how the bytes travel: a mounted
    filesystem (``local``), SSH/SFTP or Globus (:mod:`corrflow.transfer_backends`).
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
        from corrflow.transfer_backends import transfer_run_files

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
