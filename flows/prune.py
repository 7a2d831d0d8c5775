"""Pruning: delete a source copy only when a verified destination copy exists and retention has passed.

For every manifest the compute facility wrote (``<compute_storage>/<run uid>/manifest.json``, only
written after every file in it was verified), each listed file is deleted from the beamline
storage when *all* of these hold at the time of pruning:

* the source file is older than the retention age (modification time);
* the destination is an independent copy: a regular file inside the destination run's directory,
  reached without a symbolic link, and not the source itself (another inode: a hard link or a
  shared mount would make "both copies" one);
* the destination file exists and its sha256, computed now, equals the manifest's;
* the source file's sha256, computed now, equals the manifest's (it was not rewritten since).

Anything else is kept and reported with the reason. ``dry_run`` reports without deleting. The
``prune`` flow records every deletion in the catalog, on the raw run
(``lifecycle.pruned``: which file, when, and where the verified copy is), so a reader learns that
a raw file was pruned and where its copy is, instead of meeting a missing file.
"""

from __future__ import annotations

import json
import os
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
    copy: str = ""
    """The verified copy the decision was made against."""


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
            source = source_root / relative
            destination = manifest_path.parent / relative
            decision = _decide(source, destination, expected, source_root, manifest_path.parent, retention_s, now_s, dry_run)
            decisions.append(decision)
    return decisions


def _independent_copy_problem(source: Path, destination: Path, destination_dir: Path) -> str | None:
    """Why ``destination`` is not a copy that survives deleting ``source`` (None when it is one)."""
    if destination.resolve() != destination.absolute() or destination.is_symlink():
        return f"destination {destination} is (or is reached through) a symbolic link"
    if not destination.absolute().is_relative_to(destination_dir.resolve()):
        return f"destination {destination} lies outside its run directory {destination_dir}"
    if os.path.samefile(source, destination):
        return f"destination {destination} is the source file itself (same inode), not a copy"
    return None


def _decide(
    source: Path, destination: Path, expected: str, source_root: Path, destination_dir: Path,
    retention_s: float, now_s: float, dry_run: bool,
) -> PruneDecision:
    def kept(reason: str) -> PruneDecision:
        return PruneDecision(str(source), "kept", reason, str(destination))

    if source.is_symlink() or not source.resolve().is_relative_to(source_root):
        return kept("outside the source root (or a symbolic link)")
    if not source.is_file():
        return kept("source already gone")
    age_s = now_s - source.stat().st_mtime
    if age_s < retention_s:
        return kept(f"younger than retention ({age_s / 86400:.2f} of {retention_s / 86400:.2f} days)")
    if not destination.is_file():
        return kept(f"no destination copy at {destination}")
    problem = _independent_copy_problem(source, destination, destination_dir)
    if problem is not None:
        return kept(problem)
    if sha256_file(destination) != expected:
        return kept("destination hash does not match the manifest")
    if sha256_file(source) != expected:
        return kept("source changed since it was transferred")
    if dry_run:
        return PruneDecision(str(source), "would-delete", "verified copy, past retention", str(destination))
    source.unlink()
    return PruneDecision(str(source), "deleted", "verified copy, past retention", str(destination))


def record_pruned(settings: Any, decisions: list[PruneDecision]) -> None:
    """Record each deleted raw file on its run in the catalog (``lifecycle.pruned``)."""
    from corrflow.catalog.tiled import open_catalog, record_lifecycle

    by_run: dict[str, list[dict[str, Any]]] = {}
    compute_root = Path(settings.compute_storage).resolve()
    for decision in decisions:
        if decision.action != "deleted":
            continue
        run_uid = Path(decision.copy).resolve().relative_to(compute_root).parts[0]
        by_run.setdefault(run_uid, []).append({"file": decision.source, "copy": decision.copy, "time": time.time()})
    if not by_run:
        return
    with open_catalog(settings) as catalog:
        for run_uid, pruned in by_run.items():
            if run_uid not in catalog.runs:
                continue
            record_lifecycle(catalog.runs[run_uid], "pruned", pruned)


@flow(name="prune", flow_run_name="{site} · prune", log_prints=True)
def prune(site: Literal["beamline"] = "beamline", retention_days: float | None = None, dry_run: bool = False) -> list[dict[str, Any]]:
    """Delete beamline raw copies verified at the compute facility and older than the retention age."""
    settings = flow_settings()
    days = settings.transfer.retention_days if retention_days is None else retention_days
    decisions = prune_verified_copies(
        source_root=settings.beamline_storage, destination_root=settings.compute_storage, retention_s=days * 86400, dry_run=dry_run
    )
    record_pruned(settings, decisions)
    deleted = sum(d.action == "deleted" for d in decisions)
    print(f"prune at {site}: {deleted} deleted, {len(decisions) - deleted} kept (retention {days} days)")
    return [asdict(d) for d in decisions]
