"""Untrusted configs and files: a `_target_` outside the allowlist is refused, with its config
path, before anything is called; pickles in snapshots and checkpoints are never run.

Every refused target here carries a payload that would leave a file behind if it ran (a shell
command, an ``eval``, or `untrusted_helper.touch`); each test asserts the file does not exist.
That `load_pretrained` reads tensors only and refuses pickled entries (ObjectEntry, torch_save) is
tested in tests/test_pretrained.py::test_object_and_pickled_entries_are_refused; the console
script's refusal is the `untrusted_target` case of tests/test_bad_inputs.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import pytest
from hydra import compose, initialize
from omegaconf import OmegaConf

import recap_embed.train.config  # noqa: F401  (registers the app's schema)
import untrusted_helper
from recap_embed.instantiate import DEFAULT_ALLOWED_TARGETS, UntrustedTargetError, check_targets, instantiate


def compose_train(overrides):
    with initialize(version_base=None, config_path=None):
        return compose("recap_embed_train", overrides=overrides)


def refused_configs(marker: Path) -> Dict[str, Any]:
    """name -> (config, config path of the bad `_target_`, words of the message)."""
    shell = f"echo called > {marker}"
    py = f"open({str(marker)!r}, 'w').write('called')"
    return {
        "os_system": ({"_target_": "os.system", "_args_": [shell]}, "_target_", ["'os.system'"]),
        "builtins_eval": ({"_target_": "builtins.eval", "_args_": [py]}, "_target_", ["'builtins.eval'"]),
        "nested_in_embeddings": (
            {"embeddings": {"_target_": "recap_embed.modules.LargeEmbeddings", "tables": {"user": {"_target_": "os.system", "_args_": [shell]}}}},
            "embeddings.tables.user._target_", ["'os.system'"],
        ),
        "small_embeddings_target": (
            {"small_embeddings": {"_target_": "untrusted_helper.touch", "path": str(marker)}},
            "small_embeddings._target_", ["'untrusted_helper.touch'"],
        ),
        "in_a_list": (
            {"layers": [{"_target_": "torch.nn.Identity"}, {"_target_": "subprocess.call", "_args_": [["sh", "-c", shell]]}]},
            "layers[1]._target_", ["'subprocess.call'"],
        ),
        # Hydra walks attributes: an allowed module that imports `os` must not reach os.system.
        "attribute_walk": ({"_target_": "recap_embed.errors.os.system", "_args_": [shell]}, "_target_", ["recap_embed.errors.os.system", "posix.system"]),
        # ... nor shutil.copyfile, which Hydra's own blocklist lets through (it would copy `src`).
        "attribute_walk_unblocked": (
            {"_target_": "recap_embed.io.vocab.shutil.copyfile", "_args_": [str(marker.parent / "src"), str(marker)]},
            "_target_", ["recap_embed.io.vocab.shutil.copyfile", "shutil.copyfile"],
        ),
        "torch_load_via_torch_nn": (
            {"_target_": "torch.nn.modules.module.torch.load", "f": str(marker)}, "_target_", ["torch.serialization.load"],
        ),
        "lookalike_prefix": ({"_target_": "torchrecs.system", "_args_": [shell]}, "_target_", ["'torchrecs.system'"]),
        "callable_object": ({"_target_": untrusted_helper.touch, "path": str(marker)}, "_target_", ["'untrusted_helper.touch'"]),
        "interpolated": ({"_target_": "${oc.env:RECAP_EMBED_EVIL_TARGET}", "_args_": [shell]}, "_target_", ["oc.env"]),
    }


NAMES = list(refused_configs(Path("x")))


@pytest.mark.parametrize("name", NAMES)
def test_refused_before_anything_is_called(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    marker = tmp_path / "called"
    monkeypatch.setenv("RECAP_EMBED_EVIL_TARGET", "os.system")
    (tmp_path / "src").write_text("payload\n")
    cfg, path, words = refused_configs(marker)[name]
    as_omegaconf = name != "callable_object"  # OmegaConf cannot hold a function
    with pytest.raises(UntrustedTargetError) as err:
        instantiate(OmegaConf.create(cfg) if as_omegaconf else cfg)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    for word in [*words, "allowed prefixes", *DEFAULT_ALLOWED_TARGETS, "allowed_targets"]:
        assert word in message, (word, message)
    assert not marker.exists(), "a refused target was called"


def test_the_payloads_would_have_run(tmp_path: Path) -> None:
    """The harness detects a call: the same payload runs once its module is allowed."""
    marker = tmp_path / "called"
    cfg = OmegaConf.create({"small_embeddings": {"_target_": "untrusted_helper.touch", "path": str(marker)}})
    assert instantiate(cfg.small_embeddings, allowed_targets=["untrusted_helper"]) == str(marker)
    assert marker.exists()


def test_user_prefixes_are_whole_module_names(tmp_path: Path) -> None:
    check_targets({"_target_": "untrusted_helper.touch"}, ["untrusted_helper"])
    check_targets({"_target_": "untrusted_helper.touch"}, ["untrusted_helper."])
    with pytest.raises(UntrustedTargetError, match="'untrusted_helper.touch'"):
        check_targets({"_target_": "untrusted_helper.touch"}, ["untrusted"])  # not a prefix of the module


def test_library_targets_are_allowed_by_default() -> None:
    cfg = compose_train(["data.dir=unused"])
    check_targets(cfg)  # every `_target_` of the app's own config
    for target in ("torch.nn.Linear", "torch.optim.SGD", "torchrec.EmbeddingBagCollection", "torchmetrics.classification.BinaryAUROC"):
        check_targets({"_target_": target})
    with pytest.raises(Exception, match=r"x\._target_: 'recap_embed\.modules\.Nope' cannot be imported"):
        instantiate(OmegaConf.create({"x": {"_target_": "recap_embed.modules.Nope"}}).x)


# --------------------------------------------------------------------------- the training app


def test_app_refuses_by_default_and_accepts_allowed_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from recap_embed.train.loop import Trainer, preflight

    marker = tmp_path / "called"
    monkeypatch.setenv(untrusted_helper.MARKER_ENV, str(marker))
    target = ["stratifiers=synthetic", "stratifiers._target_=untrusted_helper.make_stratifiers", f"data.dir={tmp_path / 'data'}"]

    cfg = compose_train(target)
    with pytest.raises(UntrustedTargetError, match=r"^stratifiers\._target_: _target_ 'untrusted_helper\.make_stratifiers' is not allowed"):
        preflight(cfg, torch.device("cpu"), 1)
    with pytest.raises(UntrustedTargetError):
        Trainer(cfg, tmp_path / "run")
    assert not marker.exists() and not (tmp_path / "data").exists() and not (tmp_path / "run").exists()

    cfg = compose_train([*target, "allowed_targets=[untrusted_helper]"])
    preflight(cfg, torch.device("cpu"), 1)  # accepted
    strata = instantiate(cfg.stratifiers, allowed_targets=cfg.allowed_targets)
    assert marker.exists() and strata.names == ["device_0", "device_1", "country_0"]


def test_trainer_passes_allowed_targets_to_instantiate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recap_embed.train.loop import Trainer

    marker = tmp_path / "called"
    monkeypatch.setenv(untrusted_helper.MARKER_ENV, str(marker))
    cfg = compose_train([
        f"data.dir={tmp_path / 'data'}", "data.synthetic.num_users=100", "data.synthetic.num_items=20",
        "data.synthetic.num_train=500", "data.synthetic.num_eval=100", "train.batch_size=64",
        "small_embeddings._target_=untrusted_helper.make_small_then_stop", "allowed_targets=[untrusted_helper]",
    ])
    with pytest.raises(ValueError, match="make_small_then_stop was called"):
        Trainer(cfg, tmp_path / "run")
    assert marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.json").exists()


# --------------------------------------------------------------------------- pickles


def test_checkpoint_objects_are_never_fully_unpickled(tmp_path: Path) -> None:
    """A checkpoint whose object entry pickles a call: restore refuses it (torch.load with
    weights_only=True), and so does torchsnapshot's own restore on this torch; nothing runs."""
    from torchsnapshot import Snapshot, StateDict

    from recap_embed.io.checkpoint import CheckpointError, latest_checkpoint, restore_checkpoint, save_checkpoint

    marker = tmp_path / "called"
    save_checkpoint(tmp_path / "ckpt", 1, {"s": StateDict(obj=untrusted_helper.Payload(str(marker)))})
    assert not marker.exists()  # pickling does not call it
    ckpt = latest_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        restore_checkpoint(ckpt, {"s": StateDict(obj=None)})
    assert not marker.exists()
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") in (None, "", "0"):
        try:
            Snapshot(str(ckpt)).restore({"s": StateDict(obj=None)})
        except Exception:  # noqa: BLE001 - refusing is the expected outcome
            pass
        assert not marker.exists()
