"""Vocab lookups: ``Vocab.map`` vs. pandas ``Index.get_indexer`` and other tools, on the same data.

A vocab of N entries (distinct sparse 64-bit ids, rows a random permutation) maps N query ids
drawn from it (uniform, with repeats). Two cases: every id known (``oov_policy=error``), and 1%
unknown ids (``oov_policy=default_row``; pandas: ``get_indexer`` then the -1s replaced). The
pandas side includes the row gather (``rows[index.get_indexer(q)]``), so both produce rows;
its hash table is built before timing (pandas builds it lazily on the first lookup), and
`setup` records that build time. Calls are interleaved (ours, pandas, ours, ...).

Other arms, for the record of what was tried: ``previous`` (the sorted-array ``Vocab.map`` this
replaced: sort the queries, binary-search the sorted ids, unsort), ``pyarrow_index_in``
(``pyarrow.compute.index_in`` with the vocab as value set: it builds its hash table on every
call, which is counted, as a caller would pay it), ``ours_2_threads`` (``threads=2``).

Memory per entry: ``Vocab.nbytes`` and the RSS growth of `Vocab.load` of a parquet vocab of the
same entries (what an app does), vs. pandas ``Index.memory_usage()`` with its hash table.

pandas is an optional benchmark dependency (``pip install pandas``), never a project requirement;
without it only our side is measured and the JSON says so.

    python benchmarks/bench_vocab.py --out benchmarks/results/vocab.json
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, parser, rss_bytes, set_threads, summary, write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recap_embed.io.vocab import Vocab, hash_ids, save_vocab  # noqa: E402


def load_in_child(directory: Path, warmup: Path) -> Dict[str, Any]:
    """`Vocab.load` in a fresh process: RSS before, after, and peak (no allocator history).

    A tiny vocab is loaded first so that lazily imported modules are not counted.
    """
    code = (
        "import json, sys, time; sys.path.insert(0, sys.argv[2]);"
        "from _common import rss_bytes, peak_rss_bytes, reset_peak_rss;"
        "from recap_embed.io.vocab import Vocab; import gc;"
        "Vocab.load(sys.argv[3], table='warmup', num_embeddings=None, oov_policy='error'); gc.collect();"
        "base = rss_bytes(); reset_peak_rss(); t0 = time.perf_counter();"
        "v = Vocab.load(sys.argv[1], table='bench', num_embeddings=None, oov_policy='error');"
        "s = time.perf_counter() - t0;"
        "print(json.dumps({'entries': len(v), 'nbytes': v.nbytes, 'base': base, 'after': rss_bytes(), 'peak': peak_rss_bytes(), 'seconds': s}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(directory), str(Path(__file__).resolve().parent), str(warmup)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def previous_map(ids: torch.Tensor, rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The sorted-array ``Vocab.map`` before the hash table (known ids only): sort the batch,
    ``searchsorted`` the sorted vocab ids, gather, check, put back in input order."""
    order_v = torch.argsort(ids)
    vi, vr = ids[order_v].contiguous(), rows[order_v].contiguous()

    def fn(q: torch.Tensor) -> torch.Tensor:
        keys, order = torch.sort(q)
        pos = torch.searchsorted(vi, keys).clamp_(max=vi.numel() - 1)
        out = vr[pos]
        if bool((vi[pos] != keys).any()):
            raise KeyError("unknown ids")
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted

    return fn


def pyarrow_index_in(ids: torch.Tensor, rows: torch.Tensor) -> Callable[[torch.Tensor], np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc

    value_set = pa.array(ids.numpy())
    rows_np = rows.numpy()

    def fn(q: torch.Tensor) -> np.ndarray:
        pos = pc.index_in(pa.array(q.numpy()), value_set=value_set).to_numpy(zero_copy_only=False)
        return rows_np[pos.astype(np.int64)]

    return fn


def main() -> None:
    p = parser(__doc__.split("\n\n")[0], threads=True)
    p.add_argument("--entries", type=int, default=10_000_000)
    p.add_argument("--queries", type=int, default=10_000_000)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    set_threads(args.threads)
    n, q, reps = (100_000, 100_000, 2) if args.quick else (args.entries, args.queries, args.reps)
    try:
        import pandas as pd
    except ImportError:
        pd = None
    result: Dict[str, Any] = {
        "benchmark": "vocab",
        "machine": {**machine(), "torch_threads": torch.get_num_threads(), "pandas": getattr(pd, "__version__", None),
                    "numpy": np.__version__},
        "quick": args.quick,
        "setup": {"entries": n, "queries": q, "reps": reps, "ids": "splitmix64 of 0..N-1 (sparse 64-bit), queries uniform over them"},
    }
    gen = torch.Generator().manual_seed(0)
    ids = hash_ids(torch.arange(n, dtype=torch.int64) + (5 << 40))
    rows = torch.randperm(n, generator=gen)
    queries = ids[torch.randint(0, n, (q,), generator=gen)]
    unknown = hash_ids(torch.arange(q, dtype=torch.int64) + (9 << 40))
    mixed = torch.where(torch.rand(q, generator=gen) < 0.01, unknown, queries)

    # Memory: load a parquet vocab of the same entries, here and in a fresh process.
    tmp = Path(tempfile.mkdtemp(prefix="recap_bench_vocab_"))
    try:
        save_vocab(tmp / "v", ids, rows, num_files=4)
        save_vocab(tmp / "tiny", ids[:1000], rows[:1000])
        if args.quick:  # no second process: the memory numbers of a quick run mean nothing anyway
            base, t0 = rss_bytes(), time.perf_counter()
            vocab = Vocab.load(tmp / "v", table="bench", num_embeddings=None, oov_policy="error")
            child = {"base": base, "after": rss_bytes(), "peak": rss_bytes(), "seconds": time.perf_counter() - t0}
        else:
            child = load_in_child(tmp / "v", tmp / "tiny")
            vocab = Vocab.load(tmp / "v", table="bench", num_embeddings=None, oov_policy="error")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    vocab_oov = Vocab(ids, rows, table="bench_oov", oov_policy="default_row")
    memory: Dict[str, Any] = {
        "ours_nbytes_per_entry": vocab.nbytes / n,
        "ours_rss_growth_per_entry_after_load": (child["after"] - child["base"]) / n,
        "ours_peak_rss_growth_per_entry_during_load": (child["peak"] - child["base"]) / n,
        "ours_load_seconds": child["seconds"],
    }

    fns: Dict[str, Callable[[], Any]] = {
        "ours": lambda: vocab.map(queries, threads=1),
        "ours_1pct_oov": lambda: vocab_oov.map(mixed, threads=1),
        "ours_2_threads": lambda: vocab.map(queries, threads=2),
    }
    previous = previous_map(ids, rows)
    fns["previous"] = lambda: previous(queries)
    arrow = pyarrow_index_in(ids, rows)
    fns["pyarrow_index_in"] = lambda: arrow(queries)
    checks: Dict[str, Any] = {
        "previous_same_rows": bool(torch.equal(previous(queries), fns["ours"]())),
        "pyarrow_same_rows": bool(np.array_equal(arrow(queries), fns["ours"]().numpy())),
        "two_threads_same_rows": bool(torch.equal(fns["ours_2_threads"](), fns["ours"]())),
    }
    if pd is not None:
        ids_np, rows_np = ids.numpy(), rows.numpy()
        q_np, m_np = queries.numpy(), mixed.numpy()
        gc.collect()
        base = rss_bytes()
        t0 = time.perf_counter()
        index = pd.Index(ids_np)
        index.get_indexer(q_np[:10])  # builds the hash table
        build_s = time.perf_counter() - t0
        pandas_rss = rss_bytes() - base
        oov_row = int(rows_np.max()) + 1

        def pandas_map() -> np.ndarray:
            return rows_np[index.get_indexer(q_np)]

        def pandas_map_oov() -> np.ndarray:
            pos = index.get_indexer(m_np)
            out = rows_np[pos]
            out[pos < 0] = oov_row
            return out

        fns["pandas"] = pandas_map
        fns["pandas_1pct_oov"] = pandas_map_oov
        memory["pandas_memory_usage_per_entry"] = index.memory_usage(deep=True) / n
        memory["pandas_rss_growth_per_entry"] = pandas_rss / n
        memory["pandas_index_build_seconds"] = build_s
        checks["same_rows"] = bool(np.array_equal(fns["ours"]().numpy(), pandas_map()))
        checks["same_rows_oov"] = bool(np.array_equal(fns["ours_1pct_oov"]().numpy(), pandas_map_oov()))
        if not (checks["same_rows"] and checks["same_rows_oov"]):
            raise SystemExit("ours and pandas disagree on the rows")
    else:
        result["pandas_missing"] = "pandas is not installed: pip install pandas (optional benchmark dependency)"
    if not all(checks.values()):
        raise SystemExit(f"the arms disagree on the rows: {checks}")

    times = interleaved(fns, reps=reps, warmup=1)
    stats = {k: summary(v) for k, v in times.items()}
    ids_per_s = {k: q / s["median"] for k, s in stats.items()}
    result["seconds"] = stats
    result["ids_per_second"] = ids_per_s
    result["memory"] = memory
    result["checks"] = checks
    if pd is not None:
        result["ratios"] = {
            "ours_over_pandas_ids_per_s": ids_per_s["ours"] / ids_per_s["pandas"],
            "ours_over_pandas_ids_per_s_1pct_oov": ids_per_s["ours_1pct_oov"] / ids_per_s["pandas_1pct_oov"],
            "ours_2_threads_over_pandas_ids_per_s": ids_per_s["ours_2_threads"] / ids_per_s["pandas"],
            "previous_over_pandas_ids_per_s": ids_per_s["previous"] / ids_per_s["pandas"],
            "pyarrow_index_in_over_pandas_ids_per_s": ids_per_s["pyarrow_index_in"] / ids_per_s["pandas"],
            "pandas_bytes_per_entry_over_ours": memory["pandas_memory_usage_per_entry"] / memory["ours_nbytes_per_entry"],
        }
        result["targets"] = {"ours_ge_2x_pandas": result["ratios"]["ours_over_pandas_ids_per_s"] >= 2.0,
                             "memory_le_16_bytes_per_entry": memory["ours_nbytes_per_entry"] <= 16.0 + 1e-3}
    for k, v in ids_per_s.items():
        print(f"{k:18s} {v / 1e6:8.2f} M ids/s  (median {stats[k]['median']:.3f} s)")
    print("memory:", {k: round(v, 2) for k, v in memory.items()})
    if "ratios" in result:
        print("ratios:", {k: round(v, 3) for k, v in result["ratios"].items()})
    write_json(args.out, result)


if __name__ == "__main__":
    main()
