"""`instantiate` with an allowlist of `_target_`s: configs copied from strangers can't run code.

`hydra.utils.instantiate` imports and calls whatever `_target_` names (`os.system`,
`builtins.eval`, ...). Every object recap_embed builds from a config goes through this one
function, which first checks every `_target_` in the config against allowed module prefixes.
"""

from __future__ import annotations

import importlib
import re
import types
from typing import Any, Iterable, List, Mapping, Optional, Tuple

from omegaconf import DictConfig, ListConfig

from recap_embed.config.errors import ConfigError
from recap_embed.errors import USER_ERRORS

#: Modules whose callables a config may name by default.
DEFAULT_ALLOWED_TARGETS: Tuple[str, ...] = (
    "recap_embed.",
    "torchrec.",
    "torch.nn.",
    "torch.optim.",
    "torchmetrics.",
)


class UntrustedTargetError(ConfigError):
    """A `_target_` outside the allowlist (a config error: names the config path)."""


_UNRESOLVED = object()  # a value whose interpolation cannot be resolved here


def _value(node: Any, key: Any, resolve: bool) -> Any:
    """`node[key]` with interpolations resolved (a node interpolation gives the node it points at)."""
    if not resolve:
        return node._get_node(key)._value() if isinstance(node, (DictConfig, ListConfig)) else node[key]
    try:
        return node[key]
    except Exception:  # noqa: BLE001 - missing values, unknown resolvers, `${hydra:...}` outside a run
        return _UNRESOLVED


def _targets(node: Any, path: str, resolve: bool = True, seen: Optional[set] = None) -> Iterable[Tuple[str, Any]]:
    """(config path, target) of every `_target_` reachable from `node`, following interpolations.

    With `resolve` the walk sees what `instantiate` will see: a value `${payload}` is the node it
    points at, wherever that lives in the config, and a `_target_` that is an interpolation is its
    resolved string. Each container is visited once (interpolations may form cycles).
    """
    seen = set() if seen is None else seen
    if isinstance(node, (DictConfig, ListConfig)):
        if node._is_none() or node._is_missing() or id(node) in seen:
            return
        seen.add(id(node))
    elif isinstance(node, (Mapping, list, tuple)):
        if id(node) in seen:
            return
        seen.add(id(node))
    if isinstance(node, (DictConfig, Mapping)):
        for key in list(node.keys()):
            child = f"{path}.{key}" if path else str(key)
            value = _value(node, key, resolve)
            if key == "_target_":
                yield child, value
            elif value is not _UNRESOLVED:
                yield from _targets(value, child, resolve, seen)
    elif isinstance(node, (ListConfig, list, tuple)):
        for i in range(len(node)):
            value = _value(node, i, resolve)
            if value is not _UNRESOLVED:
                yield from _targets(value, f"{path}[{i}]", resolve, seen)


def _qualified_name(obj: Any) -> str:
    """``module.qualname`` of a class, function or module ('' when it has none)."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str) else ""


def _resolve(name: str) -> Any:
    """What Hydra would call for `name` (it walks attributes as well as modules), or None."""
    try:
        from hydra._internal.utils import _locate
    except ImportError:  # pragma: no cover - a Hydra without it: import as Hydra 1.3 does
        _locate = None
    try:
        if _locate is not None:
            return _locate(name)
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    except Exception:  # noqa: BLE001 - not importable: instantiate reports it with the path
        return None


def check_targets(cfg: Any, allowed: Iterable[str] = (), path: str = "", *, resolve: bool = True) -> None:
    """Raise UntrustedTargetError naming the config path of the first `_target_` not allowed.

    `allowed` adds module prefixes (e.g. ``"my_project."``) to `DEFAULT_ALLOWED_TARGETS`. A name
    must start with an allowed prefix, and so must what it resolves to: Hydra walks attributes,
    so ``recap_embed.errors.os.system`` would otherwise reach ``os.system`` through a module that
    imports ``os``. Resolving imports the (allowed) modules the names point into; nothing is called.
    Interpolations are followed (`resolve`): ``x: ${payload}`` checks the node it points at, since
    `hydra.utils.instantiate` resolves it and builds what it finds there.
    """
    prefixes: List[str] = [*DEFAULT_ALLOWED_TARGETS, *(p if p.endswith(".") else p + "." for p in allowed)]

    def ok(name: str) -> bool:
        return bool(name) and any(name.startswith(p) for p in prefixes)

    def refuse(where: str, what: str) -> UntrustedTargetError:
        return UntrustedTargetError(
            f"{where}: {what} is not allowed; allowed prefixes: {', '.join(prefixes)} "
            f"(add your own module with `allowed_targets`)"
        )

    for where, target in _targets(cfg, path, resolve):
        if target is _UNRESOLVED:
            raise UntrustedTargetError(f"{where}: _target_ is an interpolation that cannot be resolved here; a _target_ must name a callable")
        if callable(target) or isinstance(target, types.ModuleType):
            name = _qualified_name(target) or repr(target)
            if not ok(name):
                raise refuse(where, repr(name))
            continue
        name = str(target)
        if not ok(name):
            raise refuse(where, repr(name))
        obj = _resolve(name)
        if obj is not None:
            real = _qualified_name(obj)
            if not ok(real):
                raise refuse(where, f"{name!r} (which is {real or type(obj).__name__!r})")


def instantiate(cfg: Any, *args: Any, allowed_targets: Iterable[str] = (), **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` after `check_targets`; the config path is kept for messages.

    A bad-input error the target raises (`recap_embed.errors.USER_ERRORS`) is re-raised as it
    is, not wrapped in Hydra's InstantiationException.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    prefix = ""
    if isinstance(cfg, (DictConfig, ListConfig)) and cfg._get_parent() is not None:
        prefix = str(cfg._get_full_key(None) or "")
    prepared = _as_omegaconf(cfg, allowed_targets, prefix)
    check_targets(prepared, allowed_targets, prefix)  # interpolations resolved, as Hydra will
    check_targets(kwargs, allowed_targets, prefix)
    try:
        return hydra_instantiate(prepared, *args, **kwargs)
    except InstantiationException as e:
        # Hydra wraps what the target raised in "Error in call to target ...: VocabError('...')";
        # a bad input is reported as its own (path-naming) message instead.
        cause = e.__cause__
        if isinstance(cause, USER_ERRORS):
            raise cause from None
        located = re.match(r"Error locating target '([^']*)'.*?(?:full_key: (\S+))?\Z", str(e), re.S)
        if isinstance(cause, ImportError) and located:
            target, key = located.group(1), located.group(2) or prefix
            detail = " ".join(str(cause).split())
            raise ConfigError(f"{key + '.' if key else ''}_target_: {target!r} cannot be imported ({detail})") from None
        raise


def _as_omegaconf(cfg: Any, allowed: Iterable[str], prefix: str) -> Any:
    """`cfg` as the OmegaConf node `hydra.utils.instantiate` will build from (plain dicts, lists and
    dataclasses are converted as Hydra converts them; callables are checked before they become
    names). Checking it with interpolations resolved against its own root checks what Hydra
    resolves in its copy, so the targets checked are the targets called."""
    from omegaconf import OmegaConf

    if cfg is None or isinstance(cfg, (DictConfig, ListConfig)):
        return cfg
    check_targets(cfg, allowed, prefix, resolve=False)
    try:
        from hydra._internal.instantiate._instantiate2 import _prepare_input_dict_or_list
    except ImportError:  # pragma: no cover - another Hydra layout: Hydra converts it itself
        return cfg
    raw = _prepare_input_dict_or_list(cfg) if isinstance(cfg, (dict, list)) else cfg
    try:
        return OmegaConf.structured(raw, flags={"allow_objects": True})
    except Exception:  # noqa: BLE001 - not a config Hydra could build either: let it say so
        return raw




def build(cfg: DictConfig, parsed: Any, *, allowed_targets: Iterable[str] = (), **overrides: Any) -> Any:
    """The section `cfg` built from its parsed form: ``target.from_config(parsed)``.

    `parsed` is the `ParsedConfig` of the app's config (from `recap_embed.config.validate`); the
    section's `_target_` (checked against the allowlist) names the class, ours or a subclass,
    and nothing is parsed, resolved or copied again (Hydra's instantiate resolves and deep-copies
    the whole node: seconds for thousands of tables). A target without ``from_config`` (a
    factory function of the user's) is called as `instantiate` would, with `overrides` as kwargs.
    """
    from hydra.utils import get_object

    prefix = str(cfg._get_full_key(None) or "") if cfg._get_parent() is not None else ""
    check_targets(cfg, allowed_targets, prefix)
    target = cfg.get("_target_")
    obj = get_object(target) if isinstance(target, str) else None
    if isinstance(obj, type) and hasattr(obj, "from_config"):
        return obj.from_config(parsed)
    return instantiate(cfg, allowed_targets=allowed_targets, **overrides)


__all__ = ["DEFAULT_ALLOWED_TARGETS", "UntrustedTargetError", "build", "check_targets", "instantiate"]
