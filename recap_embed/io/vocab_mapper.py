"""`VocabMapper`: a batch's raw ids through the vocabs of the tables its features feed.

A `Vocab` (`recap_embed.io.vocab`) maps one table's ids; the mapper applies the right one to
each feature of a KeyedJaggedTensor, in the data pipeline before the batch reaches the model,
and is built from the config's tables. It sits above the vocabulary: one job per module, and
`Vocab` and `save_vocab` load without torchrec.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Union

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recap_embed.config import EmbeddingsSpec, ParsedConfig, validate

from .vocab import Vocab

__all__ = ["VocabMapper"]


class VocabMapper:
    """Replaces the raw ids of the features that have a vocab with rows, in a KeyedJaggedTensor.

    Features without a vocab pass through unchanged (values become int64 if they were not);
    keys, lengths, offsets, weights and variable batch sizes are kept. No parameters: it runs in
    the data pipeline, before the batch reaches the model.
    """

    def __init__(self, vocabs: Mapping[str, Vocab]) -> None:
        """`vocabs`: feature name -> Vocab (features of one table share one Vocab)."""
        self.vocabs: Dict[str, Vocab] = dict(vocabs)

    @classmethod
    def from_config(cls, embeddings: Any) -> "VocabMapper":
        """Loads the vocab of every table that sets one; a table feeds its ``feature_names``.

        `embeddings` is the parsed config (``validate(cfg)`` or its ``.embeddings``), used as it is,
        or an embeddings section (DictConfig, dataclass or dict), checked by `validate` first (which
        also makes tables sharing a feature share its vocab).
        """
        if isinstance(embeddings, ParsedConfig):
            embeddings = embeddings.embeddings
        if not isinstance(embeddings, EmbeddingsSpec):
            embeddings = validate(embeddings, section="embeddings", device="meta").embeddings
        vocabs: Dict[str, Vocab] = {}
        for spec in embeddings.tables:
            if spec.vocab is None:
                continue
            vocab = Vocab.load(
                spec.vocab,
                table=spec.name,
                num_embeddings=spec.num_embeddings,
                oov_policy=spec.oov_policy,
                oov_buckets=spec.oov_buckets,
                config_path=f"{spec.path}.vocab",
            )
            for f in spec.feature_names:
                vocabs.setdefault(f, vocab)  # tables sharing a feature share its vocab (a validate rule)
        return cls(vocabs)

    @property
    def tables(self) -> Dict[str, Vocab]:
        """Table name -> Vocab, e.g. to size tables whose num_embeddings is derived."""
        return {v.table: v for v in self.vocabs.values()}

    def to(self, device: Union[str, torch.device]) -> "VocabMapper":
        for v in {id(v): v for v in self.vocabs.values()}.values():
            v.to(device)
        return self

    def __call__(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = kjt.keys()
        if not any(k in self.vocabs for k in keys):
            return kjt
        values = kjt.values()
        offsets = kjt.offset_per_key()
        pieces = []
        for i, k in enumerate(keys):
            seg = values[offsets[i]:offsets[i + 1]]
            pieces.append(self.vocabs[k].map(seg) if k in self.vocabs else seg.to(torch.int64))
        if offsets[-1] < values.numel():  # values past the last key (padding) stay as they are
            pieces.append(values[offsets[-1]:].to(torch.int64))
        stride_kwargs: Dict[str, Any] = (
            {"stride_per_key_per_rank": kjt.stride_per_key_per_rank()}
            if kjt.variable_stride_per_key()
            else {"stride": kjt.stride()}
        )
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(pieces),
            weights=kjt.weights_or_none(),
            lengths=kjt.lengths(),
            offsets=kjt.offsets(),
            length_per_key=kjt.length_per_key(),
            offset_per_key=offsets,
            inverse_indices=kjt.inverse_indices_or_none(),
            **stride_kwargs,
        )

    def oov_rates(self) -> Dict[str, float]:
        """Table name -> OOV rate since the last reset, for logging."""
        return {name: v.oov_rate() for name, v in self.tables.items()}

    def reset_counts(self) -> None:
        for v in self.tables.values():
            v.reset_counts()
