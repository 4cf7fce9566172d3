"""What the training app checks and settles before it reads data or builds a table.

A bad config must fail in seconds, before a synthetic log is generated or a snapshot is read:
`preflight` runs every check that needs neither (the `_target_` allowlist, `validate`, the app's
own settings, the features the tables read, the pretrained manifests) and returns the parsed
config every builder takes. `apply_threads` and `build_vocab_paths` settle the two things that
must be fixed before it: the threads per rank, and where the vocabs the app builds will live.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from recap_embed._instantiate import check_targets
from recap_embed.config import ConfigError, ParsedConfig, validate
from recap_embed.hydra_guards import app_allowed_targets
from recap_embed.io.pretrained import check_pretrained
from recap_embed.modules.names import check_module_names

from . import derive
from .guards import check_dense_memory, check_settings
from .keep_best import KeepBest
from .own_data import Columns

__all__ = ["SPARSE_FEATURES", "apply_threads", "build_vocab_paths", "preflight"]

#: Sparse features of the app's batches (`data.make_batch`): one raw id per example each.
SPARSE_FEATURES = ("user", "item")


def apply_threads(threads: Optional[int]) -> int:
    """Set this rank's torch (intra-op) threads from `train.threads`; returns the count in use.

    One per rank by default, as torchrun sets OMP_NUM_THREADS=1 for its workers: ranks sharing a
    host do not oversubscribe its cores, and the step's many small kernels (lookups of a batch,
    an MLP of a few thousand weights) lose more to waking and syncing threads than they gain.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"train.threads: {threads!r} is not allowed; use a positive number of threads per rank, or null for torch's default")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_vocab_paths(cfg: DictConfig, output_dir: Path) -> List[str]:
    """Point every table with neither `vocab` nor `num_embeddings` at the vocab the app builds
    from the training split (``<run dir>/vocabs/<table name>``); returns those tables' keys.

    `validate` needs the paths, so this runs before it; it reads the three fields it needs from
    the composed nodes instead of parsing the tables, which `validate` then does once. A table
    whose fields cannot be read (a missing value, an interpolation that fails) is left as it is:
    `validate` names the problem.
    """
    tables = cfg.embeddings.get("tables") if isinstance(cfg.embeddings, DictConfig) else None
    if not isinstance(tables, DictConfig):
        return []
    planned = []
    for key in tables:
        try:
            table = tables[key]
            if not isinstance(table, DictConfig) or not (_null(table, "vocab") and _null(table, "num_embeddings")):
                continue
            name = table.get("name") or key
        except OmegaConfBaseException:
            continue
        with open_dict(table):
            table.vocab = str(Path(output_dir) / derive.VOCAB_DIR / str(name))
        planned.append(str(key))
    return planned


def _null(table: DictConfig, field: str) -> bool:
    """`field` is absent or null (a missing ``???`` value is not: it is an error to report)."""
    return not OmegaConf.is_missing(table, field) and table.get(field) is None


def preflight(cfg: DictConfig, device: torch.device, world: int) -> ParsedConfig:
    """Every check that needs neither data nor tables, before anything is generated or built:
    `_target_`s against the allowlist, the config's rules, the features tables read and the
    pretrained snapshots (manifests and file sizes). Returns the parsed config every builder takes."""
    check_targets(cfg, app_allowed_targets(cfg))
    parsed = validate(cfg, device=str(device), num_discrete_features=len(cfg.data.discrete_columns))
    check_settings(cfg)
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the {world} ranks; use a multiple of {world}")
    fraction = cfg.data.validation_fraction
    if not 0 <= fraction < 1:
        raise ConfigError(f"data.validation_fraction: {fraction} is not allowed; use a share of the training rows in [0, 1) (0: no validation split)")
    Columns.from_config(cfg.data).check_distinct()
    KeepBest.from_config(cfg.train)  # its settings, checked
    assert parsed.embeddings is not None
    specs = list(parsed.embeddings.tables)
    for spec in specs:
        _check_features(spec)
    check_module_names((s.path, s.name) for s in specs)
    check_dense_memory(cfg, specs, list(parsed.small_embeddings or ()), device)
    check_pretrained(specs)
    return parsed


def _check_features(spec: Any) -> None:
    unknown = [f for f in spec.feature_names if f not in SPARSE_FEATURES]
    if unknown:
        raise ConfigError(
            f"{spec.path}: reads feature(s) {unknown}, which the training data does not have; the data's "
            f"features: {', '.join(SPARSE_FEATURES)} (set feature_names, or remove the table with ~{spec.path})"
        )
