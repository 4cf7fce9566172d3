"""Small embedding tables kept inside the model (country, device, language ...).

Unlike the large tables they are plain `nn.Embedding`s: replicated on every rank and
trained by the model's dense optimizer. Each table looks up one column of the integer
discrete-feature tensor; the outputs are concatenated in config order.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from recap_embed.config import ConfigError, ParsedConfig, SmallEmbeddingsConfig, SmallTableSpec, validate
from recap_embed.config.resolve import config_prefix
from recap_embed.errors import UserError

from .discrete import check_columns
from .names import check_module_names

__all__ = ["SmallEmbeddings", "SmallEmbeddingsError", "SmallTable"]

#: Config path of the section, used in messages when the config does not say otherwise.
SECTION = "small_embeddings"
#: Bad ids quoted in an error message; the message also gives their count.
_QUOTED = 5


class SmallEmbeddingsError(IndexError, UserError):
    """An input the tables cannot look up: an id out of range, or too few columns (a data error:
    reported as one line by the console scripts)."""


#: One small table with its defaults applied (the config layer's parsed form).
SmallTable = SmallTableSpec


def section_of(cfg: Any, section: str, item_key: str, schema: type) -> Any:
    """The `section` of a root config, or `cfg` itself when it is that section (has `item_key`)."""
    if isinstance(cfg, schema):
        return cfg
    if isinstance(cfg, (DictConfig, Mapping)) and section in cfg and item_key not in cfg:
        return cfg[section]
    if not isinstance(cfg, (DictConfig, Mapping)) and hasattr(cfg, section):
        return getattr(cfg, section)
    return cfg


def small_tables(
    tables: Any, path: str = SECTION, num_discrete_features: Optional[int] = None
) -> Tuple[SmallTable, ...]:
    """Validated tables in config order (name defaults to the key).

    `tables` maps keys to `SmallEmbeddingBagConfig`s, DictConfigs or dicts, or is the parsed
    tuple of `SmallTableSpec` (``validate(cfg).small_embeddings``), returned as it is. Raises
    ConfigValidationError (all problems at once, each naming its config path).
    """
    if isinstance(tables, tuple) and all(isinstance(t, SmallTableSpec) for t in tables):
        return tables
    parsed = validate({"tables": tables or {}}, section=SECTION, path=path, num_discrete_features=num_discrete_features)
    assert parsed.small_embeddings is not None
    return parsed.small_embeddings


class SmallEmbeddings(nn.Module):
    """Embeddings of a few small vocabularies, concatenated: [B, F] ids -> [B, sum(dims)].

    Output columns, in config order of `tables`: table t fills ``output_slices[t]``
    (``output_dims[t]`` columns starting at the sum of the earlier dims). Weights are
    `nn.Embedding` weights (``embeddings[name].weight``), initialised N(0, 1).

    Every forward checks the ids with one min/max per looked-up column (one device sync);
    an id outside ``[0, num_embeddings)`` raises `SmallEmbeddingsError` naming the table,
    its config path, the bad ids and the allowed range. ``check_ids=False`` skips the check
    (then a bad id fails inside the embedding kernel, or silently on some devices).
    """

    def __init__(
        self,
        tables: Mapping[str, Any],
        *,
        check_ids: bool = True,
        num_discrete_features: Optional[int] = None,
        path: str = SECTION,
    ) -> None:
        super().__init__()
        self.tables: Tuple[SmallTable, ...] = small_tables(tables, path, num_discrete_features)
        check_module_names((t.path, t.name) for t in self.tables)
        self.check_ids = check_ids
        self.path = path
        self.embeddings = nn.ModuleDict({t.name: nn.Embedding(t.num_embeddings, t.embedding_dim) for t in self.tables})
        self.register_buffer("_column_index", torch.tensor([t.index for t in self.tables], dtype=torch.long), persistent=False)
        self.register_buffer(
            "_num_embeddings", torch.tensor([t.num_embeddings for t in self.tables], dtype=torch.long), persistent=False
        )

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> "SmallEmbeddings":
        """Build from a `SmallEmbeddingsConfig` (dataclass or DictConfig), a root config holding one,
        or a `ParsedConfig` (not checked again)."""
        if isinstance(cfg, ParsedConfig):
            if cfg.small_embeddings is None:
                raise ConfigError("the parsed config holds no small_embeddings section")
            return cls(cfg.small_embeddings, path=cfg.small_embeddings_path, **kwargs)
        section = section_of(cfg, SECTION, "tables", SmallEmbeddingsConfig)
        path = kwargs.pop("path", config_prefix(section, SECTION))
        parsed = validate(section, section=SECTION, path=path, num_discrete_features=kwargs.get("num_discrete_features"))
        return cls(parsed.small_embeddings, path=path, **kwargs)

    # ------------------------------------------------------------------ shape of the output

    @property
    def table_names(self) -> List[str]:
        """Table names in output order."""
        return [t.name for t in self.tables]

    @property
    def output_dims(self) -> List[int]:
        """Columns each table contributes, in output order."""
        return [t.embedding_dim for t in self.tables]

    @property
    def output_dim(self) -> int:
        """Width of the output: the sum of the dims."""
        return sum(self.output_dims)

    @property
    def output_slices(self) -> Dict[str, slice]:
        """{table name: its output columns}."""
        slices, start = {}, 0
        for t in self.tables:
            slices[t.name] = slice(start, start + t.embedding_dim)
            start += t.embedding_dim
        return slices

    # ------------------------------------------------------------------ lookup

    def forward(self, discrete: torch.Tensor) -> torch.Tensor:
        """Look up column `index` of `discrete` ([B, F] int64/int32) in each table; [B, sum(dims)]."""
        self._check_shape(discrete)
        if not self.tables:
            return torch.zeros(discrete.shape[0], 0, device=discrete.device, dtype=torch.get_default_dtype())
        if self.check_ids and discrete.shape[0] > 0:
            self._check_ids(discrete)
        return torch.cat([self.embeddings[t.name](discrete[:, t.index]) for t in self.tables], dim=1)

    def _check_shape(self, discrete: torch.Tensor) -> None:
        check_columns(discrete, ((t.path, "table", t.name, t.index) for t in self.tables), path=self.path, error=SmallEmbeddingsError)
        if discrete.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"small embeddings look up integer ids; expected int64 or int32 discrete features, got {discrete.dtype}")

    def _check_ids(self, discrete: torch.Tensor) -> None:
        """One min/max per column and one sync; details are gathered only when something is wrong."""
        cols = discrete.index_select(1, self._column_index)
        low, high = torch.aminmax(cols, dim=0)
        bad = (low < 0) | (high >= self._num_embeddings)
        if not bool(bad.any()):
            return
        lines = []
        for i in bad.nonzero().flatten().tolist():
            t = self.tables[i]
            col = cols[:, i]
            wrong = col[(col < 0) | (col >= t.num_embeddings)]
            values = torch.unique(wrong).tolist()
            quoted = ", ".join(str(v) for v in values[:_QUOTED]) + (", ..." if len(values) > _QUOTED else "")
            lines.append(
                f"{t.path}: {wrong.numel()} id(s) in column {t.index} outside the rows of table {t.name!r} "
                f"(distinct bad ids: {quoted}); allowed: 0..{t.num_embeddings - 1} (num_embeddings={t.num_embeddings})"
            )
        raise SmallEmbeddingsError("\n".join(lines))

    def extra_repr(self) -> str:
        return ", ".join(f"{t.name}: col {t.index} -> {t.num_embeddings}x{t.embedding_dim}" for t in self.tables)
