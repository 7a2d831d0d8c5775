"""Verified transfer: every byte checked, resumable, idempotent, corrupt copies re-sent."""

import hashlib
import json

import numpy as np
import pytest

from corrflow.formats.checksums import sha256_file
from corrflow.transfer.verified import TransferError, transfer_files, verified_copy


@pytest.fixture
def source_tree(tmp_path):
    root = tmp_path / "beamline"
    (root / "scan1").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for name, size in (("scan1/dark.h5", 1000), ("scan1/proj.h5", 300_000), ("scan1/tomo.nxs", 1)):
        path = root / name
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        files.append(path)
    return root, files


def test_transfer_copies_and_verifies_every_file(source_tree, tmp_path):
    root, files = source_tree
    dest = tmp_path / "compute"
    manifest = transfer_files(files, source_root=root, destination_root=dest, chunk_bytes=4096)
    assert len(manifest.files) == 3
    for src, entry in zip(files, manifest.files, strict=True):
        copied = dest / entry.relative_path
        assert copied.read_bytes() == src.read_bytes()
        assert entry.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    on_disk = json.loads((dest / "manifest.json").read_text())
    assert on_disk["total_bytes"] == sum(f.stat().st_size for f in files)
    assert not list(dest.rglob("*.part"))


def test_transfer_is_idempotent(source_tree, tmp_path):
    root, files = source_tree
    dest = tmp_path / "compute"
    transfer_files(files, source_root=root, destination_root=dest)
    again = transfer_files(files, source_root=root, destination_root=dest)
    assert all(f.skipped for f in again.files)


@pytest.mark.fault("transfer cut at 50 %")
def test_interrupted_copy_resumes_from_partial_file(source_tree, tmp_path):
    root, files = source_tree
    src = files[1]
    dest = tmp_path / "compute" / "proj.h5"
    dest.parent.mkdir(parents=True)
    half = src.read_bytes()[: src.stat().st_size // 2]
    dest.with_name("proj.h5.part").write_bytes(half)  # a copy cut at 50 %
    result = verified_copy(src, dest, relative_path="proj.h5", chunk_bytes=4096)
    assert dest.read_bytes() == src.read_bytes()
    assert result.sha256 == sha256_file(src)


def test_garbage_partial_file_is_detected_and_replaced(source_tree, tmp_path):
    root, files = source_tree
    src = files[1]
    dest = tmp_path / "compute" / "proj.h5"
    dest.parent.mkdir(parents=True)
    dest.with_name("proj.h5.part").write_bytes(b"\x00" * 1000)  # not a prefix of the source
    verified_copy(src, dest, relative_path="proj.h5")
    assert dest.read_bytes() == src.read_bytes()


def test_corrupt_destination_is_detected_and_resent(source_tree, tmp_path):
    root, files = source_tree
    dest = tmp_path / "compute"
    transfer_files(files, source_root=root, destination_root=dest)
    corrupt = dest / "scan1" / "proj.h5"
    data = bytearray(corrupt.read_bytes())
    data[1234] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    manifest = transfer_files(files, source_root=root, destination_root=dest)
    assert [f.resent for f in manifest.files] == [False, True, False]
    assert corrupt.read_bytes() == files[1].read_bytes()


def test_bad_sources_are_rejected_before_anything_is_written(source_tree, tmp_path):
    root, files = source_tree
    dest = tmp_path / "compute"
    outside = tmp_path / "elsewhere.h5"
    outside.write_bytes(b"x")
    with pytest.raises(TransferError, match="not under the source root"):
        transfer_files([files[0], outside], source_root=root, destination_root=dest)
    with pytest.raises(TransferError, match="does not exist"):
        transfer_files([files[0], root / "missing.h5"], source_root=root, destination_root=dest)
    with pytest.raises(TransferError, match="empty"):
        transfer_files([], source_root=root, destination_root=dest)
    assert not dest.exists()
