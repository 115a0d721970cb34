"""pytest plugin of benchmarks/gpu_check.sh (engine/bench/gpucheck.py's phase 1): per-op test counts on disk after every test, and per-op
time limits that cut an op's remaining tests instead of the whole run.

    KFE_PROGRESS=path.json KFE_PROGRESS_OPS='{"tests/engine/ops/test_grn.py": "grn", ...}' \
    KFE_PROGRESS_LIMITS='{"grn": 25, ...}' PYTHONPATH=benchmarks:. python -m pytest -p gpu_check_progress ...

path.json holds {op: {"collected", "passed", "failed", "skipped", "cut", "seconds", "failures": [...]}}
and "finished": true once pytest ends; a run killed from outside leaves the counts of every test that
finished, so the summary can say which ops were cut. An op whose time (from its first test on) is past
its limit has its remaining tests skipped with the reason "gpu_check: cut" and counted as cut.
It lives outside the engine package on purpose: importing engine imports triton, and tests/conftest.py
must set TRITON_INTERPRET before anything does.
"""
from __future__ import annotations

import json
import os
import time

import pytest

CUT = "gpu_check: cut by the op's time limit"


class Progress:
    def __init__(self, path: str, ops: dict[str, str], limits: dict[str, float]):
        self.path, self.ops, self.limits = path, ops, limits
        self.state: dict = {"finished": False, "ops": {}}
        self.started: dict[str, float] = {}
        self.outcomes: dict[str, str] = {}

    def op_of(self, nodeid: str) -> str:
        file = nodeid.split("::", 1)[0]
        return self.ops.get(file, file)

    def _op(self, op: str) -> dict:
        return self.state["ops"].setdefault(op, {"collected": 0, "passed": 0, "failed": 0, "skipped": 0,
                                                 "cut": 0, "seconds": 0.0, "failures": []})

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.path)

    def pytest_collectreport(self, report) -> None:
        # A test file that fails to import (run with --continue-on-collection-errors) is its op's failure.
        if report.failed and report.nodeid:
            op = self._op(self.op_of(report.nodeid))
            op["collect_errors"] = op.get("collect_errors", 0) + 1
            op["failures"].append(f"{report.nodeid} (collection error)")
            self.write()

    def pytest_collection_finish(self, session) -> None:  # after -m / -k deselection
        for op in self.ops.values():
            self._op(op)
        for item in session.items:
            self._op(self.op_of(item.nodeid))["collected"] += 1
        self.write()

    @pytest.hookimpl(tryfirst=True)  # before the gpu marker's skip: a cut op says "cut", not "no GPU"
    def pytest_runtest_setup(self, item) -> None:
        op = self.op_of(item.nodeid)
        start = self.started.setdefault(op, time.monotonic())
        if op in self.limits and time.monotonic() - start >= self.limits[op]:
            pytest.skip(CUT)

    def pytest_runtest_logreport(self, report) -> None:
        # One outcome per test: setup skip / failure, else the call's, and a failing teardown fails it.
        outcome = None
        if report.skipped and report.when in ("setup", "call"):
            cut = isinstance(report.longrepr, tuple) and CUT in str(report.longrepr[-1])
            outcome = "cut" if cut else "skipped"
        elif report.failed:
            outcome = "failed"
        elif report.when == "call":
            outcome = "passed"
        op = self._op(self.op_of(report.nodeid))
        op["seconds"] = round(op["seconds"] + report.duration, 3)
        if outcome is not None:
            before = self.outcomes.get(report.nodeid)
            if before is not None:
                op[before] -= 1
            self.outcomes[report.nodeid] = outcome
            op[outcome] += 1
            if outcome == "failed" and report.nodeid not in op["failures"]:
                op["failures"].append(report.nodeid)
        self.write()

    def pytest_sessionfinish(self) -> None:
        self.state["finished"] = True
        self.write()


def pytest_configure(config) -> None:
    path = os.environ.get("KFE_PROGRESS")
    if path:
        ops = json.loads(os.environ.get("KFE_PROGRESS_OPS", "{}"))
        limits = json.loads(os.environ.get("KFE_PROGRESS_LIMITS", "{}"))
        config.pluginmanager.register(Progress(path, ops, limits), "kfe_progress")
