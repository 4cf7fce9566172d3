"""MovieLens-100k as the training app's parquet: `python prepare.py --out data/ml-100k`.

Reads the atomic files RecBole 1.2.1 ships in its wheel (`recbole/dataset_example/ml-100k/`:
ml-100k.inter, .user, .item; GroupLens' MovieLens-100k in RecBole's tab-separated format) straight
from the zip, without installing RecBole. `--wheel` names a downloaded wheel; without it the script
runs `python -m pip download --no-deps recbole==1.2.1` into `--cache`.

Rows: the 100,000 ratings. Label `click` = rating >= 4. Columns: `user_id`, `item_id` (int64) and
five discrete features: `gender` (M/F), `age` (the lower bound of MovieLens-1M's age groups: 1, 18,
25, 35, 45, 50, 56), `occupation` (21 strings), `decade` (of the release year, e.g. 1990; null
for the two items whose year is not a number) and `genre` (the first of the item's genres). A
seeded random 80/20 split gives train.parquet and eval.parquet.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
RECBOLE = "recbole==1.2.1"
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)  # MovieLens-1M's: under 18, 18-24, 25-34, ..., 56+
DISCRETE = ["gender", "age", "occupation", "decade", "genre"]


def download_wheel(cache: Path) -> Path:
    """The RecBole wheel in `cache`, downloaded with pip when it is not there yet."""
    found = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", RECBOLE, "-d", str(cache)], check=True)
    found = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not found:
        raise SystemExit(f"pip download {RECBOLE} left no wheel in {cache}")
    return found[0]


def read_atomic(wheel: zipfile.ZipFile, suffix: str) -> Dict[str, List[str]]:
    """One atomic file as {field: values (strings)}; headers look like `user_id:token`."""
    text = wheel.read(f"{PREFIX}.{suffix}").decode("utf-8")
    lines = text.rstrip("\n").split("\n")
    fields = [h.split(":", 1)[0] for h in lines[0].split("\t")]
    rows = [line.split("\t") for line in lines[1:]]
    return {f: [r[i] if i < len(r) else "" for r in rows] for i, f in enumerate(fields)}


def age_group(age: int) -> int:
    return max(g for g in AGE_GROUPS if g <= age) if age >= AGE_GROUPS[1] else AGE_GROUPS[0]


def build_table(wheel_path: Path) -> pa.Table:
    with zipfile.ZipFile(wheel_path) as wheel:
        inter, users, items = (read_atomic(wheel, s) for s in ("inter", "user", "item"))
    user_rows = {int(u): i for i, u in enumerate(users["user_id"])}
    item_rows = {int(m): i for i, m in enumerate(items["item_id"])}
    user_id = np.array([int(u) for u in inter["user_id"]], dtype=np.int64)
    item_id = np.array([int(m) for m in inter["item_id"]], dtype=np.int64)
    rating = np.array([float(r) for r in inter["rating"]])
    u = [user_rows[x] for x in user_id]
    m = [item_rows[x] for x in item_id]

    def decade(year: str):
        return int(year) // 10 * 10 if year.isdigit() else None  # one year is 'V', one 'unkonwn'

    genre = [g.split(" ")[0] if g else None for g in items["class"]]
    return pa.table(
        {
            "user_id": user_id,
            "item_id": item_id,
            "click": (rating >= 4).astype(np.int8),
            "gender": pa.array([users["gender"][i] for i in u], pa.string()),
            "age": pa.array([age_group(int(users["age"][i])) for i in u], pa.int64()),
            "occupation": pa.array([users["occupation"][i] for i in u], pa.string()),
            "decade": pa.array([decade(items["release_year"][i]) for i in m], pa.int64()),
            "genre": pa.array([genre[i] for i in m], pa.string()),
        }
    )


def split(table: pa.Table, eval_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(table.num_rows)
    cut = int(round(table.num_rows * (1 - eval_fraction)))
    return table.take(np.sort(order[:cut])), table.take(np.sort(order[cut:]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/ml-100k"), help="where train.parquet and eval.parquet go")
    parser.add_argument("--wheel", type=Path, help="a recbole-1.2.1 wheel (default: downloaded into --cache)")
    parser.add_argument("--cache", type=Path, default=Path("data/cache"), help="where the wheel is downloaded")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    wheel = args.wheel or download_wheel(args.cache)
    train, evaluation = split(build_table(wheel), args.eval_fraction, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    pq.write_table(train, args.out / "train.parquet")
    pq.write_table(evaluation, args.out / "eval.parquet")
    print(f"{args.out}: train.parquet {train.num_rows:,} rows, eval.parquet {evaluation.num_rows:,} rows "
          f"(click rate {np.mean(train.column('click').to_numpy()):.3f})")
    print("train with:")
    print(f"  recap-embed-train data.source=parquet data.train_path={args.out / 'train.parquet'} "
          f"data.eval_path={args.out / 'eval.parquet'} data.discrete_columns=[{','.join(DISCRETE)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
