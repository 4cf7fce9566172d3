"""tests/launch.py, the one way the tests start commands: what a child inherits, and how a child
that fails, hangs or leaves processes behind is reported and cleaned up."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

import launch

#: What a torchrun rank, a job scheduler or a debugging shell leaves in the environment.
DIRTY = {
    "RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "3", "ROLE_NAME": "trainer", "ROLE_WORLD_SIZE": "8",
    "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "other-job",
    "TORCHELASTIC_ERROR_FILE": "/nonexistent/error.json", "TORCHELASTIC_RESTART_COUNT": "2",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "PET_NPROC_PER_NODE": "8", "HYDRA_FULL_ERROR": "1",
    "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "64",
}
ENV_PROBE = "import json, os; print(json.dumps(dict(os.environ)))"


@pytest.fixture
def dirty_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in DIRTY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RECAP_EMBED_TEST_UNRELATED", "kept")


def child_env(**kwargs) -> dict:
    return json.loads(launch.run(launch.python_c(ENV_PROBE), timeout=60, **kwargs).stdout)


def test_a_child_sees_none_of_the_distributed_or_hydra_variables(dirty_env: None) -> None:
    env = child_env()
    leaked = sorted(k for k in DIRTY if k in env and k != "OMP_NUM_THREADS")
    assert not leaked, leaked
    assert env["OMP_NUM_THREADS"] == "1" and env["GLOO_DEVICE_TRANSPORT"] == "TCP"
    assert env["RECAP_EMBED_TEST_UNRELATED"] == "kept"  # everything else is inherited
    assert os.environ["RANK"] == "3"  # the parent's own environment is untouched


def test_variables_asked_for_reach_the_child_and_none_removes(dirty_env: None) -> None:
    env = child_env(env={"HYDRA_FULL_ERROR": "1", "RANK": "1", "WORLD_SIZE": "2", "RECAP_EMBED_TEST_UNRELATED": None})
    assert (env["HYDRA_FULL_ERROR"], env["RANK"], env["WORLD_SIZE"]) == ("1", "1", "2")
    assert "RECAP_EMBED_TEST_UNRELATED" not in env and "MASTER_PORT" not in env
    # A started child gets the same environment.
    proc = launch.start(launch.python_c(ENV_PROBE), env={"RANK": "0"})
    started = json.loads(launch.finish(proc, timeout=60).stdout)
    assert started["RANK"] == "0" and "WORLD_SIZE" not in started and started["OMP_NUM_THREADS"] == "1"


def test_a_failure_names_the_command_its_status_and_the_end_of_its_output(tmp_path: Path) -> None:
    code = "import sys; print('x' * 5000 + 'last stdout line'); print('the cause', file=sys.stderr); sys.exit(3)"
    with pytest.raises(AssertionError) as err:
        launch.run(launch.python_c(code), cwd=tmp_path, timeout=60)
    message = str(err.value)
    assert "exit status 3, expected 0" in message, message
    assert f"$ {sys.executable} -c " in message and f"(in {tmp_path})" in message, message
    assert "last stdout line" in message and "the cause" in message, message
    assert "last 3000 of 5017 characters" in message and len(message) < 4000, message
    # The status the test needs, or any status.
    assert launch.run(launch.python_c(code), timeout=60, expect=3).returncode == 3
    done = launch.run(launch.python_c(code), timeout=60, expect=None)
    assert done.returncode == 3 and done.output.endswith("the cause\n")
    killed = launch.run(launch.python_c("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), timeout=60, expect=None)
    assert killed.returncode == -signal.SIGKILL


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent has not collected it


#: Starts a grandchild in a session of its own (as torchrun starts its ranks), says both pids, hangs.
HANGER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    print("pids", os.getpid(), grandchild.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see the grandchild")
def test_a_hanging_child_times_out_with_everything_it_started(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(launch.TimedOut) as err:
        launch.run(launch.python_c(HANGER), timeout=3)
    seconds = time.monotonic() - t0
    message = str(err.value)
    assert "did not finish within 3 s (killed with its children)" in message and "$ " in message, message
    assert seconds < 20, seconds
    child, grandchild = (int(p) for p in message.split("pids ", 1)[1].split()[:2])  # its output so far
    deadline = time.monotonic() + 10
    while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child) and not _alive(grandchild), "a process of the timed-out command is still running"


def test_a_started_child_leads_its_own_group_and_waits_are_bounded() -> None:
    proc = launch.start(launch.python_c("import sys, time; print('one'); print('ready', flush=True); time.sleep(600)"))
    try:
        assert os.getpgid(proc.pid) == proc.pid  # a signal to it (or its group) reaches it alone
        assert launch.wait_for(proc, "ready", timeout=60) == ["one\n", "ready\n"]
        with pytest.raises(launch.TimedOut, match="did not finish within 1 s"):
            launch.finish(proc, timeout=1)
        assert proc.returncode == -signal.SIGKILL
    finally:
        launch.stop(proc)
    quiet = launch.start(launch.python_c("import time; time.sleep(600)"))
    with pytest.raises(launch.TimedOut, match="printed no line with 'ready' within 1 s"):
        launch.wait_for(quiet, "ready", timeout=1)
    assert quiet.poll() is not None
    ended = launch.start(launch.python_c("import sys; print('bye'); sys.exit(4)"))
    with pytest.raises(AssertionError, match=r"ended with exit status 4 before printing 'ready'"):
        launch.wait_for(ended, "ready", timeout=60)


def test_command_forms(dirty_env: None) -> None:
    assert launch.python_m("recap_embed.train", "a=1") == [sys.executable, "-m", "recap_embed.train", "a=1"]
    assert launch.python_script(Path("app.py"), 1) == [sys.executable, "app.py", "1"]
    run = launch.torchrun("-m", "recap_embed.train", nproc_per_node=2)
    assert Path(run[0]).name == "torchrun" and run[1:3] == ["--standalone", "--nproc_per_node=2"], run
    with pytest.raises(AssertionError, match="not a console script of the installed package.*recap-embed-train"):
        launch.console("recap-embed-trian")
    script = launch.console("recap-embed-from-tml", "--help")
    assert Path(script[0]).name == "recap-embed-from-tml" or script[:2] == [sys.executable, "-c"], script
    assert "usage: recap-embed-from-tml" in launch.run(script, timeout=120).stdout


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed beside the interpreter")
def test_torchrun_ranks_get_their_own_variables_not_the_parents(dirty_env: None, tmp_path: Path) -> None:
    """A parent environment that names another job's master and ranks changes nothing."""
    probe = tmp_path / "probe.py"
    # Each rank writes its own file: two ranks printing to one pipe can interleave their lines.
    probe.write_text("import json, os\nopen(f\"rank{os.environ['RANK']}.json\", 'w').write(json.dumps({k: os.environ.get(k) for k in "
                     "('RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_ERROR_FILE')}))\n")
    done = launch.run(launch.torchrun(probe, nproc_per_node=2), cwd=tmp_path, timeout=120)
    seen = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["RANK"])
    assert [r["RANK"] for r in seen] == ["0", "1"], done.output[-3000:]
    for r in seen:
        assert r["WORLD_SIZE"] == "2" and r["LOCAL_WORLD_SIZE"] == "2", r
        assert r["MASTER_ADDR"] != DIRTY["MASTER_ADDR"] and r["MASTER_PORT"] != DIRTY["MASTER_PORT"], r
        assert r["TORCHELASTIC_ERROR_FILE"] != DIRTY["TORCHELASTIC_ERROR_FILE"], r


def test_every_launcher_in_the_tests_goes_through_launch() -> None:
    """No test starts a process any other way (which would bring back an environment of its own)."""
    here = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(here.glob("*.py")):
        if path.name in ("launch.py", "test_launch.py"):
            continue
        text = path.read_text()
        for needle in ("subprocess.run(", "subprocess.Popen(", "subprocess.call(", "subprocess.check_", "os.system(", "mp.spawn("):
            if needle in text:
                offenders.append(f"{path.name}: {needle}")
    assert not offenders, offenders
