"""Shared fixtures: a clean Hydra between tests, and composing against the test app's conf."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, List, Optional

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import recap_embed.config  # noqa: F401  (registers the groups)

TESTS = Path(__file__).resolve().parent
MINIMAL_APP = TESTS / "apps" / "minimal"

# torch in this process (imported after this line) must not size its thread pool for the whole
# machine; commands started through tests/launch.py get OMP_NUM_THREADS=1 from `clean_env` anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def clean_hydra() -> Iterator[None]:
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def own_process_group() -> Iterator[None]:
    """`shard` in one process creates a one-rank default group; drop it after the test that made it."""
    import torch.distributed as dist

    before = dist.is_initialized()
    yield
    if dist.is_initialized() and not before:
        dist.destroy_process_group()


def compose_app(overrides: Optional[List[str]] = None, config_dir: Path = MINIMAL_APP / "conf", config_name: str = "train"):
    """Compose `config_name` from `config_dir` with recap_embed's groups on the search path."""
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=config_name, overrides=overrides or [])
