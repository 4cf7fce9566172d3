"""Config cost vs. number of tables: compose + validate + meta instantiate, 10 to 3,000 tables.

For each count N an inline preset ``embeddings/bench_N.yaml`` (all tables in one file, the
layout that composes fastest for large presets: one YAML to parse instead of one per table) and a primary config selecting it are written to a
temp dir; then, timed separately:

* compose: ``hydra.initialize_config_dir`` + ``hydra.compose`` (the groups come from
  ``import recap_embed.config`` and recap_embed's search-path plugin), GlobalHydra cleared each time;
* validate: ``recap_embed.config.validate(cfg, device="cpu")``;
* instantiate: ``recap_embed.instantiate(cfg.embeddings)`` -> `LargeEmbeddings` on meta.

Counts are interleaved round by round (10, 100, 1000, 3000, 10, ...); medians are reported, a
straight line is fitted to log(time) vs log(N) (slope 1 = linear), and the log-log plot is
written to ``benchmarks/table_count.png``. Each round also composes the same tables written as an
open mapping (a preset without the typed schema), ``compose_open``: what the types cost.

``--profile N`` (default 1000) then says where typed compose time goes: a stack-sampling profile of
one compose of N tables, each sample charged to the first of a few OmegaConf/Hydra activities on its
stack (building a typed node from its dataclass, deep copies, YAML parsing, merging, ...), a cProfile
table of the top functions, and micro-timings of one typed table node (built, copied, merged).

    python benchmarks/bench_table_count.py --out benchmarks/results/table_count.json
"""

from __future__ import annotations

import gc
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parser, summary, write_inline_preset, write_json  # noqa: E402

PHASES = ("compose", "validate", "instantiate")
TARGETS = {1000: 1.0, 3000: 3.0}  # seconds, total
#: issue 11: typed compose + validate (no instantiate)
TYPED_TARGETS = {1000: 2.0, 3000: 6.0}


def write_configs(conf: Path, n: int) -> str:
    write_inline_preset(conf, f"bench_{n}", n, writer="bench_table_count.py")
    name = f"primary_{n}"
    (conf / f"{name}.yaml").write_text(f"defaults:\n  - embeddings: bench_{n}\n  - sharding: cpu\n  - _self_\n")
    return name


def write_open_configs(conf: Path, n: int) -> str:
    """The same tables, in a preset without the typed schema: `embeddings.tables` is an open mapping."""
    lines = ["# written by benchmarks/bench_table_count.py (no schema: an open mapping)", "defaults:", "  - optimizer: sgd",
             "  - _self_", "", "embedding_dim: 16", "tables:"]
    for i in range(n):
        lines += [f"  t{i:04d}:", f"    num_embeddings: {1000 + i}"]
    (conf / "embeddings" / f"open_{n}.yaml").write_text("\n".join(lines) + "\n")
    name = f"primary_open_{n}"
    (conf / f"{name}.yaml").write_text(f"defaults:\n  - embeddings: open_{n}\n  - sharding: cpu\n  - _self_\n")
    return name


def fit_slope(xs: List[float], ys: List[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def plot(counts: List[int], med: Dict[int, Dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for phase in (*PHASES, "total", "compose_validate", "compose_open"):
        style = {"linestyle": "--"} if phase == "compose_open" else {}
        ax.plot(counts, [med[n][phase] for n in counts], marker="o", label=phase.replace("compose_open", "compose (open mapping)"),
                linewidth=2.2 if phase == "total" else 1.2, **style)
    ref = med[counts[-1]]["total"]
    ax.plot(counts, [ref * n / counts[-1] for n in counts], linestyle=":", color="grey", label="linear (slope 1)")
    goals = [(n, TARGETS[n]) for n in counts if n in TARGETS]
    if goals:
        ax.plot([g[0] for g in goals], [g[1] for g in goals], linestyle="none", marker="x", markersize=10,
                color="red", label="target (total)")
    typed_goals = [(n, TYPED_TARGETS[n]) for n in counts if n in TYPED_TARGETS]
    if typed_goals:
        ax.plot([g[0] for g in typed_goals], [g[1] for g in typed_goals], linestyle="none", marker="+", markersize=12,
                color="purple", label="target (compose_validate)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tables")
    ax.set_ylabel("seconds (median)")
    ax.set_title("typed compose + validate + meta instantiate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def instantiate_breakdown(cfg: Any, reps: int) -> Dict[str, Any]:
    """Where `instantiate(cfg.embeddings)` spends its time, and what three changes would save.

    Replays the steps of ``LargeEmbeddings.__init__`` one by one (it calls private helpers of
    recap_embed.modules.large, so it may need updating when those change). The ``what_if_*`` rows
    are measurements of alternatives, not library code.
    """
    import torch
    from omegaconf import OmegaConf
    from torchrec import EmbeddingBagCollection

    from recap_embed.config import LargeEmbeddingsConfig, table_specs, validate
    from recap_embed.config.convert import from_mapping
    from recap_embed import instantiate
    from recap_embed.modules.large import _no_init_on_meta, torchrec_config

    def med(fn: Any) -> Any:
        ts, out = [], None
        for _ in range(reps):
            gc.collect()
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        return summary(ts)["median"], out

    meta = torch.device("meta")
    out: Dict[str, Any] = {}
    out["instantiate_total"], _ = med(lambda: instantiate(cfg.embeddings))
    t, values = med(lambda: OmegaConf.to_container(cfg.embeddings, resolve=True))
    out["to_container"] = t
    values.pop("_target_", None)
    out["validate(values)"], _ = med(lambda: validate(values, device="meta"))
    out["table_specs(values)"], specs = med(lambda: table_specs(values, prefix="embeddings"))
    out["from_mapping (typing, inside both)"], _ = med(lambda: from_mapping(LargeEmbeddingsConfig, dict(values), "embeddings", []))
    configs = [torchrec_config(s) for s in specs]
    out["torchrec EBC on meta (with init)"], _ = med(lambda: EmbeddingBagCollection(tables=configs, device=meta))

    def ebc_no_meta_init() -> Any:
        with _no_init_on_meta():
            return EmbeddingBagCollection(tables=configs, device=meta)

    out["torchrec EBC on meta (as LargeEmbeddings builds it: no init on meta)"], _ = med(ebc_no_meta_init)
    return out


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="10,100,1000,3000")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent / "table_count.png")
    p.add_argument("--skip-instantiate", action="store_true",
                   help="time compose and validate only (the typed-config figures of issue 11), no instantiate, no breakdown")
    p.add_argument("--profile", type=int, default=1000, metavar="N",
                   help="profile one typed compose of N tables (0: skip; --quick uses the largest count)")
    args = p.parse_args()
    counts = [10, 30, 100] if args.quick else [int(c) for c in args.counts.split(",")]
    reps = 1 if args.quick else args.reps

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import recap_embed.config  # noqa: F401  (registers the groups)
    from recap_embed.config import validate
    from recap_embed import instantiate

    import torch  # noqa: F401  (imported up front: its import is not a per-table cost)
    import recap_embed.modules  # noqa: F401

    tmp = Path(tempfile.mkdtemp(prefix="recap_bench_tables_"))
    try:
        names = {n: write_configs(tmp, n) for n in counts}
        open_names = {n: write_open_configs(tmp, n) for n in counts}

        def compose_only(name: str) -> Any:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(tmp), version_base=None):
                return compose(config_name=name)

        def pipeline(n: int) -> Dict[str, float]:
            GlobalHydra.instance().clear()
            t0 = time.perf_counter()
            with initialize_config_dir(config_dir=str(tmp), version_base=None):
                cfg = compose(config_name=names[n])
            t1 = time.perf_counter()
            validate(cfg, device="cpu")
            t2 = time.perf_counter()
            if not args.skip_instantiate:
                model = instantiate(cfg.embeddings)
                assert len(model.specs) == n, (len(model.specs), n)
            t3 = time.perf_counter()
            t4 = time.perf_counter()
            open_cfg = compose_only(open_names[n])
            t5 = time.perf_counter()
            assert len(open_cfg.embeddings.tables) == n
            return {"compose": t1 - t0, "validate": t2 - t1, "instantiate": t3 - t2, "total": t3 - t0,
                    "compose_validate": t2 - t0, "compose_open": t5 - t4}

        pipeline(counts[0])  # warm-up (imports, plugin discovery)
        samples: Dict[int, List[Dict[str, float]]] = {n: [] for n in counts}
        for _ in range(reps):
            for n in counts:
                samples[n].append(pipeline(n))
                gc.collect()
        breakdown: Dict[str, Any] = {}
        for n in ([c for c in counts if c >= 1000] or counts[-1:]) if not args.skip_instantiate else []:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(tmp), version_base=None):
                cfg = compose(config_name=names[n])
            breakdown[str(n)] = instantiate_breakdown(cfg, reps=max(reps, 3) if not args.quick else 1)
        compose_profile: Dict[str, Any] = {}
        n_prof = counts[-1] if args.quick else args.profile
        if n_prof:
            from _compose_profile import profiled, sampled, table_node_costs

            from recap_embed.config import EmbeddingBagConfig, LargeEmbeddingsConfig

            if n_prof not in names:
                names[n_prof] = write_configs(tmp, n_prof)
            print(f"profiling typed compose of {n_prof} tables ...", flush=True)
            compose_only(names[n_prof])
            compose_profile = {
                "tables": n_prof,
                "sampled": sampled(lambda: compose_only(names[n_prof])),
                "cprofile": profiled(lambda: compose_only(names[n_prof])),
                "one_table": table_node_costs(EmbeddingBagConfig, LargeEmbeddingsConfig, reps=20 if args.quick else 200),
            }
    finally:
        GlobalHydra.instance().clear()
        shutil.rmtree(tmp, ignore_errors=True)

    keys = (*PHASES, "total", "compose_validate", "compose_open")
    med = {n: {k: summary([s[k] for s in samples[n]])["median"] for k in keys} for n in counts}
    big = [n for n in counts if n >= 100] or counts
    slopes = {
        "total_all_counts": fit_slope(counts, [med[n]["total"] for n in counts]),
        "total_counts_ge_100": fit_slope(big, [med[n]["total"] for n in big]) if len(big) > 1 else None,
        **{f"{k}_counts_ge_100": fit_slope(big, [med[n][k] for n in big]) if len(big) > 1 else None
           for k in (*PHASES, "compose_validate", "compose_open") if not (args.skip_instantiate and k == "instantiate")},
    }
    plot_path = args.plot
    if args.quick:
        plot_path = (args.out.with_suffix(".png") if args.out else Path(tempfile.gettempdir()) / "table_count_quick.png")
    plot(counts, med, plot_path)
    targets: Dict[str, Any] = {}
    for n, limit in TARGETS.items() if not args.skip_instantiate else []:
        if n in med:
            targets[f"{n}_tables_le_{limit:g}s"] = med[n]["total"] <= limit
    if slopes["total_counts_ge_100"] is not None and not args.skip_instantiate:
        targets["linear_growth_slope_le_1.15"] = slopes["total_counts_ge_100"] <= 1.15
    for n, limit in TYPED_TARGETS.items():
        if n in med:
            targets[f"typed_compose_validate_{n}_tables_le_{limit:g}s"] = med[n]["compose_validate"] <= limit
    if slopes["compose_validate_counts_ge_100"] is not None:
        targets["typed_compose_validate_slope_le_1.15"] = slopes["compose_validate_counts_ge_100"] <= 1.15
    result = {
        "benchmark": "table_count",
        "machine": machine(),
        "quick": args.quick,
        "setup": {"counts": counts, "reps": reps, "instantiate_timed": not args.skip_instantiate, "table_fields": ["num_embeddings"], "layout": "inline preset (one YAML file)",
                  "compose_open": "the same tables in a preset without the typed schema (compose only)"},
        "seconds_median": {str(n): med[n] for n in counts},
        "per_table_ms": {str(n): 1e3 * med[n]["total"] / n for n in counts},
        "typed_over_open_compose": {str(n): med[n]["compose"] / med[n]["compose_open"] for n in counts},
        "compose_profile": compose_profile,
        "loglog_slopes": slopes,
        "instantiate_breakdown_seconds": breakdown,
        "plot": str(plot_path.name if not args.quick else plot_path),
        "targets": targets,
    }
    print(f"{'tables':>7} " + " ".join(f"{k:>16}" for k in keys))
    for n in counts:
        print(f"{n:7d} " + " ".join(f"{med[n][k]:15.3f}s" for k in keys))
    for n, b in breakdown.items():
        print(f"instantiate breakdown, {n} tables:")
        for k, v in b.items():
            print(f"    {k:66s} {v:7.3f} s")
    print("log-log slopes:", {k: (round(v, 3) if v is not None else None) for k, v in slopes.items()})
    if compose_profile:
        sp = compose_profile["sampled"]
        print(f"typed compose of {compose_profile['tables']} tables, {sp['wall_seconds']:.2f} s, {sp['samples']} samples:")
        for k, v in sorted(sp["share"].items(), key=lambda kv: -kv[1]):
            print(f"    {100 * v:5.1f}%  {k}")
        for k, v in sp["deepcopy_share_by_caller"].items():
            print(f"           deepcopy from {k}: {100 * v:.1f}%")
        print("one typed table:", {k: round(v, 3) for k, v in compose_profile["one_table"].items()})
    print("targets:", targets)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
