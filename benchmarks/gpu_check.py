"""The GPU check: recap_embed's tables sharded on CUDA, checked against plain torch; one table out.

On a CUDA machine with the CUDA build of fbgemm-gpu (and torchrec) installed::

    python benchmarks/gpu_check.py [--out gpu_check.json]

runs, in one process with a one-rank NCCL group (`shard` creates it):

* ``train``: one table sharded ``table_wise``, ``row_wise`` and ``column_wise`` (two column
  shards), with each fused optimizer (sgd, rowwise_adagrad, adam, lamb, partial_rowwise_adam):
  pooled outputs and weights after 3 steps against plain torch on the whole table with FBGEMM's
  update rules (rows a batch does not touch are not updated; row-wise state is per column shard);
* ``uvm_caching``: the same with the ``fused_uvm_caching`` kernel (sgd and rowwise_adagrad);
* ``nccl``: the process group `shard` made is NCCL;
* ``pretrained``: `load_pretrained` of a saved whole table into each sharding's CUDA shards;
* ``checkpoint``: save, restore into a fresh model, same weights and optimizer state, and the
  next step equal;
* ``step_time``: the training step through the documented API (instantiate -> shard ->
  combined_optimizer + EmbeddingLRScheduler) against a hand-written FBGEMM TBE on the same GPU
  (4 x 1M x 64, batch 2048, pooling 20), median of CUDA-synchronised steps.

It prints one table and exits 1 when any check fails (timings are reported, not judged).
Without CUDA it says so and exits 0. ``--cpu`` runs the checks a CPU can run (table_wise and
column_wise; sgd, adagrad, rowwise_adagrad; pretrained; checkpoint) so that the script's own
logic is exercised without a GPU (the tests do).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROWS, DIM, BAGS, STEPS = 1000, 16, 32, 3
LR, EPS, BETA1, BETA2 = 0.05, 1e-8, 0.9, 0.999
ROWWISE_STATE = {"rowwise_adagrad", "partial_rowwise_adam"}  # one value per row (of each column shard)
TOLERANCE = 1e-5  # max |difference| / (1 + max |reference|) for float32 GPU vs. torch


class Report:
    def __init__(self) -> None:
        self.rows: List[Dict[str, Any]] = []

    def add(self, check: str, case: str, ok: Optional[bool], detail: str) -> None:
        self.rows.append({"check": check, "case": case, "result": "ok" if ok else ("FAIL" if ok is False else "info"), "detail": detail})

    def run(self, check: str, case: str, fn: Callable[[], Tuple[Optional[bool], str]]) -> None:
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - every check is reported, the script goes on
            ok, detail = False, f"{type(e).__name__}: {e}".splitlines()[0][:200]
            traceback.print_exc()
        self.add(check, case, ok, detail)

    @property
    def failed(self) -> bool:
        return any(r["result"] == "FAIL" for r in self.rows)

    def format(self) -> str:
        cols = ["check", "case", "result", "detail"]
        widths = [max(len(c), *(len(str(r[c])) for r in self.rows)) for c in cols]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in self.rows]
        return "\n".join(lines)


# --------------------------------------------------------------------------- model and batches


def _config(algorithm: str, sharding: str, kernel: str = "fused") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    ranks = [0, 0] if sharding == "column_wise" else [0]
    embeddings = {
        "embedding_dim": DIM,
        "optimizer": {"algorithm": algorithm, "init_learning_rate": LR, "eps": EPS, "beta1": BETA1, "beta2": BETA2},
        "tables": {"t": {"num_embeddings": ROWS}},
    }
    plan = {"t": {"sharding_type": sharding, "compute_kernel": kernel, "ranks": ranks}}
    return embeddings, plan


def _build(algorithm: str, sharding: str, device: Any, kernel: str = "fused") -> Tuple[Any, Any, Any]:
    import torch

    from recap_embed.distributed import shard
    from recap_embed.modules import LargeEmbeddings
    from recap_embed.optim import EmbeddingLRScheduler, combined_optimizer

    embeddings, plan = _config(algorithm, sharding, kernel)
    torch.manual_seed(0)
    model = shard(LargeEmbeddings.from_config(embeddings), {"device": str(device), "plan": plan})
    opt = combined_optimizer(model)
    return model, opt, EmbeddingLRScheduler(model, opt)


def _batch(step: int, device: Any) -> Tuple[Any, Any, Any]:
    import torch

    g = torch.Generator().manual_seed(100 + step)
    lengths = torch.randint(0, 5, (BAGS,), generator=g)
    ids = torch.randint(0, ROWS, (int(lengths.sum()),), generator=g)
    coef = torch.randn(BAGS, DIM, generator=g)
    return ids.to(device), lengths.to(device), coef.to(device)


def _kjt(ids: Any, lengths: Any) -> Any:
    from torchrec import KeyedJaggedTensor

    return KeyedJaggedTensor(keys=["t"], values=ids, lengths=lengths)


def _full_weight(model: Any, device: Any) -> Any:
    """The whole table of a (one-rank) sharded model, assembled from its local shards."""
    import torch

    value = next(v for k, v in model.state_dict().items() if k.endswith("embedding_bags.t.weight"))
    if not hasattr(value, "local_shards"):
        return value.detach().clone()
    out = torch.empty(ROWS, DIM, device=device)
    for s in value.local_shards():
        r, c = (int(o) for o in s.metadata.shard_offsets)
        out[r:r + s.tensor.shape[0], c:c + s.tensor.shape[1]] = s.tensor
    return out


def _shard_cols(sharding: str) -> List[int]:
    return [DIM // 2, DIM // 2] if sharding == "column_wise" else [DIM]


def _pool(w: Any, ids: Any, lengths: Any) -> Any:
    import torch

    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=w.device), lengths)
    return torch.zeros(lengths.numel(), w.shape[1], device=w.device, dtype=w.dtype).index_add_(0, bag, w[ids])


class Reference:
    """Plain torch on the whole table with FBGEMM's update rules (fbgemm_gpu codegen optimizers)."""

    def __init__(self, weight: Any, algorithm: str, cols: List[int]) -> None:
        import torch

        self.w, self.algorithm, self.cols, self.iter = weight.clone(), algorithm, cols, 0
        self.m1 = torch.zeros_like(self.w)
        self.m2 = torch.zeros_like(self.w)
        self.row_state = torch.zeros(self.w.shape[0], len(cols), device=self.w.device)

    def forward(self, ids: Any, lengths: Any) -> Any:
        return _pool(self.w, ids, lengths)

    def step(self, ids: Any, lengths: Any, coef: Any) -> None:
        import torch

        w = self.w.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((_pool(w, ids, lengths) * coef).sum(), w)
        rows = torch.unique(ids)
        g = grad[rows]
        self.iter += 1
        t, a = self.iter, self.algorithm
        w0 = self.w[rows]
        if a == "sgd":
            new = w0 - LR * g
        elif a == "adagrad":
            self.m1[rows] += g * g
            new = w0 - LR * g / (self.m1[rows].sqrt() + EPS)
        elif a in ("rowwise_adagrad", "partial_rowwise_adam"):
            pieces, outs = g.split(self.cols, dim=1), []
            for j, (gp, wp) in enumerate(zip(pieces, w0.split(self.cols, dim=1))):
                if a == "rowwise_adagrad":
                    self.row_state[rows, j] += gp.pow(2).mean(dim=1)
                    outs.append(wp - LR * gp / (self.row_state[rows, j].sqrt() + EPS).unsqueeze(1))
                else:
                    lo = sum(self.cols[:j])
                    m1 = self.m1[rows, lo:lo + gp.shape[1]] * BETA1 + (1 - BETA1) * gp
                    self.m1[rows, lo:lo + gp.shape[1]] = m1
                    v = self.row_state[rows, j] * BETA2 + (1 - BETA2) * gp.pow(2).mean(dim=1)
                    self.row_state[rows, j] = v
                    v_hat = v / (1 - BETA2 ** t)
                    outs.append(wp - LR * (m1 / (1 - BETA1 ** t) / (v_hat.sqrt() + EPS).unsqueeze(1)))
            new = torch.cat(outs, dim=1)
        elif a in ("adam", "lamb"):
            m1 = self.m1[rows] * BETA1 + (1 - BETA1) * g
            m2 = self.m2[rows] * BETA2 + (1 - BETA2) * g * g
            self.m1[rows], self.m2[rows] = m1, m2
            r = m1 / (1 - BETA1 ** t) / ((m2 / (1 - BETA2 ** t)).sqrt() + EPS)
            if a == "adam":
                new = w0 - LR * r
            else:  # trust ratio per row of each column shard
                outs = []
                for rp, wp in zip(r.split(self.cols, dim=1), w0.split(self.cols, dim=1)):
                    ratio = wp.norm(dim=1) / rp.norm(dim=1)
                    outs.append(wp - LR * ratio.unsqueeze(1) * rp)
                new = torch.cat(outs, dim=1)
        else:
            raise ValueError(a)
        self.w[rows] = new


def _diff(got: Any, want: Any) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / (1 + want.abs().max()))


# --------------------------------------------------------------------------- checks


def check_train(algorithm: str, sharding: str, device: Any, kernel: str = "fused") -> Tuple[bool, str]:
    from recap_embed.distributed import describe_plan
    from recap_embed.distributed.single_rank import single_rank_modules

    model, opt, sched = _build(algorithm, sharding, device, kernel)
    placed = describe_plan(model)[0]
    if (placed["sharding_type"], placed["compute_kernel"]) != (sharding, kernel):
        return False, f"placed {placed['sharding_type']}/{placed['compute_kernel']}"
    ref = Reference(_full_weight(model, device), algorithm, _shard_cols(sharding))
    worst_out = worst_w = 0.0
    for step in range(STEPS):
        ids, lengths, coef = _batch(step, device)
        out = model(_kjt(ids, lengths))["t"]
        worst_out = max(worst_out, _diff(out, ref.forward(ids, lengths)))
        (out * coef).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ref.step(ids, lengths, coef)
        worst_w = max(worst_w, _diff(_full_weight(model, device), ref.w))
    path = "single-rank path" if single_rank_modules(model) else "torchrec's distributed path"
    ok = worst_out <= TOLERANCE and worst_w <= TOLERANCE
    return ok, f"{path}; max rel diff outputs {worst_out:.1e}, weights {worst_w:.1e} after {STEPS} steps"


def check_nccl(device: Any) -> Tuple[bool, str]:
    import torch.distributed as dist

    _build("sgd", "table_wise", device)
    backend = dist.get_backend()
    return backend == "nccl", f"default group backend {backend}, world size {dist.get_world_size()}"


def check_pretrained(sharding: str, device: Any, tmp: Path) -> Tuple[bool, str]:
    import torch
    import torchsnapshot

    from recap_embed.config.schema import EmbeddingSnapshot
    from recap_embed.io.pretrained import load_pretrained

    source = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(7))
    path = tmp / f"pretrained_{sharding}"
    torchsnapshot.Snapshot.take(str(path), app_state={"tables": torchsnapshot.StateDict(t=source)})
    model, _, _ = _build("sgd", sharding, device)
    specs = [s for s in model.module.specs]
    from dataclasses import replace

    specs = [replace(s, pretrained=EmbeddingSnapshot(emb_name="t", embedding_snapshot_uri=str(path))) for s in specs]
    report = load_pretrained(model, specs)["t"]
    got = _full_weight(model, device).cpu()
    return bool(torch.equal(got, source)), f"{report.rows_copied} rows from {report.source_entry}; equal: {torch.equal(got, source)}"


def check_checkpoint(algorithm: str, sharding: str, device: Any, tmp: Path) -> Tuple[bool, str]:
    import torch
    from torchsnapshot.flatten import flatten

    from recap_embed.io.checkpoint import restore_checkpoint, save_checkpoint

    model, opt, sched = _build(algorithm, sharding, device)
    for step in range(2):
        ids, lengths, coef = _batch(step, device)
        (model(_kjt(ids, lengths))["t"] * coef).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    ckpt = save_checkpoint(tmp / f"ckpt_{algorithm}_{sharding}", 2, {"model": model, "optimizer": opt, "scheduler": sched})
    fresh, fopt, fsched = _build(algorithm, sharding, device)
    restore_checkpoint(ckpt, {"model": fresh, "optimizer": fopt, "scheduler": fsched})

    def local(state: Any) -> Dict[str, Any]:
        _, flat = flatten(state, prefix="s")
        out = {}
        for k, v in flat.items():
            if hasattr(v, "local_shards"):
                for i, s in enumerate(v.local_shards()):
                    out[f"{k}#{i}"] = s.tensor
            elif isinstance(v, torch.Tensor):
                out[k] = v
        return out

    a, b = local({"m": model.state_dict(), "o": opt.state_dict()}), local({"m": fresh.state_dict(), "o": fopt.state_dict()})
    same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids, lengths, coef = _batch(5, device)
    outs = []
    for m, o in ((model, opt), (fresh, fopt)):
        out = m(_kjt(ids, lengths))["t"]
        (out * coef).sum().backward()
        o.step()
        outs.append((out.detach(), _full_weight(m, device)))
    next_equal = torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    return same and next_equal, f"{len(a)} tensors restored equal: {same}; next step equal: {next_equal}"


def check_step_time(algorithm: str, device: Any, reps: int) -> Tuple[None, str]:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train_step import OPTIMIZERS, build_ours, make_batches  # noqa: E402
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen
    from torchrec import KeyedJaggedTensor

    tables, rows, dim, batch, pooling = 4, 1_000_000, 64, 2048, 20
    model, opt, sched, keys, _ = build_ours(tables, rows, dim, OPTIMIZERS[algorithm][0], device=str(device))
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(rows, dim, EmbeddingLocation.DEVICE, ComputeDevice.CUDA) for _ in range(tables)],
        optimizer=getattr(EmbOptimType, OPTIMIZERS[algorithm][1]), learning_rate=0.01, eps=1e-8,
        weights_precision=SparseType.FP32, pooling_mode=PoolingMode.SUM, device=device,
    )
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(8, tables, rows, batch, pooling)]

    def ours(b: Dict[str, Any]) -> None:
        kjt = KeyedJaggedTensor(keys=keys, values=b["values"], lengths=b["lengths"])
        opt.zero_grad()
        model(kjt).values().sum().backward()
        opt.step()
        sched.step()

    def fbgemm(b: Dict[str, Any]) -> None:
        tbe(b["values"], b["offsets"]).sum().backward()

    times: Dict[str, List[float]] = {"ours": [], "fbgemm": []}
    for i in range(reps + 5):
        for name, fn in (("ours", ours), ("fbgemm", fbgemm)) if i % 2 == 0 else (("fbgemm", fbgemm), ("ours", ours)):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn(batches[i % len(batches)])
            torch.cuda.synchronize(device)
            if i >= 5:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return None, f"ours {med['ours']:.3f} ms, fbgemm {med['fbgemm']:.3f} ms: {med['ours'] / med['fbgemm']:.3f}x ({reps} steps each)"


# --------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the checks a CPU can run (how the tests exercise this script)")
    p.add_argument("--reps", type=int, default=50, help="timed steps per arm for step_time")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.cpu:
        device = torch.device("cpu")
        shardings, algorithms = ["table_wise", "column_wise"], ["sgd", "adagrad", "rowwise_adagrad"]
    else:
        if not torch.cuda.is_available():
            print("gpu_check: CUDA is not available on this machine (torch.cuda.is_available() is False): "
                  "nothing was checked. Run it on a CUDA machine with fbgemm-gpu; --cpu runs the CPU subset.")
            return 0
        try:
            import fbgemm_gpu  # noqa: F401
            from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen  # noqa: F401
        except Exception as e:  # noqa: BLE001 - a CPU-only fbgemm or a broken install
            print(f"gpu_check: CUDA is present but fbgemm_gpu cannot be used ({type(e).__name__}: {e}); install the CUDA "
                  "build of fbgemm-gpu matching torch (see BENCHMARKS.md, GPU check)")
            return 1
        device = torch.device("cuda", torch.cuda.current_device())
        shardings = ["table_wise", "row_wise", "column_wise"]
        algorithms = ["sgd", "rowwise_adagrad", "adam", "lamb", "partial_rowwise_adam"]
    torch.set_num_threads(1)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="recap_gpu_check_") as tmp_dir:
        tmp = Path(tmp_dir)
        for sharding in shardings:
            for algorithm in algorithms:
                report.run("train", f"{sharding}/{algorithm}", lambda: check_train(algorithm, sharding, device))
        if device.type == "cuda":
            for algorithm in ("sgd", "rowwise_adagrad"):
                report.run("uvm_caching", f"table_wise/{algorithm}", lambda: check_train(algorithm, "table_wise", device, "fused_uvm_caching"))
            report.run("nccl", "one rank", lambda: check_nccl(device))
        for sharding in shardings:
            report.run("pretrained", sharding, lambda: check_pretrained(sharding, device, tmp))
        for sharding in shardings:
            report.run("checkpoint", f"{sharding}/rowwise_adagrad", lambda: check_checkpoint("rowwise_adagrad", sharding, device, tmp))
        if device.type == "cuda":
            for algorithm in ("sgd", "rowwise_adagrad"):
                report.run("step_time", algorithm, lambda: check_step_time(algorithm, device, args.reps))
        else:
            report.add("step_time", "-", None, "CPU: measured by bench_train_step.py")
    print(report.format())
    if args.out is not None:
        args.out.write_text(json.dumps({"device": str(device), "rows": report.rows}, indent=2) + "\n")
    print("gpu_check:", "FAILED" if report.failed else "all checks passed", f"on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
