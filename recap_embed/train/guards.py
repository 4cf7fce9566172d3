"""Checks of the training app that refuse garbage before it trains, and stop a run that turns to NaN.

`check_settings` (before any data exists): sizes, steps and rates of the app's own sections, the
dense optimizer's name, and the paths it will write or read. `check_examples` (once the data is in
memory, before sharding): empty splits, splits smaller than one batch, labels that are not 0/1,
discrete codes outside the small tables. `check_loss` (every step): a non-finite loss stops the
run at once, before anything from the broken step is saved.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from recap_embed.config import ConfigError, ConfigValidationError
from recap_embed.distributed.memory import USABLE_SHARE, MemoryDoesNotFit, available_bytes
from recap_embed.errors import DataError, InputPathError, UserError
from recap_embed.units import format_bytes

__all__ = ["DENSE_OPTIMIZERS", "NonFiniteLossError", "check_examples", "check_loss", "check_settings", "dense_optimizer_class"]

#: ``train.dense_optimizer.name`` -> the torch optimizer of the dense part (MLP, small embeddings).
DENSE_OPTIMIZERS: Dict[str, type] = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}

Problems = List[Tuple[str, str]]


class NonFiniteLossError(UserError):
    """The training loss became nan or inf: the run stops, nothing from the broken step is saved."""


def dense_optimizer_class(name: str) -> type:
    try:
        return DENSE_OPTIMIZERS[str(name)]
    except KeyError:
        raise ConfigError(f"train.dense_optimizer.name: {name!r} is not a dense optimizer; allowed: {', '.join(DENSE_OPTIMIZERS)}") from None


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _positive(value: Any, path: str, problems: Problems, what: str = "a positive integer") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problems.append((path, f"{value!r} is not allowed; use {what}"))


def _non_negative(value: Any, path: str, problems: Problems, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problems.append((path, f"{value!r} is not allowed; use an integer >= 0 ({meaning})"))


def _rate(value: Any, path: str, problems: Problems, what: str = "learning rate") -> None:
    if not _finite(value) or float(value) < 0:
        problems.append((path, f"{value!r} is not allowed; use a finite {what} >= 0"))


def check_settings(cfg: Any) -> None:
    """Every setting of the app's own sections that cannot train, at once (ConfigValidationError)."""
    problems: Problems = []
    train = cfg.train
    _positive(train.batch_size, "train.batch_size", problems)
    _positive(train.epochs, "train.epochs", problems)
    if train.max_steps is not None:
        _positive(train.max_steps, "train.max_steps", problems, "a positive integer, or null for every epoch")
    _non_negative(train.eval_every, "train.eval_every", problems, "0: evaluate at the end only")
    _non_negative(train.log_every, "train.log_every", problems, "0: no table statistics")
    if "checkpoint_every" in train:
        _non_negative(train.checkpoint_every, "train.checkpoint_every", problems, "0: the final checkpoint only")
    if "keep_checkpoints" in train:
        _positive(train.keep_checkpoints, "train.keep_checkpoints", problems, "a positive integer (how many periodic checkpoints to keep)")
    dense = train.dense_optimizer
    if str(dense.name) not in DENSE_OPTIMIZERS:
        problems.append(("train.dense_optimizer.name", f"{dense.name!r} is not a dense optimizer; allowed: {', '.join(DENSE_OPTIMIZERS)}"))
    _rate(dense.lr, "train.dense_optimizer.lr", problems)
    _rate(dense.weight_decay, "train.dense_optimizer.weight_decay", problems, "weight decay")
    for i, width in enumerate(cfg.model.hidden):
        _positive(width, f"model.hidden[{i}]", problems, "a positive layer width")
    data = cfg.data
    if isinstance(data.seed, bool) or not isinstance(data.seed, int) or data.seed < 0:
        problems.append(("data.seed", f"{data.seed!r} is not allowed; use an integer >= 0"))
    if str(getattr(data.source, "name", data.source)) == "synthetic":
        syn = data.synthetic
        for name in ("num_users", "num_items", "num_factors", "num_train", "num_eval", "num_countries", "num_devices", "num_hours"):
            _positive(getattr(syn, name), f"data.synthetic.{name}", problems)
        for name in ("signal", "bias"):
            if not _finite(getattr(syn, name)):
                problems.append((f"data.synthetic.{name}", f"{getattr(syn, name)!r} is not allowed; use a finite number"))
        if not _finite(syn.unknown_rate) or not 0 <= float(syn.unknown_rate) < 1:
            problems.append(("data.synthetic.unknown_rate", f"{syn.unknown_rate!r} is not allowed; use a share in [0, 1)"))
    problems += _path_problems(cfg)
    if problems:
        raise ConfigValidationError(problems)


def _path_problems(cfg: Any) -> Problems:
    """Paths of the wrong kind: a file where a directory goes, a directory where a file goes."""
    problems: Problems = []

    def must_be_dir(path: Optional[str], where: str) -> None:
        if path and os.path.exists(path) and not os.path.isdir(path):
            problems.append((where, f"{str(path)!r} is a file, not a directory; give a directory (it is created when missing)"))

    must_be_dir(cfg.data.dir, "data.dir")
    plan_file = cfg.sharding.get("plan_file") if hasattr(cfg.sharding, "get") else None
    if plan_file and os.path.isdir(str(plan_file)):
        problems.append(("sharding.plan_file", f"{str(plan_file)!r} is a directory; give the plan.json file recap-embed-plan wrote"))
    return problems


def check_output_dir(output_dir: Path) -> None:
    """The run directory is a directory (Hydra created it; a caller from Python may pass anything)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InputPathError(f"run directory {str(output_dir)!r} is a file, not a directory; choose another hydra.run.dir")


def check_examples(splits: Mapping[str, Any], global_batch_size: int, small_tables: Sequence[Any], paths: Mapping[str, str]) -> None:
    """The data can be trained on: non-empty splits, a train split of at least one batch, 0/1 labels
    and discrete codes every small table can look up. Raises DataError naming the split and file."""
    for split, examples in splits.items():
        where = f"the {split} split ({paths.get(split, '?')})"
        n = len(examples)
        if n == 0:
            raise DataError(f"{where} has no rows; nothing to {'train on' if split == 'train' else 'evaluate'}")
        labels = examples.clicks
        bad = ~((labels == 0) | (labels == 1))
        if bool(bad.any()):
            values = sorted({float(v) for v in labels[bad][:10_000].tolist()}, key=lambda v: (math.isnan(v), v))[:5]
            raise DataError(
                f"{where}: column 'click' must hold 0 or 1 labels; {int(bad.sum())} of {n} rows hold other values, e.g. "
                f"{values} (map your labels to 0/1: a loss on other values trains to nonsense)"
            )
        for table in small_tables:
            if examples.discrete.shape[1] <= table.index:
                continue  # reported by validate (index beyond the data's width)
            codes = examples.discrete[:, table.index]
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= table.num_embeddings:
                raise DataError(
                    f"{table.path}: {where} has codes in [{lo}, {hi}] in discrete column {table.index}, outside the table's "
                    f"{table.num_embeddings} rows; allowed: [0, {table.num_embeddings}): raise {table.path}.num_embeddings "
                    f"or fix the data"
                )
    train = len(splits["train"])
    if train < global_batch_size:
        raise DataError(
            f"the train split ({paths.get('train', '?')}) has {train} rows, fewer than one batch of train.batch_size="
            f"{global_batch_size}: no step would run; lower train.batch_size or add data"
        )


def check_loss(loss: float, step: int, rates: Callable[[], Mapping[str, float]]) -> None:
    """Raise NonFiniteLossError when `loss` (this step's, agreed over the ranks) is nan or inf.

    `rates` gives the learning rates the message names; it is called only for a bad loss (it
    reads every table's rate: about 2% of a step on CPU, for a check that runs every step)."""
    if math.isfinite(loss):
        return
    shown = ", ".join(f"{k}={v:g}" for k, v in list(rates().items())[:6])
    raise NonFiniteLossError(
        f"train: the loss is {loss} at step {step}: training stopped, and nothing from this step on is saved; likely "
        f"causes: learning rates too high ({shown}), exploding weights from a pretrained table, or labels or features "
        f"out of range; lower the rates (or use a schedule that ramps up) and run again"
    )


def check_weights_finite(model: Any, step: int) -> None:
    """Every float weight this rank holds is finite; else NonFiniteLossError naming the first bad one.

    Run before a checkpoint is written, so a checkpoint never holds weights that are nan or inf."""
    for key, value in model.state_dict().items():
        tensors = [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise NonFiniteLossError(
                    f"train: weight {key!r} holds non-finite values (nan or inf) at step {step}: training stopped "
                    f"without saving them; likely causes: learning rates too high, or a pretrained table out of range"
                )


#: fp32 state per parameter of each dense optimizer (Adam: two moments; Adagrad: one sum).
_DENSE_STATE = {"adam": 2, "adagrad": 1, "sgd": 0}


def dense_bytes(cfg: Any, specs: Sequence[Any], small_tables: Sequence[Any]) -> int:
    """fp32 bytes of the dense part (MLP, small tables) with its optimizer state, from the config alone
    (the layer widths of `recap_embed.train.model.RecapModel`)."""
    dims = {s.name: int(s.embedding_dim) for s in specs}
    width = sum(int(s.embedding_dim) for s in specs for _ in s.feature_names)
    width += sum(int(t.embedding_dim) for t in small_tables)
    if cfg.model.interaction and "user" in dims and dims.get("user") == dims.get("item"):
        width += dims["user"]
    params = sum(int(t.num_embeddings) * int(t.embedding_dim) for t in small_tables)
    for h in [*cfg.model.hidden, 1]:
        params += width * int(h) + int(h)
        width = int(h)
    return 4 * params * (1 + _DENSE_STATE.get(str(cfg.train.dense_optimizer.name), 2))


def check_dense_memory(cfg: Any, specs: Sequence[Any], small_tables: Sequence[Any], device: torch.device) -> None:
    """The dense part fits the memory this rank has (checked before it is built: nn.Linear allocates at once)."""
    need = dense_bytes(cfg, specs, small_tables)
    have = available_bytes(device)
    if need > USABLE_SHARE * have:
        raise MemoryDoesNotFit(
            f"model: the dense part (MLP over the embeddings, small tables, {cfg.train.dense_optimizer.name} state) needs "
            f"{format_bytes(need)}, but {'the GPU' if device.type == 'cuda' else 'this host'} has {format_bytes(have)} "
            f"available; its input is as wide as the embeddings together: lower embeddings.embedding_dim (or a table's), "
            f"model.hidden, or small_embeddings num_embeddings/embedding_dim"
        )
