"""Every benchmark script runs with --quick and writes the JSON keys BENCHMARKS.md relies on.

Nothing here is about speed: the scripts are started together (each in its own process, so the
whole module takes about as long as the slowest one) and each test checks one exit status and
its output's keys.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest

from launch import python_script, start, stop

# Real training runs and subprocesses: deselect with -m "not slow" for a fast loop.
pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

#: script -> keys its --quick JSON must hold
EXPECTED: Dict[str, Tuple[str, ...]] = {
    "bench_train_step.py": ("benchmark", "machine", "setup", "results", "fixed_overhead"),
    "bench_config_commands.py": ("benchmark", "machine", "seconds", "ratios", "importtime", "targets"),
    "bench_vocab.py": ("benchmark", "machine", "seconds", "ids_per_second", "memory", "checks"),
    "bench_meta_instantiate.py": ("benchmark", "machine", "seconds", "rss_growth_bytes_held", "peak_rss_growth_bytes", "targets"),
    "bench_table_count.py": ("benchmark", "machine", "seconds_median", "loglog_slopes", "instantiate_breakdown_seconds",
                             "typed_over_open_compose", "compose_profile", "targets"),
    "bench_pretrained_load.py": ("benchmark", "machine", "setup", "results", "targets"),
    "bench_train_app.py": ("benchmark", "machine", "setup", "targets"),
    "bench_neighbour.py": ("benchmark", "machine", "setup", "skipped", "checks", "seconds", "ratios", "targets"),
}

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Tuple[subprocess.Popen, Path, Path]]]:
    out_dir = tmp_path_factory.mktemp("bench_quick")
    procs: Dict[str, Tuple[subprocess.Popen, Path, Path]] = {}
    for script in EXPECTED:
        out = out_dir / (Path(script).stem + ".json")
        log = out_dir / (Path(script).stem + ".log")
        with open(log, "w") as f:
            procs[script] = (
                start(python_script(BENCHMARKS / script, "--quick", "--out", out), cwd=out_dir,
                      env={"PYTHONWARNINGS": "ignore"}, stdout=f, stderr=subprocess.STDOUT),
                out,
                log,
            )
    yield procs
    for proc, _, _ in procs.values():
        stop(proc)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_quick_run(runs: Dict[str, Tuple[subprocess.Popen, Path, Path]], script: str) -> None:
    proc, out, log = runs[script]
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"{script} --quick did not finish in {TIMEOUT_S} s")
    assert rc == 0, f"{script} --quick exited {rc}:\n{log.read_text()[-4000:]}"
    data = json.loads(out.read_text())
    missing = [k for k in EXPECTED[script] if k not in data]
    assert not missing, f"{script}: JSON lacks {missing}; has {sorted(data)}"
    assert data["quick"] is True
    assert data["machine"].get("cpu") and data["machine"].get("date")
