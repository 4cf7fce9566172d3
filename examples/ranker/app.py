"""A minimal ranker of your own that takes its embedding tables from recap_embed.

Run it from anywhere once recap_embed is installed:
    python app.py                                      # the TwHIN tables, planner's placement
    python app.py embeddings.embedding_dim=8 embeddings/optimizer=rowwise_adagrad
    python app.py -m embeddings.embedding_dim=4,8      # a sweep
"""

import hydra
import torch
from omegaconf import DictConfig
from torch import nn
from torchrec import KeyedJaggedTensor

from recap_embed.config import validate
from recap_embed.distributed import shard
from recap_embed import build
from recap_embed.optim import EmbeddingLRScheduler, combined_optimizer


class DotRanker(nn.Module):
    """Score = user . tweet (+ a learned bias): the smallest model a table pair supports."""

    def __init__(self, embeddings: nn.Module, bias: bool) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.bias = nn.Parameter(torch.zeros(1)) if bias else None

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embeddings(features).to_dict()
        score = (pooled["user"] * pooled["tweet"]).sum(dim=1)
        return score + self.bias if self.bias is not None else score


def random_batch(cfg: DictConfig, generator: torch.Generator) -> KeyedJaggedTensor:
    rows = {name: table.num_embeddings for name, table in cfg.embeddings.tables.items()}
    ids = [torch.randint(0, rows[name], (cfg.batch_size,), generator=generator) for name in ("user", "tweet")]
    return KeyedJaggedTensor(keys=["user", "tweet"], values=torch.cat(ids), lengths=torch.ones(2 * cfg.batch_size, dtype=torch.int32))


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    parsed = validate(cfg)  # every rule checked once; the builders take the parsed config
    model = DotRanker(build(cfg.embeddings, parsed), cfg.model.bias)  # tables on meta: no memory yet
    model = shard(model, parsed)  # placed, fused optimizers attached
    optimizer = combined_optimizer(model, lambda params: torch.optim.Adam(params, lr=1e-2))
    scheduler = EmbeddingLRScheduler(model, optimizer)
    generator = torch.Generator().manual_seed(0)
    for step in range(cfg.steps):
        features = random_batch(cfg, generator)
        labels = torch.randint(0, 2, (cfg.batch_size,), generator=generator).float()
        loss = nn.functional.binary_cross_entropy_with_logits(model(features), labels)
        optimizer.zero_grad()
        loss.backward()  # the tables update here, inside backward
        optimizer.step()
        scheduler.step()
    print(f"trained {cfg.steps} steps; last loss {loss.item():.4f}; lr {scheduler.get_last_lr()}")
    return float(loss.detach())


if __name__ == "__main__":
    main()
