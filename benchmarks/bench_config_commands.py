"""Start-up cost of the config-only commands on a 100-table config vs. a bare Hydra app.

Each command runs in a fresh process (``subprocess``), the commands interleaved round by round,
N rounds; the median wall time per command and its ratio to the bare app are reported.

* ``train_cfg_job``: ``recap-embed-train --cfg job hydra.searchpath=[file://<tmp>] embeddings=bench100``
  (a 100-table preset written to a temp config dir)
* ``train_help``: ``recap-embed-train --help`` with the same overrides
* ``plan_cfg_job``: ``recap-embed-plan --cfg job`` with the same overrides (skipped when that
  console script is not installed)
* ``bare_cfg_job`` / ``bare_help``: a Hydra hello-world app (one YAML file, ``print(cfg)``), run
  the same way. Hydra discovers every installed plugin for every app, recap_embed's search-path
  plugin included, so this baseline already pays for importing ``recap_embed.config``.
* ``bare_noplugin_cfg_job`` / ``bare_noplugin_help``: the same hello-world app with recap_embed's
  checkout removed from ``sys.path`` (its plugin is not discovered): the cost of Hydra alone, to
  size what recap_embed's plugin adds to every Hydra app installed next to it.

Then ``python -X importtime`` of ``--cfg job`` and ``--help`` checks that torch (and torchrec,
fbgemm_gpu, pyarrow) are not imported on those paths.

    python benchmarks/bench_config_commands.py --out benchmarks/results/config_commands.json
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, parser, summary, write_inline_preset, write_json  # noqa: E402

PRESET = "bench100"
HEAVY = ("torch", "torchrec", "fbgemm_gpu", "pyarrow", "numpy", "torchsnapshot", "matplotlib")

BARE_APP = '''import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg))


if __name__ == "__main__":
    main()
'''

BARE_CONFIG = """db:
  driver: mysql
  user: omry
  password: secret
"""

# Runs a script with recap_embed's checkout taken off sys.path, so its Hydra plugin is not found.
NO_PLUGIN = (
    "import os, runpy, sys; root = os.path.realpath(sys.argv[1]); "
    "sys.path[:] = [p for p in sys.path if os.path.realpath(p or '.') != root]; "
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def write_preset(conf_dir: Path, tables: int) -> None:
    """An inline preset, each table with its own dim (see BENCHMARKS.md section 5)."""
    write_inline_preset(conf_dir, PRESET, tables, writer="bench_config_commands.py", table_dim=True)


def console_script(name: str) -> List[str]:
    """How to run an installed console script with this interpreter (None-safe: [] if absent)."""
    here = Path(sys.executable).parent / name
    path = str(here) if here.exists() else shutil.which(name)
    return [sys.executable, path] if path else []


def commands(tmp: Path) -> Dict[str, List[str]]:
    overrides = [f"hydra.searchpath=[file://{tmp / 'conf'}]", f"embeddings={PRESET}"]
    cmds: Dict[str, List[str]] = {}
    # The console script when installed, else the same entry point as a module.
    train = console_script("recap-embed-train") or [sys.executable, "-m", "recap_embed.train"]
    cmds["train_cfg_job"] = [*train, "--cfg", "job", *overrides]
    cmds["train_help"] = [*train, "--help", *overrides]
    plan = console_script("recap-embed-plan")
    if plan:
        cmds["plan_cfg_job"] = [*plan, "--cfg", "job", *overrides]
    app = str(tmp / "bare" / "app.py")
    cmds["bare_cfg_job"] = [sys.executable, app, "--cfg", "job"]
    cmds["bare_help"] = [sys.executable, app, "--help"]
    cmds["bare_noplugin_cfg_job"] = [sys.executable, "-c", NO_PLUGIN, str(ROOT), app, "--cfg", "job"]
    cmds["bare_noplugin_help"] = [sys.executable, "-c", NO_PLUGIN, str(ROOT), app, "--help"]
    return cmds


def run(cmd: List[str], cwd: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)


def imports_of(cmd: List[str], cwd: Path, env: Dict[str, str]) -> Dict[str, Any]:
    """Top-level packages `python -X importtime` shows, the heavy ones, and the slowest imports."""
    proc = run([cmd[0], "-X", "importtime", *cmd[1:]], cwd, env)
    modules: Dict[str, int] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            modules[m.group(4)] = int(m.group(2))
    tops = {name.split(".")[0] for name in modules}
    slow = sorted(((c, n) for n, c in modules.items() if "." not in n), reverse=True)[:10]
    watched = ("hydra_plugins.recap_embed.searchpath", "recap_embed.config", "recap_embed.train.app", "hydra", "omegaconf")
    return {
        "returncode": proc.returncode,
        "modules_imported": len(modules),
        "heavy_imported": sorted(h for h in HEAVY if h in tops),
        "torch_imported": "torch" in tops,
        "slowest_top_level_ms": [[n, round(c / 1e3, 1)] for c, n in slow],
        "cumulative_ms": {n: round(modules[n] / 1e3, 1) for n in watched if n in modules},
    }


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="fresh processes per command (interleaved)")
    p.add_argument("--tables", type=int, default=100)
    args = p.parse_args()
    rounds, n_tables = (1, 10) if args.quick else (args.rounds, args.tables)
    tmp = Path(tempfile.mkdtemp(prefix="recap_bench_cfg_"))
    try:
        write_preset(tmp / "conf", n_tables)
        (tmp / "bare" / "conf").mkdir(parents=True)
        (tmp / "bare" / "app.py").write_text(BARE_APP)
        (tmp / "bare" / "conf" / "config.yaml").write_text(BARE_CONFIG)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")}
        env["HYDRA_FULL_ERROR"] = "1"
        cmds = commands(tmp)
        # Check every command once (and warm the OS file cache: all timings are warm-cache).
        checks: Dict[str, Any] = {}
        for name, cmd in cmds.items():
            if args.quick and name.startswith("bare"):
                continue  # a quick run checks our commands only (the timed round still runs every one)
            proc = run(cmd, tmp, env)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
            checks[name] = {"stdout_chars": len(proc.stdout)}
            if name.startswith(("train", "plan")):
                found = len(set(re.findall(r"\bt\d{4}:", proc.stdout)))
                checks[name]["tables_in_output"] = found
        times: Dict[str, List[float]] = {name: [] for name in cmds}
        for _ in range(rounds):
            for name, cmd in cmds.items():
                t0 = time.perf_counter()
                proc = run(cmd, tmp, env)
                times[name].append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
        stats = {name: summary(v) for name, v in times.items()}
        med = {name: s["median"] for name, s in stats.items()}
        ratios = {
            "train_cfg_job_over_bare": med["train_cfg_job"] / med["bare_cfg_job"],
            "train_help_over_bare": med["train_help"] / med["bare_help"],
            "bare_over_bare_noplugin": med["bare_cfg_job"] / med["bare_noplugin_cfg_job"],
            "bare_help_over_bare_noplugin_help": med["bare_help"] / med["bare_noplugin_help"],
            "train_help_over_bare_noplugin_help": med["train_help"] / med["bare_noplugin_help"],
            "train_cfg_job_over_bare_noplugin": med["train_cfg_job"] / med["bare_noplugin_cfg_job"],
        }
        if "plan_cfg_job" in med:
            ratios["plan_cfg_job_over_bare"] = med["plan_cfg_job"] / med["bare_cfg_job"]
        importtime = {name: imports_of(cmds[name], tmp, env) for name in cmds if not name.startswith("bare")}
        if not args.quick:
            importtime["bare_cfg_job"] = imports_of(cmds["bare_cfg_job"], tmp, env)
        targets = {
            "train_cfg_job_le_1.5x_bare": ratios["train_cfg_job_over_bare"] <= 1.5,
            "train_help_le_1.5x_bare": ratios["train_help_over_bare"] <= 1.5,
            "no_torch_on_cfg_job_and_help": not any(v["torch_imported"] for v in importtime.values()),
        }
        if "plan_cfg_job_over_bare" in ratios:
            targets["plan_cfg_job_le_1.5x_bare"] = ratios["plan_cfg_job_over_bare"] <= 1.5
        result = {
            "benchmark": "config_commands",
            "machine": machine(),
            "quick": args.quick,
            "setup": {"tables": n_tables, "rounds": rounds,
                      "commands": {k: " ".join(Path(c).name if i < 2 else c.replace(str(tmp), "<tmp>").replace(str(ROOT), "<repo>")
                                               for i, c in enumerate(v)) for k, v in cmds.items()},
                      "plan_command_present": "plan_cfg_job" in cmds, "file_cache": "warm (each command ran once before timing)"},
            "checks": checks,
            "seconds": stats,
            "ratios": ratios,
            "importtime": importtime,
            "targets": targets,
        }
        for name, s in stats.items():
            print(f"{name:24s} median {s['median'] * 1e3:7.1f} ms  (p10 {s['p10'] * 1e3:.1f}, p90 {s['p90'] * 1e3:.1f})")
        print("ratios:", {k: round(v, 3) for k, v in ratios.items()})
        print("heavy imports:", {k: v["heavy_imported"] for k, v in importtime.items()})
        write_json(args.out, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
