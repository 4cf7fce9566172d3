"""Instantiating a 1e12-parameter config on meta: time and memory.

20 tables x 400M rows x 128 (1.024e12 parameters, 4 TB of fp32) are built the way the training
app builds them: ``recap_embed.instantiate(cfg.embeddings)`` -> `LargeEmbeddings` on
``torch.device("meta")`` (validation, table specs, torchrec ``EmbeddingBagCollection``). The
reference is a bare torchrec ``EmbeddingBagCollection(device="meta")`` of the same tables.
Builds are interleaved (ours, torchrec, ours, ...); RSS growth is measured while one instance
is alive, after a small warm-up build (so lazy imports are not counted), and peak RSS during it.

    python benchmarks/bench_meta_instantiate.py --out benchmarks/results/meta_instantiate.json
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, parser, peak_rss_bytes, reset_peak_rss, rss_bytes, summary, write_json  # noqa: E402


def config(tables: int, rows: int, dim: int) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "embeddings": {
                "_target_": "recap_embed.modules.LargeEmbeddings",
                "embedding_dim": dim,
                "optimizer": {"algorithm": "rowwise_adagrad", "init_learning_rate": 0.01},
                "tables": {f"t{i:02d}": {"num_embeddings": rows} for i in range(tables)},
            }
        }
    )


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    tables, rows, dim, reps = (2, 1000, 8, 2) if args.quick else (20, 400_000_000, 128, args.reps)

    import torch
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from recap_embed import instantiate

    cfg = config(tables, rows, dim)
    meta = torch.device("meta")

    def ours() -> Any:
        return instantiate(cfg.embeddings)

    def torchrec_ebc() -> Any:
        return EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(num_embeddings=rows, embedding_dim=dim, name=f"t{i:02d}", feature_names=[f"t{i:02d}"])
                    for i in range(tables)],
            device=meta,
        )

    instantiate(config(1, 10, 8).embeddings)  # warm-up: lazy imports, caches
    torchrec_ebc()
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    model = ours()
    first_s = time.perf_counter() - t0
    held = rss_bytes() - base
    peak = peak_rss_bytes() - base
    params = sum(p.numel() for p in model.parameters())
    on_meta = all(p.is_meta for p in model.parameters())
    del model
    gc.collect()

    times = interleaved({"ours": ours, "torchrec_ebc": torchrec_ebc}, reps=reps, warmup=1, after=gc.collect)
    stats = {k: summary(v) for k, v in times.items()}
    result: Dict[str, Any] = {
        "benchmark": "meta_instantiate",
        "machine": machine(),
        "quick": args.quick,
        "setup": {"tables": tables, "rows": rows, "dim": dim, "parameters": params, "reps": reps,
                  "fp32_bytes_if_materialised": params * 4},
        "first_build_seconds": first_s,
        "seconds": stats,
        "rss_growth_bytes_held": held,
        "peak_rss_growth_bytes": peak,
        "all_parameters_on_meta": on_meta,
        "ratios": {"ours_over_torchrec_ebc": stats["ours"]["median"] / stats["torchrec_ebc"]["median"]},
        "targets": {"lt_1s": stats["ours"]["median"] < 1.0 and first_s < 1.0, "lt_100MB": max(held, peak) < 100e6},
    }
    print(f"{params:.3e} parameters on meta={on_meta}: first build {first_s * 1e3:.1f} ms, median {stats['ours']['median'] * 1e3:.1f} ms "
          f"(torchrec EBC alone {stats['torchrec_ebc']['median'] * 1e3:.1f} ms); RSS +{held / 1e6:.1f} MB held, +{peak / 1e6:.1f} MB peak")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
