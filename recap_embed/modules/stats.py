"""Statistics of large tables for logging: row norms and the share of rows used lately.

`table_stats(model, tables)` works on unsharded (materialised) and sharded models. With a process
group of more than one rank it is a collective: every rank must call it with the same tables.

* ``mean_row_norm`` / ``max_row_norm``: L2 norm of each row over the whole table. Table-wise and
  row-wise shards hold whole rows and reduce two scalars across ranks; column-wise shards hold
  parts of every row, so squared partial norms (one float per row) are summed across ranks.
* ``touched_fraction``: rows looked up by any rank since the previous call, over all rows. The
  ids each rank's forward sees are recorded in a one-byte-per-row mask (`LargeEmbeddings`
  tracks the tables in ``tables_to_log`` and those given to ``track_touched``), OR-ed across
  ranks here and reset. Absent for a table that is not tracked.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from recap_embed.distributed.collectives import model_process_group

from .tables import large_embeddings

__all__ = ["table_stats"]


@torch.no_grad()
def table_stats(model: nn.Module, tables: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    """``{table: {"mean_row_norm", "max_row_norm", "touched_fraction"}}`` for `tables`.

    `tables`: names or keys (default: every LargeEmbeddings' ``tables_to_log``).
    """
    modules = large_embeddings(model)
    if not modules:
        raise TypeError(f"{type(model).__name__} holds no LargeEmbeddings")
    if tables is None:
        tables = [t for _, le in modules for t in le.tables_to_log]
    pg = model_process_group(model)
    distributed = pg is not None and dist.get_world_size(pg) > 1
    out: Dict[str, Dict[str, float]] = {}
    state_dicts: Dict[int, Dict[str, Any]] = {}  # one (cheap, view-only) state_dict per module
    for table in tables:
        le = next((m for _, m in modules if any(table in (s.name, s.key) for s in m.specs)), None)
        if le is None:
            raise KeyError(f"{table!r} is not a table; tables: {[s.name for _, m in modules for s in m.specs]}")
        spec = le.spec(table)
        if id(le) not in state_dicts:
            state_dicts[id(le)] = le.ebc.state_dict()
        weight = state_dicts[id(le)][f"embedding_bags.{spec.name}.weight"]
        stats = _norms(weight, int(spec.num_embeddings), spec.path, pg if distributed else None)
        mask = le.take_touched(spec.name)
        if mask is not None:
            if distributed:
                mask = mask.to(_comm_device(pg, mask))
                dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=pg)
            stats["touched_fraction"] = float(mask.sum().item()) / max(1, mask.numel())
        out[spec.name] = stats
    return out


def _comm_device(pg: Any, like: torch.Tensor) -> torch.device:
    backend = dist.get_backend(pg)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if backend == "gloo" else like.device


def _norms(weight: Any, rows: int, path: str, pg: Optional[Any]) -> Dict[str, float]:
    sharded = hasattr(weight, "local_shards")
    if not sharded and weight.is_meta:
        raise RuntimeError(f"{path}: the table is still on meta (no weights yet); shard the model first")
    if not sharded:  # a plain tensor: unsharded or data_parallel (replicated: no reduction)
        norms = weight.float().norm(dim=1) if weight.numel() else torch.zeros(0)
        return {"mean_row_norm": float(norms.mean()) if norms.numel() else 0.0,
                "max_row_norm": float(norms.max()) if norms.numel() else 0.0}
    meta = weight.metadata()
    full_cols = int(meta.size[1])
    whole_rows = all(int(m.shard_sizes[1]) == full_cols for m in meta.shards_metadata)
    local = weight.local_shards()
    if whole_rows:
        total, count, biggest = 0.0, 0, 0.0
        for s in local:
            norms = s.tensor.float().norm(dim=1)
            if norms.numel():
                total += float(norms.sum())
                count += norms.numel()
                biggest = max(biggest, float(norms.max()))
        sums = torch.tensor([total, float(count)], dtype=torch.float64)
        top = torch.tensor([biggest], dtype=torch.float64)
        if pg is not None:
            device = _comm_device(pg, sums)
            sums, top = sums.to(device), top.to(device)
            dist.all_reduce(sums, group=pg)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=pg)
        return {"mean_row_norm": float(sums[0] / max(1.0, float(sums[1]))), "max_row_norm": float(top[0])}
    # Column shards: add squared partial norms of every row across shards (and ranks).
    sq = torch.zeros(rows, dtype=torch.float32)
    for s in local:
        r0 = int(s.metadata.shard_offsets[0])
        part = s.tensor.float().pow(2).sum(dim=1).cpu()
        sq[r0 : r0 + part.numel()] += part
    if pg is not None:
        sq = sq.to(_comm_device(pg, sq))
        dist.all_reduce(sq, group=pg)
    norms = sq.sqrt()
    return {"mean_row_norm": float(norms.mean()), "max_row_norm": float(norms.max())}
