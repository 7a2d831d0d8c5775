"""Reconstruction flow: NXtomo -> normalize -> centre -> FBP -> volume with provenance."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from corrflow import progress
from corrflow.catalog import open_catalog, register_product
from corrflow.flows._common import flow_settings, run_name
from corrflow.flows.models import ReconstructionParameters, ReconstructionResult, Sample
from corrflow.volume import read_provenance, reconstruct_nxtomo


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
    product = reconstruct_nxtomo(
        Path(nxtomo_path),
        output,
        filter_name=parameters.filter_name,
        center_px=parameters.center_px,
        chunk_rows=parameters.chunk_rows,
        provenance={"input_run_uid": run_uid, "sample": sample.model_dump()},
        progress=lambda done, total: progress.report("reconstruct (rows)", done, total),
    )
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
