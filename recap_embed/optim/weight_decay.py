"""Weight decay of the fused tables: the FBGEMM enum wherever this fbgemm_gpu keeps it, and a probe
of whether the kernel that will train a table actually applies it.

FBGEMM takes ``weight_decay`` and ``weight_decay_mode`` for every optimizer but not every kernel
uses them: the CPU kernels of fbgemm-gpu-cpu 1.8 (exact Adagrad and row-wise Adagrad) accept both
and leave the weights exactly as without decay (measured: two steps with and without decay give
equal bits). A setting that silently does nothing is refused instead: `check_fused_weight_decay`
runs a two-row kernel of the table's optimizer on the table's device for two steps, with and
without decay, once per (optimizer, device type), and refuses a fused table whose kernel ignores
it, naming the config path. Tables on data_parallel are trained by torch's dense optimizers,
which apply the decay to every row.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Iterable, List, Tuple

import torch

from recap_embed.config import ConfigValidationError, OptimizerAlgorithm, TableSpec

__all__ = ["check_fused_weight_decay", "kernel_applies_weight_decay", "weight_decay_mode"]

_MODULES = ("fbgemm_gpu.tbe.config", "fbgemm_gpu.split_table_batched_embeddings_ops_training", "fbgemm_gpu.split_embedding_configs")


def weight_decay_mode() -> Any:
    """FBGEMM's ``WeightDecayMode`` enum, from where the installed fbgemm_gpu keeps it.

    fbgemm_gpu 1.x has it in ``fbgemm_gpu.tbe.config`` (re-exported by
    ``split_table_batched_embeddings_ops_training``); older releases in ``split_embedding_configs``.
    """
    for module in _MODULES:
        try:
            return getattr(importlib.import_module(module), "WeightDecayMode")
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"fbgemm_gpu has no WeightDecayMode (looked in {', '.join(_MODULES)})")


#: FBGEMM optimizer of each algorithm that takes a weight decay (sgd has none).
_OPTIM_TYPES = {
    OptimizerAlgorithm.adagrad: "EXACT_ADAGRAD",
    OptimizerAlgorithm.rowwise_adagrad: "EXACT_ROWWISE_ADAGRAD",
    OptimizerAlgorithm.adam: "ADAM",
    OptimizerAlgorithm.partial_rowwise_adam: "PARTIAL_ROWWISE_ADAM",
    OptimizerAlgorithm.lamb: "LAMB",
}


@functools.lru_cache(maxsize=None)
def kernel_applies_weight_decay(algorithm: OptimizerAlgorithm, device_type: str) -> bool:
    """Whether FBGEMM's kernel of `algorithm` on `device_type` changes its update with an L2 decay."""
    algorithm = OptimizerAlgorithm(algorithm)
    if algorithm not in _OPTIM_TYPES:
        return False
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

    cuda = device_type == "cuda"
    location = EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST
    compute = ComputeDevice.CUDA if cuda else ComputeDevice.CPU
    device = torch.device("cuda") if cuda else torch.device("cpu")
    mode = weight_decay_mode()

    def two_steps(decay: float) -> torch.Tensor:
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(2, 4, location, compute)], optimizer=getattr(EmbOptimType, _OPTIM_TYPES[algorithm]),
            learning_rate=0.1, eps=1e-8, weight_decay=decay, weight_decay_mode=mode.L2 if decay else mode.NONE,
            **({"device": device} if cuda else {}),
        )
        with torch.no_grad():
            tbe.split_embedding_weights()[0].copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]))
        signs = torch.tensor([[1.0, -1.0, 2.0, -2.0]], device=device)
        for _ in range(2):
            (tbe(torch.tensor([0], device=device), torch.tensor([0, 1], device=device)) * signs).sum().backward()
        return tbe.split_embedding_weights()[0][0].detach().to("cpu").clone()

    return not torch.equal(two_steps(0.0), two_steps(0.5))


def check_fused_weight_decay(fused_tables: Iterable[TableSpec], device_type: str) -> None:
    """Refuse every fused table whose ``weight_decay`` the kernel on `device_type` would ignore."""
    problems: List[Tuple[str, str]] = []
    for spec in fused_tables:
        opt = spec.optimizer
        if not opt.weight_decay:
            continue
        algorithm = OptimizerAlgorithm(opt.algorithm)
        if algorithm is OptimizerAlgorithm.sgd or kernel_applies_weight_decay(algorithm, device_type):
            continue  # sgd is refused by `validate`
        collection = spec.path.rsplit(".tables.", 1)[0]
        problems.append((
            f"{spec.path}.optimizer.weight_decay",
            f"{opt.weight_decay!r} (the table's own, or {collection}.optimizer.weight_decay) has no effect on table {spec.name!r}: this FBGEMM build's {device_type} "
            f"{algorithm.name} kernel ignores weight decay (probed: updates with and without it are equal); "
            f"set 0, train on CUDA, or place the table on data_parallel (torch's optimizer applies it)",
        ))
    if problems:
        raise ConfigValidationError(problems)
