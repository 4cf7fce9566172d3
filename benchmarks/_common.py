"""Shared helpers of the benchmark scripts: machine record, interleaved timing, JSON output.

Plain Python, no project imports, so that every script can use it before importing torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def write_inline_preset(conf_dir: Path, name: str, tables: int, *, writer: str, table_dim: bool = False) -> Path:
    """``embeddings/<name>.yaml`` under `conf_dir`: `tables` tables inline in one file (the fast layout
    for many tables: one YAML to parse), SGD, collection dim 16; `table_dim` gives each its own dim."""
    lines = [f"# written by benchmarks/{writer}", "defaults:", "  - base", "  - optimizer: sgd", "  - _self_", "",
             "embedding_dim: 16", "tables:"]
    for i in range(tables):
        lines += [f"  t{i:04d}:", f"    num_embeddings: {1000 + i}"] + (["    embedding_dim: 16"] if table_dim else [])
    path = Path(conf_dir) / "embeddings" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def parser(description: str, threads: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds; checks that it runs, asserts nothing about speed")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    if threads:
        p.add_argument(
            "--threads", type=int, default=1,
            help="torch intra-op threads (default 1; 0 keeps torch's default). On a shared 2-core machine a "
                 "2-thread parallel region stalls whenever the other core is busy (seen here: torch.sort of 100k "
                 "ids 1 ms with 1 thread, 180 ms with 2 under load), so 1 thread gives comparable numbers",
        )
    return p


def set_threads(n: int) -> int:
    """Apply --threads (0: leave torch's default); returns the thread count in use."""
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def machine() -> Dict[str, Any]:
    """Date, CPU model, cores, Python and (when imported or importable) torch version."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: Dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
    else:
        try:
            from importlib.metadata import version

            info["torch"] = version("torch")
        except Exception:  # noqa: BLE001
            info["torch"] = None
    return info


def interleaved(fns: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 2,
                after: Optional[Callable[[], None]] = None, rotate: bool = True,
                shuffle_seed: Optional[int] = None) -> Dict[str, List[float]]:
    """Run A, B, C, then B, C, A, then C, A, B, ... `reps` rounds (after `warmup` untimed rounds).

    Every arm runs once per round, so load drift hits all arms alike; the order rotates from
    round to round so that no arm is always first. A rotation keeps the cyclic order, though:
    each arm still follows the same neighbour in all rounds but one, and what that neighbour
    leaves in the caches or the allocator biases it (seen here: the arms right after a plain
    torch step with large sparse gradients ran 5-25% slower, decaying along the cycle). With
    `shuffle_seed` every round gets its own random order instead. Returns seconds per call.
    """
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            if after:
                after()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
    for r in range(reps):
        k = r % len(names) if rotate else 0
        order = names[k:] + names[:k]
        if rng is not None:
            rng.shuffle(order)
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if after:
                after()
    return times


def summary(samples: Sequence[float]) -> Dict[str, float]:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return {"median": statistics.median(s), "p10": q(0.1), "p90": q(0.9), "min": s[0], "n": len(s)}


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak RSS (VmHWM) of this process so far."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_json(path: Optional[Path], payload: Dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, default=str)
    if path is None:
        print(text)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"wrote {path}")


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"
