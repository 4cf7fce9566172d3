"""Fingerprints that tie saved things to what made them, so reuse never mixes meanings silently.

* A generated ``data.dir`` records the settings that generated it (``fingerprint.json``); reusing
  the directory with other settings is refused, naming the settings that differ.
* A checkpoint records the fingerprint of every table's vocabulary (``recap_embed.json``: a hash
  of its id -> row pairs), so a warm start (or a resume) whose vocabulary differs from the one
  the rows were trained with is refused: the same row would mean another id.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from recap_embed.config import ConfigError
from recap_embed.errors import DataError

__all__ = [
    "CHECKPOINT_INFO",
    "DATA_FINGERPRINT",
    "check_data_fingerprint",
    "check_warm_start_vocabs",
    "data_fingerprint",
    "read_checkpoint_info",
    "vocab_fingerprint",
    "write_checkpoint_info",
]

log = logging.getLogger("recap_embed.train")

DATA_FINGERPRINT = "fingerprint.json"
CHECKPOINT_INFO = "recap_embed.json"


# --------------------------------------------------------------------------- data.dir


def _plain(cfg: Any) -> Dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if is_dataclass(cfg):
        return asdict(cfg)
    return dict(cfg)


def data_fingerprint(synthetic: Any, seed: int) -> Dict[str, Any]:
    """What determines a generated synthetic log: its settings and seed."""
    return {"source": "synthetic", "seed": int(seed), "synthetic": _plain(synthetic)}


def check_data_fingerprint(data_dir: Path, expected: Mapping[str, Any]) -> None:
    """A complete generated data dir was generated with `expected`; else DataError naming the differences."""
    path = Path(data_dir) / DATA_FINGERPRINT
    if not path.is_file():
        raise DataError(
            f"data.dir: {str(data_dir)!r} holds generated data without {DATA_FINGERPRINT}, so the settings that made "
            f"it are unknown; remove the directory (it is generated again) or set another data.dir"
        )
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"data.dir: {str(path)!r} cannot be read ({e}); remove the directory to generate it again") from None
    if found == dict(expected):
        return
    diffs = []
    for key in sorted(set(found.get("synthetic", {})) | set(expected.get("synthetic", {}))):
        a, b = found.get("synthetic", {}).get(key), expected.get("synthetic", {}).get(key)
        if a != b:
            diffs.append(f"data.synthetic.{key}: {a!r} there, {b!r} now")
    if found.get("seed") != expected.get("seed"):
        diffs.append(f"data.seed: {found.get('seed')!r} there, {expected.get('seed')!r} now")
    raise DataError(
        f"data.dir: {str(data_dir)!r} was generated with other settings ({'; '.join(diffs) or 'different fingerprint'}); "
        f"using it would train on data these settings do not describe: set another data.dir, or the same settings"
    )


# --------------------------------------------------------------------------- vocabularies


def vocab_fingerprint(vocab: Any) -> Dict[str, Any]:
    """A vocab's fingerprint (`recap_embed.io.vocab.Vocab.fingerprint`)."""
    return vocab.fingerprint()


def write_checkpoint_info(directory: Path, vocabs: Mapping[str, Optional[Dict[str, Any]]], extra: Optional[Mapping[str, Any]] = None) -> None:
    """``recap_embed.json`` in a checkpoint being written: each table's vocab fingerprint (None: raw ids are rows)."""
    info = {"format": "recap_embed.checkpoint", "version": 1, "vocabs": dict(vocabs), **dict(extra or {})}
    (Path(directory) / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_checkpoint_info(snapshot: str) -> Optional[Dict[str, Any]]:
    """The info of a local checkpoint written by this app, or None (another writer, or a remote URI)."""
    root = snapshot[len("fs://"):] if snapshot.startswith("fs://") else snapshot
    if "://" in root:
        return None
    path = Path(root) / CHECKPOINT_INFO
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_warm_start_vocabs(specs: Iterable[Any], vocabs: Mapping[str, Any]) -> None:
    """Every pretrained table whose snapshot records its vocabulary uses the same one now.

    A snapshot without the record (another writer, a remote URI) cannot be checked: a warning
    says so. With ``allow_partial_rows`` (a vocab that grew) a different fingerprint is expected:
    a warning says the rows are assumed to keep their ids.
    """
    for spec in specs:
        pre = spec.pretrained
        if pre is None:
            continue
        uri = str(pre.embedding_snapshot_uri)
        info = read_checkpoint_info(uri)
        source = pre.emb_name or spec.name
        where = f"{spec.path}.pretrained"
        if info is None or source not in (info.get("vocabs") or {}):
            log.warning("%s: snapshot %s does not record the vocabulary of table %r; it cannot be checked against %s's",
                        where, uri, source, spec.path)
            continue
        saved = info["vocabs"][source]
        now = vocab_fingerprint(vocabs[spec.name]) if spec.name in vocabs else None
        if saved == now:
            continue
        describe = lambda fp: "raw ids as rows (no vocab)" if fp is None else f"a vocab of {fp['entries']:,} ids (sha256 {fp['sha256'][:12]})"  # noqa: E731
        if pre.allow_partial_rows and saved is not None and now is not None:
            log.warning("%s: table %r of %s was trained with %s, this run has %s; allow_partial_rows assumes the "
                        "first rows keep their ids", where, source, uri, describe(saved), describe(now))
            continue
        raise ConfigError(
            f"{where}: table {source!r} of {uri!r} was trained with {describe(saved)}, this run's {spec.path} has "
            f"{describe(now)}: its rows would mean other ids; use the vocab it was trained with "
            f"({spec.path}.vocab), or set allow_partial_rows=true if the vocab only grew (old ids keep their rows)"
        )
