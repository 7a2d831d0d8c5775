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
from corrflow.plans.preflight import disk_problems, read_microscope_state, read_now
from corrflow.plans.requests import MAX_TILES, MicrographMosaicRequest
from corrflow.plans.validation import (
    MAX_EXPOSURE_S,
    PlanEstimate,
    PlanValidationError,
    _Checks,
    microscope_of,
    request_and_context,
    tomo_devices,
)

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


def _check_grid(checks: _Checks, columns: Any, rows: Any, overlap_fraction: Any) -> tuple[int | None, int | None, float | None]:
    c = checks.integer("columns", columns, minimum=1, maximum=MAX_TILES)
    r = checks.integer("rows", rows, minimum=1, maximum=MAX_TILES)
    overlap = checks.number("overlap_fraction", overlap_fraction, unit="")
    if overlap is not None and not 0 <= overlap < 1:
        checks.fail(f"overlap_fraction must be in [0, 1), got {overlap}")
        overlap = None
    if c is not None and r is not None and c * r > MAX_TILES:
        checks.fail(f"columns x rows must be at most {MAX_TILES} tiles, got {c * r}")
    return c, r, overlap


def _check_axis_range(checks: _Checks, name: str, axis: Any, values: np.ndarray) -> None:
    low, high = axis.limits
    if values.min() < low or values.max() > high:
        checks.fail(f"tiles span {name} [{values.min()}, {values.max()}] um, outside its limits [{low}, {high}] um")


# -- X-ray radiography mosaic -------------------------------------------------------------------
def _validate_xray_mosaic(beamline: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    devices = tomo_devices(beamline)
    checks = _Checks()
    columns, rows, overlap = _check_grid(checks, kwargs["columns"], kwargs["rows"], kwargs["overlap_fraction"])
    exposure = checks.number("exposure_s", kwargs["exposure_s"], unit="s", gt=0.0, le=MAX_EXPOSURE_S)
    angle = checks.number("angle_deg", kwargs["angle_deg"], unit="deg")
    darks = checks.integer("num_darks", kwargs["num_darks"], minimum=1, maximum=10_000)
    flats = checks.integer("num_flats", kwargs["num_flats"], minimum=1, maximum=10_000)
    info = checks.sample(kwargs["sample"])
    uids = checks.uids("parent_uids", kwargs["parent_uids"])
    user_md = checks.metadata(kwargs["md"])
    stage, detector = devices.stage, devices.detector
    rows_px, cols_px = detector.frame_shape_px
    pixel_um = float(detector.pixel_size_um.get())
    fov = (cols_px * pixel_um, rows_px * pixel_um)
    center = (float(stage.x.position), float(stage.z.position))
    for name, value in (("center_x_um", kwargs["center_x_um"]), ("center_z_um", kwargs["center_z_um"])):
        if value is not None:
            checked = checks.number(name, value, unit="um")
            if checked is not None:
                center = (checked, center[1]) if name == "center_x_um" else (center[0], checked)
    if angle is not None:
        low, high = stage.rotation.limits
        if not low <= angle <= high:
            checks.fail(f"angle_deg ({angle}) is outside the rotation limits [{low}, {high}] deg")
    tiles, flat_x = None, None
    if columns is not None and rows is not None and overlap is not None:
        tiles = grid_positions(columns=columns, rows=rows, tile_size_um=fov, overlap_fraction=overlap, center_um=center)
        _check_axis_range(checks, "x", stage.x, tiles[:, 0])
        _check_axis_range(checks, "z", stage.z, tiles[:, 1])
        # Flats: the region the grid images (half a field beyond its outer tile centres) moved
        # out of the field, with half a field to spare.
        flat_x = tiles[:, 0].max() + 1.5 * fov[0]
        if not stage.x.limits[0] <= flat_x <= stage.x.limits[1]:
            checks.fail(f"the flat-field position x = {flat_x} um is outside the x limits {stage.x.limits} um")
    if darks is not None and flats is not None and columns is not None and rows is not None:
        checks.disk_space(detector, n_frames=darks + flats + columns * rows)
    checks.raise_if_any("xray_mosaic")
    return dict(
        devices=devices, tiles=tiles, fov=fov, overlap=overlap, exposure=exposure, angle=angle, darks=darks, flats=flats,
        info=info, uids=uids, md=user_md, columns=columns, rows=rows, flat_x=flat_x,
        x0=float(stage.x.position), z0=float(stage.z.position), rotation0=float(stage.rotation.position),
    )


def xray_mosaic(
    beamline: Beamline,
    *,
    columns: int,
    rows: int,
    exposure_s: float,
    sample: Sample | Mapping[str, str],
    overlap_fraction: float = 0.2,
    angle_deg: float = 0.0,
    center_x_um: float | None = None,
    center_z_um: float | None = None,
    num_darks: int = 5,
    num_flats: int = 5,
    parent_uids: Sequence[str] = (),
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """Validate and return a radiography mosaic: a grid of stage x, z positions at one angle.

    Parameters
    ----------
    beamline
        A :class:`~corrflow.devices.beamline.Beamline` (simulated or EPICS).
    columns, rows
        Tiles across the beam (x) and vertically (z), each >= 1.
    exposure_s
        Exposure of every frame (s, > 0).
    sample
        Identification of the sample.
    overlap_fraction
        Fraction of the detector field shared by neighbouring tiles, in [0, 1).
    angle_deg
        Rotation angle of all tiles (deg).
    center_x_um, center_z_um
        Grid centre (um, stage frame); default the current stage position.
    num_darks, num_flats
        Reference frames (flats with the stage beyond the grid's far side).
    parent_uids, md
        References and extra metadata.

    Raises
    ------
    PlanValidationError
        On any bad argument, including tiles or the flat-field position beyond the soft limits.
    """
    request = _validate_xray_mosaic(beamline, locals())
    devices = request["devices"]
    stage, detector, shutter = devices.stage, devices.detector, devices.shutter
    parameters = {
        "columns": request["columns"], "rows": request["rows"], "overlap_fraction": request["overlap"],
        "exposure_s": request["exposure"], "angle_deg": request["angle"], "num_darks": request["darks"],
        "num_flats": request["flats"], "tile_width_um": request["fov"][0], "tile_height_um": request["fov"][1],
        "flat_x_um": request["flat_x"],
    }
    units = {"columns": "", "rows": "", "overlap_fraction": "", "exposure_s": "s", "angle_deg": "deg", "num_darks": "",
             "num_flats": "", "tile_width_um": "um", "tile_height_um": "um", "flat_x_um": "um"}
    references = references_metadata(frame=devices.frame, parent_uids=request["uids"], conventions="tiles_um: [x, z] stage positions (um) in the order taken")
    references["tiles_um"] = request["tiles"].tolist()
    start_md = build_start_metadata(
        identification=identification_metadata(request["info"], facility=devices.facility, instrument=devices.instrument),
        references=references,
        settings=settings_metadata("xray_mosaic", parameters, units=units),
        md=request["md"],
        plan_name="xray_mosaic",
        plan_args=parameters,
        detectors=[detector.name],
        motors=[stage.x.name, stage.z.name],
        num_points=len(request["tiles"]),
        planned_events={"dark": request["darks"], "flat": request["flats"], "primary": len(request["tiles"])},
        hints={"dimensions": [([stage.x.name], "primary"), ([stage.z.name], "primary")]},
    )
    readables = [stage, shutter]

    def tiles() -> MsgGenerator[None]:
        yield from bps.mv(detector.exposure_s, request["exposure"], stage.rotation, request["angle"])
        yield from bps.mv(shutter, "closed", detector.image_key, IMAGE_KEY_DARK)
        yield from repeated_frames(detector, readables, stream="dark", num_frames=request["darks"])
        yield from bps.mv(stage.x, request["flat_x"], shutter, "open", detector.image_key, IMAGE_KEY_FLAT)
        yield from repeated_frames(detector, readables, stream="flat", num_frames=request["flats"])
        yield from bps.mv(detector.image_key, IMAGE_KEY_PROJECTION)
        yield from frames_on_grid(detector, readables, axes=(stage.x, stage.z), positions=request["tiles"], stream="primary")

    def restore() -> MsgGenerator[None]:
        yield from bps.mv(shutter, "closed", stage.x, request["x0"], stage.z, request["z0"], stage.rotation, request["rotation0"])

    @bpp.run_decorator(md=start_md)
    def run() -> MsgGenerator[None]:
        yield from bpp.finalize_wrapper(tiles(), restore())

    return run()


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
    """Duration and data volume of :func:`xray_mosaic` (validates first)."""
    request = _validate_xray_mosaic(beamline, _with_defaults(xray_mosaic, kwargs))
    stage, detector = request["devices"].stage, request["devices"].detector
    tiles = request["tiles"]
    travel = np.abs(np.diff(tiles, axis=0))
    motion_s = float(np.sum(np.maximum(travel[:, 0] / stage.x.velocity.get(), travel[:, 1] / stage.z.velocity.get())))
    motion_s += 2 * abs(request["flat_x"] - request["x0"]) / stage.x.velocity.get()
    n = request["darks"] + request["flats"] + len(tiles)
    rows, cols = detector.frame_shape_px
    return PlanEstimate(duration_s=n * request["exposure"] + motion_s, data_bytes=n * rows * cols * np.dtype(detector.frame_dtype).itemsize, n_frames=n)


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
