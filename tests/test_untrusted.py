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
from recap_embed import DEFAULT_ALLOWED_TARGETS, UntrustedTargetError, check_targets, instantiate


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
        "interpolated": ({"_target_": "${oc.env:RECAP_EMBED_EVIL_TARGET}", "_args_": [shell]}, "_target_", ["'os.system'"]),
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
    with pytest.raises(UntrustedTargetError, match=r"^stratifiers\._target_: 'untrusted_helper\.make_stratifiers' is not allowed"):
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


# --------------------------------------------------------------------------- interpolations


def test_a_node_interpolation_is_checked_where_it_points(tmp_path: Path) -> None:
    """`instantiate(cfg.small_embeddings)` resolves `${payload}` from elsewhere in the config and
    would build what it finds there: the payload is refused before anything is called."""
    marker = tmp_path / "called"
    cfg = OmegaConf.create({
        "payload": {"_target_": "untrusted_helper.touch", "path": str(marker)},
        "small_embeddings": {"_target_": "recap_embed.modules.SmallEmbeddings", "tables": "${payload}"},
    })
    with pytest.raises(UntrustedTargetError, match=r"^small_embeddings\.tables\._target_: 'untrusted_helper\.touch'"):
        instantiate(cfg.small_embeddings)
    assert not marker.exists()
    # The same payload reached through a list, and through a chain of interpolations.
    cfg = OmegaConf.create({"p": {"_target_": "shutil.copyfile", "_args_": ["a", str(marker)]}, "q": "${p}", "x": {"_target_": "torch.nn.Sequential", "_args_": ["${q}"]}})
    with pytest.raises(UntrustedTargetError, match=r"^x\._args_\[0\]\._target_: 'shutil\.copyfile'"):
        instantiate(cfg.x)
    assert not marker.exists()


def test_interpolation_cycles_end() -> None:
    cfg = OmegaConf.create({"a": {"_target_": "torch.nn.Identity", "me": "${a}", "up": "${..a}"}, "b": "${c}", "c": "${b}"})
    check_targets(cfg)  # terminates; the cycle b <-> c cannot be resolved and holds no target


# --------------------------------------------------------------------------- what Hydra builds


def _train(args, cwd: Path):
    """(exit status, stdout + stderr, seconds) of `python -m recap_embed.train args`."""
    import time

    from launch import python_m, run

    t0 = time.perf_counter()
    out = run(python_m("recap_embed.train", *args), cwd=cwd, timeout=120, expect=None)
    return out.returncode, out.output, time.perf_counter() - t0


EVIL = {
    # @package _global_ presets a user might pick with --config-dir
    "callback": "hydra:\n  callbacks:\n    x:\n      _target_: shutil.copyfile\n      _args_: [{src}, {marker}]\n",
    "callback_interpolated": "hydra:\n  callbacks:\n    x:\n      _target_: ${{oc.env:RECAP_EMBED_NO_SUCH_VAR,shutil.copyfile}}\n      _args_: [{src}, {marker}]\n",
    "widen": "allowed_targets: [shutil]\n",
    "logging_factory": "hydra:\n  job_logging:\n    handlers:\n      evil:\n        (): shutil.copyfile\n        src: {src}\n        dst: {marker}\n    root:\n      handlers: [evil]\n",
    "logging_class": "hydra:\n  hydra_logging:\n    handlers:\n      evil:\n        class: shutil.copyfile\n        src: {src}\n        dst: {marker}\n    root:\n      handlers: [evil]\n",
}
EVIL_WORDS = {
    "callback": ["hydra.callbacks.x._target_", "'shutil.copyfile' is not allowed"],
    "callback_interpolated": ["hydra.callbacks.x._target_", "'shutil.copyfile' is not allowed"],
    "widen": ["allowed_targets: ['shutil'] is set by a config file", "cannot widen", "allowed_targets=[shutil]"],
    "logging_factory": ["hydra.job_logging.handlers.evil.()", "'shutil.copyfile' is not a logging Handler"],
    "logging_class": ["hydra.hydra_logging.handlers.evil.class", "'shutil.copyfile' is not a logging Handler"],
}


@pytest.fixture(scope="module")
def evil_runs(tmp_path_factory):
    """Each preset of EVIL through the console script (two at a time), plus the control run that
    allows `shutil` on the command line and so must leave the marker."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("evil")
    (root / "src").write_text("payload\n")
    (root / "conf" / "extra").mkdir(parents=True)

    def run(name: str):
        marker = root / f"marker-{name}"
        preset = name.replace("_control", "")
        (root / "conf" / "extra" / f"{name}.yaml").write_text("# @package _global_\n" + EVIL[preset].format(src=root / "src", marker=marker))
        args = ["--config-dir", str(root / "conf"), f"+extra={name}", f"hydra.run.dir={root / name}", f"data.dir={root / name / 'data'}",
                "embeddings.tables.user.embedding_dim=6"]  # a bad value: the control stops right after the callbacks ran
        if name.endswith("_control"):
            args.append("allowed_targets=[shutil]")
        code, output, _ = _train(args, root)
        return code, output, marker

    names = [*EVIL, "callback_control"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(names, pool.map(run, names)))


@pytest.mark.parametrize("name", list(EVIL))
def test_presets_cannot_make_hydra_call_anything(evil_runs, name: str) -> None:
    code, output, marker = evil_runs[name]
    assert code == 2, output[-3000:]
    for word in EVIL_WORDS[name]:
        assert word in output, (word, output[-3000:])
    assert "Traceback" not in output and output.count("[ERROR]") == 1, output[-3000:]
    assert not marker.exists(), "the payload ran"


def test_the_callback_payload_runs_once_allowed_on_the_command_line(evil_runs) -> None:
    code, output, marker = evil_runs["callback_control"]
    assert marker.exists(), output[-3000:]
    assert code == 2 and "embedding_dim: 6 is not a multiple of 4" in output  # then the bad value stopped it


@pytest.mark.parametrize("kind", ["alias_bomb", "deep_nesting"])
def test_config_files_that_would_not_finish_are_refused_quickly(tmp_path: Path, kind: str) -> None:
    (tmp_path / "conf" / "extra").mkdir(parents=True)
    if kind == "alias_bomb":  # 10^10 values once expanded, 110 in the file
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
        text, words = "\n".join(lines), ["extra/bomb", "expands to more than 2,000,000 values"]
    else:
        text, words = "x: " + "[" * 10_000 + "]" * 10_000, ["extra/bomb", "nested more than 64 levels deep"]
    (tmp_path / "conf" / "extra" / "bomb.yaml").write_text("# @package _global_\n" + text + "\n")
    code, output, seconds = _train(["--config-dir", str(tmp_path / "conf"), "+extra=bomb", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert seconds < 60, seconds
    assert code == 1, output[-3000:]  # Hydra's exit status for errors while composing
    for word in words:
        assert word in output, (word, output[-3000:])
    assert "Traceback" not in output and "RecursionError" not in output, output[-3000:]
    assert not (tmp_path / "run").exists()
