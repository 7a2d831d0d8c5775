"""Reconstruction flow: NXtomo -> normalize -> centre -> FBP -> volume with provenance.

The slabs of detector rows are Prefect tasks on a Dask cluster through prefect-dask: a local
cluster by default (``settings.compute.dask_workers`` processes), or an existing cluster at
``settings.compute.dask_address``. Each task reads its own rows from the NXtomo file; the flow
writes the slabs in order as they come back, with at most two per worker in flight (bounded
memory, see corrflow/volume.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from corrflow import progress
from corrflow.catalog import open_catalog, register_product
from corrflow.flows._common import flow_settings, run_name
from corrflow.flows.models import ReconstructionParameters, ReconstructionResult, Sample
from corrflow.settings import ComputeSettings
from corrflow.volume import SlabJob, VolumeProduct, read_provenance, reconstruct_nxtomo, reconstruct_slab


@task(name="reconstruct-slab", cache_policy=NO_CACHE, task_run_name="rows {job.r0}-{job.r1}")
def reconstruct_slab_task(job: SlabJob) -> np.ndarray:
    return reconstruct_slab(job)


def task_slabs(max_in_flight: int):
    """A slab mapper that submits each slab as a Prefect task, keeping ``max_in_flight`` pending."""

    def mapper(jobs: Iterable[SlabJob]) -> Iterator[tuple[SlabJob, np.ndarray]]:
        pending: deque[tuple[SlabJob, object]] = deque()
        for job in jobs:
            pending.append((job, reconstruct_slab_task.submit(job)))
            if len(pending) >= max_in_flight:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()

    return mapper


def current_api_url() -> str:
    """The Prefect API this process reports to (starting the embedded server if none is configured)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def dask_task_runner(compute: ComputeSettings):
    """The DaskTaskRunner the settings ask for: an existing cluster, or a local one of processes.

    The local cluster's worker processes are told this process's Prefect API URL. Without it, each
    worker of an embedded (no-server) setup starts an ephemeral Prefect server of its own: ~6 s
    before its first slab, and task runs recorded in a database nobody reads.
    """
    from prefect_dask import DaskTaskRunner

    if compute.dask_address:
        return DaskTaskRunner(address=compute.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": compute.dask_workers,
            "threads_per_worker": compute.threads_per_worker,
            "processes": True,
            "dashboard_address": None,  # no web server on the compute node by default
            "env": {"PREFECT_API_URL": current_api_url()},
        }
    )


@flow(name="reconstruct-slabs", flow_run_name=run_name("reconstruct slabs"))
def _reconstruct_slabs(
    sample: Sample, nxtomo_path: Path, output: Path, run_uid: str, parameters: ReconstructionParameters,
    workers: int, threads_per_worker: int,
) -> VolumeProduct:
    return reconstruct_nxtomo(
        nxtomo_path,
        output,
        filter_name=parameters.filter_name,
        center_px=parameters.center_px,
        chunk_rows=parameters.chunk_rows,
        provenance={"input_run_uid": run_uid, "sample": sample.model_dump(), "dask_workers": workers},
        progress=lambda done, total: progress.report("reconstruct (rows)", done, total),
        map_slabs=task_slabs(max_in_flight=2 * workers),
        threads=threads_per_worker,
    )


def reconstruct_on_dask(
    sample: Sample, nxtomo_path: Path, output: Path, run_uid: str, parameters: ReconstructionParameters,
    compute: ComputeSettings,
) -> VolumeProduct:
    """Reconstruct with the slabs spread over the Dask cluster the compute settings describe."""
    runner = dask_task_runner(compute)
    return _reconstruct_slabs.with_options(task_runner=runner)(
        sample, nxtomo_path, output, run_uid, parameters, compute.dask_workers, compute.threads_per_worker
    )


@flow(name="reconstruct", flow_run_name=run_name("reconstruct"), log_prints=True)
def reconstruct(
    sample: Sample,
    nxtomo_path: Path,
    run_uid: str,
    parameters: ReconstructionParameters = ReconstructionParameters(),
) -> ReconstructionResult:
    """Reconstruct a transferred NXtomo scan into ``<compute_storage>/<run_uid>/<sample>_volume.nxs``.

    The finished volume is registered in the catalog under ``/processed/<run_uid>-volume`` with its
    provenance (input run uid and sha256, parameters, software versions).
    """
    settings = flow_settings()
    output = settings.compute_storage / run_uid / f"{sample.name}_volume.nxs"
    product = reconstruct_on_dask(sample, Path(nxtomo_path), output, run_uid, parameters, settings.compute)
    with open_catalog(settings) as catalog:
        register_product(
            catalog,
            product.path,
            key=f"{run_uid}-volume",
            dataset="/entry/data/data",
            metadata={
                "kind": "reconstruction",
                "parent_run_uids": [run_uid],
                "sample": sample.model_dump(),
                "units": "1/mm",
                "axes": ["z", "y", "x"],
                "voxel_size_um": product.voxel_size_um,
                "provenance": read_provenance(product.path),
            },
        )
    print(f"reconstructed {product.shape_zyx} in {product.seconds:.1f} s, centre {product.center_px:.2f} px")
    return ReconstructionResult(
        volume_path=product.path,
        center_px=product.center_px,
        voxel_size_um=product.voxel_size_um,
        shape_zyx=product.shape_zyx,
        seconds=product.seconds,
    )
