"""corrflow benchmarks: one module per area, run from the project root as ``python -m benchmarks.NAME``.

Each module measures corrflow (rows whose implementation name starts with ``corrflow``) and its peers on
the same inputs in the same run, prints one table and writes ``benchmarks/results/NAME.json`` (a list of
rows ``{"case", "implementation", "seconds", <accuracy or throughput fields>}``). Peers are optional: install them with
``pip install -r benchmarks/requirements.txt``; a missing peer is reported as a row with a note, never
with invented numbers. Results are outputs, kept out of git.

Benchmarks convention
---------------------
``--quick`` gives a run of a few minutes on 2 cores. Case names shared by the areas:
``event_overhead`` (RunEngine seconds per event), ``hdf5_frames`` (field ``throughput_MBps``),
``fbp_512`` (512^2 slice from 720 angles, with ``rmse``), ``fbp_1024`` (1024^2, 1440 angles),
``paganin_2048``, ``translation_512`` (with ``error_px``), ``rigid_mi_512`` (with ``error_px`` and
``error_deg``), ``verified_copy`` (field ``throughput_MBps``).
"""
