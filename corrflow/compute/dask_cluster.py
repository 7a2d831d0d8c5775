"""The local Dask cluster that reconstruction slabs run on when no cluster address is configured.

Dask's nanny exports ``MALLOC_TRIM_THRESHOLD_=65536`` into every worker process it spawns (the
``distributed.nanny.pre-spawn-environ`` setting), so that freed memory goes back to the OS at once.
Setting any glibc malloc threshold also switches off glibc's adaptive mmap threshold: every temporary
array over 128 KiB is then a fresh ``mmap``, page-faulted in and unmapped again. The slab kernels
allocate such temporaries per detector row (FFT buffers, the gridrec Fourier grid), and a 32-row,
720-angle, 512-column slab took ~157 000 page faults in such a worker against ~13 000 in a plain
Python process, and 25-45 % longer. Workers started here keep glibc's defaults, as any Python
process has them: memory is handed back once more than ~64 MiB per arena is free (glibc's adaptive
limit), which is what a plain ``python`` running the same kernels keeps.

Workers of an existing cluster (``settings.compute.dask_address``) are started by the facility; to
give them the same allocator, start ``dask worker`` with
``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_=None`` in its environment.
"""

from __future__ import annotations

import os
from typing import Any

MALLOC_TRIM_VARIABLE = "MALLOC_TRIM_THRESHOLD_"
_PRE_SPAWN_KEY = f"distributed.nanny.pre-spawn-environ.{MALLOC_TRIM_VARIABLE}"


def local_cluster(**cluster_kwargs: Any):
    """A :class:`distributed.LocalCluster` whose worker processes keep glibc's adaptive malloc thresholds.

    Takes the keyword arguments of ``LocalCluster`` (``n_workers``, ``threads_per_worker``,
    ``processes``, ``env``...); usable as ``DaskTaskRunner(cluster_class=local_cluster, ...)``.
    """
    import dask
    from distributed import LocalCluster

    # A nanny started earlier in this process has already exported the variable here (it sets it in
    # its own process's environment before spawning), and workers inherit that environment: lift it
    # while ours spawn, and put it back for whoever set it.
    inherited = os.environ.pop(MALLOC_TRIM_VARIABLE, None)
    try:
        with dask.config.set({_PRE_SPAWN_KEY: None}):
            return LocalCluster(**cluster_kwargs)
    finally:
        if inherited is not None:
            os.environ[MALLOC_TRIM_VARIABLE] = inherited
