"""Acquisition: run a bluesky plan on an instrument, catalogue it, export NeXus.

The plain functions (:func:`run_tomography`, :func:`run_micrograph`, :func:`export_nxtomo`) do
the work and are tested directly; :func:`tomography_stage` and :func:`micrograph_stage` are the
chain's stages (:mod:`corrflow.flows.pipeline`), and :func:`acquire_micrograph` is the micrograph a
queue entry asks for.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow

from corrflow.acquisition.cancellation import run_abortable
from corrflow.acquisition.runengine import EventCounter, StorageFullError, is_storage_full, make_run_engine, storage_full_text
from corrflow.catalog.filters import with_view_sources
from corrflow.catalog.reconcile import reconcile_runs
from corrflow.catalog.spool import DocumentSpool
from corrflow.catalog.tiled import Catalog, external_file_paths, open_catalog, record_lifecycle, tiled_writer
from corrflow.config.settings import ProtectionSettings, Settings, Site
from corrflow.devices.beamline import build_beamline
from corrflow.devices.sem import build_microscope
from corrflow.flows._common import flow_settings, run_name
from corrflow.flows.models import (
    ExperimentRequest,
    MicrographRun,
    DEFAULT_SAMPLE,
    Sample,
    StoredFile,
    TomographyRun,
)
from corrflow.formats.nexus import write_nxtomo_from_documents
from corrflow.plans.requests import MicrographRequest, TomoScanRequest
from corrflow.plans.microscopy import micrograph
from corrflow.plans.tomography import tomo_scan
from corrflow.simulators.world import SimulatedWorld


class AcquisitionError(RuntimeError):
    """The plan did not finish successfully; the message holds the run's exit status and reason."""


def _scan_directory(root: Path, sample: Sample, kind: str) -> Path:
    # Unique per attempt, so a re-run never writes into (or over) an earlier run's files.
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return root / sample.proposal / sample.name / f"{kind}_{stamp}_{uuid.uuid4().hex[:6]}"


def _check_success(run: Any) -> None:
    stop = run.metadata.get("stop") or {}
    if stop.get("exit_status") != "success":
        raise AcquisitionError(
            f"run {run.metadata['start']['uid']} ended with exit_status={stop.get('exit_status')!r}: "
            f"{stop.get('reason', 'no stop document')}"
        )


def close_lost_runs(catalog: Any, instrument: str) -> list[str]:
    """Close this instrument's runs left without a stop document by a dead process; returns their uids.

    Runs before each acquisition (see :mod:`corrflow.catalog.reconcile`): a run whose worker died is
    marked ``exit_status="fail"`` with the reason, so nobody mistakes it for one still going.
    """
    closed = [entry for entry in reconcile_runs(catalog, instrument=instrument) if entry.action == "closed"]
    for entry in closed:
        print(f"closed run {entry.uid} of {instrument} (no stop document): {entry.reason}")
    return [entry.uid for entry in closed]


#: Where a run's partial files go, below its site's storage root, when the storage filled up.
INCOMPLETE_DIR = "incomplete"


def set_aside_partial_files(settings: Settings, catalog: Catalog, site: Site, data_dir: Path, error: StorageFullError) -> Path | None:
    """Move the files of a run that failed on a full storage out of the data tree; returns where.

    Nothing acquired is deleted: the directory is renamed (no space needed) to
    ``<storage>/incomplete/<its path below the storage>`` (or, if even that directory cannot be
    made, to ``<data_dir>.incomplete`` beside it), so no later stage or user takes the partial files
    for a scan. The move is recorded on the run in the catalog (``lifecycle.set_aside``).
    """
    if not data_dir.exists():
        return None
    root = settings.storage(site)
    target = root / INCOMPLETE_DIR / data_dir.relative_to(root)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        target = data_dir.with_name(data_dir.name + ".incomplete")
    os.rename(data_dir, target)
    entry = {"from": str(data_dir), "to": str(target), "reason": error.reason, "time": time.time()}
    for uid in error.run_uids:
        try:
            record_lifecycle(catalog.runs[uid], "set_aside", [entry])
        except Exception as exc:  # noqa: BLE001 - the run itself is already catalogued as failed
            print(f"run {uid}: files set aside in {target}, not recorded in the catalog: {exc}")
    return target


def acquire_catalogued(
    settings: Settings,
    catalog: Catalog,
    instrument: Any,
    plan: Any,
    *callbacks: Any,
    protections: ProtectionSettings,
    site: Site,
    data_dir: Path,
) -> Any:
    """Run ``plan`` on the production RunEngine with the catalog behind a spool; returns the catalogued run.

    Runs that died with their process are closed first (:func:`close_lost_runs`). Every document
    goes to the spool on local disk before the catalog (:mod:`corrflow.catalog.spool`): if the
    catalog goes away mid-run the acquisition goes on, and afterwards the run is replayed into it
    once it answers again (``settings.catalog.outage_wait_s``). A run that fails because ``site``'s
    storage filled up has its files in ``data_dir`` set aside (:func:`set_aside_partial_files`).

    Raises
    ------
    CatalogUnavailableError
        The catalog did not come back in time; the message names it and the spool file.
    StorageFullError
        A write found no space left; the run is catalogued ``fail`` and its files were set aside.
    AcquisitionError
        The run did not end ``success`` (every planned point taken).
    """
    close_lost_runs(catalog, instrument.name)
    spool = DocumentSpool(tiled_writer(catalog.runs, settings), directory=settings.spool_dir, catalog_address=settings.catalog_address)
    engine = make_run_engine(*callbacks, catalog_writer=spool, instrument=instrument, protections=protections)
    try:
        (uid,) = engine(plan)
    except StorageFullError as exc:
        moved = set_aside_partial_files(settings, catalog, site, data_dir, exc)
        raise StorageFullError(f"{exc.reason}; the run's partial files were set aside in {moved}", exc.run_uids) from exc
    spool.settle(uid, catalog.runs, wait_s=settings.catalog.outage_wait_s, make_writer=lambda: tiled_writer(catalog.runs, settings))
    run = catalog.runs[uid]
    _check_success(run)
    return run


def export_nxtomo(run: Any, path: Path) -> Path:
    """Write a catalogued tomography run as NeXus NXtomo, from the documents the catalog holds.

    Streams ``dark``, ``flat`` and ``primary`` become image_key 2, 1 and 0, in that order; the
    geometry is the one the plan read when it ran (its start document). The frames are not copied:
    the NXtomo's ``data`` is a virtual dataset of the frames in the detector files (or their views)
    beside it, which travel with it.
    """
    return write_nxtomo_from_documents(path, run.documents(), link_frames=True)


class StorageSpaceError(ValueError):
    """The chain's data would not fit on a storage; nothing was moved or written."""


def chain_bytes_by_site(parameters: TomoScanRequest, *, frame_shape_px: tuple[int, int], itemsize: int) -> dict[str, int]:
    """Bytes the correlative chain writes on each site's storage for one scan.

    beamline: the detector frames (the NXtomo export links them: a few kB of geometry beside them);
    compute: the frames again (the verified transfer) and the float32 volume (twice as wide for an
    offset-centre scan); microscope: the shipped volume.
    """
    rows, cols = frame_shape_px
    frames = parameters.n_frames * rows * cols * itemsize
    width = 2 * cols if parameters.axis_offset_um else cols
    volume = rows * width * width * 4
    return {"beamline": frames, "compute": frames + volume, "microscope": volume}


def check_chain_space(settings: Settings, needed_by_site: dict[str, int]) -> None:
    """Refuse, before anything moves, a scan whose chain would not fit on the storages this process sees.

    Storages on one file system add up (one machine: all three). A storage this process cannot
    see (another facility's) is checked by that facility's stage.

    Raises
    ------
    StorageSpaceError
        Naming each file system, what the chain needs there and what is free.
    """
    from corrflow.plans.preflight import DISK_RESERVE_BYTES, free_bytes

    by_device: dict[int, list[str]] = {}
    free_of: dict[int, tuple[int, Path]] = {}
    for site in needed_by_site:
        root = settings.storage(site)  # type: ignore[arg-type]
        if not root.exists():
            continue  # another facility's storage: its own stage checks it
        free, where = free_bytes(root)
        device = where.stat().st_dev
        by_device.setdefault(device, []).append(site)
        free_of[device] = (free, where)
    problems = []
    for device, sites in by_device.items():
        needed = sum(needed_by_site[site] for site in sites)
        free, where = free_of[device]
        if needed + DISK_RESERVE_BYTES > free:
            problems.append(
                f"{' + '.join(sites)} storage ({where}): the chain writes {needed} bytes there, {free} are free "
                f"(keeping {DISK_RESERVE_BYTES} in reserve)"
            )
    if problems:
        raise StorageSpaceError("not enough space for this scan's data:\n" + "\n".join(f"  - {p}" for p in problems))


def run_tomography(settings: Settings, sample: Sample, parameters: TomoScanRequest) -> TomographyRun:
    """Run a tomography scan on the beamline, catalogue it, and export the raw scan as NXtomo.

    ``parameters`` is the plan's own request model. First the space the whole chain will write is
    checked on every storage this process sees (:func:`check_chain_space`); then the plan's preflight
    checks it against the beamline as it is now (limits, field of view, the detector's disk), before
    anything moves or is written, and a problem raises ``StorageSpaceError`` or ``PlanValidationError``.
    """
    world = SimulatedWorld(settings.simulation)
    scan_dir = _scan_directory(settings.beamline_storage, sample, "tomo")
    beamline = build_beamline(settings, world, data_dir=scan_dir)
    detector = beamline.detector
    check_chain_space(
        settings,
        chain_bytes_by_site(parameters, frame_shape_px=detector.frame_shape_px, itemsize=np.dtype(detector.frame_dtype).itemsize),
    )
    plan = tomo_scan(beamline, **parameters.model_dump(), sample=sample)
    with open_catalog(settings) as catalog:
        run = acquire_catalogued(
            settings, catalog, beamline, plan, EventCounter("tomography (projections)", parameters.num_projections),
            protections=settings.beamline.protections, site="beamline", data_dir=scan_dir,
        )
        uid = run.metadata["start"]["uid"]
        try:
            nexus = export_nxtomo(run, scan_dir / f"{sample.name}_{uid[:8]}_nxtomo.nxs")
        except OSError as exc:
            if not is_storage_full(exc):
                raise
            # The acquisition is complete and catalogued as such; only its export is missing.
            raise StorageFullError(f"{storage_full_text(exc)} (run {uid} is complete; export it again once there is space)", (uid,)) from exc
        # A resumed run's re-taken frames are catalogued through a view of the detector file:
        # both files travel.
        files = (*with_view_sources(external_file_paths(run)), nexus)
    return TomographyRun(
        run_uid=uid,
        instrument=beamline.name,
        files=tuple(StoredFile.under(settings, "beamline", path) for path in files),
        nxtomo=StoredFile.under(settings, "beamline", nexus),
    )


def run_micrograph(
    settings: Settings, sample: Sample, parameters: MicrographRequest, *, parent_uids: Sequence[str] = ()
) -> MicrographRun:
    """Image the sectioned sample on the microscope at the requested stage position and catalogue it.

    ``parent_uids`` (the tomography run the micrograph follows from) go to the run's ``references``.
    """
    world = SimulatedWorld(settings.simulation)
    scan_dir = _scan_directory(settings.microscope_storage, sample, "sem")
    microscope = build_microscope(settings, world, data_dir=scan_dir)
    plan = micrograph(
        microscope,
        **parameters.model_dump(),
        sample=sample,
        parent_uids=tuple(parent_uids),
    )
    with open_catalog(settings) as catalog:
        run = acquire_catalogued(
            settings, catalog, microscope, plan, EventCounter("micrograph", 1),
            protections=settings.microscope.protections, site="microscope", data_dir=scan_dir,
        )
        uid = run.metadata["start"]["uid"]
        files = tuple(with_view_sources(external_file_paths(run)))
    return MicrographRun(
        run_uid=uid,
        instrument=microscope.name,
        files=tuple(StoredFile.under(settings, "microscope", path) for path in files),
    )


def tomography_stage(settings: Settings, request: ExperimentRequest) -> TomographyRun:
    """The chain's first stage: the tomography of the request's sample."""
    acquired = run_tomography(settings, request.sample, request.tomography)
    print(f"run {acquired.run_uid}: {len(acquired.files)} files, NXtomo {acquired.nxtomo.path}")
    return acquired


def micrograph_stage(settings: Settings, request: ExperimentRequest, *, tomography: TomographyRun) -> MicrographRun:
    """The micrograph of the sectioned sample, a child of the tomography run in the catalog."""
    acquired = run_micrograph(settings, request.sample, request.micrograph, parent_uids=(tomography.run_uid,))
    print(f"run {acquired.run_uid}: micrograph of the section (parent run {tomography.run_uid})")
    return acquired


@flow(name="acquire-micrograph", flow_run_name=run_name("acquire micrograph"), log_prints=True)
def acquire_micrograph(
    sample: Sample = DEFAULT_SAMPLE, parameters: MicrographRequest = MicrographRequest()
) -> MicrographRun:
    """One micrograph on the microscope, catalogued in Tiled (a queue entry of plan 'micrograph')."""
    settings = flow_settings()
    result = run_abortable(lambda: run_micrograph(settings, sample, parameters), reason="micrograph cancelled")
    print(f"run {result.run_uid}: {result.files[0].path}")
    return result
