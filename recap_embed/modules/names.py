"""Table names torch can hold: a name becomes a key of an ``nn.ModuleDict`` (torchrec's
``embedding_bags``, the small embeddings), which refuses dots and names of its own attributes."""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

from torch import nn

from recap_embed.config import ConfigValidationError

_ATTRIBUTES = frozenset(a for a in dir(nn.ModuleDict()) if not a.startswith("__"))


def module_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot name a table (a submodule), or None when it can."""
    if not name:
        return "is empty; a table needs a name"
    if "." in name:
        return f"{name!r} contains '.', which torch module names cannot (use '_')"
    if name in _ATTRIBUTES:
        return f"{name!r} is an attribute of torch's ModuleDict and cannot name a submodule; choose another name (e.g. {name}_table)"
    return None


def check_module_names(named: Iterable[Tuple[str, str]]) -> None:
    """Raise ConfigValidationError for every ``(config path, name)`` torch cannot hold."""
    problems: List[Tuple[str, str]] = []
    for path, name in named:
        problem = module_name_problem(name)
        if problem is not None:
            problems.append((path, f"table name {problem}"))
    if problems:
        raise ConfigValidationError(problems)


__all__ = ["check_module_names", "module_name_problem"]
