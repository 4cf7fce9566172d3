"""Per-table optimizers of the large tables, and how a training loop combines them.

Each table's effective optimizer (`TableSpec.optimizer`) is attached to its weight with
``torch.distributed.optim._apply_optimizer_in_backward`` before sharding (`shard` does it). The
torchrec sharder reads the class and kwargs, turns them into FBGEMM "fused params" and builds
table-batched kernels that update the weights inside backward. Tables are batched into one
kernel only when their fused params are equal; the schedule is part of them (``_batch_key``, a
grouping key torchrec strips before building the kernel), so every kernel holds tables that
always share one learning rate and `EmbeddingLRScheduler` can drive each table's rate.

Tables the planner puts on ``data_parallel`` are different: torchrec replaces them by plain
replicated tensors (dense kernel) whose gradients are all-reduced by DDP, and the in-backward
optimizer attached before sharding is dropped. `table_optimizer` gives each of them a real torch
optimizer built from the same config, so a table trains the same way wherever it is placed
(both paths see the gradient averaged over ranks, see `_MatchFusedGradients`).

Typical loop::

    model = shard(LargeEmbeddings.from_config(cfg.embeddings), cfg.sharding)
    opt = combined_optimizer(model, lambda params: torch.optim.Adam(params, lr=1e-3))
    sched = EmbeddingLRScheduler(model, opt)
    for batch in data:
        loss = ...; loss.backward()   # fused tables are updated here
        opt.step(); opt.zero_grad()   # dense params and data_parallel tables
        sched.step()                  # next step's per-table learning rates
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Tuple, Type, Union

import torch
import torchrec.optim as trec_optim
from torchrec import EmbeddingBagCollection
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

from recap_embed.config import ConfigError, EmbeddingOptimizerConfig, OptimizerAlgorithm
from recap_embed.distributed.collectives import model_world_size
from recap_embed.modules.tables import large_embeddings, table_parameters

from .weight_decay import weight_decay_mode

__all__ = [
    "FUSED_OPTIMIZER_CLASSES",
    "DENSE_OPTIMIZER_CLASSES",
    "apply_fused_optimizers",
    "combined_optimizer",
    "dense_parameters",
    "dense_table_optimizer_args",
    "fused_optimizer",
    "fused_optimizer_args",
    "large_embeddings",
    "table_optimizer",
    "table_parameters",
]

logger = logging.getLogger(__name__)

#: Classes the sharder maps to FBGEMM optimizers (torchrec.distributed.utils
#: ``_OPTIMIZER_CLASS_TO_EMB_OPT_TYPE``). The torchrec classes accept extra kwargs (FBGEMM
#: arguments, ``_batch_key``); all but RowWiseAdagrad are placeholders that never run themselves.
FUSED_OPTIMIZER_CLASSES: Dict[OptimizerAlgorithm, Type[torch.optim.Optimizer]] = {
    OptimizerAlgorithm.sgd: trec_optim.SGD,  # EXACT_SGD
    OptimizerAlgorithm.adagrad: trec_optim.Adagrad,  # EXACT_ADAGRAD
    OptimizerAlgorithm.rowwise_adagrad: trec_optim.RowWiseAdagrad,  # EXACT_ROWWISE_ADAGRAD
    OptimizerAlgorithm.adam: trec_optim.Adam,  # ADAM (CUDA)
    OptimizerAlgorithm.partial_rowwise_adam: trec_optim.PartialRowWiseAdam,  # PARTIAL_ROWWISE_ADAM (CUDA)
    OptimizerAlgorithm.lamb: trec_optim.LAMB,  # LAMB (CUDA)
}

#: Real torch optimizers for tables placed on data_parallel (plain replicated tensors). Torch has
#: no LAMB or partial row-wise Adam: such tables must not be placed on data_parallel.
DENSE_OPTIMIZER_CLASSES: Dict[OptimizerAlgorithm, Type[torch.optim.Optimizer]] = {
    OptimizerAlgorithm.sgd: torch.optim.SGD,
    OptimizerAlgorithm.adagrad: torch.optim.Adagrad,
    OptimizerAlgorithm.rowwise_adagrad: trec_optim.RowWiseAdagrad,
    OptimizerAlgorithm.adam: torch.optim.Adam,
}

_CACHE = "_recap_embed_table_optimizer"  # the table optimizer, cached on the sharded model


# --------------------------------------------------------------------------- config -> kwargs


def fused_optimizer_args(opt: EmbeddingOptimizerConfig) -> Tuple[Type[torch.optim.Optimizer], Dict[str, Any]]:
    """The class and kwargs `_apply_optimizer_in_backward` takes for one table (FBGEMM names).

    ``lr`` becomes FBGEMM's ``learning_rate``; ``weight_decay`` is an L2 penalty (FBGEMM
    ``WeightDecayMode.L2``; sgd has none and `validate` refuses it there, and `shard` refuses it
    where the kernel would ignore it, see `recap_embed.optim.weight_decay`). ``_batch_key`` keeps tables
    with different schedules in different kernels.
    """
    algorithm = OptimizerAlgorithm(opt.algorithm)
    cls = FUSED_OPTIMIZER_CLASSES[algorithm]
    kwargs: Dict[str, Any] = {"lr": float(opt.init_learning_rate)}
    if algorithm is not OptimizerAlgorithm.sgd:
        kwargs["eps"] = float(opt.eps)
        if opt.weight_decay:
            kwargs["weight_decay"] = float(opt.weight_decay)
            kwargs["weight_decay_mode"] = weight_decay_mode().L2
    if algorithm in (OptimizerAlgorithm.adam, OptimizerAlgorithm.partial_rowwise_adam, OptimizerAlgorithm.lamb):
        kwargs["beta1"] = float(opt.beta1)
        kwargs["beta2"] = float(opt.beta2)
    kwargs["_batch_key"] = _schedule_key(opt)
    return cls, kwargs


def dense_table_optimizer_args(
    opt: EmbeddingOptimizerConfig, path: str = "embeddings"
) -> Tuple[Type[torch.optim.Optimizer], Dict[str, Any]]:
    """The torch optimizer class and kwargs for a table placed on data_parallel."""
    algorithm = OptimizerAlgorithm(opt.algorithm)
    if algorithm not in DENSE_OPTIMIZER_CLASSES:
        raise ConfigError(
            f"{path}.optimizer.algorithm: {algorithm.name} has no torch implementation for a table "
            f"placed on data_parallel; constrain the table to a fused placement "
            f"(sharding.tables.{path.rsplit('.', 1)[-1]}.sharding_types=[table_wise])"
        )
    cls = DENSE_OPTIMIZER_CLASSES[algorithm]
    lr = float(opt.init_learning_rate)
    if algorithm is OptimizerAlgorithm.sgd:
        return cls, {"lr": lr}
    if algorithm is OptimizerAlgorithm.adam:
        return cls, {"lr": lr, "eps": opt.eps, "betas": (opt.beta1, opt.beta2), "weight_decay": opt.weight_decay}
    return cls, {"lr": lr, "eps": opt.eps, "weight_decay": opt.weight_decay}


def _schedule_key(opt: EmbeddingOptimizerConfig) -> str:
    schedule = opt.learning_rate
    items = asdict(schedule) if hasattr(schedule, "__dataclass_fields__") else dict(schedule or {})
    return "schedule:" + repr(sorted((k, v) for k, v in items.items() if v is not None))


# --------------------------------------------------------------------------- attaching


def apply_fused_optimizers(model: nn.Module) -> int:
    """Attach each table's optimizer to its weight (call before sharding; `shard` does).

    Idempotent: weights that already carry an in-backward optimizer are left alone (so a user may
    attach their own first). Returns the number of weights given an optimizer.
    """
    applied = 0
    for path, le in large_embeddings(model):
        if not isinstance(le.ebc, EmbeddingBagCollection):
            raise RuntimeError(f"{path or 'model'}: the tables are already sharded; attach optimizers before shard()")
        for spec in le.specs:
            weight = le.ebc.embedding_bags[spec.name].weight
            if hasattr(weight, "_in_backward_optimizers"):
                continue
            cls, kwargs = fused_optimizer_args(spec.optimizer)
            # One kwargs dict per weight: the sharder edits it in place (adds "optimizer", renames lr).
            _apply_optimizer_in_backward(cls, [weight], dict(kwargs))
            applied += 1
    return applied


# --------------------------------------------------------------------------- optimizers


def fused_optimizer(model: nn.Module) -> KeyedOptimizer:
    """The fused optimizer of a sharded model (``dmp.fused_optimizer``, a CombinedOptimizer).

    Its ``step()`` does not update weights (backward did); it pushes each param group's "lr" into
    its kernel. Its state_dict holds the kernels' optimizer state (momentum) by parameter key.
    """
    fo = getattr(model, "fused_optimizer", None)
    if fo is None:
        raise TypeError(
            f"{type(model).__name__} has no fused optimizer; pass the model returned by "
            f"recap_embed.distributed.shard(...)"
        )
    return fo


class _MatchFusedGradients:
    """Step pre-hook keeping a data_parallel table's gradient on the fused tables' scale.

    DDP averages the gradient of a replicated table over ranks. The fused kernels of sharded
    tables receive every rank's gradient through torchrec's all-to-all, whose backward divides by
    the world size too while ``torchrec.distributed.comm_ops.get_gradient_division()`` is True
    (the default): then nothing is to be done. With gradient division off the fused kernels see
    the sum, and this hook multiplies the DDP mean back to the sum, so a table trains the same
    way whichever placement the planner chose.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        from torchrec.distributed.comm_ops import get_gradient_division

        if self.world_size == 1 or get_gradient_division():
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(self.world_size)


def table_optimizer(model: nn.Module) -> CombinedOptimizer:
    """Every optimizer of the large tables of a sharded model, as one KeyedOptimizer.

    ``("fused", dmp.fused_optimizer)`` plus ``("data_parallel.<table>", optimizer)`` for each
    table the plan put on data_parallel, built from the table's config (see module docstring).
    Built once and cached on `model`: call it any number of times.
    """
    cached = getattr(model, _CACHE, None)
    if cached is not None:
        return cached
    fused = fused_optimizer(model)
    parts: List[Tuple[str, KeyedOptimizer]] = [("fused", fused)]
    world_size = model_world_size(model)
    for fqn, spec, kind, weight in table_parameters(model):
        if kind != "dense" or weight is None:
            continue
        cls, kwargs = dense_table_optimizer_args(spec.optimizer, spec.path)
        hook = _MatchFusedGradients(world_size)

        def factory(params: List[torch.Tensor], cls: Any = cls, kwargs: Dict[str, Any] = kwargs, hook: Any = hook) -> Any:
            opt = cls(params, **kwargs)
            opt.register_step_pre_hook(hook)
            return opt

        parts.append((f"data_parallel.{spec.name}", KeyedOptimizerWrapper({fqn: weight}, factory)))
    combined = CombinedOptimizer(parts)
    object.__setattr__(model, _CACHE, combined)
    return combined


DenseOptimizer = Union[KeyedOptimizer, Callable[[List[torch.Tensor]], torch.optim.Optimizer], None]


def dense_parameters(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters no table optimizer updates: what the dense optimizer must train."""
    tables = {id(w) for _, _, kind, w in table_parameters(model) if w is not None}
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "_in_backward_optimizers") or id(p) in tables or not p.requires_grad:
            continue
        out[name] = p
    return out


def combined_optimizer(model: nn.Module, dense_optimizer: DenseOptimizer = None) -> CombinedOptimizer:
    """One optimizer for the training loop: the table optimizers plus the dense optimizer.

    Returns ``CombinedOptimizer([("embeddings", table_optimizer(model)), ("dense", ...)])``.
    `dense_optimizer` is either a factory ``params -> torch.optim.Optimizer`` (recommended: it is
    given exactly `dense_parameters(model)`, i.e. not the tables) or a ready KeyedOptimizer (it
    must not hold table weights), or None for a model without dense parameters.
    """
    parts: List[Tuple[str, KeyedOptimizer]] = [("embeddings", table_optimizer(model))]
    if dense_optimizer is None:
        pass
    elif isinstance(dense_optimizer, KeyedOptimizer):
        tables = {id(w) for _, _, _, w in table_parameters(model) if w is not None}
        clash = [k for k, p in dense_optimizer.params.items() if id(p) in tables]
        if clash:
            raise ValueError(
                f"the dense optimizer holds table weights {clash}; they have their own optimizers. "
                f"Build it over recap_embed.optim.dense_parameters(model)"
            )
        parts.append(("dense", dense_optimizer))
    elif callable(dense_optimizer):
        params = dense_parameters(model)
        if params:
            parts.append(("dense", KeyedOptimizerWrapper(params, dense_optimizer)))
    else:
        raise TypeError("dense_optimizer must be a KeyedOptimizer, a factory params -> Optimizer, or None")
    return CombinedOptimizer(parts)
