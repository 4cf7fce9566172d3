"""What installing recap_embed costs other Hydra apps: one unrelated app, with and without the package.

Two virtual environments, side by side in one run:

* ``with``: the CPU requirements (``requirements/cpu.txt``), ``torchrec`` (``--no-deps``) and
  recap_embed installed from this checkout **non-editably** (``pip install --no-deps .``), as a
  user installs it (README);
* ``without``: the same packages, no recap_embed at all (so its search-path plugin cannot be found:
  hiding the checkout from ``sys.path`` does not hide an installed plugin).

Both are plain venvs (no ``--system-site-packages``), created under ``--cache-dir`` and reused while
the requirements and the package's sources are unchanged; ``--with-python`` / ``--without-python``
take existing interpreters instead. Before timing, the script checks that ``with`` imports recap_embed
from its own site-packages and discovers the plugin, that ``without`` finds neither, and that the two
hold the same other packages (``pip freeze``).

Timed, each command in a fresh process, all arms interleaved round by round (the order rotating),
medians and ratios of medians plus the median of the per-round ratios:

* ``neighbour_help`` / ``neighbour_cfg_job``: an unrelated tiny Hydra app (its own conf dir with two
  groups, written to a temp dir) run with ``--help`` and ``--cfg job`` in each venv. Target: ``with`` /
  ``without`` <= 1.05 (issue 11). Its ``--cfg job`` output must be identical in both.
* ``train_cfg_job``: ``recap-embed-train --cfg job`` of the ``with`` venv on an inline preset of 100
  tables, against ``bare_cfg_job``, Hydra's hello-world app (one YAML file) in the same venv (and in
  ``without``). Target: <= 1.5x the bare app.

``--quick`` builds no venvs: it runs every arm of the current interpreter as ``with`` (an editable
install counts) on 10 tables, skips the ``without`` arms (saying so), and asserts nothing about speed.

    python benchmarks/bench_neighbour.py --out benchmarks/results/neighbour.json
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, interleaved, machine, parser, summary, write_inline_preset, write_json  # noqa: E402

TORCHREC = "torchrec==1.8.0"
REQUIREMENTS = ROOT / "requirements" / "cpu.txt"
TARGET_NEIGHBOUR = 1.05
TARGET_TRAIN = 1.5

# ----------------------------------------------------------------------------- the apps

NEIGHBOUR_APP = '''"""An app that knows nothing about recap_embed: two groups of its own."""
import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg))


if __name__ == "__main__":
    main()
'''

NEIGHBOUR_CONF = {
    "config.yaml": "defaults:\n  - db: mysql\n  - server: apache\n  - _self_\n\napp:\n  name: neighbour\n  workers: 4\n",
    "db/mysql.yaml": "driver: mysql\nuser: omry\npassword: secret\nport: 3306\n",
    "db/postgresql.yaml": "driver: postgresql\nuser: postgres_user\npassword: drowssap\nport: 5432\n",
    "server/apache.yaml": "name: apache\nport: 80\n",
    "server/nginx.yaml": "name: nginx\nport: 8080\n",
}

BARE_APP = NEIGHBOUR_APP.replace('"""An app that knows nothing about recap_embed: two groups of its own."""', '"""Hydra\'s hello world."""')
BARE_CONF = {"config.yaml": "db:\n  driver: mysql\n  user: omry\n  password: secret\n"}

PRESET = "bench_tables"

# Printed by each venv's interpreter: where recap_embed comes from and which search-path plugins Hydra finds.
PROBE = r"""
import importlib.util, json
from importlib.metadata import version
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
spec = importlib.util.find_spec("recap_embed")
plugins = sorted(f"{p.__module__}.{p.__name__}" for p in Plugins.instance().discover(SearchPathPlugin))
print(json.dumps({"recap_embed": spec.origin if spec else None, "search_path_plugins": plugins,
                  "hydra_core": version("hydra-core"), "omegaconf": version("omegaconf")}))
"""


def write_app(folder: Path, app: str, conf: Dict[str, str]) -> Path:
    for rel, text in conf.items():
        (folder / "conf" / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / "conf" / rel).write_text(text)
    (folder / "app.py").write_text(app)
    return folder / "app.py"


def write_preset(conf_dir: Path, tables: int) -> None:
    """An inline preset of `tables` typed tables."""
    write_inline_preset(conf_dir, PRESET, tables, writer="bench_neighbour.py")


# ----------------------------------------------------------------------------- the venvs

def clean_env() -> Dict[str, str]:
    """The environment every timed command gets: nothing that points Python or Hydra elsewhere."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONWARNINGS")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("HYDRA_")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def source_digest() -> str:
    """Hash of what a non-editable install copies: the packaging files, the packages and the presets."""
    h = hashlib.sha1()
    files = [ROOT / "setup.cfg", ROOT / "pyproject.toml"]
    for top in ("recap_embed", "hydra_plugins", "conf"):
        files += sorted(p for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".cfg"))
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    print("   ", " ".join(a if i else Path(a).name for i, a in enumerate(cmd)), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pip failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def ensure_venv(folder: Path, with_package: bool) -> Path:
    """Create (or bring up to date) one of the two venvs; returns its interpreter."""
    python = folder / "bin" / "python"
    want = {
        "requirements_sha1": hashlib.sha1(REQUIREMENTS.read_bytes()).hexdigest()[:12],
        "torchrec": TORCHREC,
        "recap_embed_sources": source_digest() if with_package else None,
    }
    marker = folder / "recap_embed_bench.json"
    have = json.loads(marker.read_text()) if marker.is_file() and python.exists() else {}
    if have == want:
        return python
    print(f"preparing venv {folder.name} ({'with' if with_package else 'without'} recap_embed) ...", flush=True)
    t0 = time.perf_counter()
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    if have.get("requirements_sha1") != want["requirements_sha1"] or have.get("torchrec") != want["torchrec"]:
        _pip(python, "-r", str(REQUIREMENTS))
        _pip(python, "--no-deps", TORCHREC)
    if with_package:
        _pip(python, "--no-deps", "--force-reinstall", str(ROOT))
    else:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "recap_embed"], capture_output=True)
    marker.write_text(json.dumps(want) + "\n")
    print(f"    ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return python


def probe(python: Path, cwd: Path) -> Dict[str, Any]:
    proc = subprocess.run([str(python), "-c", PROBE], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"probe of {python} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def redact(path: Optional[str], python: Path) -> Optional[str]:
    """`path` relative to the venv of `python` (``<venv>/lib/...``), so that results name no machine's paths."""
    if not path:
        return path
    venv = python.parent.parent
    try:
        return "<venv>/" + Path(path).resolve().relative_to(venv.resolve()).as_posix()
    except ValueError:
        return "<outside the venv>/" + "/".join(Path(path).parts[-2:])


def frozen(python: Path) -> List[str]:
    proc = subprocess.run([str(python), "-m", "pip", "freeze", "--disable-pip-version-check"], env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    return sorted(line for line in proc.stdout.splitlines() if line and not line.lower().startswith(("recap_embed", "recap-embed")))


def check_arms(pythons: Dict[str, Path], cwd: Path) -> Dict[str, Any]:
    """Refuse to time venvs that are not what the comparison claims."""
    checks: Dict[str, Any] = {name: probe(py, cwd) for name, py in pythons.items()}
    ours = "hydra_plugins.recap_embed.searchpath.RecapEmbedSearchPathPlugin"
    with_ = checks["with"]
    if not with_["recap_embed"] or ours not in with_["search_path_plugins"]:
        raise SystemExit(f"'with' does not see recap_embed and its plugin: {with_}")
    if "without" in checks:
        origin = Path(with_["recap_embed"]).resolve()
        site = pythons["with"].parent.parent.resolve()
        if site not in origin.parents:
            raise SystemExit(f"'with' imports recap_embed from {origin}, not from its own site-packages (an editable or stray install)")
        if checks["without"]["recap_embed"] or ours in checks["without"]["search_path_plugins"]:
            raise SystemExit(f"'without' finds recap_embed or its plugin: {checks['without']}")
        a, b = frozen(pythons["with"]), frozen(pythons["without"])
        checks["same_other_packages"] = a == b
        if a != b:
            raise SystemExit(f"the venvs differ in more than recap_embed: only with {sorted(set(a) - set(b))}, "
                             f"only without {sorted(set(b) - set(a))}")
        checks["other_packages"] = len(a)
        with_["installed_non_editable"] = True
    else:
        with_["installed_non_editable"] = bool(with_["recap_embed"]) and "site-packages" in with_["recap_embed"]
    for name, py in pythons.items():
        checks[name]["recap_embed"] = redact(checks[name]["recap_embed"], py)
    return checks


def console_script(python: Path, name: str) -> List[str]:
    """An installed console script run by that venv's interpreter (no activation needed)."""
    path = python.parent / name
    return [str(python), str(path)] if path.exists() else [str(python), "-m", "recap_embed.train"]


# ----------------------------------------------------------------------------- timing

def runner(cmd: List[str], cwd: Path, env: Dict[str, str]) -> Callable[[], None]:
    def run() -> None:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return run


def output(cmd: List[str], cwd: Path, env: Dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def torch_imported(cmd: List[str], cwd: Path, env: Dict[str, str]) -> bool:
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return any(re.match(r"import time:.*\|\s*torch$", line) for line in proc.stderr.splitlines())


def help_groups(text: str) -> List[str]:
    """The config groups an app's ``--help`` lists (the lines of its "Configuration groups" block)."""
    groups, inside = [], False
    for line in text.splitlines():
        if line.startswith("== Configuration groups =="):
            inside = True
            continue
        if inside and line.startswith("=="):
            break
        m = re.match(r"^([A-Za-z0-9_./-]+): ", line)
        if inside and m:
            groups.append(m.group(1))
    return groups


def ratio(times: Dict[str, List[float]], a: str, b: str) -> Dict[str, float]:
    """`a` over `b`: the ratio of the medians, and the median of each round's own ratio."""
    med = statistics.median
    return {"of_medians": med(times[a]) / med(times[b]), "median_of_paired": med([x / y for x, y in zip(times[a], times[b])])}


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="fresh processes per command (interleaved)")
    p.add_argument("--tables", type=int, default=100, help="tables of the recap-embed-train preset")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recap_embed" / "bench_venvs",
                   help="where the two venvs are created and reused")
    p.add_argument("--with-python", type=Path, default=None, help="interpreter of an existing venv with recap_embed installed (non-editably)")
    p.add_argument("--without-python", type=Path, default=None, help="interpreter of an existing venv without recap_embed")
    args = p.parse_args()
    rounds, n_tables = (2, 10) if args.quick else (args.rounds, args.tables)

    skipped: List[str] = []
    if args.quick:
        pythons = {"with": args.with_python or Path(sys.executable)}
        if args.without_python:
            pythons["without"] = args.without_python
        else:
            skipped.append("--quick builds no venvs: the 'without recap_embed' arms are skipped and 'with' is the "
                           "current interpreter (possibly an editable install); no ratio to an environment without the package")
            print("NOTE:", skipped[-1], flush=True)
    else:
        pythons = {
            "with": args.with_python or ensure_venv(args.cache_dir / "with_recap_embed", with_package=True),
            "without": args.without_python or ensure_venv(args.cache_dir / "without_recap_embed", with_package=False),
        }

    tmp = Path(tempfile.mkdtemp(prefix="recap_bench_neighbour_"))
    try:
        neighbour = write_app(tmp / "neighbour", NEIGHBOUR_APP, NEIGHBOUR_CONF)
        bare = write_app(tmp / "bare", BARE_APP, BARE_CONF)
        write_preset(tmp / "presets", n_tables)
        env = clean_env()
        checks = check_arms(pythons, tmp)

        cmds: Dict[str, Tuple[List[str], Path]] = {}
        for arm, py in pythons.items():
            cmds[f"neighbour_help[{arm}]"] = ([str(py), str(neighbour), "--help"], neighbour.parent)
            cmds[f"neighbour_cfg_job[{arm}]"] = ([str(py), str(neighbour), "--cfg", "job"], neighbour.parent)
            cmds[f"bare_cfg_job[{arm}]"] = ([str(py), str(bare), "--cfg", "job"], bare.parent)
        train = console_script(pythons["with"], "recap-embed-train")
        cmds["train_cfg_job[with]"] = ([*train, "--cfg", "job", f"hydra.searchpath=[file://{tmp / 'presets'}]", f"embeddings={PRESET}"], tmp)

        # Each command once, untimed: it must work, and it warms the file cache (all timings are warm-cache).
        outputs = {name: output(cmd, cwd, env) for name, (cmd, cwd) in cmds.items()}
        tables_shown = len(set(re.findall(r"^    (t\d{4}):", outputs["train_cfg_job[with]"], re.M)))
        if tables_shown != n_tables:
            raise SystemExit(f"recap-embed-train --cfg job shows {tables_shown} of the preset's {n_tables} tables")
        checks["train_cfg_job_tables_shown"] = tables_shown
        checks["train_cfg_job_imports_torch"] = torch_imported(*cmds["train_cfg_job[with]"], env)
        checks["help_groups"] = {arm: help_groups(outputs[f"neighbour_help[{arm}]"]) for arm in pythons}
        checks["help_lists_recap_embed_group"] = {arm: [g for g in groups if g.split("/")[0] == "recap_embed"]
                                                  for arm, groups in checks["help_groups"].items()}
        if "without" in pythons:
            same = outputs["neighbour_cfg_job[with]"] == outputs["neighbour_cfg_job[without]"]
            checks["neighbour_cfg_job_output_identical"] = same
            if not same:
                raise SystemExit("the unrelated app composes differently with recap_embed installed:\n"
                                 f"with:\n{outputs['neighbour_cfg_job[with]']}\nwithout:\n{outputs['neighbour_cfg_job[without]']}")
            checks["help_groups_added_by_recap_embed"] = sorted(set(checks["help_groups"]["with"]) - set(checks["help_groups"]["without"]))

        print(f"timing {len(cmds)} commands x {rounds} rounds, interleaved ...", flush=True)
        times = interleaved({name: runner(cmd, cwd, env) for name, (cmd, cwd) in cmds.items()}, reps=rounds, warmup=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    stats = {name: summary(v) for name, v in times.items()}
    ratios: Dict[str, Any] = {"train_cfg_job_over_bare[with]": ratio(times, "train_cfg_job[with]", "bare_cfg_job[with]")}
    targets: Dict[str, Any] = {
        f"train_cfg_job_le_{TARGET_TRAIN:g}x_bare": ratios["train_cfg_job_over_bare[with]"]["of_medians"] <= TARGET_TRAIN,
        "no_torch_on_train_cfg_job": not checks["train_cfg_job_imports_torch"],
        "no_recap_embed_group_in_neighbour_help": not any(checks["help_lists_recap_embed_group"].values()),
    }
    if "without" in pythons:
        for cmd in ("neighbour_help", "neighbour_cfg_job", "bare_cfg_job"):
            ratios[f"{cmd}_with_over_without"] = ratio(times, f"{cmd}[with]", f"{cmd}[without]")
        ratios["train_cfg_job_over_bare[without]"] = ratio(times, "train_cfg_job[with]", "bare_cfg_job[without]")
        for cmd in ("neighbour_help", "neighbour_cfg_job"):
            targets[f"{cmd}_with_le_{TARGET_NEIGHBOUR:g}x_without"] = ratios[f"{cmd}_with_over_without"]["of_medians"] <= TARGET_NEIGHBOUR
        targets["neighbour_composes_identically"] = checks["neighbour_cfg_job_output_identical"]
    else:
        for cmd in ("neighbour_help", "neighbour_cfg_job"):
            targets[f"{cmd}_with_le_{TARGET_NEIGHBOUR:g}x_without"] = "skipped (no 'without' venv)"

    result = {
        "benchmark": "neighbour",
        "machine": machine(),
        "quick": args.quick,
        "setup": {
            "rounds": rounds, "tables": n_tables, "arms": sorted(pythons),
            "venvs": {arm: {"python": "<cache>/" + "/".join(Path(py).parts[-3:]) if not args.quick else Path(py).name} for arm, py in pythons.items()},
            "install": {"with": f"-r requirements/cpu.txt; --no-deps {TORCHREC}; --no-deps . (non-editable)",
                        "without": f"-r requirements/cpu.txt; --no-deps {TORCHREC}"},
            "neighbour_app": sorted(NEIGHBOUR_CONF), "bare_app": sorted(BARE_CONF),
            "train_command": f"recap-embed-train --cfg job hydra.searchpath=[file://<tmp>] embeddings={PRESET}",
            "file_cache": "warm (each command ran once before timing)",
            "recap_embed_sources": source_digest(),
        },
        "skipped": skipped,
        "checks": checks,
        "seconds": stats,
        "ratios": ratios,
        "targets": targets,
    }
    for name, s in stats.items():
        print(f"{name:28s} median {s['median'] * 1e3:7.1f} ms  (p10 {s['p10'] * 1e3:.1f}, p90 {s['p90'] * 1e3:.1f})")
    print("ratios (of medians / median of paired):",
          {k: (round(v["of_medians"], 3), round(v["median_of_paired"], 3)) for k, v in ratios.items()})
    print("targets:", targets)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
