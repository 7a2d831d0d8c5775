"""Filters between a RunEngine and the catalog writer: what a resumed run must look like in Tiled.

A run that is paused or suspended and then resumed is *rewound* to its last checkpoint: bluesky
replays the messages since then, so an event saved after that checkpoint is emitted again with
the same ``seq_num`` (and, for a detector that writes files, its frame is taken again and
announced by a second ``stream_datum`` pointing at a later frame of the same file). A frame being
exposed when the suspension came is taken again too, without any event of its own: the file then
holds a stale frame that no document announces.

The ``TiledWriter`` appends what it is given: a duplicated event becomes a second row with the
same ``seq_num``. And Tiled reads a stream's external frames as the first *N* frames of its
files, concatenated, whatever the ``stream_datum`` indices say: after a stale frame every later
image of the stream sits one row off its event (its angle, its position), and the last frame is
cut off. :class:`ResumedRunFilter`, subscribed in front of the writer, gives the catalog one
event per ``(descriptor, seq_num)`` -- the last copy, taken after the resume, as
:func:`corrflow.plans.interruptions.unique_events` keeps -- and images that line up with them:

- events are held back until the RunEngine passes its next checkpoint (nothing before a
  checkpoint can be re-emitted), and a re-emitted copy replaces the held one;
- the ``stream_resource`` and ``stream_datum`` documents are held until the run stops, then
  forwarded as they came if the announced frames of each file are exactly its frames 0..N-1 in
  ``seq_num`` order (no resume, or a resume between frames); otherwise the frames kept are
  exposed through a *view*: a new HDF5 file beside the detector file holding a virtual dataset
  that maps, in ``seq_num`` order, exactly the frames announced last. The detector file is never
  modified; the view refers to it by its file name, so the two travel together
  (:func:`with_view_sources` lists what a view needs).

Documents reach the writer in their original order otherwise. Without a RunEngine to watch (a
replay of stored documents), events are held until the stop document.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bluesky import RunEngine

__all__ = ["CatalogFilterError", "CompletenessCheck", "ResumedRunFilter", "VIEW_SUFFIX", "view_sources", "with_view_sources"]

DocumentCallback = Callable[[str, dict[str, Any]], Any]

#: Name ending of the view files (``<detector file stem>.<data key>.kept.h5``).
VIEW_SUFFIX = ".kept.h5"
_FILE_URI_PREFIX = "file://localhost"


class CatalogFilterError(RuntimeError):
    """The filter cannot give the catalog a consistent run; the message says which stream and why."""


@dataclass
class _Run:
    """What the filter holds for one open run."""

    descriptors: set[str] = field(default_factory=set)
    # Held events in emission order; a re-emitted copy replaces the held one (same key).
    pending: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    released: set[tuple[str, int]] = field(default_factory=set)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> stream_resource, in order
    # (descriptor uid, data key) -> seq_num -> (stream resource uid, frame index): the last datum wins.
    frames: dict[tuple[str, str], dict[int, tuple[str, int]]] = field(default_factory=dict)


class ResumedRunFilter:
    """A document callback that hands ``writer`` each run as a resumed run must be catalogued.

    Parameters
    ----------
    writer
        The catalog's document callback (a ``TiledWriter``).
    engine
        The RunEngine emitting the documents: its checkpoints release the held events. Without
        one, events are held until their run's stop document.

    Attributes
    ----------
    replaced_events
        Events dropped because a later copy with the same ``(descriptor, seq_num)`` replaced them.
    views
        View files written (one per detector file whose frames needed one).

    Raises
    ------
    CatalogFilterError
        From the stop document, when a view of the kept frames cannot be written (the detector
        file is unreadable here, or its directory is read-only); the writer then never receives
        the stop document, so the catalog never shows the run as complete.
    """

    def __init__(self, writer: DocumentCallback, *, engine: RunEngine | None = None) -> None:
        self.writer = writer
        self.replaced_events = 0
        self.views: list[Path] = []
        self._runs: dict[str, _Run] = {}  # run start uid -> state
        self._run_of_descriptor: dict[str, str] = {}
        self._run_of_resource: dict[str, str] = {}
        if engine is not None:
            self.watch(engine)

    # -- checkpoints ------------------------------------------------------------------------
    def watch(self, engine: RunEngine) -> None:
        """Release held events whenever ``engine`` passes a checkpoint (chains any ``msg_hook``)."""
        previous = engine.msg_hook

        def hook(msg: Any) -> None:
            if previous is not None:
                previous(msg)
            # The hook runs just before the message is processed, in the same step of the
            # RunEngine's loop: no suspension can come in between, so every document emitted
            # before this checkpoint is final.
            if msg.command in ("checkpoint", "clear_checkpoint"):
                self.release()

        engine.msg_hook = hook

    def release(self) -> None:
        """Forward every held event: none of them can be emitted again (the run passed a checkpoint)."""
        for run in self._runs.values():
            self._release_events(run)

    # -- documents ------------------------------------------------------------------------------
    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{name}", None)
        if handler is None:  # start, descriptor-independent documents, datum/resource of old style
            self.writer(name, doc)
            return
        handler(doc)

    def _on_start(self, doc: dict[str, Any]) -> None:
        self._runs[doc["uid"]] = _Run()
        self.writer("start", doc)

    def _on_descriptor(self, doc: dict[str, Any]) -> None:
        run_uid = doc["run_start"]
        run = self._runs.get(run_uid)
        if run is not None:
            run.descriptors.add(doc["uid"])
            self._run_of_descriptor[doc["uid"]] = run_uid
        self.writer("descriptor", doc)

    def _on_event(self, doc: dict[str, Any]) -> None:
        run = self._run_for_descriptor(doc["descriptor"])
        if run is None:
            self.writer("event", doc)
            return
        key = (doc["descriptor"], int(doc["seq_num"]))
        if key in run.released:
            # A rewind goes back to the last checkpoint at most, and everything before it was
            # released: a copy arriving now means the checkpoint bookkeeping is broken.
            raise CatalogFilterError(
                f"event seq_num {key[1]} of descriptor {key[0]} was emitted again after a checkpoint "
                "had released it; the catalog already holds the first copy"
            )
        if key in run.pending:
            self.replaced_events += 1
            del run.pending[key]  # the later copy takes the place (and the order) of the earlier one
        run.pending[key] = doc

    def _on_event_page(self, doc: dict[str, Any]) -> None:
        from event_model import unpack_event_page

        for event in unpack_event_page(doc):
            self._on_event(event)

    def _on_stream_resource(self, doc: dict[str, Any]) -> None:
        # Held to the stop: whether the writer gets the file itself or a view depends on all the frames.
        run_uid = doc.get("run_start", "")  # the RunEngine fills it in
        run = self._runs.get(run_uid)
        if run is None:
            self.writer("stream_resource", doc)
            return
        run.resources[doc["uid"]] = doc
        self._run_of_resource[doc["uid"]] = run_uid

    def _on_stream_datum(self, doc: dict[str, Any]) -> None:
        run_uid = self._run_of_resource.get(doc["stream_resource"])
        run = self._runs.get(run_uid) if run_uid is not None else None
        if run is None:
            self.writer("stream_datum", doc)
            return
        resource = run.resources[doc["stream_resource"]]
        key = (doc["descriptor"], resource["data_key"])
        frames = run.frames.setdefault(key, {})
        seq_nums = range(doc["seq_nums"]["start"], doc["seq_nums"]["stop"])
        indices = range(doc["indices"]["start"], doc["indices"]["stop"])
        if len(seq_nums) != len(indices):
            raise CatalogFilterError(
                f"stream_datum {doc['uid']} announces {len(indices)} frames for {len(seq_nums)} events; "
                "one frame per event is expected"
            )
        for seq_num, index in zip(seq_nums, indices, strict=True):
            frames[seq_num] = (doc["stream_resource"], index)  # a re-announced frame replaces the earlier one

    def _on_stop(self, doc: dict[str, Any]) -> None:
        run_uid = doc["run_start"]
        run = self._runs.get(run_uid)
        if run is None:
            self.writer("stop", doc)
            return
        self._release_events(run)
        self._forward_frames(run)
        del self._runs[run_uid]
        for descriptor in run.descriptors:
            self._run_of_descriptor.pop(descriptor, None)
        for resource in run.resources:
            self._run_of_resource.pop(resource, None)
        self.writer("stop", doc)

    # -- internals --------------------------------------------------------------------------------
    def _run_for_descriptor(self, descriptor: str) -> _Run | None:
        run_uid = self._run_of_descriptor.get(descriptor)
        return self._runs.get(run_uid) if run_uid is not None else None

    def _release_events(self, run: _Run) -> None:
        pending, run.pending = run.pending, {}
        for key, event in pending.items():
            run.released.add(key)
            self.writer("event", event)

    def _forward_frames(self, run: _Run) -> None:
        forwarded: set[str] = set()
        for key, frames in run.frames.items():
            if not frames:
                continue
            descriptor, data_key = key
            # seq_num order is the order of the rows Tiled pairs the frames with; Tiled reads the
            # frames as the files of the stream concatenated, each from its first frame.
            kept = sorted(frames.items())
            files = list(dict.fromkeys(resource_uid for _, (resource_uid, _) in kept))
            expected = [(uid, k) for uid in files for k in range(sum(1 for _, (u, _) in kept if u == uid))]
            if [frame for _, frame in kept] == expected:
                for resource_uid in files:
                    self.writer("stream_resource", run.resources[resource_uid])
                    forwarded.add(resource_uid)
                    own = [(seq_num, index) for seq_num, (uid, index) in kept if uid == resource_uid]
                    for datum in _datums(resource_uid, descriptor, own):
                        self.writer("stream_datum", datum)
                continue
            first = run.resources[files[0]]
            resource = self._view_resource(first, [(run.resources[uid], index) for _, (uid, index) in kept])
            self.writer("stream_resource", resource)
            forwarded.update(files)
            for datum in _datums(first["uid"], descriptor, [(seq_num, k) for k, (seq_num, _) in enumerate(kept)]):
                self.writer("stream_datum", datum)
        for resource_uid, resource in run.resources.items():
            if resource_uid not in forwarded:  # announced, no frame: as the writer would have had it
                self.writer("stream_resource", resource)

    def _view_resource(self, first: dict[str, Any], frames: Sequence[tuple[dict[str, Any], int]]) -> dict[str, Any]:
        """A copy of ``first`` whose file is a view of ``frames`` (resource, frame index), in that order."""
        sources = []
        for resource, index in frames:
            uri = resource["uri"]
            if resource.get("mimetype") != "application/x-hdf5" or not uri.startswith(_FILE_URI_PREFIX):
                raise CatalogFilterError(
                    f"stream resource {resource['uid']} ({resource.get('mimetype')}, {uri}): frames of a resumed run "
                    "were re-taken, and only local HDF5 files can be given a view of the frames kept"
                )
            if resource["parameters"].get("dataset") != first["parameters"].get("dataset"):
                raise CatalogFilterError(f"stream resources of {first['data_key']} name different datasets")
            sources.append((Path(uri[len(_FILE_URI_PREFIX) :]), index))
        view = write_frame_view(sources, dataset=first["parameters"]["dataset"], data_key=first["data_key"])
        self.views.append(view)
        return {**first, "uri": f"{_FILE_URI_PREFIX}{view}", "parameters": {**first["parameters"], "swmr": False}}


class CompletenessCheck:
    """A document callback that lets ``writer`` record ``success`` only for a run that took every planned point.

    A plan declares what it will take in its start document, ``planned_events`` (stream name ->
    number of events: ``{"dark": 5, "flat": 10, "primary": 180}``). Placed behind
    :class:`ResumedRunFilter` (so a re-taken frame counts once), it counts the distinct
    ``seq_num`` of each stream; a stop document that says ``success`` for a run with a stream
    short of its plan (a detector that dropped frames, a loop cut short) reaches the writer as
    ``exit_status="fail"`` with a reason that names each short stream, e.g. ``primary: 216 of 360
    planned events taken``. A run that failed or was aborted keeps its own status and gets the
    count added to its reason. Runs without ``planned_events`` pass unchanged.

    Attributes
    ----------
    incomplete
        Run uid -> the reason, for every run this check turned from ``success`` to ``fail``.
    """

    def __init__(self, writer: DocumentCallback) -> None:
        self.writer = writer
        self.incomplete: dict[str, str] = {}
        self._planned: dict[str, dict[str, int]] = {}  # run uid -> stream -> planned events
        self._stream_of: dict[str, tuple[str, str]] = {}  # descriptor uid -> (run uid, stream name)
        self._seen: dict[str, dict[str, set[int]]] = {}  # run uid -> stream -> seq_nums

    def __call__(self, name: str, doc: dict[str, Any]) -> Any:
        if name == "start" and doc.get("planned_events"):
            self._planned[doc["uid"]] = {str(k): int(v) for k, v in doc["planned_events"].items()}
            self._seen[doc["uid"]] = {}
        elif name == "descriptor" and doc["run_start"] in self._planned:
            self._stream_of[doc["uid"]] = (doc["run_start"], doc.get("name", "primary"))
        elif name == "event" and doc["descriptor"] in self._stream_of:
            self._count(doc["descriptor"], [int(doc["seq_num"])])
        elif name == "event_page" and doc["descriptor"] in self._stream_of:
            self._count(doc["descriptor"], [int(n) for n in doc["seq_num"]])
        elif name == "stop" and doc["run_start"] in self._planned:
            doc = self._judged(doc)
        return self.writer(name, doc)

    def _count(self, descriptor: str, seq_nums: list[int]) -> None:
        run_uid, stream = self._stream_of[descriptor]
        self._seen[run_uid].setdefault(stream, set()).update(seq_nums)

    def _judged(self, stop: dict[str, Any]) -> dict[str, Any]:
        run_uid = stop["run_start"]
        planned, seen = self._planned.pop(run_uid), self._seen.pop(run_uid)
        for descriptor in [d for d, (uid, _) in self._stream_of.items() if uid == run_uid]:
            del self._stream_of[descriptor]
        short = [
            f"{stream}: {len(seen.get(stream, ()))} of {count} planned events taken"
            for stream, count in planned.items()
            if len(seen.get(stream, ())) < count
        ]
        if not short:
            return stop
        reason = "; ".join(short)
        if stop.get("exit_status") == "success":
            self.incomplete[run_uid] = reason
            return {**stop, "exit_status": "fail", "reason": f"incomplete run: {reason}"}
        return {**stop, "reason": "; ".join(filter(None, [stop.get("reason", ""), reason]))}


def _datums(resource_uid: str, descriptor: str, kept: Sequence[tuple[int, int]]) -> Iterable[dict[str, Any]]:
    """``stream_datum`` documents for ``(seq_num, index)`` pairs: one per run consecutive in both."""
    start = 0
    for k in range(1, len(kept) + 1):
        if k == len(kept) or kept[k][0] != kept[k - 1][0] + 1 or kept[k][1] != kept[k - 1][1] + 1:
            first, last = kept[start], kept[k - 1]
            yield {
                "uid": f"{resource_uid}/kept-{first[0]}",
                "stream_resource": resource_uid,
                "descriptor": descriptor,
                "indices": {"start": first[1], "stop": last[1] + 1},
                "seq_nums": {"start": first[0], "stop": last[0] + 1},
            }
            start = k


def write_frame_view(frames: Sequence[tuple[Path, int]], *, dataset: str, data_key: str) -> Path:
    """Write a view of ``frames`` ((file, frame index), in that order): ``dataset`` of a new HDF5 file.

    The view is an HDF5 virtual dataset, ``<first file stem>.<data_key>.kept.h5`` beside the
    first file: no frame is copied, and the detector files are only opened read-only. It names
    them relative to its own directory, so it resolves wherever they lie side by side. Created
    under a temporary name and linked into place, so it is never partial and never replaces an
    existing file (a second view gets a numbered name).

    Raises
    ------
    CatalogFilterError
        A detector file cannot be read, holds fewer frames than announced, or the view cannot be written.
    """
    import h5py

    shapes: dict[Path, tuple[tuple[int, ...], Any]] = {}
    for path, _ in frames:
        if path in shapes:
            continue
        try:
            with h5py.File(path, "r", swmr=True) as f:
                shapes[path] = (f[dataset].shape, f[dataset].dtype)
        except (OSError, KeyError) as exc:
            raise CatalogFilterError(f"cannot read {dataset} of {path} to write a view of the frames kept: {exc}") from exc
    (frame_shape, dtype), *others = {(shape[1:], dtype) for shape, dtype in shapes.values()}
    if others:
        raise CatalogFilterError(f"the files of {data_key} hold frames of different shapes or types: {sorted(shapes)}")
    for path, index in frames:
        if index >= shapes[path][0][0]:
            raise CatalogFilterError(f"{path}:{dataset} holds {shapes[path][0][0]} frames; frame {index} was announced")
    directory = frames[0][0].parent
    layout = h5py.VirtualLayout(shape=(len(frames), *frame_shape), dtype=dtype)
    vsources = {
        path: h5py.VirtualSource(os.path.relpath(path, directory), dataset, shape=shape, dtype=dtype)
        for path, (shape, dtype) in shapes.items()
    }
    start = 0
    for k in range(1, len(frames) + 1):
        if k == len(frames) or frames[k][0] != frames[k - 1][0] or frames[k][1] != frames[k - 1][1] + 1:
            path, first_index = frames[start]
            layout[start:k] = vsources[path][first_index : first_index + (k - start)]
            start = k
    first = frames[0][0]
    safe_key = re.sub(r"[^A-Za-z0-9_.-]", "_", data_key)
    temporary = directory / f".{first.stem}.{uuid.uuid4().hex[:8]}.part"
    try:
        with h5py.File(temporary, "w-", libver="latest") as f:
            f.create_virtual_dataset(dataset, layout)
            f.attrs["corrflow_view_of"] = [os.path.relpath(path, directory) for path in shapes]
            f.attrs["corrflow_frame_indices"] = [index for _, index in frames]
        for n in range(1000):
            view = directory / f"{first.stem}.{safe_key}{'' if n == 0 else f'.{n}'}{VIEW_SUFFIX}"
            try:
                os.link(temporary, view)  # atomic, and fails rather than replace an existing file
            except FileExistsError:
                continue
            return view
        raise CatalogFilterError(f"no free name for a view of {first} beside it")
    except OSError as exc:
        raise CatalogFilterError(f"cannot write a view of the frames kept of {first}: {exc}") from exc
    finally:
        temporary.unlink(missing_ok=True)


def view_sources(path: Path) -> list[Path]:
    """The files a view (see :func:`write_frame_view`) maps; ``[]`` for any other file."""
    import h5py

    path = Path(path)
    if not path.name.endswith(VIEW_SUFFIX):
        return []
    with h5py.File(path, "r") as f:
        names = f.attrs.get("corrflow_view_of")
    return [Path(os.path.normpath(path.parent / str(name))) for name in (names if names is not None else [])]


def with_view_sources(paths: Iterable[Path]) -> list[Path]:
    """``paths``, each view followed by the detector file it maps (once), e.g. for a transfer."""
    result: list[Path] = []
    for path in paths:
        for item in (Path(path), *view_sources(Path(path))):
            if item not in result:
                result.append(item)
    return result
