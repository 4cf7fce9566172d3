"""What recap_embed's own console apps add to Hydra before it reads a config (never imported by the
plugin, so other Hydra apps are unchanged): every config file is bounded, and everything Hydra
itself builds from the config goes through the same `_target_` allowlist as the app's modules.

Hydra 1.3 instantiates ``hydra.callbacks`` and the logging configs (``hydra.job_logging``,
``hydra.hydra_logging``: ``logging.config.dictConfig`` calls any ``()`` factory or handler
``class``) before the task function runs, so a preset picked with ``--config-dir`` could run a
callable the app never sees. `install` wraps those two entry points (and YAML loading) for the
app's process:

* ``hydra.callbacks``: checked with `recap_embed.check_targets` (interpolations
  resolved) against the default prefixes plus ``allowed_targets`` given on the command line;
* logging configs: each factory and handler class must resolve to a logging Handler, Formatter or
  Filter class of ``logging`` or ``colorlog``, or be allowed as above;
* YAML files: at most `MAX_YAML_DEPTH` levels of nesting and `MAX_YAML_NODES` values once aliases
  are expanded (an alias bomb expands exponentially when OmegaConf copies it; deep nesting ends
  in a RecursionError), refused before anything is built;
* a YAML syntax error is one message naming the file, not a traceback.

Why the command line and not a config file widens the allowlist: the allowlist exists to make a
config file from elsewhere safe to use; a file that could extend it would make it a formality.
The command line (and Python code calling `instantiate(..., allowed_targets=...)`) belongs to the
person running the job. A config file that sets ``allowed_targets`` is refused, saying so.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterable, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from recap_embed._instantiate import UntrustedTargetError, _resolve, check_targets
from recap_embed.config.errors import ConfigError
from recap_embed.errors import USER_ERRORS, InputPathError
from recap_embed.train.rundir import RunDirLock

__all__ = [
    "ALLOWED_TARGETS_KEY",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "app_allowed_targets",
    "check_logging_config",
    "command_line_allowed_targets",
    "install",
]

#: The app config key that lists extra module prefixes for `_target_`s.
ALLOWED_TARGETS_KEY = "allowed_targets"
#: Deepest nesting of mappings and lists a config file may have.
MAX_YAML_DEPTH = 64
#: Most values (scalars, mappings, lists) a config file may hold once its aliases are expanded;
#: a 3,000-table preset holds about 40,000.
MAX_YAML_NODES = 2_000_000

log = logging.getLogger("recap_embed")


class ConfigFileTooLarge(ConfigError):
    """A config file nested too deep or expanding to too many values."""


# --------------------------------------------------------------------------- the allowlist's source


def command_line_allowed_targets(task_overrides: Iterable[str], key: str = ALLOWED_TARGETS_KEY) -> Optional[List[str]]:
    """The prefixes ``key=[...]`` (or ``+key=`` / ``++key=``) sets on the command line, [] for
    ``~key``, None when the command line does not mention it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    found: Optional[List[str]] = None
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        if override.key_or_group != key or override.package is not None:
            continue
        if override.is_delete():
            found = []
            continue
        value = override.value()
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{key}: {value!r} on the command line is not a list of module prefixes, e.g. {key}=[my_project]")
        found = [str(v) for v in values]
    return found


def _task_overrides(config: Any) -> Optional[List[str]]:
    """hydra.overrides.task of a config that has a hydra node, else of the running Hydra job."""
    node = OmegaConf.select(config, "hydra.overrides.task") if isinstance(config, DictConfig) else None
    if node is not None:
        return list(OmegaConf.to_container(node, resolve=False))  # type: ignore[arg-type]
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover
        return None
    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def app_allowed_targets(cfg: Any, key: str = ALLOWED_TARGETS_KEY) -> List[str]:
    """The extra `_target_` prefixes an app may use: those given on the command line.

    Under a Hydra run, a value of ``cfg.<key>`` that the command line did not give came from a
    config file, which may not widen the allowlist that guards it: ConfigError. Outside a Hydra
    run (the app called from Python) the caller's code built `cfg`, and its value is used.
    """
    configured = list(OmegaConf.select(cfg, key, default=None) or []) if isinstance(cfg, DictConfig) else list((cfg or {}).get(key) or [])
    overrides = _task_overrides(cfg)
    if overrides is None:
        return [str(p) for p in configured]
    given = command_line_allowed_targets(overrides, key)
    if given is None:
        if configured:
            raise ConfigError(
                f"{key}: {configured} is set by a config file; a config file cannot widen the allowlist that "
                f"guards it: give the prefixes on the command line ({key}=[{','.join(map(str, configured))}]) "
                f"after checking that you trust those modules"
            )
        return []
    return given


# --------------------------------------------------------------------------- what Hydra builds


def check_callbacks(config: Any) -> None:
    """``hydra.callbacks`` of a full Hydra config against the allowlist (interpolations resolved)."""
    callbacks = OmegaConf.select(config, "hydra.callbacks")
    if callbacks:
        check_targets(callbacks, app_allowed_targets(config), "hydra.callbacks")


def check_run_dir(config: Any) -> None:
    """The run (or sweep) directory is not a file; a single-process run takes its lock now, before
    Hydra writes the run's config into it (a second run into a directory in use is refused here)."""
    import os

    mode = str(OmegaConf.select(config, "hydra.mode", default="RUN") or "RUN")
    key = "hydra.sweep.dir" if "MULTIRUN" in mode else "hydra.run.dir"
    path = OmegaConf.select(config, key, default=None)
    if path is None:
        return
    path = str(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputPathError(f"{key}: {path!r} is a file, not a directory; choose another {key}")
    if _LOCK_RUN_DIR and key == "hydra.run.dir" and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        RunDirLock(path).acquire()


_LOCK_RUN_DIR = False
_LOGGING_PACKAGES = ("logging", "colorlog")


def check_logging_config(log_config: Any, path: str, allowed: Iterable[str] = ()) -> None:
    """Every factory (``()``) and ``class`` of a ``logging.config.dictConfig`` config must be a
    Handler, Formatter or Filter class of the logging packages, or an allowed `_target_`."""
    if log_config is None:
        return
    node = OmegaConf.to_container(log_config, resolve=True) if isinstance(log_config, (DictConfig, ListConfig)) else log_config

    def logging_class(obj: Any) -> bool:
        if not isinstance(obj, type) or not issubclass(obj, (logging.Handler, logging.Formatter, logging.Filter)):
            return False
        return str(obj.__module__).split(".")[0] in _LOGGING_PACKAGES

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                child = f"{where}.{k}"
                if k in ("()", "class") and not callable(v):
                    name = str(v)
                    if not logging_class(_resolve(name)):
                        try:
                            check_targets({"_target_": name}, allowed, child.rsplit(".", 1)[0])
                        except UntrustedTargetError as e:
                            raise UntrustedTargetError(
                                f"{child}: {name!r} is not a logging Handler, Formatter or Filter class of "
                                f"{'/'.join(_LOGGING_PACKAGES)}, nor an allowed _target_ ({str(e).split('; ', 1)[-1]})"
                            ) from None
                elif k in ("()", "class"):
                    raise UntrustedTargetError(f"{child}: a callable object is not allowed in a logging config")
                else:
                    walk(v, child)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    walk(node, path)


def _refuse(error: BaseException) -> None:
    """One line on stderr and exit status 2 (logging may not be configured yet)."""
    import os

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"[ERROR] {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def _guard_callbacks() -> None:
    try:
        from hydra._internal import callbacks as callbacks_module
    except ImportError:  # pragma: no cover - another Hydra layout
        return
    cls = callbacks_module.Callbacks
    if getattr(cls.__init__, "_recap_embed", False):
        return
    original = cls.__init__

    def __init__(self, config: Optional[DictConfig] = None, *args: Any, **kwargs: Any) -> None:  # type: ignore[no-untyped-def]
        if config is not None:
            try:
                check_run_dir(config)
                check_callbacks(config)
            except USER_ERRORS as e:
                _refuse(e)
        original(self, config, *args, **kwargs)

    __init__._recap_embed = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


def _guard_logging() -> None:
    try:
        import hydra.core.utils as core_utils
    except ImportError:  # pragma: no cover
        return
    original = core_utils.configure_log
    if getattr(original, "_recap_embed", False):
        return

    def configure_log(log_config: Any, verbose_config: Any = False) -> None:
        try:
            check_logging_config(log_config, _logging_path(log_config), app_allowed_targets_or_empty())
        except USER_ERRORS as e:
            _refuse(e)
        original(log_config, verbose_config)

    configure_log._recap_embed = True  # type: ignore[attr-defined]
    # Hydra imports it by name into several modules: replace every copy of the original.
    for name, module in list(sys.modules.items()):
        if name.startswith("hydra") and getattr(module, "configure_log", None) is original:
            setattr(module, "configure_log", configure_log)


def _logging_path(log_config: Any) -> str:
    """hydra.job_logging or hydra.hydra_logging, from the node's own key when it has one."""
    if isinstance(log_config, DictConfig):
        key = log_config._get_full_key(None)
        if key:
            return str(key)
    return "hydra.logging"


def app_allowed_targets_or_empty() -> List[str]:
    """Command-line prefixes of the running job (logging is configured before the task's config
    is at hand; a config file's value is never used here)."""
    overrides = _task_overrides(None)
    if overrides is None:
        return []
    return command_line_allowed_targets(overrides) or []


# --------------------------------------------------------------------------- YAML


def _bounded_yaml() -> None:
    """OmegaConf's YAML loader, refusing files nested deeper than MAX_YAML_DEPTH or expanding to
    more than MAX_YAML_NODES values (both checked on the node graph, before anything is built)."""
    try:
        from omegaconf import _utils
    except ImportError:  # pragma: no cover
        return
    original = _utils.get_yaml_loader
    if getattr(original, "_recap_embed", False):
        return

    def get_yaml_loader() -> Any:
        base = original()

        class BoundedLoader(base):  # type: ignore[misc, valid-type]
            _depth = 0

            def compose_node(self, parent: Any, index: Any) -> Any:
                self._depth += 1
                try:
                    if self._depth > MAX_YAML_DEPTH:
                        mark = self.peek_event().start_mark
                        raise ConfigFileTooLarge(
                            f"nested more than {MAX_YAML_DEPTH} levels deep (at line {mark.line + 1}, column "
                            f"{mark.column + 1}); a config needs far fewer"
                        )
                    return super().compose_node(parent, index)
                finally:
                    self._depth -= 1

            def construct_document(self, node: Any) -> Any:
                size = _expanded_size(node, MAX_YAML_NODES)
                if size > MAX_YAML_NODES:
                    raise ConfigFileTooLarge(
                        f"expands to more than {MAX_YAML_NODES:,} values once its aliases (*name) are expanded; "
                        f"refusing to build it (an alias bomb, or a config far larger than any model needs)"
                    )
                return super().construct_document(node)

        return BoundedLoader

    get_yaml_loader._recap_embed = True  # type: ignore[attr-defined]
    _utils.get_yaml_loader = get_yaml_loader


def _expanded_size(root: Any, limit: int) -> int:
    """Values in the YAML node graph with every alias expanded (memoised per node; stops past `limit`)."""
    import yaml

    sizes: dict = {}
    stack = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else list(node.value)
        if not ready:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        total = 1
        for c in children:
            total += sizes.get(id(c), 0)
            if total > limit:
                return total
        sizes[id(node)] = total
    return sizes.get(id(root), 0)


def _compact_yaml_errors() -> None:
    """Report a YAML syntax error (or a file refused above) as one message naming the file.

    Hydra 1.3 loads config files before the app runs and prints anything but its own composition
    errors with the whole stack; a typo in a user's preset is a bad input like any other.
    """
    try:
        import yaml
        from hydra._internal.config_repository import ConfigRepository
        from hydra.errors import ConfigCompositionException
    except ImportError:  # pragma: no cover - another Hydra layout
        return
    load = ConfigRepository.load_config
    if getattr(load, "_recap_embed", False):
        return

    def load_config(self, config_path):  # type: ignore[no-untyped-def]
        try:
            return load(self, config_path)
        except ConfigFileTooLarge as e:
            raise ConfigCompositionException(f"{config_path}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigCompositionException(f"{config_path} is not valid YAML: {' '.join(str(e).split())}") from e

    load_config._recap_embed = True  # type: ignore[attr-defined]
    ConfigRepository.load_config = load_config  # type: ignore[method-assign]


def install(lock_run_dir: bool = False) -> None:
    """Apply every guard above to this process (idempotent); `lock_run_dir`: take the run
    directory's lock before Hydra writes into it (the training app)."""
    global _LOCK_RUN_DIR
    _LOCK_RUN_DIR = _LOCK_RUN_DIR or lock_run_dir
    _bounded_yaml()
    _compact_yaml_errors()
    _guard_callbacks()
    _guard_logging()
