"""A normal (non-editable) install, used from a Hydra app in a directory outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

APP = '''
import hydra
from omegaconf import OmegaConf
import recap_embed

@hydra.main(config_path=None, config_name="train", version_base=None)
def main(cfg):
    print("FROM", recap_embed.__file__)
    print(OmegaConf.to_yaml(cfg.embeddings.tables))

if __name__ == "__main__":
    main()
'''


def test_installed_package_serves_the_groups_to_an_app_elsewhere(tmp_path: Path):
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(REPO)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert not (site / "hydra_plugins" / "__init__.py").exists()  # stays a namespace package
    assert (site / "recap_embed" / "conf" / "embeddings" / "twhin.yaml").exists()
    assert (site / "hydra_plugins" / "recap_embed" / "searchpath.py").exists()

    app_dir = tmp_path / "app"
    (app_dir / "conf").mkdir(parents=True)
    (app_dir / "app.py").write_text(APP)
    (app_dir / "train.yaml").write_text("defaults:\n  - embeddings: twhin\n  - _self_\n")
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "app.py", "--config-dir", str(app_dir), *args], capture_output=True, text=True, timeout=120, cwd=app_dir, env=env)

    out = run("embeddings.tables.user.embedding_dim=64", "hydra.run.dir=out")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"FROM {site}" in out.stdout  # the installed copy, not the checkout
    assert "embedding_dim: 64" in out.stdout and "num_embeddings: 72543" in out.stdout
    info = run("--info", "searchpath")
    assert f"recap_embed://{site / 'recap_embed' / 'conf'}" in info.stdout, info.stdout[-3000:]  # the installed presets
    help_ = run("--help")
    assert "embeddings/optimizer: adagrad, adam, lamb, partial_rowwise_adam, rowwise_adagrad, sgd" in help_.stdout
