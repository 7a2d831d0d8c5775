"""A storage that really fills up mid-scan, on the production acquisition path.

The beamline storage is its own small file system (a tmpfs mounted for the test; that needs root,
and the test is skipped, saying so, where mounting is not allowed). The scan passes the space
check; once it is acquiring, another writer takes the rest of the file system, as a second user
of a shared detector disk would. The run must fail naming the full storage, be catalogued
``fail`` (never ``success``), export nothing, and have its partial files set aside (moved, not
deleted) with the move recorded on the run.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from corrflow.acquisition.runengine import StorageFullError
from corrflow.catalog.tiled import open_catalog
from corrflow.config.settings import load_settings
from corrflow.flows.acquire import INCOMPLETE_DIR, chain_bytes_by_site, run_tomography
from corrflow.flows.models import DEFAULT_SAMPLE
from corrflow.plans.preflight import DISK_RESERVE_BYTES
from corrflow.plans.requests import TomoScanRequest

pytest_plugins = ["epics_fixtures"]

# The simulated camera computes frames faster than it exposes an EPICS one: its scan is longer, so
# the disk fills while it acquires in both cases.
SCAN_BY_MODE = {
    "sim": TomoScanRequest(num_projections=1000, exposure_s=0.1, num_darks=2, num_flats=2),
    "epics": TomoScanRequest(num_projections=100, exposure_s=0.1, num_darks=2, num_flats=2),
}
FRAME_SHAPE_PX = (32, 128)  # the simulated camera's default
MARGIN_BYTES = 4 * 2**20


@contextlib.contextmanager
def small_filesystem(path: Path, size_bytes: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small file system cannot be mounted here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill_once_acquiring(storage: Path, seen: dict[str, float]) -> threading.Thread:
    """Wait until the projections are being written (the dark, flat and projection files exist),
    then write until the file system is full."""

    def fill() -> None:
        deadline = time.monotonic() + 120
        while len(list(storage.rglob("*.h5"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # a few projections in
        with open(storage / f"other-user-{uuid.uuid4().hex[:6]}.bin", "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * 2**20)
                    handle.flush()
            except OSError:
                seen["full"] = time.time()

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    return thread


@pytest.fixture(params=["sim", "epics"])
def full_storage_settings(request, tmp_path):
    scan = SCAN_BY_MODE[request.param]
    size = DISK_RESERVE_BYTES + chain_bytes_by_site(scan, frame_shape_px=FRAME_SHAPE_PX, itemsize=2)["beamline"] + MARGIN_BYTES
    with small_filesystem(tmp_path / "detector-disk", size) as storage:
        beamline: dict = {}
        if request.param == "epics":
            beamline = {"mode": "epics", "epics_prefix": request.getfixturevalue("sim_facility").beamline_prefix}
        yield load_settings(data_root=tmp_path / "root", facilities={"beamline_storage": str(storage)}, beamline=beamline), storage, scan


@pytest.mark.fault("disk full")
def test_a_storage_that_fills_up_mid_scan_fails_the_run_and_sets_its_partial_files_aside(full_storage_settings, fault_figures):
    settings, storage, scan = full_storage_settings
    settings.ensure_directories()
    sample = DEFAULT_SAMPLE.model_copy(update={"name": "disk-full-01"})
    seen: dict[str, float] = {}
    filler = _fill_once_acquiring(storage, seen)
    with pytest.raises(StorageFullError, match="storage full: no space left on device writing .*set aside in") as raised:
        run_tomography(settings, sample, scan)
    failed_at = time.time()
    filler.join(10)
    assert "full" in seen, "the file system was filled"
    with open_catalog(settings) as catalog:
        (uid,) = list(catalog.runs)
        run = catalog.runs[uid]
        stop = run.metadata["stop"]
        lifecycle = run.metadata.get("lifecycle") or {}
    assert stop["exit_status"] == "fail"
    assert stop["reason"].startswith("storage full: no space left on device writing " + str(storage))
    assert raised.value.run_uids == (uid,)
    # Set aside, not lost: the partial files moved out of the proposal's tree, recorded on the run.
    (moved,) = lifecycle["set_aside"]
    target = Path(moved["to"])
    assert target.is_relative_to(storage / INCOMPLETE_DIR)
    partial = sorted(target.glob("*.h5"))
    assert partial and all(p.stat().st_size > 0 for p in partial)
    proposal_tree = storage / sample.proposal
    assert not any(p.is_file() for p in proposal_tree.rglob("*")), "nothing left where a scan's files are looked for"
    assert not list(storage.rglob("*.nxs")), "a failed run is never exported"
    fault_figures[f"{settings.beamline.mode}: storage full -> run failed (s)"] = round(failed_at - seen["full"], 2)
    fault_figures[f"{settings.beamline.mode}: frames before the disk filled"] = int(stop["num_events"].get("primary", 0))
