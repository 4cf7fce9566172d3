"""The README's two commands are the ones CI and users run."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_exactly():
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert len(ci_lines) == 1, ci_lines
    readme = (REPO / "README.md").read_text()
    assert ci_lines[0] in readme.splitlines()


def test_readme_main_command_installs_and_runs_the_training_app():
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(lines) == 2
    assert lines[0].endswith("&& recap-embed-train")
    assert lines[1].endswith("python -m pytest -q")
