"""`recap-embed-plan`: memory math, per-rank totals, planning at scale, errors, and the plan file
reproducing the plan in a real 2-rank (gloo) run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from hydra import compose, initialize
from omegaconf import OmegaConf

import recap_embed.plan.config  # noqa: F401  (registers the app's schema)
from launch import Completed, python_m, run
from multiprocess import run_ranks

ROOT = Path(__file__).resolve().parents[1]
GB = 1024**3

#: twhin plus a small table (data_parallel) and a wide one (two column shards of 128), on 2 CPU ranks.
ROUND_TRIP = [
    "topology.world_size=2",
    "topology.compute_device=cpu",
    "embeddings/tables=[author]",
    "embeddings.tables.author.num_embeddings=100",
    "+sharding.tables={author: {sharding_types: [data_parallel]}, tweet: {sharding_types: [column_wise]}}",
    "embeddings.tables.tweet.embedding_dim=256",
]


def compose_plan(overrides: Optional[List[str]] = None):
    with initialize(version_base=None):
        return compose(config_name="recap_embed_plan", overrides=overrides or [])


def huge(dim: int, n: int = 1000, total: int = 10**11, world_size: int = 512) -> Dict[str, Any]:
    """`n` tables, `total` rows in all (a power-law of sizes: the largest 6.5e9 rows), on GPUs."""
    weights = [1 / (i + 1) ** 0.8 for i in range(n)]
    rows = [int(total * w / sum(weights)) for w in weights]
    rows[0] += total - sum(rows)
    return {
        "embeddings": {"embedding_dim": dim, "tables": {f"t{i:04d}": {"num_embeddings": r} for i, r in enumerate(rows)}},
        "sharding": {},
        "topology": {"world_size": world_size},
    }


def run_cli(*args: str, cwd: Path, expect: int = 0) -> Completed:
    """`python -m recap_embed.plan args`; the test fails unless it exits with `expect`."""
    return run(python_m("recap_embed.plan", *args), cwd=cwd, timeout=120, expect=expect)


# --------------------------------------------------------------------------- memory math


def test_optimizer_state_bytes_per_algorithm():
    from recap_embed.distributed.planner import optimizer_state_bytes

    rows, cols = 1000, 8
    assert optimizer_state_bytes("sgd", rows, cols) == 0
    assert optimizer_state_bytes("adagrad", rows, cols) == rows * cols * 4
    assert optimizer_state_bytes("rowwise_adagrad", rows, cols) == rows * 4
    assert optimizer_state_bytes("adam", rows, cols) == 2 * rows * cols * 4
    assert optimizer_state_bytes("partial_rowwise_adam", rows, cols) == rows * cols * 4 + rows * 4
    assert optimizer_state_bytes("lamb", rows, cols) == 2 * rows * cols * 4


@pytest.mark.parametrize(
    "overrides, optimizer_bytes",
    [
        ([], lambda rows, dim: 0),  # twhin: sgd, 8 GPUs
        (["topology.world_size=2", "topology.compute_device=cpu", "embeddings/optimizer=adagrad"], lambda rows, dim: rows * dim * 4),
    ],
)
def test_small_plan_rows_bytes_and_rank_totals(overrides, optimizer_bytes):
    from recap_embed.plan import plan_report

    report = plan_report(compose_plan(overrides))
    tables = {t.key: t for t in report.tables}
    user = tables["user"]
    assert (user.rows, user.dim, user.data_type) == (424_241, 4, "fp32")
    assert user.weight_bytes == 424_241 * 4 * 4
    assert tables["tweet"].weight_bytes == 72_543 * 4 * 4
    for t in report.tables:
        assert t.optimizer_bytes == optimizer_bytes(t.rows, t.dim)
    # Per-rank totals are the sums over tables (replicas counted on every rank holding one).
    ranks = report.ranks
    assert len(ranks) == report.topology.world_size
    assert sum(r.hbm_bytes for r in ranks) == sum(t.hbm_bytes for t in report.tables)
    assert sum(r.ddr_bytes for r in ranks) == sum(t.ddr_bytes for t in report.tables)
    assert sum(r.state_bytes for r in ranks) == sum(t.state_bytes * t.replicas for t in report.tables)
    assert sum(r.shards for r in ranks) == sum(len(t.shards) for t in report.tables)
    for r in ranks:
        assert r.state_bytes == sum(rows * cols * 4 + optimizer_bytes(rows, cols)
                                    for t in report.tables for rows, cols, rank in t.shards if rank == r.rank)
        assert r.perf_ms >= 0
    cuda = report.device_type == "cuda"
    used = "hbm_bytes" if cuda else "ddr_bytes"
    assert sum(getattr(t, used) for t in report.tables) >= sum(t.state_bytes for t in report.tables)  # + buffers
    text = report.format()
    assert "424,241" in text and "critical path" in text and ("HBM used" in text) == cuda
    assert set(report.placements) == {"user", "tweet"}


# --------------------------------------------------------------------------- scale


@pytest.mark.slow
def test_huge_config_fits_in_under_30_seconds():
    from recap_embed.plan import plan_report

    cfg = huge(dim=64)
    start = time.perf_counter()
    report = plan_report(cfg)
    seconds = time.perf_counter() - start
    print(f"\nplanned 1,000 tables / 1e11 rows on 512 GPUs in {seconds:.1f} s (planner {report.planner_seconds:.1f} s, "
          f"{report.num_proposals} proposals)")
    assert seconds < 30
    assert len(report.placements) == 1000 and len(report.ranks) == 512
    assert sum(t.rows for t in report.tables) == 10**11
    assert sum(t.weight_bytes for t in report.tables) == 10**11 * 64 * 4
    assert all(r.hbm_bytes <= r.hbm_usable for r in report.ranks)
    assert sum(r.hbm_bytes for r in report.ranks) == sum(t.hbm_bytes for t in report.tables)
    biggest = max(report.tables, key=lambda t: t.rows)
    assert biggest.sharding_type == "row_wise" and biggest.ranks == list(range(512))  # 1.5 TiB: no host holds it
    text = report.format(max_rows=10)
    assert "the 10 largest of 1000" in text and "the 10 busiest of 512" in text


def test_huge_config_that_does_not_fit_names_tables_and_totals():
    from recap_embed.plan import PlanDoesNotFitError, plan_report

    start = time.perf_counter()
    with pytest.raises(PlanDoesNotFitError) as e:
        plan_report(huge(dim=256))
    assert time.perf_counter() - start < 30
    msg = str(e.value)
    # 1e11 rows × 256 × 4 B = 93.1 TiB against 512 × 68 GiB (80 GB less the 15% margin) = 34.0 TiB.
    assert "93.1 TiB" in msg and "34.0 TiB" in msg and "512 ranks" in msg
    assert "t0000 (6,464,203,834 × 256 fp32" in msg and "t0001" in msg
    assert "topology.world_size=" in msg
    assert "sharding.compute_kernels=[fused_uvm_caching]" in msg
    assert "embeddings.tables.t0000.data_type=fp16" in msg


def test_planner_error_is_translated():
    """Fits the lower bound, but the two big tables cannot share a rank with the third."""
    from recap_embed.plan import PlanDoesNotFitError, plan_report

    cfg = compose_plan(["topology.world_size=2", "topology.compute_device=cpu", "topology.ddr_cap_gb=0.007",
                        "embeddings/tables=[author]", "embeddings.tables.author.num_embeddings=424241",
                        "sharding.sharding_types=[table_wise]"])
    with pytest.raises(PlanDoesNotFitError, match=r"torchrec's planner found no placement(.|\n)*largest of 3 tables: user"):
        plan_report(cfg)


def test_topology_values_are_checked():
    from recap_embed.config import ConfigValidationError
    from recap_embed.plan import plan_report

    with pytest.raises(ConfigValidationError, match=r"topology\.local_world_size: 3 is not allowed"):
        plan_report(compose_plan(["topology.world_size=8", "topology.local_world_size=3"]))
    with pytest.raises(ConfigValidationError, match=r"row_wise needs CUDA"):
        plan_report(compose_plan(["topology.compute_device=cpu", "sharding=row_wise"]))


# --------------------------------------------------------------------------- plan file round trip


def _shard_with_plan_file(rank: int, world_size: int, embeddings: Dict[str, Any], plan_file: str) -> Dict[str, Any]:
    from recap_embed.distributed import describe_plan, plan_placements, shard
    from recap_embed.modules import LargeEmbeddings

    model = shard(LargeEmbeddings.from_config(embeddings), {"device": "cpu", "plan_file": plan_file})
    return {
        "placements": {k: (p.sharding_type.value, p.compute_kernel.value, list(p.ranks)) for k, p in plan_placements(model).items()},
        "shards": {r["key"]: r["shards"] for r in describe_plan(model)},
    }


@pytest.mark.slow
def test_cli_plan_file_reproduces_the_plan_in_a_two_rank_run(tmp_path):
    from recap_embed.distributed import load_plan_file
    from recap_embed.plan import plan_report

    run_dir = tmp_path / "run"
    out = run_cli(*ROUND_TRIP, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert "critical path" in out.stdout and "Successfully loaded" not in out.stdout + out.stderr
    assert (run_dir / "plan.txt").read_text().strip() in out.stdout
    planned = load_plan_file(run_dir / "plan.json")
    assert planned.world_size == 2 and planned.device_type == "cpu"
    want = {k: (p.sharding_type.value, p.compute_kernel.value, list(p.ranks)) for k, p in planned.tables.items()}
    assert want["tweet"][0] == "column_wise" and len(want["tweet"][2]) == 2  # 256 columns in two shards of 128
    assert want["author"][0] == "data_parallel"

    # The same plan in-process (the planner is deterministic), with its shards.
    cfg = compose_plan(ROUND_TRIP)
    report = plan_report(cfg)
    assert {k: (p.sharding_type.value, p.compute_kernel.value, list(p.ranks)) for k, p in report.placements.items()} == want

    embeddings = OmegaConf.to_container(cfg.embeddings, resolve=True)
    results = run_ranks(_shard_with_plan_file, 2, embeddings, str(run_dir / "plan.json"), timeout=180)
    for r in results:
        assert r["placements"] == want
        for t in report.tables:
            if t.sharding_type != "data_parallel":
                assert r["shards"][t.key] == [list(s) for s in t.shards]


# --------------------------------------------------------------------------- CLI


def test_cli_help_lists_the_topology_fields(tmp_path):
    out = run_cli("--help", cwd=tmp_path)
    for name in ("world_size", "local_world_size", "compute_device", "hbm_cap_gb", "ddr_cap_gb", "batch_size", "pooling_factor"):
        assert f"topology.{name}" in out.stdout
    assert "recap-embed-plan" in out.stdout


def test_cli_does_not_fit_exits_2_without_traceback(tmp_path):
    out = run_cli("topology.world_size=2", "topology.compute_device=cpu", "topology.ddr_cap_gb=0.001",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, expect=2)
    text = out.output
    assert "Traceback" not in text
    assert "the tables do not fit on 2 cpu ranks" in text and "user (424,241 × 4 fp32" in text
    assert not (tmp_path / "run" / "plan.json").exists()
