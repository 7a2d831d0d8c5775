"""Pruning: delete a source copy only when a verified destination copy exists and retention has passed.

For every manifest the compute facility wrote (``<compute_storage>/<run uid>/manifest.json``, only
written after every file in it was verified), each listed file is deleted from the beamline
storage when *all* of these hold at the time of pruning:

* the source file is older than the retention age (modification time);
* the destination file exists and its sha256, computed now, equals the manifest's;
* the source file's sha256, computed now, equals the manifest's (it was not rewritten since).

Anything else is kept and reported with the reason. ``dry_run`` reports without deleting.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import flow

from corrflow.flows._common import flow_settings
from corrflow.formats.checksums import sha256_file
from corrflow.transfer.verified import MANIFEST_NAME


@dataclass(frozen=True)
class PruneDecision:
    source: str
    action: Literal["deleted", "would-delete", "kept"]
    reason: str


def prune_verified_copies(
    *, source_root: Path, destination_root: Path, retention_s: float, now_s: float | None = None, dry_run: bool = False
) -> list[PruneDecision]:
    """Apply the rules of the module docstring to every manifest under ``destination_root``."""
    if retention_s < 0:
        raise ValueError(f"retention_s must be >= 0, got {retention_s}")
    now_s = time.time() if now_s is None else now_s
    source_root, destination_root = Path(source_root).resolve(), Path(destination_root).resolve()
    decisions = []
    for manifest_path in sorted(destination_root.glob(f"*/{MANIFEST_NAME}")):
        manifest = json.loads(manifest_path.read_text())
        for entry in manifest["files"]:
            relative, expected = entry["relative_path"], entry["sha256"]
            source = (source_root / relative).resolve()
            destination = manifest_path.parent / relative
            decisions.append(_decide(source, destination, expected, source_root, retention_s, now_s, dry_run))
    return decisions


def _decide(source: Path, destination: Path, expected: str, source_root: Path, retention_s: float, now_s: float, dry_run: bool) -> PruneDecision:
    def kept(reason: str) -> PruneDecision:
        return PruneDecision(str(source), "kept", reason)

    if not source.is_relative_to(source_root):
        return kept("outside the source root")
    if not source.is_file():
        return kept("source already gone")
    age_s = now_s - source.stat().st_mtime
    if age_s < retention_s:
        return kept(f"younger than retention ({age_s / 86400:.2f} of {retention_s / 86400:.2f} days)")
    if not destination.is_file():
        return kept(f"no destination copy at {destination}")
    if sha256_file(destination) != expected:
        return kept("destination hash does not match the manifest")
    if sha256_file(source) != expected:
        return kept("source changed since it was transferred")
    if dry_run:
        return PruneDecision(str(source), "would-delete", "verified copy, past retention")
    source.unlink()
    return PruneDecision(str(source), "deleted", "verified copy, past retention")


@flow(name="prune", flow_run_name="{site} · prune", log_prints=True)
def prune(site: Literal["beamline"] = "beamline", retention_days: float | None = None, dry_run: bool = False) -> list[dict[str, Any]]:
    """Delete beamline raw copies verified at the compute facility and older than the retention age."""
    settings = flow_settings()
    days = settings.transfer.retention_days if retention_days is None else retention_days
    decisions = prune_verified_copies(
        source_root=settings.beamline_storage, destination_root=settings.compute_storage, retention_s=days * 86400, dry_run=dry_run
    )
    deleted = sum(d.action == "deleted" for d in decisions)
    print(f"prune at {site}: {deleted} deleted, {len(decisions) - deleted} kept (retention {days} days)")
    return [asdict(d) for d in decisions]
