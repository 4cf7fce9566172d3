"""Examples for the training app: the synthetic click log with planted structure, and batches.

The synthetic log's columns: `user_id`, `item_id` (raw int64 ids, mapped to rows by each table's
vocab), the discrete features `country`, `device`, `hour` (small ints) and `click` (0/1). Every
split, synthetic or your own, is read and checked by `recap_embed.train.own_data`.

The synthetic log plants what the model should find: users and items have their own click
propensity and hidden factors, and a click is likelier when the factors align; country, device
and hour shift the click rate. Raw ids
are sparse 64-bit values, so they only make sense through the generated parquet vocabs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recap_embed.io.vocab import hash_ids, save_vocab

from .fingerprint import DATA_FINGERPRINT, check_data_fingerprint, data_fingerprint

LABEL = "click"


@dataclass
class Examples:
    """One split in memory: raw ids, discrete features [N, F] and labels."""

    user_ids: torch.Tensor  # int64 [N]
    item_ids: torch.Tensor  # int64 [N]
    discrete: torch.Tensor  # int64 [N, F]: codes of the discrete columns (own_data.DiscreteCodes)
    clicks: torch.Tensor  # float32 [N]

    def __len__(self) -> int:
        return int(self.clicks.numel())


@dataclass
class Batch:
    """What one rank trains on in one step."""

    sparse: KeyedJaggedTensor  # features `user`, `item`: raw ids, one per example
    discrete: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.sparse.to(device), self.discrete.to(device), self.labels.to(device))


# --------------------------------------------------------------------------- synthetic


def _raw_ids(n: int, salt: int) -> np.ndarray:
    """n distinct sparse 64-bit ids (splitmix64 is a bijection, so distinct inputs stay distinct)."""
    return hash_ids(torch.arange(n, dtype=torch.int64) + (salt << 40)).numpy()


def generate_synthetic(out_dir: Path, cfg, seed: int) -> Path:
    """Write train.parquet, eval.parquet and vocab/{user,item}/ into `out_dir`, atomically.

    `cfg` is the `data.synthetic` section. Deterministic per (cfg, seed). If `out_dir` is
    already complete it is reused (a second process waiting on the same dir sees it whole).
    """
    out_dir = Path(out_dir)
    fingerprint = data_fingerprint(cfg, seed)
    if (out_dir / "COMPLETE").exists():
        check_data_fingerprint(out_dir, fingerprint)  # reused only with the settings that made it
        return out_dir
    rng = np.random.default_rng(seed)
    users, items, k = cfg.num_users, cfg.num_items, cfg.num_factors
    user_factors = rng.normal(size=(users, k)) / np.sqrt(k)
    item_factors = rng.normal(size=(items, k)) / np.sqrt(k)
    user_bias = rng.normal(scale=cfg.bias, size=users)  # how click-happy each user is
    item_bias = rng.normal(scale=cfg.bias, size=items)  # how clickable each item is
    user_country = rng.integers(0, cfg.num_countries, users)
    country_bias = rng.normal(scale=0.5, size=cfg.num_countries)
    device_bias = np.linspace(-0.6, 0.6, cfg.num_devices)
    hour_bias = 0.4 * np.sin(np.arange(cfg.num_hours) / cfg.num_hours * 2 * np.pi)
    item_pop = 1.0 / (np.arange(items) + 20.0) ** 0.8
    item_pop /= item_pop.sum()
    user_raw, item_raw = _raw_ids(users, 1 + seed), _raw_ids(items, 1_000 + seed)

    def split(n: int, unknown_rate: float, oracle: Optional[dict] = None) -> pa.Table:
        u = rng.integers(0, users, n)
        i = rng.choice(items, size=n, p=item_pop)
        device = rng.integers(0, cfg.num_devices, n)
        hour = rng.integers(0, cfg.num_hours, n)
        country = user_country[u]
        affinity = np.einsum("nk,nk->n", user_factors[u], item_factors[i]) * np.sqrt(k)
        logit = cfg.signal * affinity + user_bias[u] + item_bias[i] + country_bias[country] + device_bias[device] + hour_bias[hour] - 0.5
        click = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
        if oracle is not None:  # the AUC of the true click probability: the best any model can do
            from torchmetrics.functional.classification import binary_auroc

            oracle["eval_auroc"] = float(binary_auroc(torch.from_numpy(logit), torch.from_numpy(click).long()))
        user_id = user_raw[u].copy()
        if unknown_rate > 0:  # ids no vocab has seen: new users at serving time
            unknown = rng.random(n) < unknown_rate
            user_id[unknown] = _raw_ids(int(unknown.sum()), 7_777 + seed)
        return pa.table(
            {
                "user_id": user_id,
                "item_id": item_raw[i],
                "country": country.astype(np.int64),
                "device": device.astype(np.int64),
                "hour": hour.astype(np.int64),
                LABEL: click.astype(np.int8),
            }
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        pq.write_table(split(cfg.num_train, 0.0), tmp / "train.parquet")
        oracle: dict = {}
        pq.write_table(split(cfg.num_eval, cfg.unknown_rate, oracle), tmp / "eval.parquet")
        (tmp / "oracle.json").write_text(json.dumps(oracle) + "\n")
        # Rows are a seeded permutation: nothing about a row index reveals the entity.
        save_vocab(tmp / "vocab" / "user", user_raw, rng.permutation(users))
        save_vocab(tmp / "vocab" / "item", item_raw, rng.permutation(items))
        (tmp / DATA_FINGERPRINT).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
        (tmp / "COMPLETE").write_text("ok\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data is for every rank and user
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished first: keep theirs
            if not (out_dir / "COMPLETE").exists():
                raise
            check_data_fingerprint(out_dir, fingerprint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- loading


def oracle_auroc(data_dir: Path) -> Optional[float]:
    """The eval AUC of the true click probabilities of a synthetic log (None for other data)."""
    path = Path(data_dir) / "oracle.json"
    return json.loads(path.read_text()).get("eval_auroc") if path.exists() else None


def batches(
    examples: Examples,
    global_batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    shuffle_seed: Optional[int] = None,
    drop_last: bool = True,
) -> Iterator[Batch]:
    """This rank's equal share of each global batch: rows [rank * B/W, (rank + 1) * B/W) of it.

    Shuffling permutes the split once per epoch, so each batch is a slice (no gather per step).
    Every rank gets the same number of batches, each non-empty: sharded lookups are collective,
    and a rank that skipped one would leave the others waiting. Without `drop_last` the last,
    smaller batch is split evenly too, dropping the fewer than `world_size` rows left over.
    """
    if global_batch_size % world_size:
        raise ValueError(f"batch size {global_batch_size} is not divisible by the {world_size} ranks")
    if shuffle_seed is not None:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(shuffle_seed))
        examples = Examples(examples.user_ids[order], examples.item_ids[order], examples.discrete[order], examples.clicks[order])
    n = len(examples)
    usable = n - n % global_batch_size if drop_last else n - n % world_size
    for start in range(0, usable, global_batch_size):
        share = (min(start + global_batch_size, usable) - start) // world_size
        lo = start + rank * share
        yield make_batch(examples, lo, lo + share)


def make_batch(examples: Examples, lo: int, hi: int) -> Batch:
    """Rows [lo, hi) as a batch: features `user` and `item`, one raw id (or row) per example."""
    b = hi - lo
    sparse = KeyedJaggedTensor(
        keys=["user", "item"],
        values=torch.cat([examples.user_ids[lo:hi], examples.item_ids[lo:hi]]),
        lengths=torch.ones(2 * b, dtype=torch.int32),
    )
    return Batch(sparse, examples.discrete[lo:hi], examples.clicks[lo:hi])


def num_batches(n: int, global_batch_size: int, drop_last: bool = True) -> int:
    return n // global_batch_size if drop_last else -(-n // global_batch_size)
