"""The fault matrix: every test marked ``@pytest.mark.fault("<case>")`` is one case of it.

The tests themselves run the faults on the production path (the production RunEngine, the flows,
real servers and workers, the simulated EPICS facility); this plugin only gathers their outcome
and the figures they measured (the ``fault_figures`` fixture: a dict a test fills with
``name -> value``) and prints, at the end of the session, one table:

    case | result (tests passed) | figures | test modules

The same table goes, as JSON, to ``<pytest cache dir>/fault-matrix.json``. A case whose tests were
not collected in this session (``-k``, ``-m "not slow"``) is listed as ``not run``, so the table
always shows the whole matrix.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

#: The cases of the matrix, in the order the table lists them.
CASES = (
    "beam dump",
    "pre-tripped suspender",
    "IOC killed",
    "motor that never finishes",
    "pause/resume/stop/abort/halt",
    "stopped scan recorded as success",
    "catalog down",
    "worker killed",
    "flow-run process killed with its worker",
    "cancel from the dashboard",
    "double trigger",
    "transfer cut at 50 %",
    "corruption after transfer",
    "prune safety",
    "malformed parameters",
    "bad settings",
    "no overwrite",
    "two demos at once",
    "SIGTERM ends everything",
    "auth",
    "bad raw data",
    "disk full",
)

_results_key = pytest.StashKey[dict[str, list[dict[str, Any]]]]()
_figures_key = pytest.StashKey[dict[str, Any]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault(case): a case of the fault matrix (tests/fault_matrix.py)")
    config.stash[_results_key] = {}


@pytest.fixture
def fault_figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Figures a fault test measured (``name -> number or text``), shown in the fault table."""
    figures: dict[str, Any] = {}
    request.node.stash[_figures_key] = figures
    return figures


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    marker = item.get_closest_marker("fault")
    if marker is None:
        return report
    case = str(marker.args[0])
    if case not in CASES:
        raise pytest.UsageError(f"{item.nodeid}: unknown fault case {case!r}; add it to tests/fault_matrix.py CASES")
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = "skipped" if report.skipped else report.outcome
        figures = dict(item.stash.get(_figures_key, {}))
        entry = {"test": item.nodeid, "result": outcome, "figures": figures, "seconds": round(report.duration, 1)}
        item.config.stash[_results_key].setdefault(case, []).append(entry)
    return report


def _figures_text(figures: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return "; ".join(f"{name} {fmt(value)}" for name, value in figures.items())


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(_results_key, {})
    if not results:
        return
    rows = []
    for case in CASES:
        entries = results.get(case, [])
        if not entries:
            rows.append({"case": case, "result": "not run", "figures": "", "test": ""})
            continue
        outcomes = [e["result"] for e in entries]
        failed = outcomes.count("failed")
        result = f"failed ({failed} of {len(entries)})" if failed else f"passed ({outcomes.count('passed')})"
        if not failed and outcomes.count("passed") == 0:
            result = "skipped"
        figures = "; ".join(text for text in (_figures_text(e["figures"]) for e in entries) if text)
        tests = sorted({e["test"].split("::", 1)[0].removeprefix("tests/") for e in entries})
        rows.append({"case": case, "result": result, "figures": figures, "test": ", ".join(tests)})
    widths = {key: max(len(key), *(len(row[key]) for row in rows)) for key in ("case", "result")}
    terminalreporter.section("fault matrix")
    terminalreporter.write_line(f"{'case':<{widths['case']}}  {'result':<{widths['result']}}  figures  [test modules]")
    for row in rows:
        terminalreporter.write_line(
            f"{row['case']:<{widths['case']}}  {row['result']:<{widths['result']}}  {row['figures']}  [{row['test']}]"
        )
    cases_run = [case for case in CASES if case in results]
    failed = [case for case in cases_run if any(e["result"] == "failed" for e in results[case])]
    terminalreporter.write_line(
        f"{len(cases_run)} of {len(CASES)} cases run, {len(failed)} failing" + (f": {', '.join(failed)}" if failed else "")
    )
    if getattr(config, "cache", None) is not None:  # absent with -p no:cacheprovider
        path = config.cache.mkdir("fault-matrix") / "fault-matrix.json"
        path.write_text(json.dumps({"cases": list(CASES), "results": results}, indent=1))
        terminalreporter.write_line(f"written to {path}")
