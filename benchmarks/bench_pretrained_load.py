"""Warm-starting a 2 GB table: ``load_pretrained`` vs. a raw sequential read of the same bytes.

1. A child process writes one table (8M rows x 64 fp32 = 2.05 GB; ``--quick``: 1,000 x 16) with
   ``torchsnapshot.Snapshot.take(app_state={"model": ebc})`` of an unsharded torchrec
   ``EmbeddingBagCollection``; the values are a formula of (row, col), so loads can be checked.
2. Then, each in a FRESH process, interleaved round by round:
   * ``load``: the model as the training app builds it (``instantiate`` -> `LargeEmbeddings` with
     ``pretrained`` set -> ``shard`` on CPU), then ``recap_embed.io.pretrained.load_pretrained(model,
     specs)`` with the library's defaults (streaming into the weights, the next block read while
     the current one is copied) is timed; peak RSS above the process's baseline (taken after the
     model's own weights exist) is recorded, and rows are checked against the formula;
   * ``load_no_read_ahead``: streaming without the background read (``READ_AHEAD = False``): what
     the training app did before;
   * ``load_staging``: ``staging=True`` (a staging copy of the table first; the library's
     previous default, now with the read-ahead);
   * ``raw``: plain ``readinto`` of the snapshot's data files into a reused 64 MiB buffer.
   Each is run warm (files in the page cache, as after the write) and cold (the files evicted
   with ``posix_fadvise(DONTNEED)`` before the run; dropping the whole page cache needs root,
   and the virtual disk below may still cache).
3. GB/s = table bytes / seconds; ratio = load GB/s / raw GB/s. Files are deleted at the end.

    python benchmarks/bench_pretrained_load.py --out benchmarks/results/pretrained_load.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, parser, peak_rss_bytes, reset_peak_rss, rss_bytes, summary, write_json  # noqa: E402

MOD = 65521
CHUNK = 64 * 1024 * 1024


def data_files(snapshot: Path) -> List[Path]:
    return sorted(p for p in snapshot.rglob("*") if p.is_file() and p.name != ".snapshot_metadata")


# --------------------------------------------------------------------------- children


def child_write(directory: str, rows: int, dim: int) -> Dict[str, Any]:
    import torch
    import torchsnapshot
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(num_embeddings=rows, embedding_dim=dim, name="t0", feature_names=["t0"])],
        device=torch.device("meta"),
    )
    ebc = ebc.to_empty(device=torch.device("cpu"))
    w = ebc.embedding_bags["t0"].weight
    block = max(1, (1 << 22) // dim)
    with torch.no_grad():
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            idx = torch.arange(r0 * dim, r1 * dim, dtype=torch.int64) % MOD
            w[r0:r1].copy_(idx.to(torch.float32).view(r1 - r0, dim))
    t0 = time.perf_counter()
    torchsnapshot.Snapshot.take(path=directory, app_state={"model": ebc})
    seconds = time.perf_counter() - t0
    manifest = torchsnapshot.Snapshot(path=directory).get_manifest()
    return {"take_seconds": seconds, "manifest_keys": sorted(k for k in manifest if "t0" in k)}


LOAD_MODES = ("default", "no_read_ahead", "staging")


def child_load(directory: str, rows: int, dim: int, mode: str, profile: bool = False) -> Dict[str, Any]:
    import logging

    import torch
    from omegaconf import OmegaConf

    from recap_embed.distributed import shard
    import recap_embed.io.shard_copy as shard_copy
    from recap_embed import instantiate
    from recap_embed.io.pretrained import load_pretrained

    if mode == "no_read_ahead":
        shard_copy.READ_AHEAD = False
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    cfg = OmegaConf.create({
        "embeddings": {
            "_target_": "recap_embed.modules.LargeEmbeddings",
            "embedding_dim": dim,
            "optimizer": {"algorithm": "sgd", "init_learning_rate": 0.01},
            "tables": {"t0": {"num_embeddings": rows, "pretrained": {"embedding_snapshot_uri": directory, "emb_name": "t0"}}},
        },
        "sharding": {"device": "cpu"},
    })
    large = instantiate(cfg.embeddings)
    model = shard(large, cfg.sharding, device="cpu")
    base = rss_bytes()
    reset_ok = reset_peak_rss()
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    reports = load_pretrained(model, large.specs, **({"staging": True} if mode == "staging" else {}))
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    top = None
    if prof is not None:
        import pstats

        prof.disable()
        st = pstats.Stats(prof)
        rows_ = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]  # by own (tottime) time
        top = [{"function": f"{Path(fn).name}:{line}({name})", "calls": cc, "own_seconds": tt, "cumulative_seconds": ct}
               for (fn, line, name), (cc, nc, tt, ct, callers) in rows_]
    # Check rows against the formula (first, middle, last).
    weight = [v for k, v in model.state_dict().items() if k.endswith("embedding_bags.t0.weight")][0]
    local = weight.local_shards()[0].tensor if hasattr(weight, "local_shards") else weight
    ok = True
    for r in (0, rows // 2, rows - 1):
        expect = (torch.arange(r * dim, (r + 1) * dim, dtype=torch.int64) % MOD).to(torch.float32)
        ok &= bool(torch.equal(local[r], expect))
    report = reports["t0"]
    return {
        "seconds": seconds, "report_seconds": report.seconds, "bytes_read": report.bytes_read,
        "base_rss": base, "peak_rss": peak, "peak_reset_worked": reset_ok, "values_ok": ok,
        "source_entry": report.source_entry, "profile_top_own_time": top,
    }


def child_raw(directory: str) -> Dict[str, Any]:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    files = data_files(Path(directory))
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return {"seconds": time.perf_counter() - t0, "bytes": total, "files": len(files)}


def run_child(*args: str) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evict(files: List[Path]) -> bool:
    """Drop the files' pages from the page cache (clean pages only; the write was synced)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


# --------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "write":
            out = child_write(rest[0], int(rest[1]), int(rest[2]))
        elif kind == "load":
            out = child_load(rest[0], int(rest[1]), int(rest[2]), rest[3], len(rest) > 4 and rest[4] == "profile")
        else:
            out = child_raw(rest[0])
        print(json.dumps(out))
        return

    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where to write the snapshot (default: a temp dir)")
    p.add_argument("--profile", action="store_true", help="one more warm load under cProfile: where its time goes")
    args = p.parse_args()
    rows, dim, reps = (1000, 16, 1) if args.quick else (args.rows, args.dim, args.reps)
    table_bytes = rows * dim * 4
    parent = args.dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < 2.5 * table_bytes:
        raise SystemExit(f"not enough disk space in {parent}: {free / 1e9:.1f} GB free, need {2.5 * table_bytes / 1e9:.1f} GB")
    tmp = Path(tempfile.mkdtemp(prefix="recap_bench_pretrained_", dir=parent))
    snap = tmp / "snapshot"
    try:
        written = run_child("write", str(snap), str(rows), str(dim))
        os.sync()
        files = data_files(snap)
        file_bytes = sum(f.stat().st_size for f in files)
        arms = {
            "load": ("load", str(snap), str(rows), str(dim), "default"),
            "load_no_read_ahead": ("load", str(snap), str(rows), str(dim), "no_read_ahead"),
            "load_staging": ("load", str(snap), str(rows), str(dim), "staging"),
            "raw": ("raw", str(snap)),
        }
        loaders = [name for name in arms if name != "raw"]
        caches = ("warm",) if args.quick else ("warm", "cold")
        if args.quick:
            del arms["load_no_read_ahead"]
            loaders.remove("load_no_read_ahead")
        samples: Dict[str, Dict[str, List[Dict[str, Any]]]] = {c: {k: [] for k in arms} for c in caches}
        evict_ok = True
        for _ in range(reps):
            for cache in caches:
                if cache == "warm":
                    child_raw(str(snap))  # (re)fill the page cache after a cold round
                for name, child_args in arms.items():
                    if cache == "cold":
                        evict_ok &= evict(files)
                    samples[cache][name].append(run_child(*child_args))
        profile = None
        if args.profile:
            child_raw(str(snap))
            prof_run = run_child("load", str(snap), str(rows), str(dim), "default", "profile")
            profile = {"seconds_under_cprofile": prof_run["seconds"], "top_own_time": prof_run["profile_top_own_time"]}
        results: Dict[str, Any] = {}
        for cache, by_arm in samples.items():
            med = {name: summary([s["seconds"] for s in runs])["median"] for name, runs in by_arm.items()}
            gbs = {name: table_bytes / 1e9 / m for name, m in med.items()}
            loads = [s for name in loaders for s in by_arm.get(name, [])]
            if not all(s["values_ok"] for s in loads):
                raise SystemExit("loaded values differ from the snapshot's")
            peak_over = {name: max(s["peak_rss"] - s["base_rss"] for s in by_arm[name]) for name in loaders}
            results[cache] = {
                "seconds": {name: summary([s["seconds"] for s in runs]) for name, runs in by_arm.items()},
                "gb_per_s": gbs,
                "ratio_load_over_raw": gbs["load"] / gbs["raw"],
                "ratio_over_raw": {name: gbs[name] / gbs["raw"] for name in loaders},
                "peak_rss_over_baseline_bytes": peak_over,
                "peak_rss_over_table_bytes": {k: v / table_bytes for k, v in peak_over.items()},
                "bytes_read_by_loader": by_arm["load"][0]["bytes_read"],
            }
        warm = results["warm"]
        result = {
            "benchmark": "pretrained_load",
            "machine": machine(),
            "quick": args.quick,
            "setup": {"rows": rows, "dim": dim, "dtype": "fp32", "table_bytes": table_bytes, "reps": reps,
                      "snapshot_files": len(files), "snapshot_data_bytes": file_bytes, "take_seconds": written["take_seconds"],
                      "manifest_keys": written["manifest_keys"], "disk_free_bytes_before": free,
                      "cold_eviction": "posix_fadvise(DONTNEED) per file" if evict_ok else "unavailable",
                      "source_entry": samples["warm"]["load"][0]["source_entry"],
                      "peak_reset_worked": samples["warm"]["load"][0]["peak_reset_worked"]},
            "results": results,
            "profile_load_warm": profile,
            "targets": {
                "cold_load_ge_0.9x_raw": results["cold"]["ratio_load_over_raw"] >= 0.9 if "cold" in results else None,
                "peak_rss_le_1.1x_table": max(r["peak_rss_over_table_bytes"]["load"] for r in results.values()) <= 1.1,
            },
        }
        for cache, r in results.items():
            print(f"[{cache}] GB/s: " + ", ".join(f"{k} {v:.2f}" for k, v in r["gb_per_s"].items())
                  + " | over raw: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratio_over_raw"].items())
                  + " | peak RSS / table bytes: " + ", ".join(f"{k} {v:.2f}" for k, v in r["peak_rss_over_table_bytes"].items()))
        write_json(args.out, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
