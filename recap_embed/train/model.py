"""The training app's model: large embeddings + small embeddings + an MLP -> click logit."""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recap_embed.modules import LargeEmbeddings, SmallEmbeddings


class RecapModel(nn.Module):
    """Pooled large tables, small tables over the discrete features, their interaction, an MLP.

    `interaction` adds the elementwise product of the `user` and `item` embeddings, the signal a
    factorisation model would use; it needs both tables to have the same dim.
    """

    def __init__(self, large: LargeEmbeddings, small: SmallEmbeddings, hidden: List[int], interaction: bool = True) -> None:
        super().__init__()
        self.large = large
        self.small = small
        dims = {s.name: s.embedding_dim for s in large.specs}
        # One pooled block per (table, feature): a feature two tables read gives two blocks.
        pooled_width = sum(s.embedding_dim * len(s.feature_names) for s in large.specs)
        self.interaction = bool(interaction) and "user" in dims and "item" in dims and dims["user"] == dims["item"]
        # The product of the user and item tables' first features' embeddings.
        self.interaction_keys = (large.output_keys("user")[0], large.output_keys("item")[0]) if self.interaction else None
        width = pooled_width + small.output_dim + (dims.get("user", 0) if self.interaction else 0)
        layers: List[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, sparse: KeyedJaggedTensor, discrete: torch.Tensor) -> torch.Tensor:
        pooled = self.large(sparse)
        parts = [pooled.values(), self.small(discrete)]
        if self.interaction_keys is not None:
            by_key = pooled.to_dict()
            user, item = self.interaction_keys
            parts.append(by_key[user] * by_key[item])
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)
