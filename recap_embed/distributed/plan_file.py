"""Plan files: placements keyed by table key, written by ``recap-embed-plan`` and read back by `shard`
(the format is in ``recap_embed.distributed.planner``'s docstring)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from recap_embed.config import (
    ComputeKernel,
    ConfigError,
    ConfigValidationError,
    ShardingType,
    TablePlacement,
)
from recap_embed.files import atomic_write_text


PLAN_FORMAT = "recap_embed.plan"
PLAN_VERSION = 1


@dataclass
class PlanFile:
    """The content of a plan file: placements keyed by table key, and what it was written for."""

    tables: Dict[str, TablePlacement] = field(default_factory=dict)
    world_size: Optional[int] = None
    device_type: Optional[str] = None
    version: int = PLAN_VERSION


def _placement_dict(p: Union[TablePlacement, Mapping[str, Any]]) -> Dict[str, Any]:
    if isinstance(p, TablePlacement):
        st, ck, ranks = p.sharding_type, p.compute_kernel, p.ranks
    else:
        st, ck, ranks = p["sharding_type"], p["compute_kernel"], p.get("ranks", [])
    return {
        "sharding_type": st.value if isinstance(st, ShardingType) else str(st),
        "compute_kernel": ck.value if isinstance(ck, ComputeKernel) else str(ck),
        "ranks": [int(r) for r in ranks],
    }


def save_plan_file(
    path: Union[str, os.PathLike],
    placements: Mapping[str, Union[TablePlacement, Mapping[str, Any]]],
    *,
    world_size: Optional[int] = None,
    device_type: Optional[str] = None,
) -> None:
    """Write placements (keyed by table key) as a version-1 plan file (format in module doc)."""
    doc: Dict[str, Any] = {"format": PLAN_FORMAT, "version": PLAN_VERSION}
    if world_size is not None:
        doc["world_size"] = int(world_size)
    if device_type is not None:
        doc["device_type"] = str(device_type)
    tables = {key: _placement_dict(p) for key, p in placements.items()}
    # One line per table (a row-wise table lists every rank): readable and diffable at any size.
    head = json.dumps(doc, indent=2)[:-2]
    body = ",\n".join(f"    {json.dumps(key)}: {json.dumps(entry)}" for key, entry in tables.items())
    text = head + ',\n  "tables": {' + (f"\n{body}\n  " if body else "") + "}\n}\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def load_plan_file(path: Union[str, os.PathLike], *, config_path: str = "sharding.plan_file") -> PlanFile:
    """Read and check a plan file; errors name the file and the offending entry."""
    where = f"{config_path} ({str(path)!r})"
    try:
        doc = json.loads(Path(os.path.expanduser(str(path))).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found; write one with recap-embed-plan or save_plan_file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, unreadable, not text
        raise ConfigError(f"{where}: cannot be read as a plan file ({type(e).__name__}: {e}); give the plan.json recap-embed-plan wrote") from None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise ConfigError(f"{where}: not a plan file (expected \"format\": {PLAN_FORMAT!r})")
    version = doc.get("version")
    if version != PLAN_VERSION:
        raise ConfigError(f"{where}: version {version!r} is not supported; this recap_embed reads version {PLAN_VERSION}")
    tables = doc.get("tables")
    if not isinstance(tables, dict):
        raise ConfigError(f"{where}: \"tables\" must map table keys to placements")
    problems: List[Tuple[str, str]] = []
    out: Dict[str, TablePlacement] = {}
    for key, entry in tables.items():
        p = f"{where}: tables.{key}"
        if not isinstance(entry, dict):
            problems.append((p, "must be an object with sharding_type, compute_kernel, ranks"))
            continue
        unknown = set(entry) - {"sharding_type", "compute_kernel", "ranks"}
        if unknown:
            problems.append((p, f"unknown field(s) {sorted(unknown)}; allowed: sharding_type, compute_kernel, ranks"))
        try:
            st = ShardingType(entry.get("sharding_type"))
        except ValueError:
            problems.append((f"{p}.sharding_type", f"{entry.get('sharding_type')!r} is not a sharding type; allowed: {[t.value for t in ShardingType]}"))
            continue
        try:
            ck = ComputeKernel(entry.get("compute_kernel"))
        except ValueError:
            problems.append((f"{p}.compute_kernel", f"{entry.get('compute_kernel')!r} is not a compute kernel; allowed: {[k.value for k in ComputeKernel]}"))
            continue
        ranks = entry.get("ranks", [])
        if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            problems.append((f"{p}.ranks", f"{ranks!r} is not a list of integer ranks"))
            continue
        out[key] = TablePlacement(sharding_type=st, compute_kernel=ck, ranks=list(ranks))
    if problems:
        raise ConfigValidationError(problems)
    ws = doc.get("world_size")
    return PlanFile(tables=out, world_size=int(ws) if ws is not None else None, device_type=doc.get("device_type"), version=version)
