"""Shared helpers of the benchmark modules: timing, the results table and the JSON results file."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "best_of", "machine_note", "print_table", "write_results"]


def best_of(function: Callable[[], Any], *, repeats: int) -> tuple[float, Any]:
    """Run ``function`` ``repeats`` times; return (fastest wall time in s, result of the last run).

    The best of N, not the mean: the machine is shared, so slower runs measure the neighbours' load,
    not the code.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    best = math.inf
    result: Any = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def machine_note() -> str:
    """One line describing where the numbers were taken."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.node()} · {cores} cores · load average {load:.2f} at start · Python {platform.python_version()}"


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def print_table(rows: Iterable[Mapping[str, Any]], *, columns: list[str], title: str | None = None) -> None:
    """Print rows as an aligned plain-text table (missing values as '-')."""
    rows = list(rows)
    cells = [[_format(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def write_results(name: str, rows: list[dict[str, Any]]) -> Path:
    """Write ``benchmarks/results/NAME.json`` (a JSON list of row objects); returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path
