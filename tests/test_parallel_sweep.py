"""Two sweep jobs running at the same time (joblib launcher, two processes) do not clobber each
other: each job directory holds its own complete checkpoint and metrics.json with its own
embedding dim (saved asynchronously, and completed before the job ends), the data directory both
generate into at once ends up whole, and the sweep summary lists both jobs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from launch import console, run
from recap_embed.io.checkpoint import checkpoint_step, list_checkpoints

# Real training runs and subprocesses: deselect with -m "not slow" for a fast loop.
pytestmark = pytest.mark.slow

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")

TINY = [
    "data.synthetic.num_users=200", "data.synthetic.num_items=50", "data.synthetic.num_train=2000",
    "data.synthetic.num_eval=500", "train.progress=false", "train.max_steps=3", "train.batch_size=256",
]


def test_parallel_jobs_keep_their_own_outputs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    shared = tmp_path / "shared_data"  # both jobs generate it at the same time
    out = run(
        console("recap-embed-train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "embeddings.embedding_dim=4,8",
                f"hydra.sweep.dir={sweep}", f"data.dir={shared}", *TINY,
                "train.checkpoint_async=true"),  # the final asynchronous save must complete too
        cwd=tmp_path, timeout=300,
    )
    output = out.output
    assert "Traceback" not in output, output[-4000:]

    jobs = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        dim = int(next(o.split("=", 1)[1] for o in overrides if o.startswith("embeddings.embedding_dim=")))
        jobs[job.name] = (job, dim)
    assert sorted(d for _, d in jobs.values()) == [4, 8], jobs

    for name, (job, dim) in jobs.items():
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["embedding_dims"] == {"user": dim, "item": dim}, (name, metrics["embedding_dims"])
        assert metrics["steps"] == 3
        checkpoint = Path(metrics["checkpoint"])
        assert checkpoint.parent == job / "checkpoints" and checkpoint_step(checkpoint) == 3, metrics["checkpoint"]
        assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["best", "step_3"]  # nothing partial left
        assert list_checkpoints(job / "checkpoints") == [checkpoint]
        manifest = yaml.safe_load((checkpoint / ".snapshot_metadata").read_text())["manifest"]
        shapes = {k: v.get("shape") for k, v in manifest.items() if k.split("/", 1)[1].startswith("model/") and k.endswith("embedding_bags.user.weight")}
        assert shapes and all(s is not None and s[1] == dim for s in shapes.values()), shapes
        assert (job / "recap_embed_train.log").exists()
    assert "Joblib.Parallel(n_jobs=2" in output and "is launching 2 jobs" in output, output[-3000:]

    assert (shared / "COMPLETE").exists() and not [p for p in shared.parent.iterdir() if p.name.startswith(".shared_data-")]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert sorted(r["job"] for r in rows) == sorted(jobs)
    assert sorted(int(r["embeddings.embedding_dim"]) for r in rows) == [4, 8]
    assert all(r["eval_auroc"] not in ("", None) for r in rows)
    assert (sweep / "summary.md").exists()
