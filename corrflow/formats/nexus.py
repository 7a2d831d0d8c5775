"""Raw tomography as NeXus NXtomo, so any tomography software can read it.

Layout written by :func:`write_nxtomo` (the NXtomo application definition plus corrflow's metadata)::

    /entry                      NXentry   definition="NXtomo", title, start_time
      instrument                NXinstrument
        source                  NXsource  type, name, probe="x-ray"
        monochromator           NXmonochromator  energy (keV)
        detector                NXdetector
          data                  (n, rows, cols) uint16, counts: one frame per chunk, or a virtual
                                dataset of the frames in the detector files beside it
          image_key             (n,) int8: 0 projection, 1 flat, 2 dark, 3 invalid
          x_pixel_size, y_pixel_size   (um)
          distance              (mm)
          count_time            (n,) (s)
          field_of_view         "Full", or "Half" for an offset-centre (half-acquisition) 360 deg scan
      sample                    NXsample  name, rotation_angle (n,) degree,
                                          x_translation, y_translation, z_translation (n,) um,
                                          rotation_axis_offset (um): stage x shift from the centred
                                          position during the projections (0 = axis at the detector
                                          centre; + = axis towards higher columns)
      control                   NXmonitor data (n,): exposure time of each frame (s), the beam
                                          monitor of a simulated source of constant flux
      data                      NXdata    @signal="data"; hard links to data, rotation_angle, image_key
      corrflow_metadata         NXcollection  identification, references, settings (JSON strings)

Files are written under a temporary name and linked into place atomically; an existing file is
never replaced. Given :class:`LinkedFrames` instead of an array, ``data`` is an HDF5 virtual dataset
that maps the frames where the detector wrote them (paths relative to the NXtomo file, so the file
and its detector files move together): the scan is stored once. :func:`linked_files` lists the
files a linked NXtomo needs, and :func:`read_nxtomo` refuses one whose frames are not all there
(HDF5 would read a missing source as zeros). :func:`read_nxtomo` checks the structure and consistency and names the dataset
at fault. :func:`write_nxtomo_from_documents` converts the documents (and HDF5 frames) of a
``tomo_scan`` run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import h5py
import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "IMAGE_KEY_DARK",
    "IMAGE_KEY_FLAT",
    "IMAGE_KEY_INVALID",
    "IMAGE_KEY_PROJECTION",
    "LinkedFrames",
    "METADATA_GROUPS",
    "NXtomoData",
    "NXtomoError",
    "linked_files",
    "missing_linked_files",
    "nxtomo_inputs_from_documents",
    "read_nxtomo",
    "write_nxtomo",
    "write_nxtomo_from_documents",
]

IMAGE_KEY_PROJECTION = 0
IMAGE_KEY_FLAT = 1
IMAGE_KEY_DARK = 2
IMAGE_KEY_INVALID = 3
_IMAGE_KEYS = (IMAGE_KEY_PROJECTION, IMAGE_KEY_FLAT, IMAGE_KEY_DARK, IMAGE_KEY_INVALID)
METADATA_GROUPS = ("identification", "references", "settings")

_DETECTOR = "/entry/instrument/detector"
_SAMPLE = "/entry/sample"


class NXtomoError(ValueError):
    """An NXtomo file is missing a required item or is inconsistent; the message names the dataset."""


@dataclass(frozen=True)
class LinkedFrames:
    """Frames that stay in the files the detector wrote: one ``(file, dataset, index)`` per frame, in order.

    Attributes
    ----------
    sources
        Per frame: the HDF5 file (absolute path), the dataset in it, the frame's index on axis 0.
    frame_shape
        ``(rows, cols)`` of every frame.
    dtype
        The frames' type (uint16 counts).
    """

    sources: tuple[tuple[Path, str, int], ...]
    frame_shape: tuple[int, int]
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.sources), *self.frame_shape)

    @property
    def ndim(self) -> int:
        return 3

    def read(self) -> NDArray[np.uint16]:
        """The frames as one array (reads every frame)."""
        out = np.empty(self.shape, dtype=self.dtype)
        handles: dict[Path, h5py.File] = {}
        try:
            for k, (path, dataset, index) in enumerate(self.sources):
                if path not in handles:
                    handles[path] = h5py.File(path, "r", swmr=True)
                out[k] = handles[path][dataset][index]
        finally:
            for handle in handles.values():
                handle.close()
        return out


def _virtual_layout(frames: LinkedFrames, *, directory: Path) -> h5py.VirtualLayout:
    """The layout of ``frames`` for a file in ``directory``: sources named relative to it, one
    mapping per frame (nexusformat takes a virtual dataset's length from its number of mappings;
    the benchmark ``acquisition`` measures what a slab read pays for it)."""
    layout = h5py.VirtualLayout(shape=frames.shape, dtype=frames.dtype)
    shapes: dict[tuple[Path, str], tuple[int, ...]] = {}
    for path, dataset, _ in frames.sources:
        if (path, dataset) not in shapes:
            with h5py.File(path, "r", swmr=True) as f:
                shapes[(path, dataset)] = f[dataset].shape
    sources = {
        key: h5py.VirtualSource(os.path.relpath(key[0], directory), key[1], shape=shape, dtype=frames.dtype)
        for key, shape in shapes.items()
    }
    for k, (path, dataset, index) in enumerate(frames.sources):
        if index >= shapes[(path, dataset)][0]:
            raise ValueError(f"{path}:{dataset} holds {shapes[(path, dataset)][0]} frames; frame {index} was linked")
        layout[k] = sources[(path, dataset)][index]
    return layout


def linked_files(path: Path | str) -> list[Path]:
    """The files the frames of an NXtomo file live in besides itself (through views, recursively);
    ``[]`` for a file that holds its frames."""
    found: list[Path] = []

    def visit(file: Path, dataset: str) -> None:
        with h5py.File(file, "r") as f:
            if dataset not in f or not f[dataset].is_virtual:
                return
            mapping = [(s.file_name, s.dset_name) for s in f[dataset].virtual_sources()]
        for name, source_dataset in dict.fromkeys(mapping):
            source = file if name == "." else Path(os.path.normpath(file.parent / name))
            if source != file and source not in found:
                found.append(source)
                if source.is_file():
                    visit(source, source_dataset)

    visit(Path(path), f"{_DETECTOR}/data")
    return found


def missing_linked_files(path: Path | str) -> list[Path]:
    """The files an NXtomo file links its frames from that are not there."""
    return [source for source in linked_files(path) if not source.is_file()]


@dataclass(frozen=True, eq=False)
class NXtomoData:
    """Content of an NXtomo file.

    Attributes
    ----------
    data
        Frames, shape ``(n, rows, cols)``, uint16 counts (axis 0 frame, 1 row = height, 2 column).
    image_key
        Shape ``(n,)``, int8: 0 projection, 1 flat, 2 dark, 3 invalid.
    rotation_angle_deg
        Stage angle of each frame, shape ``(n,)``, float64 (deg).
    x_translation_um, y_translation_um, z_translation_um
        Stage translations of each frame, shape ``(n,)``, float64 (um).
    count_time_s
        Exposure of each frame, shape ``(n,)``, float64 (s).
    pixel_size_um
        Detector pixel size at the sample (um); x and y pixels are square.
    distance_mm
        Sample-detector distance (mm).
    energy_keV
        Photon energy (keV).
    sample_name, title
        Identification.
    metadata
        corrflow's metadata groups (``identification``, ``references``, ``settings``) as dicts.
    axis_offset_um
        Nominal rotation-axis offset of an offset-centre scan (um; 0 = centred): the projections'
        ``x_translation`` minus the centred stage x.
    """

    data: NDArray[np.uint16]
    image_key: NDArray[np.int8]
    rotation_angle_deg: NDArray[np.float64]
    x_translation_um: NDArray[np.float64]
    y_translation_um: NDArray[np.float64]
    z_translation_um: NDArray[np.float64]
    count_time_s: NDArray[np.float64]
    pixel_size_um: float
    distance_mm: float
    energy_keV: float
    sample_name: str
    title: str
    metadata: dict[str, Any] = field(default_factory=dict)
    axis_offset_um: float = 0.0

    @property
    def half_acquisition(self) -> bool:
        """Whether the axis was offset towards a detector edge (field of view widened by a full turn)."""
        return self.axis_offset_um != 0.0

    def _select(self, key: int) -> NDArray[np.uint16]:
        return self.data[self.image_key == key]

    @property
    def projections(self) -> NDArray[np.uint16]:
        """Projection frames, shape ``(n_projections, rows, cols)``."""
        return self._select(IMAGE_KEY_PROJECTION)

    @property
    def flats(self) -> NDArray[np.uint16]:
        """Flat-field frames, shape ``(n_flats, rows, cols)``."""
        return self._select(IMAGE_KEY_FLAT)

    @property
    def darks(self) -> NDArray[np.uint16]:
        """Dark frames, shape ``(n_darks, rows, cols)``."""
        return self._select(IMAGE_KEY_DARK)

    @property
    def projection_angles_deg(self) -> NDArray[np.float64]:
        """Angles of the projections, shape ``(n_projections,)`` (deg)."""
        return self.rotation_angle_deg[self.image_key == IMAGE_KEY_PROJECTION]


def _per_frame(name: str, values: ArrayLike, n: int) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        array = np.full(n, float(array))
    if array.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one value per frame), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    return array


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def write_nxtomo(
    path: Path | str,
    *,
    data: ArrayLike,
    image_key: ArrayLike,
    rotation_angle_deg: ArrayLike,
    x_translation_um: ArrayLike,
    y_translation_um: ArrayLike,
    z_translation_um: ArrayLike,
    pixel_size_um: float,
    distance_mm: float,
    energy_keV: float,
    count_time_s: float | ArrayLike,
    sample_name: str,
    title: str,
    metadata: Mapping[str, Any],
    source_name: str = "corrflow simulated source",
    source_type: str = "Synchrotron X-ray Source",
    axis_offset_um: float | None = None,
) -> Path:
    """Write frames and their geometry as an NXtomo file.

    Parameters
    ----------
    path
        File to create (``.nxs`` or ``.h5``); must not exist.
    data
        Frames, shape ``(n, rows, cols)``, uint16 counts; or :class:`LinkedFrames`, which are mapped
        as a virtual dataset (no frame is copied; the files must stay beside the NXtomo file).
    image_key
        Shape ``(n,)``: 0 projection, 1 flat, 2 dark, 3 invalid.
    rotation_angle_deg
        Stage angle per frame, shape ``(n,)`` (deg).
    x_translation_um, y_translation_um, z_translation_um
        Stage translations per frame, shape ``(n,)`` (um); a scalar is repeated.
    pixel_size_um
        Pixel size at the sample (um, > 0).
    distance_mm
        Sample-detector distance (mm, >= 0).
    energy_keV
        Photon energy (keV, > 0).
    count_time_s
        Exposure per frame (s): a scalar or shape ``(n,)``.
    sample_name, title
        Identification.
    metadata
        Must hold the groups ``identification``, ``references`` and ``settings`` (JSON-serialisable);
        other keys are stored too.
    source_name, source_type
        The X-ray source.
    axis_offset_um
        Offset-centre (half-acquisition) scan: how far the stage x was moved from its centred position
        for the projections (um, + = rotation axis towards higher detector columns; 0 = centred). Written
        as ``sample/rotation_axis_offset`` and ``detector/field_of_view`` ("Half" when non-zero).
        Default: the ``axis_offset_um`` of ``metadata["settings"]["parameters"]`` (the scan's own
        setting), else 0.

    Returns
    -------
    Path
        The absolute path written.

    Raises
    ------
    FileExistsError
        ``path`` exists (it is left untouched).
    ValueError
        On inconsistent shapes, unknown image keys, non-finite values or missing metadata groups.
    """
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} exists; NXtomo files are never overwritten")
    frames = data if isinstance(data, LinkedFrames) else np.asarray(data)
    if frames.ndim != 3:
        raise ValueError(f"data must have shape (n, rows, cols), got {frames.shape}")
    if frames.dtype != np.uint16:
        raise ValueError(f"data must be uint16 detector counts, got {frames.dtype}")
    n = frames.shape[0]
    if n == 0:
        raise ValueError("data holds no frames")
    keys = np.asarray(image_key)
    if keys.shape != (n,):
        raise ValueError(f"image_key must have shape ({n},), got {keys.shape}")
    if not np.all(np.isin(keys, _IMAGE_KEYS)):
        raise ValueError(f"image_key values must be in {_IMAGE_KEYS}, got {sorted(set(keys.tolist()))}")
    angles = _per_frame("rotation_angle_deg", rotation_angle_deg, n)
    translations = {
        "x_translation": _per_frame("x_translation_um", x_translation_um, n),
        "y_translation": _per_frame("y_translation_um", y_translation_um, n),
        "z_translation": _per_frame("z_translation_um", z_translation_um, n),
    }
    count_time = _per_frame("count_time_s", count_time_s, n)
    if np.any(count_time < 0):
        raise ValueError("count_time_s must be >= 0")
    pixel_size_um = _positive("pixel_size_um", pixel_size_um)
    energy_keV = _positive("energy_keV", energy_keV)
    if axis_offset_um is None:  # the scan's own setting, so every exporter of a run records it
        settings = metadata.get("settings")
        parameters = settings.get("parameters") if isinstance(settings, Mapping) else None
        axis_offset_um = parameters.get("axis_offset_um", 0.0) if isinstance(parameters, Mapping) else 0.0
    try:
        axis_offset_um = float(axis_offset_um)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"axis_offset_um must be a number (um), got {axis_offset_um!r}") from None
    if not np.isfinite(axis_offset_um):
        raise ValueError(f"axis_offset_um must be finite, got {axis_offset_um}")
    distance_mm = float(distance_mm)
    if not (np.isfinite(distance_mm) and distance_mm >= 0):
        raise ValueError(f"distance_mm must be a non-negative finite number, got {distance_mm}")
    missing = [group for group in METADATA_GROUPS if group not in metadata]
    if missing:
        raise ValueError(f"metadata must hold the groups {METADATA_GROUPS}; missing {missing}")
    metadata_json = {key: json.dumps(value, sort_keys=True) for key, value in metadata.items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid4().hex}.partial")
    try:
        with h5py.File(temporary, "w-") as f:
            f.attrs["NX_class"] = "NXroot"
            f.attrs["file_name"] = path.name
            f.attrs["file_time"] = datetime.now(UTC).isoformat()
            f.attrs["creator"] = "corrflow"
            f.attrs["default"] = "entry"
            entry = _group(f, "entry", "NXentry")
            entry.attrs["default"] = "data"
            entry["definition"] = "NXtomo"
            entry["title"] = title
            entry["start_time"] = datetime.now(UTC).isoformat()

            instrument = _group(entry, "instrument", "NXinstrument")
            source = _group(instrument, "source", "NXsource")
            source["type"] = source_type
            source["name"] = source_name
            source["probe"] = "x-ray"
            monochromator = _group(instrument, "monochromator", "NXmonochromator")
            _dataset(monochromator, "energy", energy_keV, units="keV")

            detector = _group(instrument, "detector", "NXdetector")
            rows, cols = frames.shape[1:]
            if isinstance(frames, LinkedFrames):
                detector.create_virtual_dataset("data", _virtual_layout(frames, directory=path.parent))
            else:
                detector.create_dataset("data", data=frames, chunks=(1, rows, cols))
            detector["data"].attrs["units"] = "counts"
            detector.create_dataset("image_key", data=keys.astype(np.int8))
            _dataset(detector, "x_pixel_size", pixel_size_um, units="um")
            _dataset(detector, "y_pixel_size", pixel_size_um, units="um")
            _dataset(detector, "distance", distance_mm, units="mm")
            _dataset(detector, "count_time", count_time, units="s")
            # ESRF nxtomo's convention for offset-centre scans; readers that know it need nothing else.
            detector["field_of_view"] = "Half" if axis_offset_um != 0.0 else "Full"

            sample = _group(entry, "sample", "NXsample")
            sample["name"] = sample_name
            _dataset(sample, "rotation_angle", angles, units="degree")
            for name, values in translations.items():
                _dataset(sample, name, values, units="um")
            offset = _dataset(sample, "rotation_axis_offset", axis_offset_um, units="um")
            offset.attrs["description"] = (
                "stage x shift from the centred position during the projections; + moves the rotation axis "
                "towards higher detector columns (offset-centre / half-acquisition scan when non-zero)"
            )

            control = _group(entry, "control", "NXmonitor")
            _dataset(control, "data", count_time, units="s")

            nxdata = _group(entry, "data", "NXdata")
            nxdata.attrs["signal"] = "data"
            nxdata.attrs["axes"] = np.array(["rotation_angle", ".", "."], dtype=h5py.string_dtype())
            nxdata.attrs["rotation_angle_indices"] = 0
            nxdata["data"] = detector["data"]  # hard links: one copy of the frames
            nxdata["rotation_angle"] = sample["rotation_angle"]
            nxdata["image_key"] = detector["image_key"]

            corrflow_md = _group(entry, "corrflow_metadata", "NXcollection")
            for key, text in metadata_json.items():
                corrflow_md[key] = text
                corrflow_md[key].attrs["content_type"] = "application/json"
        # link() refuses to replace an existing file (rename would silently overwrite it).
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def _dataset(parent: h5py.Group, name: str, value: Any, *, units: str) -> h5py.Dataset:
    dataset = parent.create_dataset(name, data=value)
    dataset.attrs["units"] = units
    return dataset


def _require(f: h5py.File, name: str, *, nx_class: str | None = None) -> Any:
    if name not in f:
        raise NXtomoError(f"{f.filename}: {name} is missing")
    item = f[name]
    if nx_class is not None and _text(item.attrs.get("NX_class")) != nx_class:
        raise NXtomoError(f"{f.filename}: {name} must be an {nx_class} group, got {item.attrs.get('NX_class')!r}")
    return item


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value[()])
    return str(value)


def _with_units(f: h5py.File, name: str, units: tuple[str, ...]) -> NDArray[np.float64]:
    dataset = _require(f, name)
    unit = _text(dataset.attrs.get("units", ""))
    if unit not in units:
        raise NXtomoError(f"{f.filename}: {name} must have units in {units}, got {unit!r}")
    return np.asarray(dataset[()], dtype=np.float64)


def _scalar(f: h5py.File, name: str, units: tuple[str, ...]) -> float:
    value = _with_units(f, name, units)
    if value.size != 1:
        raise NXtomoError(f"{f.filename}: {name} must be a scalar, got shape {value.shape}")
    return float(value.reshape(()))


def read_nxtomo(path: Path | str) -> NXtomoData:
    """Read and check an NXtomo file written by :func:`write_nxtomo` (or any conforming writer).

    Returns
    -------
    NXtomoData

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    NXtomoError
        A required group or dataset is missing, has the wrong class or units, the per-frame
        datasets disagree in length with ``data``, or a file its frames are linked from is missing;
        the message names the dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such NXtomo file: {path}")
    missing = missing_linked_files(path)
    if missing:
        raise NXtomoError(f"{path}: {_DETECTOR}/data links frames from files that are not there: {[str(m) for m in missing]}")
    with h5py.File(path, "r") as f:
        _require(f, "/entry", nx_class="NXentry")
        definition = _text(_require(f, "/entry/definition")[()])
        if definition != "NXtomo":
            raise NXtomoError(f"{path}: /entry/definition must be 'NXtomo', got {definition!r}")
        _require(f, "/entry/instrument", nx_class="NXinstrument")
        _require(f, _DETECTOR, nx_class="NXdetector")
        _require(f, _SAMPLE, nx_class="NXsample")
        _require(f, "/entry/data", nx_class="NXdata")
        data_ds = _require(f, f"{_DETECTOR}/data")
        if data_ds.ndim != 3:
            raise NXtomoError(f"{path}: {_DETECTOR}/data must have shape (n, rows, cols), got {data_ds.shape}")
        if data_ds.dtype != np.uint16:
            raise NXtomoError(f"{path}: {_DETECTOR}/data must be uint16, got {data_ds.dtype}")
        n = data_ds.shape[0]
        data = data_ds[()]
        image_key = np.asarray(_require(f, f"{_DETECTOR}/image_key")[()])
        per_frame = {
            f"{_DETECTOR}/image_key": image_key,
            f"{_SAMPLE}/rotation_angle": _with_units(f, f"{_SAMPLE}/rotation_angle", ("degree", "deg")),
            f"{_SAMPLE}/x_translation": _with_units(f, f"{_SAMPLE}/x_translation", ("um", "micrometer")),
            f"{_SAMPLE}/y_translation": _with_units(f, f"{_SAMPLE}/y_translation", ("um", "micrometer")),
            f"{_SAMPLE}/z_translation": _with_units(f, f"{_SAMPLE}/z_translation", ("um", "micrometer")),
            f"{_DETECTOR}/count_time": _with_units(f, f"{_DETECTOR}/count_time", ("s", "second")),
        }
        for name, values in per_frame.items():
            if values.shape != (n,):
                raise NXtomoError(f"{path}: {name} has shape {values.shape}, expected ({n},) (one per frame of data)")
        if not np.all(np.isin(image_key, _IMAGE_KEYS)):
            raise NXtomoError(f"{path}: {_DETECTOR}/image_key holds values outside {_IMAGE_KEYS}")
        if not np.any(image_key == IMAGE_KEY_PROJECTION):
            raise NXtomoError(f"{path}: {_DETECTOR}/image_key marks no frame as a projection (0)")
        for name in (f"{_SAMPLE}/rotation_angle", f"{_SAMPLE}/x_translation"):
            if not np.all(np.isfinite(per_frame[name])):
                raise NXtomoError(f"{path}: {name} holds non-finite values")
        x_pixel = _scalar(f, f"{_DETECTOR}/x_pixel_size", ("um", "micrometer"))
        y_pixel = _scalar(f, f"{_DETECTOR}/y_pixel_size", ("um", "micrometer"))
        if not np.isclose(x_pixel, y_pixel):
            raise NXtomoError(f"{path}: non-square pixels ({x_pixel} x {y_pixel} um) are not supported")
        metadata: dict[str, Any] = {}
        if "/entry/corrflow_metadata" in f:
            for key, item in f["/entry/corrflow_metadata"].items():
                try:
                    metadata[key] = json.loads(_text(item[()]))
                except json.JSONDecodeError as exc:
                    raise NXtomoError(f"{path}: /entry/corrflow_metadata/{key} is not valid JSON: {exc}") from None
        axis_offset_um = (
            _scalar(f, f"{_SAMPLE}/rotation_axis_offset", ("um", "micrometer"))
            if f"{_SAMPLE}/rotation_axis_offset" in f
            else 0.0
        )
        energy = (
            _scalar(f, "/entry/instrument/monochromator/energy", ("keV",))
            if "/entry/instrument/monochromator/energy" in f
            else float("nan")
        )
        return NXtomoData(
            data=data,
            image_key=image_key.astype(np.int8),
            rotation_angle_deg=per_frame[f"{_SAMPLE}/rotation_angle"],
            x_translation_um=per_frame[f"{_SAMPLE}/x_translation"],
            y_translation_um=per_frame[f"{_SAMPLE}/y_translation"],
            z_translation_um=per_frame[f"{_SAMPLE}/z_translation"],
            count_time_s=per_frame[f"{_DETECTOR}/count_time"],
            pixel_size_um=x_pixel,
            distance_mm=_scalar(f, f"{_DETECTOR}/distance", ("mm", "millimeter")),
            energy_keV=energy,
            sample_name=_text(_require(f, f"{_SAMPLE}/name")[()]),
            title=_text(f["/entry/title"][()]) if "/entry/title" in f else "",
            metadata=metadata,
            axis_offset_um=axis_offset_um,
        )


def nxtomo_inputs_from_documents(
    documents: Iterable[tuple[str, Mapping[str, Any]]], *, link_frames: bool = False
) -> dict[str, Any]:
    """Gather the arguments of :func:`write_nxtomo` from the documents of one ``tomo_scan`` run.

    Frames are read from the HDF5 files the ``stream_resource`` documents point to (``file://``
    URIs on this host), at the indices the ``stream_datum`` documents give for each event; the
    geometry and ``image_key`` come from the events, the keys to use from the start document's
    ``nxtomo`` section. Frames are ordered as the events were taken (darks, flats, projections).

    Parameters
    ----------
    documents
        ``(name, doc)`` pairs of one run, in emission order (e.g. collected by a RunEngine callback,
        or a catalogued run's ``documents()``).
    link_frames
        Give the frames as :class:`LinkedFrames` (where the detector wrote them) instead of
        reading them into an array.

    Returns
    -------
    dict
        Keyword arguments for :func:`write_nxtomo` (all but ``path``).

    Raises
    ------
    ValueError
        The documents are not one complete ``tomo_scan`` run, or an event has no frame.
    """
    docs = list(documents)
    starts = [doc for name, doc in docs if name == "start"]
    if len(starts) != 1:
        raise ValueError(f"expected the documents of exactly one run, got {len(starts)} start documents")
    start = starts[0]
    keys = start.get("nxtomo")
    if not isinstance(keys, Mapping):
        raise ValueError("the start document has no 'nxtomo' section: not a tomo_scan run")
    stream_of = {doc["uid"]: doc["name"] for name, doc in docs if name == "descriptor"}
    resources = {doc["uid"]: doc for name, doc in docs if name == "stream_resource"}
    datums: dict[str, list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    for name, doc in docs:
        if name == "stream_datum" and resources.get(doc["stream_resource"], {}).get("data_key") == keys["image_data_key"]:
            datums.setdefault(doc["descriptor"], []).append((doc, resources[doc["stream_resource"]]))
    # A resumed run re-emits the events after its last checkpoint with the same seq_num: keep the last.
    rank = {uid: k for k, uid in enumerate(stream_of)}
    latest: dict[tuple[str, int], Mapping[str, Any]] = {}
    for name, doc in docs:
        if name == "event" and stream_of.get(doc["descriptor"]) in keys["image_key_by_stream"]:
            latest[(doc["descriptor"], doc["seq_num"])] = doc
    events = [latest[key] for key in sorted(latest, key=lambda key: (rank[key[0]], key[1]))]
    fly_stream = keys.get("fly_stream")
    if not events and fly_stream is None:
        raise ValueError("the run holds no dark, flat or projection events")

    open_files: dict[str, h5py.File] = {}
    frames: list[tuple[Path, str, int]] = []
    columns: dict[str, list[Any]] = {k: [] for k in ("image_key", "angle", "x", "y", "z")}
    try:
        for event in events:
            frames.append(_frame_of(event, datums.get(event["descriptor"], [])))
            data = event["data"]
            columns["image_key"].append(data[keys["image_key_data_key"]])
            columns["angle"].append(data[keys["rotation_angle_data_key"]])
            for axis in "xyz":
                columns[axis].append(data[keys[f"{axis}_translation_data_key"]])
        if fly_stream is not None:
            _append_fly_frames(docs, keys, stream_of, resources, open_files, frames, columns)
        if not frames:
            raise ValueError("the run holds no frames")
        first = _dataset_at(frames[0][0], frames[0][1], open_files)
        linked = LinkedFrames(tuple(frames), frame_shape=tuple(first.shape[1:]), dtype=first.dtype)  # type: ignore[arg-type]
    finally:
        for handle in open_files.values():
            handle.close()
    settings = start["settings"]["parameters"]
    identification = start["identification"]
    return dict(
        data=linked if link_frames else linked.read(),
        image_key=np.asarray(columns["image_key"]),
        rotation_angle_deg=np.asarray(columns["angle"], dtype=np.float64),
        x_translation_um=np.asarray(columns["x"], dtype=np.float64),
        y_translation_um=np.asarray(columns["y"], dtype=np.float64),
        z_translation_um=np.asarray(columns["z"], dtype=np.float64),
        pixel_size_um=settings["detector_pixel_size_um"],
        distance_mm=settings["detector_distance_mm"],
        energy_keV=settings["detector_energy_keV"],
        count_time_s=settings["exposure_s"],
        axis_offset_um=float(settings.get("axis_offset_um", 0.0)),
        sample_name=identification["sample_name"],
        title=f"{start.get('plan_name', 'scan')} of {identification['sample_name']} (run {start['uid']})",
        metadata={
            "identification": identification,
            "references": {**start["references"], "source_run_uid": start["uid"]},
            "settings": start["settings"],
        },
    )


def _append_fly_frames(
    docs: list[tuple[str, Mapping[str, Any]]],
    keys: Mapping[str, Any],
    stream_of: Mapping[str, str],
    resources: Mapping[str, Mapping[str, Any]],
    open_files: dict[str, h5py.File],
    frames: list[tuple[Path, str, int]],
    columns: dict[str, list[Any]],
) -> None:
    """Projections of a fly scan: frames and their recorded geometry, announced by stream datums only.

    For each ``stream_datum`` of the fly stream's image, the frames at its indices, and from the
    datums of the same range for the angle and translation data keys, the value recorded with
    each frame (NDAttributes of the detector file). A range announced twice keeps the last copy.
    """
    wanted = {
        keys["image_data_key"]: "image",
        keys["fly_rotation_angle_data_key"]: "angle",
        keys["fly_x_translation_data_key"]: "x",
        keys["fly_y_translation_data_key"]: "y",
        keys["fly_z_translation_data_key"]: "z",
    }
    by_range: dict[tuple[int, int], dict[str, Mapping[str, Any]]] = {}
    for name, doc in docs:
        if name != "stream_datum" or stream_of.get(doc["descriptor"]) != keys["fly_stream"]:
            continue
        column = wanted.get(resources[doc["stream_resource"]]["data_key"])
        if column is not None:
            by_range.setdefault((doc["seq_nums"]["start"], doc["seq_nums"]["stop"]), {})[column] = doc
    for seq_range in sorted(by_range):
        group = by_range[seq_range]
        missing = set(wanted.values()) - set(group)
        if missing:
            raise ValueError(f"fly stream frames {seq_range}: no stream_datum for {sorted(missing)}")
        values = {column: _dataset_of(resources[datum["stream_resource"]], open_files) for column, datum in group.items()}
        start, stop = group["image"]["indices"]["start"], group["image"]["indices"]["stop"]
        image = resources[group["image"]["stream_resource"]]
        frames.extend((_resource_path(image), image["parameters"]["dataset"], index) for index in range(start, stop))
        columns["image_key"].extend([IMAGE_KEY_PROJECTION] * (stop - start))
        for column in ("angle", "x", "y", "z"):
            datum = group[column]
            columns[column].extend(values[column][datum["indices"]["start"] : datum["indices"]["stop"]])


def _resource_path(resource: Mapping[str, Any]) -> Path:
    uri = resource["uri"]
    if not uri.startswith("file://localhost/"):
        raise ValueError(f"stream resource {resource['uid']}: only file://localhost URIs are readable here, got {uri}")
    return Path(uri.removeprefix("file://localhost"))


def _dataset_at(path: Path, dataset: str, open_files: dict[str, h5py.File]) -> h5py.Dataset:
    # One handle per file (several data keys live in one detector file).
    if str(path) not in open_files:
        open_files[str(path)] = h5py.File(path, "r", swmr=True)
    return open_files[str(path)][dataset]


def _dataset_of(resource: Mapping[str, Any], open_files: dict[str, h5py.File]) -> h5py.Dataset:
    return _dataset_at(_resource_path(resource), resource["parameters"]["dataset"], open_files)


def _frame_of(event: Mapping[str, Any], datums: list[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> tuple[Path, str, int]:
    """Where the frame of ``event`` is: (file, dataset, index), from the last datum that covers it."""
    seq_num = event["seq_num"]
    for datum, resource in reversed(datums):  # the last datum for a re-taken event points at its new frame
        if datum["seq_nums"]["start"] <= seq_num < datum["seq_nums"]["stop"]:
            index = datum["indices"]["start"] + seq_num - datum["seq_nums"]["start"]
            return _resource_path(resource), resource["parameters"]["dataset"], index
    raise ValueError(f"event {event['uid']} (seq_num {seq_num}) has no stream_datum")


def write_nxtomo_from_documents(
    path: Path | str, documents: Iterable[tuple[str, Mapping[str, Any]]], *, link_frames: bool = False
) -> Path:
    """Write the NXtomo file of one ``tomo_scan`` run from its documents (see :func:`nxtomo_inputs_from_documents`);
    with ``link_frames`` its frames stay in the detector files (a virtual dataset)."""
    return write_nxtomo(path, **nxtomo_inputs_from_documents(documents, link_frames=link_frames))
