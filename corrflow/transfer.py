"""Verified, resumable, idempotent file transfer between facility storage areas.

This is the local/mounted-filesystem backend: the beamline's storage and the compute facility's
landing area are directories this process can reach. Every file is

* copied to ``<name>.part`` first (an interrupted copy resumes from the bytes already there),
* hashed (sha256) from the source while it is read and again from the destination after the
  copy is closed and synced, and only then
* renamed atomically to its final name; a destination whose hash does not match is an error.

A destination that already holds the same bytes is left alone (idempotent); one that holds
different bytes is treated as a corrupt copy and re-sent. Sources are never modified.
A JSON manifest of (relative path, size, sha256) is written last, so its presence means every
file listed in it was verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

CHUNK_BYTES = 8 * 1024 * 1024
MANIFEST_NAME = "manifest.json"


class TransferError(RuntimeError):
    """A file could not be transferred and verified; the message names the file."""


@dataclass(frozen=True)
class TransferredFile:
    relative_path: str
    size_bytes: int
    sha256: str
    resent: bool = False  # the destination held different (corrupt) bytes and was replaced
    skipped: bool = False  # the destination already held identical bytes


@dataclass(frozen=True)
class TransferManifest:
    source_root: str
    destination_root: str
    files: tuple[TransferredFile, ...]
    seconds: float

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def to_json(self) -> str:
        return json.dumps(
            {
                "source_root": self.source_root,
                "destination_root": self.destination_root,
                "seconds": self.seconds,
                "total_bytes": self.total_bytes,
                "files": [asdict(f) for f in self.files],
            },
            indent=2,
        )


def sha256_file(path: Path, *, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of a file's bytes, read in chunks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _copy_resumable(source: Path, partial: Path, *, chunk_bytes: int) -> str:
    """Append the missing tail of ``source`` to ``partial``; return the sha256 of the whole source."""
    digest = hashlib.sha256()
    done = partial.stat().st_size if partial.exists() else 0
    if done > source.stat().st_size:
        partial.unlink()  # longer than the source: not a prefix of it, start over
        done = 0
    with open(source, "rb") as src:
        # The bytes already copied are hashed from the source, not trusted from the partial file:
        # the final destination hash check catches a partial file that was not a true prefix.
        remaining = done
        while remaining:
            block = src.read(min(chunk_bytes, remaining))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
        with open(partial, "ab") as dst:
            while block := src.read(chunk_bytes):
                digest.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
    return digest.hexdigest()


def verified_copy(
    source: Path, destination: Path, *, relative_path: str, chunk_bytes: int = CHUNK_BYTES
) -> TransferredFile:
    """Copy one file with hash verification; see the module docstring for the guarantees."""
    if not source.is_file():
        raise TransferError(f"{relative_path}: source {source} is not a file")
    destination.parent.mkdir(parents=True, exist_ok=True)
    source_sha = None
    resent = False
    if destination.exists():
        source_sha = sha256_file(source, chunk_bytes=chunk_bytes)
        if sha256_file(destination, chunk_bytes=chunk_bytes) == source_sha:
            return TransferredFile(relative_path, source.stat().st_size, source_sha, skipped=True)
        resent = True
    partial = destination.with_name(destination.name + ".part")
    for attempt in (1, 2):
        read_sha = _copy_resumable(source, partial, chunk_bytes=chunk_bytes)
        if source_sha is not None and read_sha != source_sha:
            raise TransferError(f"{relative_path}: source changed while it was being transferred")
        written_sha = sha256_file(partial, chunk_bytes=chunk_bytes)
        if written_sha == read_sha:
            break
        partial.unlink()  # a stale partial file that was not a prefix of the source: one clean retry
        if attempt == 2:
            raise TransferError(
                f"{relative_path}: destination hash {written_sha} does not match source hash {read_sha}"
            )
    os.replace(partial, destination)
    return TransferredFile(relative_path, destination.stat().st_size, read_sha, resent=resent)


def transfer_files(
    sources: Sequence[Path],
    *,
    source_root: Path,
    destination_root: Path,
    manifest_name: str = MANIFEST_NAME,
    chunk_bytes: int = CHUNK_BYTES,
) -> TransferManifest:
    """Transfer files that lie under ``source_root`` to the same relative paths under ``destination_root``.

    Returns the manifest, which is also written (atomically) as ``destination_root/manifest_name``
    after every file has been verified.

    Raises
    ------
    TransferError
        If a source lies outside ``source_root``, is missing, or a copy fails verification.
    """
    source_root = Path(source_root).resolve()
    destination_root = Path(destination_root).resolve()
    if not sources:
        raise TransferError("nothing to transfer: the list of source files is empty")
    relative = []
    for source in sources:
        resolved = Path(source).resolve()
        if not resolved.is_relative_to(source_root):
            raise TransferError(f"{source} is not under the source root {source_root}")
        if not resolved.is_file():
            raise TransferError(f"{source} does not exist or is not a file")
        relative.append((resolved, resolved.relative_to(source_root)))

    start = time.perf_counter()
    files = tuple(
        verified_copy(src, destination_root / rel, relative_path=str(rel), chunk_bytes=chunk_bytes)
        for src, rel in relative
    )
    manifest = TransferManifest(str(source_root), str(destination_root), files, time.perf_counter() - start)
    manifest_path = destination_root / manifest_name
    tmp = manifest_path.with_name(manifest_path.name + ".part")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, manifest_path)
    return manifest
