"""Child processes for the tests: one clean environment, captured output, a timeout instead of a hang.

Every test that starts a command (a console script, ``python -m``, torchrun, a benchmark script, a
Hydra app, ``python -c``) goes through here, so that what the shell running pytest happens to hold
cannot change what a child does: a ``RANK``/``MASTER_PORT`` left by torchrun or a job scheduler
would make a one-process run try to join a process group, ``HYDRA_FULL_ERROR=1`` turns the one-line
errors the tests read into tracebacks, a large ``OMP_NUM_THREADS`` oversubscribes the cores that
parallel children share.

* `clean_env(**extra)`: ``os.environ`` without those variables, with ``OMP_NUM_THREADS=1``
  and ``GLOO_DEVICE_TRANSPORT=TCP``.
* `run(cmd)`: runs to the end and returns a `Completed`; on a timeout it kills the child and all
  it started, then fails the test; an exit status other than `expect` fails the test with the
  command, the status and the end of its output.
* `start(cmd)`: the same environment for a child the test talks to while it runs (reads its lines,
  sends it signals); `wait_for`, `finish` and `stop` bound every wait.
* Command forms: `console`, `python_m`, `python_script`, `python_c`, `torchrun`; `free_port`.

Each child leads a process group of its own (``start_new_session``), so a signal the test sends
reaches it alone, and Ctrl-C in the terminal reaches pytest, which then stops its children.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Callable, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

__all__ = [
    "Completed", "TimedOut", "clean_env", "console", "finish", "free_port", "python_c", "python_m", "python_script",
    "run", "start", "stop", "torchrun", "wait_for",
]

Command = Sequence[Union[str, "os.PathLike[str]"]]

#: Variables torch.distributed and torchrun read or set for their ranks (torch 2.x's local elastic
#: agent), and that a child must never inherit: it would take itself for a rank of another job.
DISTRIBUTED_VARIABLES = frozenset({
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
})
#: Prefixes stripped as well: torchrun's agent (``TORCHELASTIC_RUN_ID``, ``TORCHELASTIC_ERROR_FILE``,
#: ...), torchrun's own options given as ``PET_<OPTION>``, and Hydra's switches (``HYDRA_FULL_ERROR``).
STRIPPED_PREFIXES = ("TORCHELASTIC_", "PET_", "HYDRA_")
#: Set in every child: one thread each (children run side by side on few cores; results do not
#: depend on the thread count), and gloo over TCP, as torchrec's multi-process tests run it.
#: Hash seeds stay random (``PYTHONHASHSEED`` is removed), as in a user's shell: no result may
#: depend on the iteration order of a set of strings.
PINNED = {"OMP_NUM_THREADS": "1", "GLOO_DEVICE_TRANSPORT": "TCP"}
UNPINNED = ("PYTHONHASHSEED",)

DEFAULT_TIMEOUT_S = 300.0
TAIL_CHARS = 3000


def clean_env(**extra: Optional[str]) -> dict:
    """``os.environ`` minus the distributed, torchrun and Hydra variables, plus `PINNED`.

    `extra` is applied last: ``clean_env(HYDRA_FULL_ERROR="1")`` keeps that variable,
    ``clean_env(RANK="1", WORLD_SIZE="2", ...)`` starts a rank by hand, and a value of None
    removes a variable."""
    env = {
        k: v for k, v in os.environ.items()
        if k not in DISTRIBUTED_VARIABLES and k not in UNPINNED and not k.startswith(STRIPPED_PREFIXES)
    }
    env.update(PINNED)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


# --------------------------------------------------------------------------- command forms


def python_m(module: str, *args: Any) -> List[str]:
    """``python -m module args`` with the interpreter running the tests."""
    return [sys.executable, "-m", module, *map(str, args)]


def python_script(path: Union[str, "os.PathLike[str]"], *args: Any) -> List[str]:
    """``python path args``: a Hydra app, a benchmark or an example's script."""
    return [sys.executable, str(path), *map(str, args)]


def python_c(code: str, *args: Any) -> List[str]:
    """``python -c code args``."""
    return [sys.executable, "-c", code, *map(str, args)]


def console(name: str, *args: Any) -> List[str]:
    """A console script of this package, as a user types it.

    The name must be one the installed package declares (a typo fails here, not as "command not
    found" in a child). Where the script file is not installed beside the interpreter, its entry
    point is called the way the script would call it."""
    points = {ep.name: ep for ep in metadata.entry_points(group="console_scripts") if ep.value.startswith("recap_embed.")}
    if name not in points:
        raise AssertionError(f"{name!r} is not a console script of the installed package; it has {sorted(points)}")
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script), *map(str, args)]
    ep = points[name]
    code = (f"import importlib, sys; from functools import reduce; sys.argv[0] = {name!r}; "
            f"sys.exit(reduce(getattr, {ep.attr!r}.split('.'), importlib.import_module({ep.module!r}))())")
    return python_c(code, *args)


def torchrun(*args: Any, nproc_per_node: int = 2) -> List[str]:
    """``torchrun --standalone --nproc_per_node=N args`` (args: ``-m module ...`` or a script), the
    torchrun installed beside the interpreter, as users start it.

    ``--standalone`` rendezvouses on ``localhost:0``: the OS picks a free port, so parallel tests
    never collide and no port is chosen by guessing."""
    script = Path(sys.executable).parent / "torchrun"
    if not script.exists():
        raise AssertionError(f"torchrun is not installed beside {sys.executable} (it comes with torch)")
    return [str(script), "--standalone", f"--nproc_per_node={nproc_per_node}", *map(str, args)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for ranks started by hand, without torchrun)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- running


class TimedOut(AssertionError):
    """A child ran past its timeout and was killed: fails the test unless the test expects it
    (a download that may not answer, say, and then skips)."""


class Completed(subprocess.CompletedProcess):
    """A finished child: `returncode`, `stdout`, `stderr` (text; None where not captured), `output`."""

    @property
    def output(self) -> str:
        """stdout then stderr, as one text."""
        return (self.stdout or "") + (self.stderr or "")


def start(
    cmd: Command,
    *,
    cwd: Union[None, str, "os.PathLike[str]"] = None,
    env: Optional[Mapping[str, Optional[str]]] = None,
    stdout: Union[int, IO[Any], None] = subprocess.PIPE,
    stderr: Union[int, IO[Any], None] = subprocess.STDOUT,
    preexec_fn: Optional[Callable[[], None]] = None,
) -> subprocess.Popen:
    """A running child in `clean_env(**env)`, leading its own process group; stdin is empty.

    Its output is text, stdout and stderr merged by default. End it with `finish` or `stop`."""
    return subprocess.Popen(
        [str(c) for c in cmd], cwd=None if cwd is None else str(cwd), env=clean_env(**dict(env or {})),
        stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=True, start_new_session=True,
        preexec_fn=preexec_fn,
    )


def run(
    cmd: Command,
    *,
    cwd: Union[None, str, "os.PathLike[str]"] = None,
    env: Optional[Mapping[str, Optional[str]]] = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    expect: Optional[int] = 0,
    preexec_fn: Optional[Callable[[], None]] = None,
) -> Completed:
    """Run `cmd` in `clean_env(**env)` to its end; stdout and stderr captured apart, as text.

    `expect`: the exit status the test needs (None: any; the test asserts on it itself). A child
    still running after `timeout` seconds is killed with everything it started, and the test fails."""
    proc = start(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
    done = finish(proc, timeout=timeout)
    if expect is not None and done.returncode != expect:
        raise AssertionError(describe(done.args, f"exit status {_status(done.returncode)}, expected {expect}", done.stdout, done.stderr, cwd))
    return done


def finish(proc: subprocess.Popen, *, timeout: float = DEFAULT_TIMEOUT_S) -> Completed:
    """Wait for a started child and collect the rest of its output; after `timeout` seconds it is
    killed with everything it started and the test fails with the end of what it printed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = _drain(proc)
        raise TimedOut(describe(proc.args, f"did not finish within {timeout:g} s (killed with its children)", out, err)) from None
    except BaseException:  # Ctrl-C or a failing test: leave nothing running
        stop(proc)
        raise
    return Completed(proc.args, proc.returncode, out, err)


def wait_for(proc: subprocess.Popen, needle: str, *, timeout: float = 180.0) -> List[str]:
    """Lines of a started child's stdout up to the first that contains `needle`; the child keeps
    running. Fails the test (and stops the child) when it ends first, or after `timeout` seconds."""
    lines: List[str] = []
    found = threading.Event()

    def read() -> None:
        for line in iter(proc.stdout.readline, ""):
            lines.append(line)
            if needle in line:
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if found.is_set():
        return lines
    if reader.is_alive():
        stop(proc)
        reader.join(10)
        raise TimedOut(describe(proc.args, f"printed no line with {needle!r} within {timeout:g} s (killed)", "".join(lines), None))
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # it closed its stdout but runs on
        stop(proc)
    err = proc.stderr.read() if proc.stderr is not None else None
    raise AssertionError(describe(proc.args, f"ended with exit status {_status(proc.returncode)} before printing {needle!r}", "".join(lines), err))


def stop(proc: subprocess.Popen) -> None:
    """Kill a started child and every process it started, then reap it. Does nothing to a child
    that has ended already.

    The whole tree, not only the child's process group: torchrun starts each rank in a session of
    its own, so killing torchrun's group would leave its ranks running. The tree is frozen first
    (SIGSTOP), so nothing in it can start another process while it is being killed."""
    if proc.poll() is not None:  # ended and reaped: its pid and group id may be another process's by now
        return
    for pid, started in _freeze_tree(proc.pid):
        if _start_time(pid) == started:  # the same process, not a later one with its pid
            _signal(pid, signal.SIGKILL)
    try:  # the rest of its group; the group id is still its own while it is not reaped
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def describe(cmd: Any, what: str, stdout: Optional[str], stderr: Optional[str], cwd: Any = None) -> str:
    """One failure message: the command, how it ended, and the end of each output."""
    argv = [str(c) for c in cmd] if not isinstance(cmd, str) else [cmd]
    lines = [f"command {what}:", f"  $ {shlex.join(argv)}"]
    if cwd is not None:
        lines.append(f"  (in {cwd})")
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if text:
            cut = f", last {TAIL_CHARS} of {len(text)} characters" if len(text) > TAIL_CHARS else ""
            lines.append(f"--- {name}{cut} ---\n{text[-TAIL_CHARS:].rstrip()}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- process trees


def _status(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"{code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


def _drain(proc: subprocess.Popen) -> Tuple[Optional[str], Optional[str]]:
    """What a killed child's pipes still hold (communicate keeps what an earlier timeout read)."""
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a pipe held open by a process that escaped the tree
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return None, None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _start_time(pid: int) -> Optional[str]:
    """Field 22 of /proc/<pid>/stat (start time since boot): tells a process from a later one with its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _children(pid: int) -> Iterable[int]:
    """Direct children of `pid`: /proc/<pid>/task/*/children, or the parent field of every /proc/*/stat."""
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except FileNotFoundError:  # no such process, or a kernel without CONFIG_PROC_CHILDREN
        pass
    except OSError:
        return []
    found: List[int] = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _freeze_tree(root: int) -> Set[Tuple[int, Optional[str]]]:
    """Stop `root` and all its descendants; return them as (pid, start time). Without /proc
    (not Linux) only `root` itself; its process group is killed by the caller."""
    seen: Set[Tuple[int, Optional[str]]] = set()
    todo = [root]
    deadline = time.monotonic() + 5.0
    while todo and time.monotonic() < deadline:
        pid = todo.pop()
        started = _start_time(pid)
        if (pid, started) in seen:
            continue
        _signal(pid, signal.SIGSTOP)  # stop first, then list its children: it can start no more
        seen.add((pid, started))
        todo.extend(_children(pid))
    return seen

