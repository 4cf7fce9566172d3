"""`instantiate` with an allowlist of `_target_`s: configs copied from strangers can't run code.

`hydra.utils.instantiate` imports and calls whatever `_target_` names (`os.system`,
`builtins.eval`, ...). Every object recap_embed builds from a config goes through this one
function, which first checks every `_target_` in the config against allowed module prefixes.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Mapping, Tuple

from omegaconf import DictConfig, ListConfig

#: Modules whose callables a config may name by default.
DEFAULT_ALLOWED_TARGETS: Tuple[str, ...] = (
    "recap_embed.",
    "torchrec.",
    "torch.nn.",
    "torch.optim.",
    "torchmetrics.",
)


class UntrustedTargetError(ValueError):
    """A `_target_` outside the allowlist."""


def _targets(node: Any, path: str) -> Iterable[Tuple[str, Any]]:
    if isinstance(node, (DictConfig, ListConfig)) and (node._is_none() or node._is_missing()):
        return
    if isinstance(node, (DictConfig, Mapping)):
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for key, value in items:
            child = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield child, value
            else:
                yield from _targets(value, child)
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}[{i}]")


def check_targets(cfg: Any, allowed: Iterable[str] = (), path: str = "") -> None:
    """Raise UntrustedTargetError naming the config path of the first `_target_` not allowed.

    `allowed` adds module prefixes (e.g. ``"my_project."``) to `DEFAULT_ALLOWED_TARGETS`.
    """
    prefixes: List[str] = [*DEFAULT_ALLOWED_TARGETS, *(p if p.endswith(".") else p + "." for p in allowed)]
    for where, target in _targets(cfg, path):
        name = target.__module__ + "." + target.__qualname__ if callable(target) else str(target)
        if not any(name.startswith(p) for p in prefixes):
            raise UntrustedTargetError(
                f"{where}: _target_ {name!r} is not allowed; allowed prefixes: {', '.join(prefixes)} "
                f"(add your own module with `allowed_targets`)"
            )


def instantiate(cfg: Any, *args: Any, allowed_targets: Iterable[str] = (), **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` after `check_targets`; the config path is kept for messages."""
    from hydra.utils import instantiate as hydra_instantiate

    prefix = ""
    if isinstance(cfg, DictConfig) and cfg._get_parent() is not None:
        prefix = str(cfg._get_full_key(None) or "")
    check_targets(cfg, allowed_targets, prefix)
    return hydra_instantiate(cfg, *args, **kwargs)


__all__ = ["DEFAULT_ALLOWED_TARGETS", "UntrustedTargetError", "check_targets", "instantiate"]
