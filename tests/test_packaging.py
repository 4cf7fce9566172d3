"""A normal (non-editable) install, used from a Hydra app in a directory outside the repository."""

from __future__ import annotations

from pathlib import Path

from launch import Completed, python_m, python_script, run

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
    run(python_m("pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", site, REPO), cwd=tmp_path, timeout=300)
    assert not (site / "hydra_plugins" / "__init__.py").exists()  # stays a namespace package
    assert (site / "recap_embed" / "conf" / "embeddings" / "twhin.yaml").exists()
    assert (site / "hydra_plugins" / "recap_embed" / "searchpath.py").exists()

    app_dir = tmp_path / "app"
    (app_dir / "conf").mkdir(parents=True)
    (app_dir / "app.py").write_text(APP)
    (app_dir / "train.yaml").write_text("defaults:\n  - embeddings: twhin\n  - _self_\n")
    def run_app(*args: str) -> Completed:  # the installed copy only: PYTHONPATH is the install target
        return run(python_script("app.py", "--config-dir", app_dir, *args), cwd=app_dir, env={"PYTHONPATH": str(site)}, timeout=120)

    out = run_app("embeddings.tables.user.embedding_dim=64", "hydra.run.dir=out")
    assert f"FROM {site}" in out.stdout  # the installed copy, not the checkout
    assert "embedding_dim: 64" in out.stdout and "num_embeddings: 72543" in out.stdout
    info = run_app("--info", "searchpath")
    assert f"recap_embed://{site / 'recap_embed' / 'conf'}" in info.stdout, info.stdout[-3000:]  # the installed presets
    help_ = run_app("--help")
    assert "embeddings/optimizer: adagrad, adam, lamb, partial_rowwise_adam, rowwise_adagrad, sgd" in help_.stdout
