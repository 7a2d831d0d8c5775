"""corrflow benchmarks: one module per area, run from the project root as ``python -m benchmarks.NAME``.

Each module measures corrflow (rows whose implementation name starts with ``corrflow``) and its peers on
the same inputs in the same run, prints one table and writes ``benchmarks/results/NAME.json`` (a list of
rows ``{"case", "implementation", "seconds", <accuracy or throughput fields>}``; see shared/DESIGN.md,
"Benchmarks convention"). Peers are optional: install them with
``pip install -r benchmarks/requirements.txt``; a missing peer is reported as a row with a note, never
with invented numbers. Results are outputs, kept out of git.
"""
