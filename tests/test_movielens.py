"""MovieLens-100k end to end: the example's prepare script on the real files, then the one command.

Needs the package registry: the files come from the RecBole 1.2.1 wheel (`pip download --no-deps`).
Where it cannot be reached the test skips and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TESTS

EXAMPLE = TESTS.parent / "examples" / "movielens"
DISCRETE = "[gender,age,occupation,decade,genre]"


@pytest.mark.slow
def test_movielens_trains_with_the_one_command(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    try:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "recbole==1.2.1", "-d", str(cache)],
                             capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("the package registry did not answer within 180 s: cannot fetch the RecBole wheel with MovieLens-100k")
    if got.returncode != 0:
        pytest.skip(f"cannot fetch the RecBole 1.2.1 wheel with MovieLens-100k (package registry unreachable?): {got.stderr.strip()[-300:]}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prep = subprocess.run([sys.executable, str(EXAMPLE / "prepare.py"), "--cache", str(cache), "--out", str(tmp_path / "ml")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert "train.parquet 80,000 rows, eval.parquet 20,000 rows" in prep.stdout
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "recap_embed.train", f"hydra.run.dir={run}", "train.progress=false", "data.source=parquet",
         f"data.train_path={tmp_path / 'ml' / 'train.parquet'}", f"data.eval_path={tmp_path / 'ml' / 'eval.parquet'}",
         f"data.discrete_columns={DISCRETE}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    # RecBole's FM reached 0.7801 and DeepFM 0.7827 on the same kind of split (README).
    assert metrics["eval_auroc"] > 0.77, metrics["eval"]
    assert {"auroc/gender=F", "auroc/gender=M"} <= set(metrics["eval"])
    assert metrics["rows"] == {"train": 72_000, "validation": 8_000, "eval": 20_000}
