"""`weight_decay` of the large tables: applied where the kernel supports it (one real step against
the formula), refused where it would be silently ignored.

FBGEMM's L2 mode adds ``weight_decay * w`` to the gradient of every row the batch touches, then
applies the optimizer. The CPU kernels of fbgemm-gpu-cpu 1.8 ignore it (probed at `shard` time);
tables on data_parallel get torch's dense optimizers, which decay every row.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from multiprocess import full_weight, load_full_weights
from recap_embed.config import ConfigValidationError, OptimizerAlgorithm, validate
from recap_embed.distributed import shard
from recap_embed.modules import LargeEmbeddings
from recap_embed.optim import combined_optimizer
from recap_embed.optim.weight_decay import kernel_applies_weight_decay, weight_decay_mode

LR, WD, EPS = 0.1, 0.5, 1e-8
C = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.25, 1.0, -1.0, 2.0]])  # d loss / d pooled output per example
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Net(nn.Module):
    def __init__(self, emb: LargeEmbeddings) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.emb(features).values()


def model_with(algorithm: str, sharding_type: str, device: str = DEVICE):
    emb = LargeEmbeddings.from_config({
        "tables": {"t": {"num_embeddings": 6}},
        "embedding_dim": 4,
        "optimizer": {"algorithm": algorithm, "init_learning_rate": LR, "weight_decay": WD, "eps": EPS},
    })
    kernel = "dense" if sharding_type == "data_parallel" else "fused"
    placement = {"t": {"sharding_type": sharding_type, "compute_kernel": kernel, "ranks": [0] if sharding_type == "table_wise" else []}}
    model = shard(Net(emb), {"device": device, "plan": placement})
    w0 = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 8 - 1.0
    load_full_weights(model, {"t": w0.to(device)})
    return model, w0


def two_steps(model, device: str = DEVICE) -> None:
    opt = combined_optimizer(model, lambda params: torch.optim.SGD(params, lr=0.0))
    features = KeyedJaggedTensor.from_lengths_sync(keys=["t"], values=torch.tensor([1, 2, 2]), lengths=torch.tensor([2, 1])).to(device)
    for _ in range(2):
        (model(features) * C.to(device)).sum().backward()
        opt.step()
        opt.zero_grad()


def expected(algorithm: str, w0: torch.Tensor, touched_only: bool, wd: float = WD) -> torch.Tensor:
    """Two steps of (row-wise) Adagrad with the L2 term added to the gradient."""
    grad = torch.zeros(6, 4)
    grad[1], grad[2] = C[0], C[0] + C[1]  # rows 1 and 2 (sum pooling)
    rows = torch.tensor([False, True, True, False, False, False]) if touched_only else torch.ones(6, dtype=torch.bool)
    w, state = w0.clone(), torch.zeros(6, 1 if algorithm == "rowwise_adagrad" else 4)
    for _ in range(2):
        g = grad + wd * w
        state = state + (g.pow(2).mean(dim=1, keepdim=True) if algorithm == "rowwise_adagrad" else g.pow(2))
        w = torch.where(rows.unsqueeze(1), w - LR * g / (state.sqrt() + EPS), w)
    return w


def test_weight_decay_mode_comes_from_the_installed_fbgemm() -> None:
    mode = weight_decay_mode()
    assert mode.L2.name == "L2" and mode.__module__.startswith("fbgemm_gpu")


def test_the_formula_tells_decay_from_no_decay() -> None:
    w0 = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 8 - 1.0
    for algorithm in ("rowwise_adagrad", "adagrad"):
        assert (expected(algorithm, w0, True) - expected(algorithm, w0, True, wd=0.0)).abs().max() > 1e-3


@pytest.mark.parametrize("algorithm", ["rowwise_adagrad", "adagrad"])
def test_fused_weight_decay_matches_the_formula_or_is_refused(algorithm: str) -> None:
    """Where the kernel applies decay: two real steps equal the formula. Where it would not (the
    CPU kernels of fbgemm-gpu-cpu 1.8): `shard` refuses the table, naming the config path."""
    if kernel_applies_weight_decay(OptimizerAlgorithm[algorithm], DEVICE):
        model, w0 = model_with(algorithm, "table_wise")
        two_steps(model)
        torch.testing.assert_close(full_weight(model, "t").cpu(), expected(algorithm, w0, touched_only=True), atol=1e-5, rtol=0)
    else:
        with pytest.raises(ConfigValidationError) as err:
            model_with(algorithm, "table_wise")
        message = str(err.value)
        for word in ("embeddings.tables.t.optimizer.weight_decay", "0.5", "has no effect", f"{DEVICE} {algorithm} kernel ignores weight decay", "data_parallel"):
            assert word in message, (word, message)


def test_data_parallel_table_decays_every_row() -> None:
    model, w0 = model_with("rowwise_adagrad", "data_parallel", device="cpu")
    two_steps(model, device="cpu")
    torch.testing.assert_close(full_weight(model, "t"), expected("rowwise_adagrad", w0, touched_only=False), atol=1e-5, rtol=0)


def test_the_probe_sees_what_sgd_lacks() -> None:
    assert kernel_applies_weight_decay(OptimizerAlgorithm.sgd, "cpu") is False


def test_weight_decay_on_sgd_is_refused_not_ignored() -> None:
    cfg = {"embeddings": {"tables": {"t": {"num_embeddings": 6, "embedding_dim": 4}}, "optimizer": {"algorithm": "sgd", "weight_decay": 0.01}}}
    with pytest.raises(ConfigValidationError, match=r"embeddings\.optimizer\.weight_decay: 0\.01 has no effect with sgd"):
        validate(cfg, device="cpu")


def test_a_table_switching_to_sgd_cannot_inherit_a_decay_it_would_ignore() -> None:
    cfg = {"embeddings": {"tables": {"t": {"num_embeddings": 6, "embedding_dim": 4, "optimizer": {"algorithm": "sgd"}}},
                          "optimizer": {"algorithm": "adagrad", "weight_decay": 0.01}}}
    with pytest.raises(ConfigValidationError, match=r"embeddings\.tables\.t\.optimizer\.algorithm: sgd would ignore the weight_decay 0\.01"):
        validate(cfg, device="cpu")
