"""Mosaics: a grid of overlapping tiles for samples larger than the field of view.

:func:`grid_positions` lays out a ``columns x rows`` grid whose tiles overlap by
``overlap_fraction`` of the field of view, centred on a point, visited row by row in a snake
(boustrophedon) order so the fast axis never travels back across the grid. Two plans use it:

- :func:`xray_mosaic`: radiographs of the sample at one rotation angle over a grid of stage x
  (across the beam) and z (up) positions, with dark and flat fields, for a sample wider or taller
  than the detector;
- :func:`micrograph_mosaic`: electron micrographs over a grid of microscope stage x, y positions.

Every tile is one event of the ``primary`` stream holding the stage position; the start document
records the grid (``references.tiles_um``: tile centres in the instrument frame, in the order taken)
and the overlap, so a stitcher knows where each tile goes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from corrflow.devices.beamline import Beamline
from corrflow.devices.detectors import IMAGE_KEY_DARK, IMAGE_KEY_FLAT, IMAGE_KEY_PROJECTION
from corrflow.devices.sem import Microscope
from corrflow.plans.metadata import (
    Sample,
    build_start_metadata,
    identification_metadata,
    references_metadata,
    settings_metadata,
)
from corrflow.plans.stubs import repeated_frames
from corrflow.plans.preflight import AxisState, TomoState, disk_problems, read_axis, read_microscope_state, read_now, read_tomo_state
from corrflow.plans.requests import MicrographMosaicRequest, XrayMosaicRequest
from corrflow.plans.validation import PlanEstimate, PlanValidationError, microscope_of, request_and_context, tomo_devices

__all__ = ["estimate_micrograph_mosaic", "estimate_xray_mosaic", "grid_positions", "micrograph_mosaic", "xray_mosaic"]


def grid_positions(
    *, columns: int, rows: int, tile_size_um: tuple[float, float], overlap_fraction: float, center_um: tuple[float, float]
) -> np.ndarray:
    """Tile centres of a snake-ordered grid, shape ``(columns * rows, 2)``, float64 (um).

    Parameters
    ----------
    columns, rows
        Tiles along the fast (first) and slow (second) axis, each >= 1.
    tile_size_um
        Field of view of one tile along the two axes (um, > 0).
    overlap_fraction
        Fraction of a tile shared with each neighbour, in [0, 1).
    center_um
        Centre of the grid (um).

    Returns
    -------
    ndarray, shape (n, 2)
        ``[fast, slow]`` positions; row ``r`` runs forward for even ``r``, backward for odd ``r``.
    """
    if columns < 1 or rows < 1:
        raise ValueError(f"columns and rows must be >= 1, got {columns}, {rows}")
    if not 0 <= overlap_fraction < 1:
        raise ValueError(f"overlap_fraction must be in [0, 1), got {overlap_fraction}")
    step = np.asarray(tile_size_um, dtype=np.float64) * (1.0 - overlap_fraction)
    fast = (np.arange(columns) - (columns - 1) / 2) * step[0] + center_um[0]
    slow = (np.arange(rows) - (rows - 1) / 2) * step[1] + center_um[1]
    points = []
    for r, y in enumerate(slow):
        for x in fast if r % 2 == 0 else fast[::-1]:
            points.append((x, y))
    return np.asarray(points, dtype=np.float64)


# -- X-ray radiography mosaic -------------------------------------------------------------------
def xray_mosaic(
    beamline: Beamline,
    *,
    sample: Sample | Mapping[str, str],
    columns: int = 1,
    rows: int = 1,
    overlap_fraction: float = 0.2,
    exposure_s: float = 0.05,
    angle_deg: float = 0.0,
    center_x_um: float | None = None,
    center_z_um: float | None = None,
    num_darks: int = 5,
    num_flats: int = 5,
    parent_uids: Sequence[str] = (),
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """Validate the arguments and return a radiography mosaic: a grid of stage x, z positions at one angle.

    Parameters
    ----------
    beamline
        A :class:`~corrflow.devices.beamline.Beamline` (simulated or EPICS).
    sample
        Identification of the sample.
    columns, rows, overlap_fraction, exposure_s, angle_deg, center_x_um, center_z_um, num_darks, num_flats
        See :class:`~corrflow.plans.requests.XrayMosaicRequest`.
    parent_uids, md
        References and extra metadata.

    Raises
    ------
    PlanValidationError
        When called: an argument breaks the request model (no hardware is read). When run: the
        preflight finds the angle, tiles or the flat-field position beyond the soft limits, or no
        room for the frames, before any motion.
    """
    devices = tomo_devices(beamline)
    arguments = dict(locals())
    del arguments["beamline"], arguments["devices"]
    request, context = request_and_context(XrayMosaicRequest, "xray_mosaic", arguments)
    return _xray_mosaic_plan(devices, request, context)


@dataclass(frozen=True)
class XrayMosaicSetup:
    """An X-ray mosaic checked against the beamline: its state, the z axis, the tiles and the flats' x."""

    state: TomoState
    z: AxisState
    tiles: np.ndarray
    flat_x_um: float
    tile_size_um: tuple[float, float]


def xray_mosaic_setup(devices: Any, request: XrayMosaicRequest) -> MsgGenerator[XrayMosaicSetup]:
    """Plan stub (preflight): read the beamline, lay out the tiles, check them."""
    state = yield from read_tomo_state(devices)
    z = yield from read_axis(devices.stage.z)
    rows_px, cols_px = state.detector.frame_shape_px
    fov = (cols_px * state.detector.pixel_size_um, rows_px * state.detector.pixel_size_um)
    center = (
        state.x.position if request.center_x_um is None else request.center_x_um,
        z.position if request.center_z_um is None else request.center_z_um,
    )
    tiles = grid_positions(columns=request.columns, rows=request.rows, tile_size_um=fov, overlap_fraction=request.overlap_fraction, center_um=center)
    # Flats: the region the grid images (half a field beyond its outer tile centres) moved out of
    # the field, with half a field to spare.
    flat_x = float(tiles[:, 0].max() + 1.5 * fov[0])
    problems = [] if state.rotation.within(request.angle_deg) else [
        f"angle_deg ({request.angle_deg}) is outside the rotation limits [{state.rotation.low}, {state.rotation.high}] deg"
    ]
    problems += [
        f"tiles span {name} [{values.min()}, {values.max()}] um, outside its limits [{axis.low}, {axis.high}] um"
        for name, axis, values in (("x", state.x, tiles[:, 0]), ("z", z, tiles[:, 1]))
        if values.min() < axis.low or values.max() > axis.high
    ]
    if not state.x.within(flat_x):
        problems.append(f"the flat-field position x = {flat_x} um is outside the x limits [{state.x.low}, {state.x.high}] um")
    problems += disk_problems(state.detector, request.num_darks + request.num_flats + len(tiles))
    if problems:
        raise PlanValidationError("xray_mosaic", problems)
    return XrayMosaicSetup(state=state, z=z, tiles=tiles, flat_x_um=flat_x, tile_size_um=fov)


def _xray_mosaic_plan(devices: Any, request: XrayMosaicRequest, context: Any) -> MsgGenerator[str]:
    setup = yield from xray_mosaic_setup(devices, request)
    stage, detector, shutter = devices.stage, devices.detector, devices.shutter
    tiles = setup.tiles
    parameters = {
        "columns": request.columns, "rows": request.rows, "overlap_fraction": request.overlap_fraction,
        "exposure_s": request.exposure_s, "angle_deg": request.angle_deg, "num_darks": request.num_darks,
        "num_flats": request.num_flats, "tile_width_um": setup.tile_size_um[0], "tile_height_um": setup.tile_size_um[1],
        "flat_x_um": setup.flat_x_um,
    }
    units = {"columns": "", "rows": "", "overlap_fraction": "", "exposure_s": "s", "angle_deg": "deg", "num_darks": "",
             "num_flats": "", "tile_width_um": "um", "tile_height_um": "um", "flat_x_um": "um"}
    references = references_metadata(frame=devices.frame, parent_uids=context.parent_uids, conventions="tiles_um: [x, z] stage positions (um) in the order taken")
    references["tiles_um"] = tiles.tolist()
    start_md = build_start_metadata(
        identification=identification_metadata(context.sample, facility=devices.facility, instrument=devices.instrument),
        references=references,
        settings=settings_metadata("xray_mosaic", parameters, units=units),
        md=context.md,
        plan_name="xray_mosaic",
        plan_args=parameters,
        detectors=[detector.name],
        motors=[stage.x.name, stage.z.name],
        num_points=len(tiles),
        planned_events={"dark": request.num_darks, "flat": request.num_flats, "primary": len(tiles)},
        hints={"dimensions": [([stage.x.name], "primary"), ([stage.z.name], "primary")]},
    )
    readables = [stage, shutter]

    def frames() -> MsgGenerator[None]:
        yield from bps.mv(detector.exposure_s, request.exposure_s, stage.rotation, request.angle_deg)
        yield from bps.mv(shutter, "closed", detector.image_key, IMAGE_KEY_DARK)
        yield from repeated_frames(detector, readables, stream="dark", num_frames=request.num_darks)
        yield from bps.mv(stage.x, setup.flat_x_um, shutter, "open", detector.image_key, IMAGE_KEY_FLAT)
        yield from repeated_frames(detector, readables, stream="flat", num_frames=request.num_flats)
        yield from bps.mv(detector.image_key, IMAGE_KEY_PROJECTION)
        yield from frames_on_grid(detector, readables, axes=(stage.x, stage.z), positions=tiles, stream="primary")

    def restore() -> MsgGenerator[None]:
        state = setup.state
        yield from bps.mv(shutter, "closed", stage.x, state.x.position, stage.z, setup.z.position, stage.rotation, state.rotation.position)

    @bpp.run_decorator(md=start_md)
    def run() -> MsgGenerator[None]:
        yield from bpp.finalize_wrapper(frames(), restore())

    return (yield from run())


def frames_on_grid(detector: Any, readables: Sequence[Any], *, axes: tuple[Any, Any], positions: np.ndarray, stream: str) -> MsgGenerator[None]:
    """Stage ``detector``; at each ``[fast, slow]`` position move both axes and take one event."""

    @bpp.stage_decorator([detector])
    def frames() -> MsgGenerator[None]:
        for fast, slow in positions:
            yield from bps.checkpoint()
            yield from bps.mv(axes[0], float(fast), axes[1], float(slow))
            yield from bps.trigger_and_read([detector, *readables], name=stream)

    return (yield from frames())


def estimate_xray_mosaic(beamline: Beamline, **kwargs: Any) -> PlanEstimate:
    """Duration and data volume of :func:`xray_mosaic` (validates first, reading the beamline now)."""
    request, _ = request_and_context(XrayMosaicRequest, "xray_mosaic", _with_defaults(xray_mosaic, kwargs))
    setup = read_now(xray_mosaic_setup(tomo_devices(beamline), request))
    state, tiles = setup.state, setup.tiles
    travel = np.abs(np.diff(tiles, axis=0))
    motion_s = float(np.sum(np.maximum(travel[:, 0] / state.x.velocity, travel[:, 1] / setup.z.velocity)))
    motion_s += 2 * abs(setup.flat_x_um - state.x.position) / state.x.velocity
    n = request.num_darks + request.num_flats + len(tiles)
    return PlanEstimate(duration_s=n * request.exposure_s + motion_s, data_bytes=state.detector.frame_bytes(n), n_frames=n)


# -- electron micrograph mosaic -----------------------------------------------------------------
def micrograph_mosaic(
    microscope: Microscope,
    *,
    sample: Sample | Mapping[str, str],
    columns: int = 1,
    rows: int = 1,
    center_x_um: float = 0.0,
    center_y_um: float = 0.0,
    overlap_fraction: float = 0.2,
    exposure_s: float | None = None,
    parent_uids: Sequence[str] = (),
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """Validate the arguments and return a mosaic of micrographs over a grid of stage positions.

    Parameters
    ----------
    microscope
        A :class:`~corrflow.devices.sem.Microscope`.
    sample
        Identification of the sample.
    columns, rows, center_x_um, center_y_um, overlap_fraction, exposure_s
        See :class:`~corrflow.plans.requests.MicrographMosaicRequest`.
    parent_uids, md
        References and extra metadata.

    Raises
    ------
    PlanValidationError
        When called: an argument breaks the request model (no hardware is read). When run: the
        preflight finds tiles beyond the stage limits or no room for the frames, before any motion.
    """
    instrument = microscope_of(microscope)
    arguments = dict(locals())
    del arguments["microscope"], arguments["instrument"]
    request, context = request_and_context(MicrographMosaicRequest, "micrograph_mosaic", arguments)
    return _micrograph_mosaic_plan(instrument, request, context)


def micrograph_mosaic_setup(microscope: Microscope, request: MicrographMosaicRequest) -> MsgGenerator[tuple[Any, np.ndarray]]:
    """Plan stub (preflight): read the microscope, lay out the tiles, check them; returns (state, tiles)."""
    state = yield from read_microscope_state(microscope)
    rows_px, cols_px = state.detector.frame_shape_px
    fov = (cols_px * state.detector.pixel_size_um, rows_px * state.detector.pixel_size_um)
    tiles = grid_positions(
        columns=request.columns, rows=request.rows, tile_size_um=fov, overlap_fraction=request.overlap_fraction,
        center_um=(request.center_x_um, request.center_y_um),
    )
    problems = [
        f"tiles span {name} [{values.min()}, {values.max()}] um, outside its limits [{axis.low}, {axis.high}] um"
        for name, axis, values in (("x", state.x, tiles[:, 0]), ("y", state.y, tiles[:, 1]))
        if values.min() < axis.low or values.max() > axis.high
    ]
    problems += disk_problems(state.detector, len(tiles))
    if problems:
        raise PlanValidationError("micrograph_mosaic", problems)
    return state, tiles


def _micrograph_mosaic_plan(microscope: Microscope, request: MicrographMosaicRequest, context: Any) -> MsgGenerator[str]:
    state, tiles = yield from micrograph_mosaic_setup(microscope, request)
    stage, detector = microscope.stage, microscope.detector
    rows_px, cols_px = state.detector.frame_shape_px
    pixel_um = state.detector.pixel_size_um
    parameters = {
        "columns": request.columns, "rows": request.rows, "overlap_fraction": request.overlap_fraction,
        "center_x_um": request.center_x_um, "center_y_um": request.center_y_um,
        "exposure_s": request.exposure_s if request.exposure_s is not None else state.detector.exposure_s,
        "tile_width_um": cols_px * pixel_um, "tile_height_um": rows_px * pixel_um, "detector_pixel_size_um": pixel_um,
    }
    units = {"columns": "", "rows": "", "overlap_fraction": "", "center_x_um": "um", "center_y_um": "um", "exposure_s": "s",
             "tile_width_um": "um", "tile_height_um": "um", "detector_pixel_size_um": "um"}
    references = references_metadata(frame=microscope.frame, parent_uids=context.parent_uids, conventions="tiles_um: [x, y] stage positions (um) in the order taken")
    references["tiles_um"] = tiles.tolist()
    start_md = build_start_metadata(
        identification=identification_metadata(context.sample, facility=microscope.facility, instrument=microscope.name),
        references=references,
        settings=settings_metadata("micrograph_mosaic", parameters, units=units),
        md=context.md,
        plan_name="micrograph_mosaic",
        plan_args=parameters,
        detectors=[detector.name],
        motors=[stage.x.name, stage.y.name],
        num_points=len(tiles),
        planned_events={"primary": len(tiles)},
    )

    @bpp.run_decorator(md=start_md)
    def run() -> MsgGenerator[None]:
        if request.exposure_s is not None:
            yield from bps.mv(detector.exposure_s, request.exposure_s)
        yield from frames_on_grid(detector, [stage], axes=(stage.x, stage.y), positions=tiles, stream="primary")

    return (yield from run())


def estimate_micrograph_mosaic(microscope: Microscope, **kwargs: Any) -> PlanEstimate:
    """Duration and data volume of :func:`micrograph_mosaic` (validates first, reading the microscope now)."""
    request, _ = request_and_context(MicrographMosaicRequest, "micrograph_mosaic", _with_defaults(micrograph_mosaic, kwargs))
    state, tiles = read_now(micrograph_mosaic_setup(microscope_of(microscope), request))
    travel = np.abs(np.diff(tiles, axis=0))
    motion_s = float(np.sum(np.maximum(travel[:, 0] / state.x.velocity, travel[:, 1] / state.y.velocity)))
    exposure = request.exposure_s if request.exposure_s is not None else state.detector.exposure_s
    n = len(tiles)
    return PlanEstimate(duration_s=n * exposure + motion_s, data_bytes=state.detector.frame_bytes(n), n_frames=n)


def _with_defaults(plan: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    import inspect

    values = {
        name: parameter.default
        for name, parameter in inspect.signature(plan).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is not inspect.Parameter.empty
    }
    unknown = set(kwargs) - set(inspect.signature(plan).parameters)
    if unknown:
        raise PlanValidationError(plan.__name__, [f"unknown parameter(s) {sorted(unknown)}"])
    return {**values, **kwargs}
