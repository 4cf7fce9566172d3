"""benchmarks/gpu_check.py: without CUDA it says so and exits 0; its checks run (and can fail) on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from launch import python_script, run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
ENV = {"PYTHONWARNINGS": "ignore"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the GPU checks")
def test_without_cuda_it_says_so_and_exits_0():
    proc = run(python_script(SCRIPT), env=ENV, timeout=120)
    assert "CUDA is not available" in proc.stdout and "nothing was checked" in proc.stdout


def test_cpu_subset_passes_and_prints_one_table(tmp_path):
    out = tmp_path / "check.json"
    proc = run(python_script(SCRIPT, "--cpu", "--out", out), env=ENV, timeout=300)
    assert "all checks passed on cpu" in proc.stdout
    import json

    rows = json.loads(out.read_text())["rows"]
    checks = {(r["check"], r["case"]): r["result"] for r in rows}
    assert checks[("train", "table_wise/rowwise_adagrad")] == "ok" and checks[("train", "column_wise/adagrad")] == "ok"
    assert checks[("pretrained", "column_wise")] == "ok" and checks[("checkpoint", "table_wise/rowwise_adagrad")] == "ok"
    assert "single-rank path" in next(r["detail"] for r in rows if r["case"] == "table_wise/sgd")


def test_a_wrong_update_is_reported_and_fails_the_run(monkeypatch, capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    monkeypatch.setattr(gpu_check, "STEPS", 1)
    real = gpu_check.Reference.step

    def off_by_a_bit(self, ids, lengths, coef):  # a reference (or kernel) that drifts by 1e-3
        real(self, ids, lengths, coef)
        self.w += 1e-3

    monkeypatch.setattr(gpu_check.Reference, "step", off_by_a_bit)
    assert gpu_check.main(["--cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "gpu_check: FAILED on cpu" in out
