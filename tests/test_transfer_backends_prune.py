"""Pruning deletes a source copy only when verified at the destination and past retention; flight checks fail loudly."""

from __future__ import annotations

import os
import time

import pytest

from corrflow.flows.flight_check import FlightCheckError, check_storage
from corrflow.flows.prune import prune_verified_copies
from corrflow.config.settings import load_settings
from corrflow.transfer.verified import transfer_files

DAY = 86400.0


@pytest.fixture
def transferred(tmp_path):
    source, dest = tmp_path / "beamline", tmp_path / "compute"
    files = []
    for name in ("old.h5", "young.h5", "corrupt.h5", "rewritten.h5"):
        path = source / "scan" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(4096))
        files.append(path)
    transfer_files(files, source_root=source, destination_root=dest / "uid-1")
    old = time.time() - 40 * DAY
    for name in ("old.h5", "corrupt.h5", "rewritten.h5"):
        os.utime(source / "scan" / name, (old, old))
    corrupt = dest / "uid-1" / "scan" / "corrupt.h5"
    corrupt.write_bytes(b"\x00" + corrupt.read_bytes()[1:])
    rewritten = source / "scan" / "rewritten.h5"
    rewritten.write_bytes(os.urandom(4096))
    os.utime(rewritten, (old, old))
    return source, dest


def test_only_verified_copies_past_retention_are_deleted(transferred):
    source, dest = transferred
    dry = prune_verified_copies(source_root=source, destination_root=dest, retention_s=30 * DAY, dry_run=True)
    assert {os.path.basename(d.source): d.action for d in dry}["old.h5"] == "would-delete"
    assert (source / "scan" / "old.h5").exists()
    decisions = {os.path.basename(d.source): d for d in prune_verified_copies(source_root=source, destination_root=dest, retention_s=30 * DAY)}
    assert decisions["old.h5"].action == "deleted" and not (source / "scan" / "old.h5").exists()
    assert decisions["young.h5"].action == "kept" and "retention" in decisions["young.h5"].reason
    assert decisions["corrupt.h5"].action == "kept" and "destination hash" in decisions["corrupt.h5"].reason
    assert decisions["rewritten.h5"].action == "kept" and "source changed" in decisions["rewritten.h5"].reason
    for name in ("young.h5", "corrupt.h5", "rewritten.h5"):
        assert (source / "scan" / name).exists()
    again = prune_verified_copies(source_root=source, destination_root=dest, retention_s=30 * DAY)
    assert {os.path.basename(d.source): d.reason for d in again}["old.h5"] == "source already gone"


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "symlinked-directory"])
@pytest.mark.fault("prune safety")
def test_a_copy_that_is_the_source_itself_is_never_counted_and_the_source_stays(tmp_path, kind):
    source, dest = tmp_path / "beamline", tmp_path / "compute"
    raw = source / "scan" / "only.h5"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(os.urandom(4096))
    transfer_files([raw], source_root=source, destination_root=dest / "uid-2")
    copy = dest / "uid-2" / "scan" / "only.h5"
    copy.unlink()
    if kind == "symlink":
        copy.symlink_to(raw)
    elif kind == "hardlink":
        os.link(raw, copy)
    else:
        copy.parent.rmdir()
        copy.parent.symlink_to(raw.parent, target_is_directory=True)
    old = time.time() - 40 * DAY
    os.utime(raw, (old, old))
    (decision,) = prune_verified_copies(source_root=source, destination_root=dest, retention_s=30 * DAY)
    assert decision.action == "kept", decision
    assert "symbolic link" in decision.reason or "same inode" in decision.reason
    assert raw.exists()


@pytest.mark.fault("prune safety")
def test_the_prune_flow_records_each_deletion_on_its_run_in_the_catalog(tmp_path):
    from corrflow.catalog.tiled import open_catalog
    from corrflow.flows.prune import PruneDecision, record_pruned

    settings = load_settings(data_root=tmp_path)
    settings.ensure_directories()
    with open_catalog(settings) as catalog:
        catalog.runs.create_container("uid-3", metadata={"start": {"uid": "uid-3"}, "stop": {"exit_status": "success"}})
    copy = settings.compute_storage / "uid-3" / "scan" / "a.h5"
    record_pruned(settings, [
        PruneDecision(str(settings.beamline_storage / "scan" / "a.h5"), "deleted", "verified copy, past retention", str(copy)),
        PruneDecision(str(settings.beamline_storage / "scan" / "b.h5"), "kept", "younger than retention", str(copy)),
    ])
    with open_catalog(settings) as catalog:
        (pruned,) = catalog.runs["uid-3"].metadata["lifecycle"]["pruned"]
    assert pruned["file"].endswith("scan/a.h5") and pruned["copy"] == str(copy)


def test_flight_check_moves_a_probe_and_cleans_up(tmp_path):
    settings = load_settings(data_root=tmp_path)
    settings.ensure_directories()
    result = check_storage(settings, "beamline", size_bytes=100_000)
    assert result["bytes"] == 100_000 and len(result["sha256"]) == 64
    assert not list((tmp_path / "beamline").rglob("probe.bin")) and not list((tmp_path / "compute").rglob("probe.bin"))
    assert check_storage(settings, "microscope", size_bytes=10)["site"] == "microscope"


def test_flight_check_fails_loudly_when_the_destination_is_not_writable(tmp_path):
    settings = load_settings(data_root=tmp_path)
    settings.ensure_directories()
    compute = tmp_path / "compute"
    compute.rmdir()
    compute.write_text("not a directory")  # a mount that went wrong
    with pytest.raises(FlightCheckError, match="flight check at beamline failed"):
        check_storage(settings, "beamline", size_bytes=1000)
