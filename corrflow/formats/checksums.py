"""Checksums of files: what transfer manifests, provenance and pruning compare."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 8 * 1024 * 1024
"""Read size when hashing (bounded memory whatever the file size)."""


def sha256_file(path: Path, *, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of a file's bytes, read in chunks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
