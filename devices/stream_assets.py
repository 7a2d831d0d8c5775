"""StreamResource / StreamDatum documents for detector files, shared by the simulated and EPICS detectors.

A detector file holds the frames in ``/entry/data/data`` and, for fly scans, one value per frame
of each NDAttribute in ``/entry/instrument/NDAttributes/<name>``. Each announced data key gets one
``stream_resource`` per file and, for each range of frames announced, one ``stream_datum``; the
RunEngine fills in the descriptor uid and the event sequence numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from event_model import StreamDatum, StreamRange, StreamResource

from corrflow.formats.hdf5_frames import ATTRIBUTES_PATH, DATASET_PATH

__all__ = ["ATTRIBUTES_PATH", "DATASET_PATH", "HDF5_MIMETYPE", "announced_attributes", "attribute_descriptions", "stream_asset_docs"]

HDF5_MIMETYPE = "application/x-hdf5"


def announced_attributes(
    frame_attribute_keys: Mapping[str, tuple[str, str]], step_attribute_suffixes: tuple[str, ...], *, fly: bool
) -> dict[str, tuple[str, str]]:
    """The per-frame attributes a scan announces as data keys: all of them in a fly scan; in a step
    scan those its event takes from the frame (the rest it reads from devices that stand still)."""
    if fly:
        return dict(frame_attribute_keys)
    return {suffix: frame_attribute_keys[suffix] for suffix in step_attribute_suffixes}


def attribute_descriptions(name: str, attributes: Mapping[str, tuple[str, str]], *, source_prefix: str) -> dict[str, dict]:
    """Data keys ``{name}_{suffix}`` of per-frame attributes (external numbers, one per frame)."""
    return {
        f"{name}_{suffix}": {
            "source": f"{source_prefix}{attribute}",
            "dtype": "number",
            "dtype_numpy": "<f8",
            "shape": [],
            "units": units,
            "external": "STREAM:",
        }
        for suffix, (attribute, units) in attributes.items()
    }


def stream_asset_docs(
    *,
    path: Path,
    resource_uids: Mapping[str, str],
    datasets: Mapping[str, str],
    chunk_shapes: Mapping[str, list[int]],
    announce_resources: bool,
    start: int,
    stop: int,
    datum_number: int,
) -> Iterator[tuple[str, StreamResource | StreamDatum]]:
    """The documents announcing frames ``[start, stop)`` of ``path`` for each data key.

    Parameters
    ----------
    path
        Absolute path of the HDF5 file on this host.
    resource_uids
        ``{data_key: stream resource uid}``.
    datasets
        ``{data_key: dataset path in the file}``.
    chunk_shapes
        ``{data_key: HDF5 chunk shape}``.
    announce_resources
        Yield the ``stream_resource`` documents first (once per file).
    start, stop
        Frame indices announced (none if ``stop <= start``).
    datum_number
        Running number of this datum within the file (makes the datum uids unique).
    """
    if announce_resources:
        for data_key, uid in resource_uids.items():
            resource: StreamResource = {
                "uid": uid,
                "data_key": data_key,
                "mimetype": HDF5_MIMETYPE,
                "uri": f"file://localhost{path}",
                "parameters": {"dataset": datasets[data_key], "chunk_shape": list(chunk_shapes[data_key]), "swmr": True},
            }
            yield "stream_resource", resource
    if stop > start:
        for uid in resource_uids.values():
            datum: StreamDatum = {
                "uid": f"{uid}/{datum_number}",
                "stream_resource": uid,
                "descriptor": "",  # the RunEngine fills in the descriptor uid
                "indices": StreamRange(start=start, stop=stop),
                "seq_nums": StreamRange(start=0, stop=0),  # the RunEngine fills in the event numbers
            }
            yield "stream_datum", datum
