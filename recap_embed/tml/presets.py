"""Write converted sections as Hydra presets (one YAML per group) that select like shipped ones."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml
from omegaconf import OmegaConf

from recap_embed.config.errors import ConfigError
from recap_embed.config.schema import EMBEDDINGS_KEY, EmbeddingOptimizerConfig, LearningRate
from recap_embed.config.store import optimizer_options, schedule_options
from recap_embed.files import atomic_write_text
from recap_embed.tml.formats import SMALL_KEY, STRATIFIERS_KEY, SOURCES, TmlConversion


#: A preset name must be a plain Hydra option name (no dots, slashes or override syntax).
_PRESET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*\Z")


def render_presets(conversion: TmlConversion, name: str, source: Optional[str] = None) -> Dict[str, str]:
    """{relative path: YAML text} of the group options `write_presets` would write."""
    check_preset_name(name)
    out: Dict[str, str] = {}
    sections = (
        (EMBEDDINGS_KEY, conversion.embeddings, _embeddings_preset),
        (SMALL_KEY, conversion.small_embeddings, _plain_preset),
        (STRATIFIERS_KEY, conversion.stratifiers, _plain_preset),
    )
    for group, values, build in sections:
        if values is None:
            continue
        origin = conversion.origin.get(group)
        where = f"{source or 'a tml config'}" + (f" (key {origin})" if origin and origin != "<root>" else "")
        header = f"# Converted by recap-embed-from-tml from {where}.\n"
        if group == EMBEDDINGS_KEY and conversion.format is not None:
            header += f"# Source format: {SOURCES[conversion.format]}.\n"
        defaults, body = build(copy.deepcopy(values))
        text = header + _dump({"defaults": defaults})
        if body:
            text += "\n" + _dump(body)
        out[f"{group}/{name}.yaml"] = text
    return out


def write_presets(
    conversion: TmlConversion,
    out_dir: "os.PathLike[str] | str",
    name: str,
    *,
    overwrite: bool = False,
    source: Optional[str] = None,
) -> List[Path]:
    """Write `out_dir/<group>/<name>.yaml` for each present section; return the paths.

    Refuses (FileExistsError, before writing anything) to replace an existing file unless
    `overwrite`; each file is written to a temporary file and renamed, so a reader never
    sees half a preset. `source` names the tml file in the header comment.
    """
    rendered = render_presets(conversion, name, source)
    targets = {Path(out_dir) / rel: text for rel, text in rendered.items()}
    if not overwrite:
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            verb = "exists" if len(existing) == 1 else "exist"
            raise PresetExistsError(f"{', '.join(existing)} already {verb}; pass --overwrite (overwrite=True) to replace")
    for target, text in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
    return list(targets)


class PresetExistsError(ConfigError, FileExistsError):
    """A preset to write exists already (and overwrite is off)."""


def check_preset_name(name: str) -> None:
    """Raise ConfigError (a ValueError) unless `name` can be a Hydra option name (and is not the schema's)."""
    if not isinstance(name, str) or not _PRESET_NAME.match(name) or name == "base":
        raise ConfigError(
            f"preset name {name!r} is not allowed: use letters, digits, _ and -, not starting with -, "
            "and not 'base' (the schema's option)"
        )


def default_preset_name(file: "os.PathLike[str] | str") -> str:
    """The file's stem made into an option name (dots and other characters become `_`)."""
    stem = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(file).stem).lstrip("-")
    return stem if stem and stem != "base" else f"{stem or 'tml'}_tml"


def _embeddings_preset(emb: Dict[str, Any]) -> Tuple[List[Any], Dict[str, Any]]:
    """Defaults list and body of an `embeddings` option.

    The collection's algorithm and schedule are chosen by the `optimizer` and `lr` options,
    not restated in the body: a body value would override a later `embeddings/optimizer=...`
    choice, and a second schedule set next to the `lr` option's would break the one-of. Only
    the schedule values that differ from the chosen `lr` option are written; no schedule is
    `lr: null` (still overridable without `+`).
    """
    opt = emb.get("optimizer") or {}
    algorithm = str(opt.pop("algorithm", "sgd"))
    if algorithm not in optimizer_options():
        raise ValueError(f"{EMBEDDINGS_KEY}.optimizer.algorithm: {algorithm!r} has no embeddings/optimizer option")
    schedule = opt.pop("learning_rate", None) or {}
    chosen = [k for k, v in schedule.items() if v is not None]
    if len(chosen) > 1:
        raise ValueError(f"{EMBEDDINGS_KEY}.optimizer.learning_rate: sets {', '.join(chosen)}; at most one schedule")
    lr_option = chosen[0] if chosen else None
    if lr_option is not None:
        init = opt.get("init_learning_rate", optimizer_options()[algorithm].init_learning_rate)
        differs = _schedule_overrides(lr_option, schedule[lr_option], init)
        if differs is not None:
            opt["learning_rate"] = {lr_option: differs}
    if opt:
        emb["optimizer"] = opt
    else:
        emb.pop("optimizer", None)
    defaults = ["base", {"optimizer": algorithm}, {"lr": lr_option}, "_self_", {"tables": []}]
    return defaults, emb


def _schedule_overrides(option: str, values: Any, init_learning_rate: float) -> Any:
    """What of `values` the `lr` option does not already give (None: nothing)."""
    cfg = OmegaConf.structured(EmbeddingOptimizerConfig(init_learning_rate=init_learning_rate))
    cfg.learning_rate = OmegaConf.merge(OmegaConf.structured(LearningRate), schedule_options()[option])
    given = OmegaConf.to_container(cfg.learning_rate, resolve=True)[option]  # type: ignore[index]
    if not isinstance(values, Mapping):
        return None if values == given else values
    differs = {k: v for k, v in values.items() if not isinstance(given, Mapping) or given.get(k) != v}
    return differs or None


def _plain_preset(values: Dict[str, Any]) -> Tuple[List[Any], Dict[str, Any]]:
    return ["base", "_self_"], values


class _PresetDumper(yaml.SafeDumper):
    """Quotes every string OmegaConf's YAML loader reads as another type (it reads `1e3` as a float)."""


_PresetDumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
        |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _dump(data: Dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_PresetDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
