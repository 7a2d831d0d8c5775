"""Compute: chunked, provenance-carrying reconstruction of NXtomo scans (:mod:`.volume`) and the local
Dask cluster its slabs run on (:mod:`.dask_cluster`). Kernels come from :mod:`corrflow.processing`."""
