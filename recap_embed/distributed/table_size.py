"""Bytes a table takes: weights by data type, optimizer state by algorithm (for plans and memory checks)."""

from __future__ import annotations

from typing import Tuple, Union

from recap_embed.config import DataType, OptimizerAlgorithm, TableSpec


#: Bytes of one weight element per data type.
_ELEMENT_BYTES = {DataType.fp32: 4, DataType.fp16: 2, DataType.bf16: 2}
#: Optimizer state floats (fp32) per element and per row, per algorithm.
_STATE_PER_ELEMENT = {
    OptimizerAlgorithm.sgd: 0,
    OptimizerAlgorithm.adagrad: 1,
    OptimizerAlgorithm.rowwise_adagrad: 0,
    OptimizerAlgorithm.adam: 2,
    OptimizerAlgorithm.partial_rowwise_adam: 1,
    OptimizerAlgorithm.lamb: 2,
}
_STATE_PER_ROW = {OptimizerAlgorithm.rowwise_adagrad: 1, OptimizerAlgorithm.partial_rowwise_adam: 1}


def element_bytes(data_type: Union[DataType, str]) -> int:
    """Bytes of one weight element: fp32 4, fp16 and bf16 2."""
    dt = data_type if isinstance(data_type, DataType) else DataType[str(data_type)]
    return _ELEMENT_BYTES[dt]


def optimizer_state_bytes(algorithm: Union[OptimizerAlgorithm, str], rows: int, cols: int) -> int:
    """Bytes of optimizer state for a block of `rows` × `cols` (a table or one shard).

    One fp32 per element for adagrad, two for adam and lamb, one per row for rowwise_adagrad, one
    per element plus one per row for partial_rowwise_adam, none for sgd. Row-wise state on column
    shards is kept per row *of each shard*, so sum this over the shards of a placed table.
    """
    a = algorithm if isinstance(algorithm, OptimizerAlgorithm) else OptimizerAlgorithm[str(algorithm)]
    return 4 * (int(rows) * int(cols) * _STATE_PER_ELEMENT[a] + int(rows) * _STATE_PER_ROW.get(a, 0))


def table_bytes(spec: TableSpec) -> Tuple[int, int]:
    """``(weights, optimizer state)`` bytes of a whole (unsharded) table; rows must be known."""
    rows, dim = int(spec.num_embeddings or 0), int(spec.embedding_dim)
    return rows * dim * element_bytes(spec.data_type), optimizer_state_bytes(spec.optimizer.algorithm, rows, dim)
