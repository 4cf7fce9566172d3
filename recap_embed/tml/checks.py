"""Checks of single tml values (tml's pydantic rules), each naming the dotted path of a bad one."""

from __future__ import annotations

import re
import string
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from recap_embed.tml.formats import TmlConversionError


def join_path(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def index_path(path: str, i: int) -> str:
    return f"{path}[{i}]"


def describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def as_mapping(value: Any, path: str) -> Mapping[str, Any]:
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value)
    if not isinstance(value, Mapping):
        raise TmlConversionError(path, f"expected a mapping, got {describe(value)}")
    return value


def as_list(value: Any, path: str) -> List[Any]:
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value)
    if not isinstance(value, (list, tuple)):
        raise TmlConversionError(path, f"expected a list, got {describe(value)}")
    return list(value)


def model_fields(value: Any, path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> Dict[str, Any]:
    """The set fields of a tml model: unknown keys refused (extra=forbid), nulls dropped."""
    node = as_mapping(value, path)
    for key in node:
        if key not in allowed:
            raise TmlConversionError(join_path(path, key), f"unknown key; allowed here: {', '.join(allowed)}")
    present = {k: v for k, v in node.items() if v is not None}
    for key in required:
        if key not in present:
            raise TmlConversionError(join_path(path, key), "is missing (tml requires it)")
    return present


def one_of(node: Mapping[str, Any], path: str, names: Sequence[str], what: str) -> Tuple[str, Any]:
    """tml's one_of: exactly one of `names` set (non-null)."""
    chosen = [n for n in names if node.get(n) is not None]
    if len(chosen) != 1:
        found = f"found {' and '.join(chosen)}" if chosen else "found none"
        raise TmlConversionError(path, f"exactly one {what} of {', '.join(names)} must be set; {found}")
    return chosen[0], node[chosen[0]]


def named_list(
    value: Any, path: str, convert: Callable[[Any, str], Tuple[str, Dict[str, Any]]], what: str
) -> Dict[str, Dict[str, Any]]:
    """A tml list of named items as our dict keyed by name (names must be unique)."""
    out: Dict[str, Dict[str, Any]] = {}
    first: Dict[str, int] = {}
    for i, item in enumerate(as_list(value, path)):
        name, body = convert(item, index_path(path, i))
        if name in out:
            raise TmlConversionError(
                join_path(index_path(path, i), "name"),
                f"duplicate {what} name {name!r} (also {index_path(path, first[name])}); names must be unique",
            )
        out[name] = body
        first[name] = i
    return out


def table_refs(value: Any, path: str, tables: Mapping[str, Any]) -> List[str]:
    refs = [as_name(v, index_path(path, i)) for i, v in enumerate(as_list(value, path))]
    for i, ref in enumerate(refs):
        if ref not in tables:
            raise TmlConversionError(index_path(path, i), f"{ref!r} is not a table; tables: {', '.join(tables) or 'none'}")
    return refs


def as_name(value: Any, path: str) -> str:
    # pydantic (v1) coerces numbers to str; `$` would become an interpolation in our keys and lists.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TmlConversionError(path, f"expected a name (string), got {describe(value)}")
    name = str(value)
    if not name or "$" in name or "." in name:  # a dot would split the dotted path of its config node
        raise TmlConversionError(path, f"{name!r} is not a usable name (empty, has a dot, or uses $ substitution)")
    return name


def as_str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise TmlConversionError(path, f"expected a string, got {describe(value)}")
    return value


def as_float(value: Any, path: str) -> float:
    # PyYAML reads `1e-7` (no dot) as a string; pydantic turned it into a float, and so do we.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TmlConversionError(path, f"expected a number, got {describe(value)}")


def as_int(value: Any, path: str, minimum: Optional[int] = None) -> int:
    result: Optional[int] = None
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)
    elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        result = int(value)
    if result is None:
        raise TmlConversionError(path, f"expected an integer, got {describe(value)}")
    if minimum is not None and result < minimum:
        raise TmlConversionError(path, f"is {result}; must be >= {minimum}")
    return result


def env_interpolation(value: str) -> str:
    """tml's `$VAR`/`${VAR}` (string.Template, expanded at load) as `${oc.env:VAR}`."""

    def sub(m: "re.Match[str]") -> str:
        if m.group("escaped") is not None:
            return "\\$" if m.end() < len(value) and value[m.end()] == "{" else "$"
        var = m.group("named") or m.group("braced")
        if var is not None:
            return "${oc.env:" + var + "}"
        return m.group(0)  # an invalid placeholder stays literal, as with safe_substitute

    out = string.Template.pattern.sub(sub, value)
    # A literal `${` left over (not a tml variable) must not be read as an interpolation.
    return re.sub(r"(?<![\\])\$\{(?!oc\.env:)", r"\\${", out)
