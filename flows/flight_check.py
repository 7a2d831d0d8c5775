"""Flight check per site: a small real transfer and read-back that fails loudly.

Scheduled every 30 minutes on each site's pool (``flight-check/<site>``), so a broken mount, an
SSH key that expired or a catalog that stopped answering shows up as a red run on the dashboard
before an experiment needs them, not during it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from prefect import flow

from corrflow.flows._common import flow_settings
from corrflow.config.settings import Settings, Site

PROBE_DIR = ".flight-check"


class FlightCheckError(RuntimeError):
    """A flight check found a problem; the message says what and where."""


def _write_probe(directory: Path, size_bytes: int) -> tuple[Path, str]:
    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size_bytes)
    path = directory / "probe.bin"
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return path, hashlib.sha256(data).hexdigest()


def check_storage(settings: Settings, site: Site, *, size_bytes: int = 1_000_000) -> dict[str, Any]:
    """Write a random probe, move it the way real data moves from this site, read it back, compare.

    beamline: probe in the beamline storage -> configured transfer backend -> compute storage;
    compute / microscope: probe written and read back in the site's own storage.
    """
    if size_bytes < 1:
        raise ValueError(f"size_bytes must be >= 1, got {size_bytes}")
    stamp = uuid.uuid4().hex[:12]
    storage = {"beamline": settings.beamline_storage, "compute": settings.compute_storage, "microscope": settings.microscope_storage}[site]
    probe_dir = storage / PROBE_DIR / stamp
    created = [probe_dir]
    try:
        probe, expected = _write_probe(probe_dir, size_bytes)
        if site == "beamline":
            from corrflow.transfer.backends import transfer_run_files

            destination = settings.compute_storage / PROBE_DIR / stamp
            created.append(destination)
            manifest = transfer_run_files(settings, [f"{PROBE_DIR}/{stamp}/probe.bin"], destination_root=destination)
            landed = destination / PROBE_DIR / stamp / "probe.bin"
            if manifest.files[0].sha256 != expected:
                raise FlightCheckError(f"transfer reported sha256 {manifest.files[0].sha256}, wrote {expected}")
        else:
            landed = probe
        read_back = hashlib.sha256(landed.read_bytes()).hexdigest()
        if read_back != expected:
            raise FlightCheckError(f"{landed}: read back sha256 {read_back}, wrote {expected}")
        return {"site": site, "bytes": size_bytes, "sha256": expected, "path": str(landed)}
    except FlightCheckError:
        raise
    except Exception as exc:
        raise FlightCheckError(f"flight check at {site} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)


def check_catalog(settings: Settings) -> int:
    """The catalog answers and lists its runs; returns how many it holds."""
    from corrflow.catalog.tiled import open_catalog

    try:
        with open_catalog(settings) as catalog:
            return len(catalog.runs)
    except Exception as exc:
        raise FlightCheckError(f"catalog {settings.catalog.url or settings.catalog_uri} does not answer: {exc}") from exc


@flow(name="flight-check", flow_run_name="{site} · flight check", log_prints=True)
def flight_check(site: Site, size_bytes: int = 1_000_000, catalog: bool = True) -> dict[str, Any]:
    """Small transfer + read-back at this site, and a catalog query; raises FlightCheckError on any problem."""
    settings = flow_settings()
    result = check_storage(settings, site, size_bytes=size_bytes)
    if catalog:
        result["catalog_runs"] = check_catalog(settings)
    print(f"flight check at {site}: ok ({result})")
    return result
