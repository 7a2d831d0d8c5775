"""Reconstruction flow: NXtomo -> normalize -> [Paganin] -> centre -> [ring removal] -> FBP -> volume with
provenance and its half-dataset resolution (the options are :class:`~corrflow.flows.models.ReconstructionParameters`).

The flow runs with a prefect-dask ``DaskTaskRunner``: a local cluster by default
(``settings.compute.dask_workers`` processes, see :mod:`corrflow.compute.dask_cluster`), or an existing
cluster at ``settings.compute.dask_address``. The slabs of detector rows go to that cluster as plain
Dask futures through the runner's Dask client, not as one Prefect task each: a Prefect task run
costs ~0.25 s of CPU across the flow process, the worker and the API server (measured: 40 empty
tasks on this 2-core machine), which a 2048-row detector in 8-row slabs would pay 256 times, and on
a busy node that CPU is taken from the reconstruction. The dashboard follows the flow run and its
progress messages instead. Each slab reads its own rows from the NXtomo file; the flow writes the
slabs in order as they come back, with at most two per worker thread in flight (bounded memory, see
corrflow/compute/volume.py).
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from prefect import flow

from corrflow.report import progress
from corrflow.catalog.tiled import open_catalog, product_key, register_product
from corrflow.compute.dask_cluster import local_cluster
from corrflow.flows._common import run_name
from corrflow.flows.models import (
    ExperimentRequest,
    ReconstructedVolume,
    ReconstructionParameters,
    Sample,
    StoredFile,
    TomographyRun,
    TransferredRun,
)
from corrflow.config.settings import ComputeSettings, Settings
from corrflow.compute.volume import (
    PhaseRetrieval,
    SlabJob,
    VolumeProduct,
    read_provenance,
    reconstruct_nxtomo,
    reconstruct_slab,
)


def dask_slabs(client, max_in_flight: int):
    """A slab mapper that runs each slab as a Dask future on ``client``'s cluster.

    At most ``max_in_flight`` slabs are submitted and not yet collected, and results come back in
    job order, so the flow holds a bounded number of slabs whatever the size of the scan. A failed
    slab raises here, and the futures still pending are released with the client.
    """

    def mapper(jobs: Iterable[SlabJob]) -> Iterator[tuple[SlabJob, np.ndarray]]:
        batch = uuid.uuid4().hex[:8]  # readable, unique keys on the Dask dashboard
        pending: deque = deque()
        for job in jobs:
            key = f"reconstruct-slab-{batch}-rows-{job.r0}-{job.r1}"
            pending.append((job, client.submit(reconstruct_slab, job, key=key)))
            if len(pending) >= max_in_flight:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()

    return mapper


def dask_task_runner(compute: ComputeSettings):
    """The DaskTaskRunner the settings ask for: an existing cluster, or a local one of processes."""
    from prefect_dask import DaskTaskRunner

    if compute.dask_address:
        return DaskTaskRunner(address=compute.dask_address)
    return DaskTaskRunner(
        cluster_class=local_cluster,
        cluster_kwargs={
            "n_workers": compute.dask_workers,
            "threads_per_worker": compute.threads_per_worker,
            "processes": True,
            "dashboard_address": None,  # no web server on the compute node by default
        },
    )


def _task_runner_client():
    """The Dask client of the running flow's DaskTaskRunner (it starts or joins the cluster).

    Not ``prefect_dask.get_dask_client``: in prefect-dask 0.3.7 it reads the runner's private
    ``_client``, which stays None until a Prefect task is submitted, and fails with AttributeError.
    The runner's public ``client`` property starts it; it submits plain functions as plain Dask tasks.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = context.task_runner if context is not None else None
    if runner is None or not hasattr(runner, "client"):
        raise RuntimeError("the slab flow must run with a prefect_dask.DaskTaskRunner (see dask_task_runner)")
    return runner.client


@flow(name="reconstruct-slabs", flow_run_name=run_name("reconstruct slabs"))
def _reconstruct_slabs(
    sample: Sample, nxtomo_path: Path, output: Path, run_uid: str, parameters: ReconstructionParameters,
    threads_per_worker: int,
) -> VolumeProduct:
    client = _task_runner_client()
    workers = len(client.scheduler_info()["workers"])
    slots = sum(client.nthreads().values())
    phase = parameters.phase_retrieval
    return reconstruct_nxtomo(
        nxtomo_path,
        output,
        filter_name=parameters.filter_name,
        center_px=parameters.center_px,
        chunk_rows=parameters.chunk_rows,
        phase_retrieval=None if phase is None else PhaseRetrieval(**phase.model_dump()),
        ring_removal_size_px=parameters.ring_removal_size_px,
        resolution=parameters.resolution,
        resolution_threshold=parameters.resolution_threshold,
        provenance={"input_run_uid": run_uid, "sample": sample.model_dump(), "dask_workers": workers,
                    "dask_threads": slots},
        progress=lambda done, total: progress.report("reconstruct (rows)", done, total),
        map_slabs=dask_slabs(client, max_in_flight=2 * max(1, slots)),
        threads=threads_per_worker,
    )


def reconstruct_on_dask(
    sample: Sample, nxtomo_path: Path, output: Path, run_uid: str, parameters: ReconstructionParameters,
    compute: ComputeSettings,
) -> VolumeProduct:
    """Reconstruct with the slabs spread over the Dask cluster the compute settings describe, with the
    phase retrieval, ring removal and resolution estimate ``parameters`` ask for."""
    runner = dask_task_runner(compute)
    return _reconstruct_slabs.with_options(task_runner=runner)(
        sample, nxtomo_path, output, run_uid, parameters, compute.threads_per_worker
    )


class InputMismatchError(RuntimeError):
    """The reconstruction's input is not the file the transfer verified."""


def manifest_sha256(manifest_path: Path, file: Path) -> str:
    """The sha256 the transfer manifest at ``manifest_path`` recorded for ``file`` (below its directory)."""
    import json

    manifest = json.loads(Path(manifest_path).read_text())
    try:
        relative = Path(file).resolve().relative_to(Path(manifest_path).parent.resolve()).as_posix()
    except ValueError:
        raise InputMismatchError(f"{file}: outside the transferred run of the manifest {manifest_path}") from None
    for entry in manifest["files"]:
        if entry["relative_path"] == relative:
            return str(entry["sha256"])
    raise InputMismatchError(f"{file}: not in the transfer manifest {manifest_path}")


def reconstruction_stage(
    settings: Settings, request: ExperimentRequest, *, tomography: TomographyRun, transfer: TransferredRun
) -> ReconstructedVolume:
    """Reconstruct the transferred NXtomo scan into ``<compute_storage>/<run_uid>/<sample>_volume.nxs``.

    The finished volume is registered in the catalog under ``/processed/<run_uid>-volume`` with its
    provenance (input run uid and sha256, parameters, software versions), its half-dataset resolution
    (``resolution_um`` and the estimate's ``resolution`` block: threshold, crossing, rows) and its
    parent, the transfer record.
    """
    run_uid, sample = tomography.run_uid, request.sample
    output = settings.compute_storage / run_uid / f"{sample.name}_volume.nxs"
    nxtomo = transfer.nxtomo.local_path(settings)
    expected_sha256 = manifest_sha256(transfer.manifest.local_path(settings), nxtomo)
    product = reconstruct_on_dask(sample, nxtomo, output, run_uid, request.reconstruction, settings.compute)
    # The input (and the detector files its frames are linked from) was hashed while it was read:
    # a file changed since its verified transfer gives a volume of the wrong data, which is never
    # kept nor catalogued.
    manifest = transfer.manifest.local_path(settings)
    read = {str(nxtomo): product.input_sha256, **product.linked_sha256}
    for file, sha256 in read.items():
        expected = expected_sha256 if file == str(nxtomo) else manifest_sha256(manifest, Path(file))
        if sha256 != expected:
            product.path.unlink(missing_ok=True)
            raise InputMismatchError(
                f"{file}: sha256 {sha256} differs from the transfer manifest's {expected}: "
                f"the file changed after its verified transfer; the volume was discarded (transfer it again)"
            )
    key = product_key(run_uid, "volume")
    provenance = read_provenance(product.path)
    with open_catalog(settings) as catalog:
        register_product(
            catalog,
            product.path,
            key=key,
            dataset="/entry/data/data",
            metadata={
                "kind": "reconstruction",
                "parent_run_uids": [run_uid],
                "parents": {"transfer": transfer.catalog_key},
                "sample": sample.model_dump(),
                "units": "1/mm",
                "axes": ["z", "y", "x"],
                "voxel_size_um": product.voxel_size_um,
                "center_px": product.center_px,
                "shape_zyx": list(product.shape_zyx),
                "seconds": product.seconds,
                "resolution_um": product.resolution_um,
                # The estimate without its curve (which stays in the provenance): searchable, small.
                "resolution": {k: v for k, v in (provenance.get("resolution") or {}).items() if k != "curve"} or None,
                "provenance": provenance,
            },
        )
    print(f"reconstructed {product.shape_zyx} in {product.seconds:.1f} s, centre {product.center_px:.2f} px")
    return ReconstructedVolume(
        catalog_key=key,
        file=StoredFile.under(settings, "compute", product.path),
        center_px=product.center_px,
        voxel_size_um=product.voxel_size_um,
        shape_zyx=product.shape_zyx,
        seconds=product.seconds,
        resolution_um=product.resolution_um,
    )
