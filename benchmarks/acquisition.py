"""Acquisition benchmark: RunEngine overhead per event and detector frames into HDF5, corrflow vs peers.

Run from the project root::

    python -m benchmarks.acquisition            # 500 events, 150 frames of 1024 x 1024, best of 5
    python -m benchmarks.acquisition --quick    # 200 events, 60 frames, best of 3 (about a minute)

Cases (the "Benchmarks convention" of benchmarks/__init__.py)
-------------------------------------------------
``event_overhead``  ``seconds`` = wall time per event of ``bluesky.plans.count`` (no delay), one
    RunEngine per row, all in this process:

    - ``bluesky+ophyd.sim``: the peer, ``count([ophyd.sim.det])``, no subscriber;
    - ``bluesky+ophyd.sim+catalog``: the same, every document into the catalog (TiledWriter, batch 100,
      in-process Tiled on SQLite, as corrflow's flows do);
    - ``corrflow-sim``: ``count`` of corrflow's simulated stage (6 axes), shutter and furnace;
    - ``corrflow-sim+catalog``: the same into the catalog;
    - ``corrflow-epics+catalog``: the EPICS stage, shutter, furnace and ring current of the simulated
      facility (caproto IOCs on 127.0.0.1 over Channel Access), into the catalog;
    - ``bluesky+ophyd.sim (8 devices)`` (and ``+catalog``): the like-for-like peer, eight ``ophyd.sim``
      readables (6 ``SynAxis``, 2 ``SynGauss``) as corrflow's rows read eight devices.

    ``ratio`` compares each row with its like-for-like peer: ``bluesky+ophyd.sim`` for itself,
    ``bluesky+ophyd.sim (8 devices)`` (with or without the catalog) for the corrflow rows.
``hdf5_frames``  ``seconds`` = wall time to write N uint16 frames (1024 x 1024, 2 MiB each, the same
    precomputed frames for everyone) to a new HDF5 file, file creation and close included;
    ``throughput_MBps`` = N x 2 MiB / seconds (10^6 bytes per MB):

    - ``h5py``: the peer, a dataset of the final shape written frame by frame, no flush;
    - ``h5py append+flush``: what a live detector file needs (extendable, one chunk per frame,
      flushed so a reader sees every frame at once);
    - ``corrflow HDF5FrameWriter``: the one SWMR writer of the simulated detectors and the detector
      IOC (``corrflow/formats/hdf5_frames.py``), as configured by default: each frame written as its chunk,
      the file flushed every 0.5 s and before frames are announced (areaDetector's
      ``NumFramesFlush``/``FlushNow``), and at close;
    - ``corrflow HDF5FrameWriter, flush every frame``: the same, flushed after every frame;
    - ``corrflow HDF5FrameWriter + 12 NDAttributes (detector IOC)``: as the caproto detector IOC
      writes, with 12 per-frame NDAttributes.

    ``ratio`` = throughput / the ``h5py`` peer's.
``nxtomo_export``  ``seconds`` = wall time to write the NXtomo file of N frames already in a detector
    file, ``megabytes`` its size: the frames copied into it, or linked (the production export: a
    virtual dataset, one mapping per frame). ``ratio`` = seconds / the copy's.
``nxtomo_slab_read``  ``seconds`` = reading rows 0:8 of every frame (a reconstruction slab) from the
    detector file itself (the peer), the copied NXtomo and the linked one; ``ratio`` = seconds / the peer's.

Timing: best of N after one untimed warm-up (the machine is shared by other processes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from benchmarks._common import best_of, machine_note, print_table, write_results

NAME = "acquisition"
FRAME_SHAPE = (1024, 1024)


# -- event overhead ---------------------------------------------------------------------------------
def _per_event_seconds(
    readables: list[Any], *, num: int, repeats: int, callback: Callable[..., Any] | None = None, engine: Any = None
) -> float:
    from bluesky import RunEngine
    from bluesky.plans import count

    RE = engine if engine is not None else RunEngine({}, context_managers=[])
    if callback is not None:
        RE.subscribe(callback)
    RE(count(readables, num=5))  # warm-up: descriptors, caches, catalog containers
    seconds, _ = best_of(lambda: RE(count(readables, num=num)), repeats=repeats)
    return seconds / num


@contextlib.contextmanager
def _catalog(root: Path) -> Iterator[Callable[..., Any]]:
    from corrflow.catalog.tiled import open_catalog, tiled_writer
    from corrflow.config.settings import load_settings

    settings = load_settings(data_root=root)
    settings.ensure_directories()
    with open_catalog(settings) as catalog:
        yield tiled_writer(catalog.runs, settings)


@contextlib.contextmanager
def _epics_beamline(root: Path) -> Iterator[Any]:
    """The simulated facility's IOCs and the EPICS beamline on them (this process's CA set up first)."""
    from corrflow.operations.sim_facility import SimFacility

    prefix = f"CFB{uuid.uuid4().hex[:6].upper()}:"
    facility = SimFacility(beamline_prefix=f"{prefix}BL:", microscope_prefix=f"{prefix}SEM:", speed=20.0, heater_time_scale=50.0)
    os.environ.update(facility.client_environment())  # before this process creates its first channel
    with facility:
        facility.start(["stage", "heater", "source", "xray-detector"])
        from corrflow.devices.beamline import build_beamline
        from corrflow.config.settings import load_settings

        settings = load_settings(data_root=root, beamline={"mode": "epics", "epics_prefix": f"{prefix}BL:"})
        yield build_beamline(settings)


def event_overhead_rows(*, num: int, repeats: int, root: Path) -> list[dict[str, Any]]:
    from ophyd.sim import SynAxis, SynGauss, det
    from ophyd.sim import motor as det_motor

    from corrflow.devices.beamline import build_beamline
    from corrflow.config.settings import load_settings
    from corrflow.simulators import SimulatedWorld

    settings = load_settings(data_root=root / "sim")
    sim = build_beamline(settings, SimulatedWorld(settings.simulation))
    sim_readables = [sim.stage, sim.shutter, sim.heater]
    # The same number of readables as corrflow's (6 axes, shutter, furnace), from ophyd.sim.
    peer_readables = [SynAxis(name=f"axis{k}") for k in range(6)] + [SynGauss(f"sig{k}", det_motor, "motor", center=0, Imax=1) for k in range(2)]
    rows = [
        {"implementation": "bluesky+ophyd.sim", "seconds": _per_event_seconds([det], num=num, repeats=repeats), "kind": "plain"},
        {"implementation": "bluesky+ophyd.sim (8 devices)", "seconds": _per_event_seconds(peer_readables, num=num, repeats=repeats), "kind": "plain8"},
        {"implementation": "corrflow-sim", "seconds": _per_event_seconds(sim_readables, num=num, repeats=repeats), "kind": "plain8"},
    ]
    with _catalog(root / "catalog") as writer:
        rows.append({"implementation": "bluesky+ophyd.sim+catalog", "seconds": _per_event_seconds([det], num=num, repeats=repeats, callback=writer), "kind": "catalog"})
        rows.append({"implementation": "bluesky+ophyd.sim (8 devices)+catalog", "seconds": _per_event_seconds(peer_readables, num=num, repeats=repeats, callback=writer), "kind": "catalog8"})
        rows.append({"implementation": "corrflow-sim+catalog", "seconds": _per_event_seconds(sim_readables, num=num, repeats=repeats, callback=writer), "kind": "catalog8"})
        from corrflow.acquisition.runengine import make_run_engine

        from corrflow.catalog.spool import DocumentSpool

        # What acquisitions run on: the production RunEngine with the beamline's protections, the
        # catalog behind the resume filter, the completeness check and the on-disk spool.
        spool = DocumentSpool(writer, directory=root / "spool", catalog_address="benchmark catalog")
        production = make_run_engine(catalog_writer=spool, instrument=sim, protections=settings.beamline.protections)
        rows.append({"implementation": "corrflow-sim+catalog, production RunEngine (protections, spool)",
                     "seconds": _per_event_seconds(sim_readables, num=num, repeats=repeats, engine=production),
                     "kind": "catalog8"})
        with _epics_beamline(root / "epics") as epics:
            readables = [epics.stage, epics.shutter, epics.heater, epics.beam]
            rows.append({"implementation": "corrflow-epics+catalog", "seconds": _per_event_seconds(readables, num=num, repeats=repeats, callback=writer), "kind": "catalog8"})
    peers = {row["kind"]: row["seconds"] for row in rows if row["implementation"].startswith("bluesky")}
    for row in rows:
        row["case"] = "event_overhead"
        row["ratio"] = row["seconds"] / peers[row.pop("kind")]
        row["note"] = f"count, {num} events, per-event seconds"
    return rows


# -- HDF5 frames ----------------------------------------------------------------------------------------
def _frames(n: int) -> np.ndarray:
    """``n`` distinct uint16 frames of shape :data:`FRAME_SHAPE` (noisy, as detector frames are)."""
    rng = np.random.default_rng(3)
    base = rng.poisson(2000.0, size=FRAME_SHAPE).astype(np.uint16)
    return np.stack([np.roll(base, 7 * k, axis=1) for k in range(n)])


def _h5py_plain(path: Path, frames: np.ndarray) -> None:
    with h5py.File(path, "w-") as f:
        dataset = f.create_dataset("data", shape=frames.shape, dtype=frames.dtype, chunks=(1, *frames.shape[1:]))
        for k, frame in enumerate(frames):
            dataset[k] = frame


def _h5py_append_flush(path: Path, frames: np.ndarray) -> None:
    rows, cols = frames.shape[1:]
    with h5py.File(path, "w-", libver="latest") as f:
        dataset = f.create_dataset("data", shape=(0, rows, cols), maxshape=(None, rows, cols), chunks=(1, rows, cols), dtype=frames.dtype)
        f.swmr_mode = True
        for k, frame in enumerate(frames):
            dataset.resize(k + 1, axis=0)
            dataset[k] = frame
            dataset.flush()


def _corrflow_writer(path: Path, frames: np.ndarray, *, attribute_names: tuple[str, ...] = (),
                     flush_interval_s: float | None = None) -> None:
    from corrflow.formats.hdf5_frames import DEFAULT_FLUSH_INTERVAL_S, HDF5FrameWriter

    interval = DEFAULT_FLUSH_INTERVAL_S if flush_interval_s is None else flush_interval_s
    writer = HDF5FrameWriter(path, frame_shape=frames.shape[1:], dtype=frames.dtype, attribute_names=attribute_names,
                             flush_interval_s=interval)
    try:
        for k, frame in enumerate(frames):
            writer.append(frame, {name: float(k) for name in attribute_names})
    finally:
        writer.close()


def _ioc_writer(path: Path, frames: np.ndarray) -> None:
    from corrflow.simulators.ioc.xray_detector import XrayDetectorIOC

    _corrflow_writer(path, frames, attribute_names=tuple(XrayDetectorIOC.attribute_names))


def hdf5_frames_rows(*, n: int, repeats: int, root: Path) -> list[dict[str, Any]]:
    frames = _frames(n)
    megabytes = frames.nbytes / 1e6
    writers = {
        "h5py": _h5py_plain,
        "h5py append+flush": _h5py_append_flush,
        "corrflow HDF5FrameWriter": _corrflow_writer,
        "corrflow HDF5FrameWriter, flush every frame": lambda path, frames: _corrflow_writer(path, frames, flush_interval_s=0.0),
        "corrflow HDF5FrameWriter + 12 NDAttributes (detector IOC)": _ioc_writer,
    }
    rows = []
    for implementation, write in writers.items():
        def once() -> None:
            path = root / f"{uuid.uuid4().hex}.h5"
            write(path, frames)
            path.unlink()

        once()  # untimed warm-up: library state, page cache, file system metadata
        seconds, _ = best_of(once, repeats=repeats)
        rows.append({"case": "hdf5_frames", "implementation": implementation, "seconds": seconds, "throughput_MBps": megabytes / seconds,
                     "note": f"{n} frames {FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} uint16"})
    peer = rows[0]["throughput_MBps"]
    for row in rows:
        row["ratio"] = row["throughput_MBps"] / peer
    return rows


def _nxtomo_export(path: Path, data: Any) -> None:
    from corrflow.formats.nexus import write_nxtomo

    n = data.shape[0]
    write_nxtomo(
        path, data=data, image_key=np.zeros(n, dtype=np.int8), rotation_angle_deg=np.linspace(0.0, 180.0, n, endpoint=False),
        x_translation_um=0.0, y_translation_um=0.0, z_translation_um=0.0, pixel_size_um=1.0, distance_mm=10.0,
        energy_keV=20.0, count_time_s=0.01, sample_name="bench", title="bench",
        metadata={"identification": {}, "references": {}, "settings": {}},
    )


def nxtomo_export_rows(*, n: int, repeats: int, root: Path) -> list[dict[str, Any]]:
    """The NXtomo export of a scan already in a detector file: copied (array) or linked (virtual
    dataset), its time and size; then an 8-row slab over every frame read back, as the reconstruction
    reads it, from each and from the detector file itself (the peer)."""
    from corrflow.formats.nexus import LinkedFrames

    frames = _frames(n)
    detector = root / "detector.h5"
    _h5py_plain(detector, frames)
    linked = LinkedFrames(tuple((detector, "data", k) for k in range(n)), frame_shape=FRAME_SHAPE, dtype=frames.dtype)
    exports = {"NXtomo export, frames copied": lambda: frames, "NXtomo export, frames linked (virtual dataset)": lambda: linked}
    rows: list[dict[str, Any]] = []
    written: dict[str, Path] = {}
    for implementation, data in exports.items():
        def once() -> None:
            path = root / f"{uuid.uuid4().hex}.nxs"
            _nxtomo_export(path, data())
            written[implementation] = path

        seconds, _ = best_of(once, repeats=repeats)
        rows.append({"case": "nxtomo_export", "implementation": implementation, "seconds": seconds,
                     "megabytes": written[implementation].stat().st_size / 1e6, "note": f"{n} frames {FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} uint16"})
    for row in rows:
        row["ratio"] = row["seconds"] / rows[0]["seconds"]
    reads = {"slab read, detector file (h5py)": (detector, "data")} | {
        f"slab read, {name.removeprefix('NXtomo export, ')}": (written[name], "/entry/instrument/detector/data") for name in exports
    }
    slab_rows = []
    for implementation, (path, dataset) in reads.items():
        def read() -> None:
            with h5py.File(path, "r") as f:
                f[dataset][:, 0:8, :]

        read()
        seconds, _ = best_of(read, repeats=repeats)
        slab_rows.append({"case": "nxtomo_slab_read", "implementation": implementation, "seconds": seconds, "note": f"rows 0:8 of {n} frames"})
    for row in slab_rows:
        row["ratio"] = row["seconds"] / slab_rows[0]["seconds"]
    return rows + slab_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.acquisition", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and frames, best of 3")
    args = parser.parse_args(argv)
    num_events, num_frames, repeats = (200, 60, 3) if args.quick else (500, 150, 5)
    print(machine_note())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="corrflow-bench-acq-") as tmp:
        root = Path(tmp)
        rows = hdf5_frames_rows(n=num_frames, repeats=repeats, root=root)
        rows += nxtomo_export_rows(n=num_frames, repeats=repeats, root=root)
        rows += event_overhead_rows(num=num_events, repeats=repeats, root=root)
    print_table(rows, columns=["case", "implementation", "seconds", "throughput_MBps", "megabytes", "ratio", "note"], title="acquisition")
    path = write_results(NAME, rows)
    print(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
