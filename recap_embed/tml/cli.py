"""recap-embed-from-tml: turn a tml YAML (heavy ranker or TwHIN) into this library's Hydra presets.

Reads both of tml's embedding formats, told apart by content: the recap format
(`model.large_embeddings`, one collection optimizer) and the common format (TwHIN's
`model.embeddings`, an optimizer and data type per table). Writes `<out>/embeddings/<name>.yaml`, `<out>/small_embeddings/<name>.yaml` and
`<out>/stratifiers/<name>.yaml` (those the file has), selectable as `embeddings=<name>`.
Every failure is one line on stderr and exit status 2, so scripts can tell it from a crash
(with HYDRA_FULL_ERROR=1, as in the Hydra apps, the traceback instead): the same policy as the
Hydra apps (`recap_embed.errors.user_error_status`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, List, Optional

import yaml

from recap_embed.config import ConfigError, ConfigValidationError, validate
from recap_embed.errors import EXIT_USER_ERROR, InputPathError, UserError, full_traceback_requested, user_error_status
from recap_embed.tml import (
    TmlConversion,
    TmlConversionError,
    check_preset_name,
    default_preset_name,
    from_tml,
    render_presets,
    write_presets,
)

PROG = "recap-embed-from-tml"
EXIT_ERROR = EXIT_USER_ERROR
_SECTIONS = ("large_embeddings", "embeddings", "small_embeddings", "stratifiers")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert the embedding sections of a tml (the-algorithm-ml) YAML config, in the recap "
        "format (model.large_embeddings) or the common format (TwHIN's model.embeddings), into Hydra presets "
        "for the embeddings, small_embeddings and stratifiers groups.",
    )
    p.add_argument("file", help="tml YAML config")
    p.add_argument(
        "--key",
        default=None,
        help="dotted path of the node holding large_embeddings (or TwHIN's embeddings), small_embeddings and "
        "stratifiers, or of an embeddings node itself (e.g. model, model.large_embeddings, model.embeddings); "
        "default: the file's root, else `model`",
    )
    p.add_argument("--name", default=None, help="preset (option) name; default: the file's stem")
    p.add_argument("--out", default="conf", help="config directory to write the groups into (default: ./conf)")
    p.add_argument("--overwrite", action="store_true", help="replace presets that already exist")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the presets instead of writing them")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; return the exit status (0 ok, 2 error) instead of exiting."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return int(e.code or 0)
    try:
        return _run(args)
    except Exception as e:  # noqa: BLE001 - a bug (not a user error) is re-raised with its traceback
        where = f"{args.file}: " if isinstance(e, TmlConversionError) else ""
        status = None if full_traceback_requested() else user_error_status(e, lambda m: _error(where + m), EXIT_ERROR)
        if status is None:
            raise
        return status


def _run(args: argparse.Namespace) -> int:
    source = Path(args.file)
    name = args.name if args.name is not None else default_preset_name(source)
    check_preset_name(name)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as e:
        raise InputPathError(f"cannot read {args.file}: {e.strerror or e}") from None
    try:
        # tml loads with yaml.safe_load too (after $VAR expansion, which the conversion keeps).
        root = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{args.file} is not valid YAML: {' '.join(str(e).split())}") from None
    key = args.key if args.key is not None else _default_key(root)
    node = _select(root, key, args.file)
    conversion = from_tml(node, path=key)
    _warn_broken_rules(conversion)
    shown = _display_path(source)
    if args.print_only:
        rendered = render_presets(conversion, name, source=shown)
        sys.stdout.write("\n".join(f"# ==> {rel} <==\n{body}" for rel, body in rendered.items()))
        _note_skipped(conversion)
        return 0
    try:
        written = write_presets(conversion, args.out, name, overwrite=args.overwrite, source=shown)
    except OSError as e:
        if isinstance(e, ConfigError):
            raise
        raise InputPathError(f"cannot write the presets into {args.out}: {e.strerror or e}") from None
    for path in written:
        print(f"wrote {path}")
    groups = ", ".join(f"{p.parent.name}={name}" for p in written)
    print(f"select with: {groups}")
    _note_skipped(conversion)
    return 0


def _note_skipped(conversion: TmlConversion) -> None:
    """Name what sat beside the sections and was left alone (TwHIN's relations, ...)."""
    if conversion.skipped:
        print(f"{PROG}: note: not embedding config, not converted: {', '.join(conversion.skipped)}", file=sys.stderr)


def _warn_broken_rules(conversion: TmlConversion) -> None:
    """tml accepted what ours may not (a dim FBGEMM rejects): say so, but still convert."""
    sections = {
        k: v
        for k, v in (
            ("embeddings", conversion.embeddings),
            ("small_embeddings", conversion.small_embeddings),
            ("stratifiers", conversion.stratifiers),
        )
        if v is not None
    }
    try:
        sections = _without_env(sections)  # paths from the environment are checked where they are used
        validate(sections, device="cuda")  # the target device is unknown here: allow CUDA-only algorithms
    except ConfigValidationError as e:
        for path, message in e.problems:
            print(f"{PROG}: warning: {path}: {message}", file=sys.stderr)
    except ConfigError as e:  # e.g. an ${oc.env:VAR} that is unset here
        print(f"{PROG}: warning: not checked against recap_embed's rules: {' '.join(str(e).split())}", file=sys.stderr)


def _without_env(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_env(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"\$\{oc\.env:([^}]*)\}", r"$\1", value)
    return value


def _default_key(root: Any) -> str:
    """The root when it holds the sections (or is one), else `model`, where tml keeps them."""
    if isinstance(root, dict) and "tables" not in root and not any(k in root for k in _SECTIONS):
        if isinstance(root.get("model"), dict):
            return "model"
    return ""


def _select(root: Any, key: str, file: str) -> Any:
    node = root
    walked: List[str] = []
    for part in [p for p in key.split(".") if p] if key else []:
        if not isinstance(node, dict) or part not in node:
            where = ".".join(walked) or "the root"
            keys = ", ".join(map(str, node)) if isinstance(node, dict) else f"a {type(node).__name__}"
            raise UserError(f"{file}: no key {key!r} (no {part!r} under {where}; there: {keys or 'nothing'})")
        node = node[part]
        walked.append(part)
    if not isinstance(node, dict):
        raise UserError(f"{file}: {key or 'the root'} is not a mapping (got {type(node).__name__})")
    return node


def _display_path(path: Path) -> str:
    """The path as the user would recognise it, never an absolute path outside the cwd."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
