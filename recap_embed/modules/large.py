"""The large embedding tables: one torchrec EmbeddingBagCollection built from a config.

`LargeEmbeddings` is what ``hydra.utils.instantiate(cfg.embeddings)`` returns. It is built on
``torch.device("meta")``: no table memory exists until `recap_embed.distributed.shard` places
the tables (each rank then allocates only its own shards). Optimizers are not attached here:
`shard` attaches each table's fused optimizer right before sharding, so the module itself stays a
plain ``nn.Module`` that can also be inspected, planned or exported without side effects.

Data flow::

    KeyedJaggedTensor (one key per feature)
      -> self.ebc   EmbeddingBagCollection (sharded after `shard`)
      -> self.cut   identity: the serving-export cut point
      -> KeyedTensor of pooled embeddings, one key per feature (default: the table name)
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor, KeyedTensor
from torchrec import EmbeddingBagConfig as TorchrecTableConfig
from torchrec.modules.embedding_configs import DataType as TorchrecDataType
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import get_embedding_names_by_table

from recap_embed.config import (
    ConfigError,
    DataType,
    EmbeddingsSpec,
    LargeEmbeddingsConfig,
    ParsedConfig,
    PoolingMode,
    TableSpec,
    validate,
)
from recap_embed.config.resolve import to_container
from recap_embed.io.vocab import Vocab

from .names import check_module_names

__all__ = ["LargeEmbeddings", "DATA_TYPES", "POOLING_TYPES", "resolve_rows", "torchrec_config"]

logger = logging.getLogger(__name__)

#: Config data types to torchrec's (the fused kernels store weights in this type).
DATA_TYPES = {DataType.fp32: TorchrecDataType.FP32, DataType.fp16: TorchrecDataType.FP16, DataType.bf16: TorchrecDataType.BF16}
#: Config pooling modes to torchrec's.
POOLING_TYPES = {PoolingMode.sum: PoolingType.SUM, PoolingMode.mean: PoolingType.MEAN}

META = torch.device("meta")


class LargeEmbeddings(nn.Module):
    """The tables of an embeddings config as one torchrec ``EmbeddingBagCollection`` on meta.

    Built by ``hydra.utils.instantiate(cfg.embeddings)`` (the fields of `LargeEmbeddingsConfig`
    arrive as keyword arguments) or by `LargeEmbeddings.from_config`. The config is validated
    first (`recap_embed.config.validate`), so a bad value is reported with its config path.

    Attributes:
        specs: one complete `TableSpec` per table, in config order (rows resolved).
        ebc: the ``EmbeddingBagCollection`` (on meta until sharded).
        cut: identity module after the lookup. Serving export cuts the graph here: everything
            up to and including ``cut`` is the embedding lookup served by the embedding service,
            everything after it is the dense model. Keep it; it holds no parameters.
        tables_to_log: names of the tables whose statistics `table_stats` tracks by default.
        vocabs: the `Vocab` of each table whose rows came from its vocab (keyed by table name).

    Args:
        tables, optimizer, tables_to_log, embedding_dim, is_weighted: the fields of
            `LargeEmbeddingsConfig`, as DictConfig, dataclass or plain values; or `tables` is the
            `EmbeddingsSpec` of a parsed config (``validate(cfg).embeddings``), used as it is.
        num_embeddings_override: rows of tables whose ``num_embeddings`` is null, keyed by table
            key or name (e.g. computed by a data pipeline). Without it such a table's rows come from
            its vocab (``Vocab.load(...).required_rows``).
        config_path: where the embeddings node lives in the app's config, for messages.
    """

    def __init__(
        self,
        tables: Any,
        optimizer: Any = None,
        tables_to_log: Optional[Sequence[str]] = None,
        embedding_dim: int = 16,
        is_weighted: bool = False,
        *,
        num_embeddings_override: Optional[Mapping[str, int]] = None,
        config_path: str = "embeddings",
        **unknown: Any,
    ) -> None:
        super().__init__()
        for hydra_key in ("_target_", "_recursive_", "_convert_"):
            unknown.pop(hydra_key, None)
        if unknown:
            raise ConfigError(
                f"{config_path}: unknown field(s) {sorted(unknown)}; allowed: tables, optimizer, "
                f"tables_to_log, embedding_dim, is_weighted"
            )
        if isinstance(tables, EmbeddingsSpec):  # already parsed (by `validate`): not checked again
            spec = tables
        else:
            values = {
                "tables": tables,
                "optimizer": optimizer,
                "tables_to_log": list(tables_to_log or []),
                "embedding_dim": embedding_dim,
                "is_weighted": is_weighted,
            }
            if optimizer is None:
                values.pop("optimizer")
            # Device-independent rules only: the target device is known when the tables are placed,
            # and `shard` checks what that device can run (e.g. adam needs CUDA).
            parsed = validate(values, device="meta", path=config_path)
            assert parsed.embeddings is not None
            spec = parsed.embeddings
        specs = spec.tables
        config_path = spec.path
        tables_to_log = spec.tables_to_log
        is_weighted = spec.is_weighted
        self.parsed = spec
        check_module_names((s.path, s.name) for s in specs)
        self.vocabs: Dict[str, Any] = {}
        self.specs: List[TableSpec] = [self._resolve_rows(s, num_embeddings_override or {}) for s in specs]
        self.is_weighted = bool(is_weighted)
        self.tables_to_log: List[str] = list(tables_to_log)
        self.config_path = config_path
        with _no_init_on_meta():
            self.ebc = EmbeddingBagCollection(
                tables=[torchrec_config(s) for s in self.specs],
                is_weighted=self.is_weighted,
                device=META,
            )
        self.cut = nn.Identity()
        self._feature_set = frozenset(self.feature_names)
        # Output keys per table, as torchrec names them (kept: a sharded EBC no longer has the configs).
        configs = self.ebc.embedding_bag_configs()
        self._output_keys: Dict[str, List[str]] = {c.name: n for c, n in zip(configs, get_embedding_names_by_table(configs))}
        # Rows seen by forward since the last `table_stats` call, for the tables being tracked.
        self._touched: Dict[str, Optional[torch.Tensor]] = {name: None for name in self.tables_to_log}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> "LargeEmbeddings":
        """Build from an embeddings config: a DictConfig, a `LargeEmbeddingsConfig` or a dict.

        Interpolations are resolved against the node's own root, so a node taken out of an app
        config (``cfg.embeddings``) works as well as a standalone one. `kwargs` are passed on
        (``num_embeddings_override``, ``config_path``).
        """
        if isinstance(cfg, ParsedConfig):
            if cfg.embeddings is None:
                raise ConfigError("the parsed config holds no embeddings section")
            cfg = cfg.embeddings
        if isinstance(cfg, EmbeddingsSpec):
            return cls(cfg, **kwargs)
        if isinstance(cfg, DictConfig):
            if "config_path" not in kwargs and cfg._get_parent() is not None:
                key = cfg._get_full_key(None)
                if key:
                    kwargs["config_path"] = str(key)
            values = to_container(cfg)
        elif isinstance(cfg, (LargeEmbeddingsConfig, Mapping)):
            values = to_container(cfg)
        else:
            raise TypeError(f"expected a DictConfig, LargeEmbeddingsConfig, dict or ParsedConfig, got {type(cfg).__name__}")
        assert isinstance(values, dict)
        for hydra_key in ("_target_", "_recursive_", "_convert_"):
            values.pop(hydra_key, None)
        return cls(**values, **kwargs)

    def _resolve_rows(self, spec: TableSpec, override: Mapping[str, int]) -> TableSpec:
        return resolve_rows(spec, override, self.vocabs)

    # ------------------------------------------------------------------ use

    @property
    def feature_names(self) -> List[str]:
        """Keys the input KeyedJaggedTensor must carry, in table order (a shared feature once)."""
        return list(dict.fromkeys(f for s in self.specs for f in s.feature_names))

    @property
    def table_names(self) -> List[str]:
        return [s.name for s in self.specs]

    @property
    def embedding_names(self) -> List[str]:
        """Keys of the output KeyedTensor, in order: one per (table, feature), the feature's
        name, or ``feature@table`` for a feature several tables read (torchrec's naming)."""
        return [n for names in self._output_keys.values() for n in names]

    def output_keys(self, table: str) -> List[str]:
        """The output keys of one table (name or key), in the order of its features."""
        return list(self._output_keys[self.spec(table).name])

    def spec(self, table: str) -> TableSpec:
        """The spec of a table, by name or key."""
        for s in self.specs:
            if table in (s.name, s.key):
                return s
        raise KeyError(f"{table!r} is not a table of {self.config_path}; tables: {self.table_names}")

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings keyed by feature name (one ``[batch, dim]`` block per feature;
        ``feature@table`` for a feature several tables read, see `embedding_names`).

        `features` holds ids (row numbers) per feature; with ``is_weighted`` also one weight per id
        (``features.weights()``), multiplied into the pooling. After `shard` the result may be a
        torchrec ``LazyAwaitable[KeyedTensor]`` that waits on first use (so communication overlaps
        with the dense model); it behaves like the KeyedTensor.
        """
        if self._feature_set.difference(features.keys()):
            missing = sorted(self._feature_set.difference(features.keys()))
            raise KeyError(f"{self.config_path}: the input has no feature(s) {missing}; every table's features must be present (an empty bag is fine)")
        if self._touched:
            self._record_touched(features)
        return self.cut(self.ebc(features))

    # ------------------------------------------------------------------ touched rows

    def track_touched(self, tables: Sequence[str]) -> None:
        """Start recording which rows forward sees for `tables` (names or keys).

        Costs one byte per row of each tracked table (allocated on first forward); `table_stats`
        reads and resets it. The tables in ``tables_to_log`` are tracked from the start.
        """
        for t in tables:
            name = self.spec(t).name
            self._touched.setdefault(name, None)

    @torch.no_grad()
    def _record_touched(self, features: KeyedJaggedTensor) -> None:
        by_feature: Optional[Dict[str, Any]] = None
        for name in self._touched:
            spec = self.spec(name)
            present = [f for f in spec.feature_names if f in features.keys()]
            if not present:
                continue
            if by_feature is None:
                by_feature = features.to_dict()
            ids = torch.cat([by_feature[f].values() for f in present]).long()
            mask = self._touched[name]
            if mask is None:
                mask = torch.zeros(int(spec.num_embeddings or 0), dtype=torch.uint8, device=ids.device)
                self._touched[name] = mask
            ids = ids[(ids >= 0) & (ids < mask.numel())]
            mask[ids.to(mask.device)] = 1

    def take_touched(self, table: str) -> Optional[torch.Tensor]:
        """The rows-long uint8 mask of rows seen since the last call (None: not tracked), reset."""
        name = self.spec(table).name
        if name not in self._touched:
            return None
        mask = self._touched[name]
        if mask is None:
            mask = torch.zeros(int(self.spec(name).num_embeddings or 0), dtype=torch.uint8)
        self._touched[name] = torch.zeros_like(mask)
        return mask

    def extra_repr(self) -> str:
        total = sum(int(s.num_embeddings or 0) * s.embedding_dim for s in self.specs)
        return f"tables={len(self.specs)}, parameters={total:,}, is_weighted={self.is_weighted}"


@contextlib.contextmanager
def _no_init_on_meta() -> Iterator[None]:
    """Skip `nn.EmbeddingBag.reset_parameters` while tables are built on meta.

    Meta tensors hold no values, so the initialisation does nothing but costs ~0.3 ms per table
    (a third of building 1,000 tables). Weights are initialised where they are materialised:
    by the sharded modules `shard` creates.
    """
    original = nn.EmbeddingBag.reset_parameters

    def reset_parameters(self: nn.EmbeddingBag) -> None:
        if self.weight.device.type != "meta":
            original(self)

    nn.EmbeddingBag.reset_parameters = reset_parameters  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.EmbeddingBag.reset_parameters = original  # type: ignore[method-assign]


def resolve_rows(spec: TableSpec, override: Mapping[str, int], vocabs: Dict[str, Any]) -> TableSpec:
    """The spec with `num_embeddings` set: from the config, the override, or the vocab (loaded
    into `vocabs`, keyed by table name)."""
    given = override.get(spec.key, override.get(spec.name))
    if spec.num_embeddings is not None:
        if given is not None and int(given) != spec.num_embeddings:
            raise ConfigError(
                f"{spec.path}.num_embeddings: is {spec.num_embeddings} but num_embeddings_override "
                f"gives {given}; overrides are for tables whose num_embeddings is null"
            )
        return spec
    if given is not None:
        if int(given) <= 0:
            raise ConfigError(f"{spec.path}.num_embeddings: override {given!r} is not a positive integer")
        return replace(spec, num_embeddings=int(given))
    vocab = Vocab.load(
        spec.vocab,
        table=spec.name,
        num_embeddings=None,
        oov_policy=spec.oov_policy,
        oov_buckets=spec.oov_buckets,
        config_path=spec.path,
    )
    vocabs[spec.name] = vocab
    logger.info("%s: %d rows from vocab %s", spec.path, vocab.required_rows, spec.vocab)
    return replace(spec, num_embeddings=int(vocab.required_rows))


def torchrec_config(spec: TableSpec) -> TorchrecTableConfig:
    """The torchrec table config of a complete spec (rows resolved): every field torchrec has
    an equivalent for, so the sharded kernels see the same initial range, pruning and flags."""
    if spec.num_embeddings is None:
        raise ConfigError(f"{spec.path}.num_embeddings: is null; resolve the rows (vocab or override) first")
    return TorchrecTableConfig(
        num_embeddings=int(spec.num_embeddings),
        embedding_dim=spec.embedding_dim,
        name=spec.name,
        feature_names=list(spec.feature_names),
        data_type=DATA_TYPES[spec.data_type],
        pooling=POOLING_TYPES[spec.pooling],
        weight_init_min=spec.weight_init_min,
        weight_init_max=spec.weight_init_max,
        num_embeddings_post_pruning=spec.num_embeddings_post_pruning,
        need_pos=spec.need_pos,
    )
