"""SmallEmbeddings: shapes, lookups by column, id checks, and building from Hydra configs."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

import recap_embed.config  # noqa: F401  (registers the groups)
import recap_embed.modules
from recap_embed.config import ConfigError, ConfigValidationError, SmallEmbeddingBagConfig, SmallEmbeddingsConfig
from recap_embed.modules.small import SmallEmbeddings, SmallEmbeddingsError

# Config order differs from column order on purpose: the output follows the config.
TABLES = {
    "language": SmallEmbeddingBagConfig(num_embeddings=80, embedding_dim=12, index=2),
    "country": SmallEmbeddingBagConfig(num_embeddings=250, embedding_dim=8, index=0),
    "device": SmallEmbeddingBagConfig(name="device_type", num_embeddings=16, embedding_dim=4, index=1),
}


@pytest.fixture
def module() -> SmallEmbeddings:
    torch.manual_seed(0)
    return SmallEmbeddings.from_config(SmallEmbeddingsConfig(tables=TABLES))


def batch(rows: int = 6, width: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.stack(
        [
            torch.randint(0, 250, (rows,), generator=g),
            torch.randint(0, 16, (rows,), generator=g),
            torch.randint(0, 80, (rows,), generator=g),
            torch.randint(0, 1000, (rows,), generator=g),  # a column no table reads
        ][:width],
        dim=1,
    )


def test_output_layout(module: SmallEmbeddings) -> None:
    assert module.table_names == ["language", "country", "device_type"]  # name defaults to the key
    assert module.output_dims == [12, 8, 4]
    assert module.output_dim == 24
    assert module.output_slices == {"language": slice(0, 12), "country": slice(12, 20), "device_type": slice(20, 24)}
    assert set(module.state_dict()) == {f"embeddings.{n}.weight" for n in module.table_names}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_lookup_matches_embedding_rows_by_column(module: SmallEmbeddings, dtype: torch.dtype) -> None:
    discrete = batch().to(dtype)
    out = module(discrete)
    assert out.shape == (6, 24) and out.dtype == torch.float32
    for name, column in (("language", 2), ("country", 0), ("device_type", 1)):
        weight = module.embeddings[name].weight
        assert weight.shape[0] == {"language": 80, "country": 250, "device_type": 16}[name]
        torch.testing.assert_close(out[:, module.output_slices[name]], weight[discrete[:, column].long()], rtol=0, atol=0)


def test_gradients_reach_the_looked_up_rows_only(module: SmallEmbeddings) -> None:
    discrete = torch.tensor([[3, 1, 5, 0]])
    module(discrete).sum().backward()
    grad = module.embeddings["country"].weight.grad
    assert grad[3].abs().sum() > 0 and grad[torch.arange(250) != 3].abs().sum() == 0


def test_empty_batch_and_no_tables(module: SmallEmbeddings) -> None:
    assert module(torch.zeros(0, 4, dtype=torch.long)).shape == (0, 24)
    empty = SmallEmbeddings({})
    assert empty(batch()).shape == (6, 0) and empty.output_dims == []


def test_out_of_range_id_names_table_path_values_and_range(module: SmallEmbeddings) -> None:
    discrete = batch()
    discrete[0, 0], discrete[3, 0], discrete[4, 0] = 250, 1000, 250
    with pytest.raises(SmallEmbeddingsError) as err:
        module(discrete)
    msg = str(err.value)
    assert "small_embeddings.tables.country" in msg and "'country'" in msg
    assert "3 id(s) in column 0" in msg and "250, 1000" in msg
    assert "allowed: 0..249" in msg
    assert "language" not in msg and "device" not in msg  # only the bad table is named
    assert isinstance(err.value, IndexError)


def test_negative_ids_and_many_bad_values(module: SmallEmbeddings) -> None:
    discrete = batch(rows=20)
    discrete[:, 1] = torch.arange(-10, 10)  # device has 16 rows: -10..-1 are bad
    with pytest.raises(SmallEmbeddingsError, match=r"small_embeddings\.tables\.device: 10 id\(s\) in column 1") as err:
        module(discrete)
    assert "-10, -9, -8, -7, -6, ..." in str(err.value) and "allowed: 0..15" in str(err.value)


def test_too_narrow_input_names_table_index_and_width(module: SmallEmbeddings) -> None:
    with pytest.raises(SmallEmbeddingsError) as err:
        module(batch(width=2))
    msg = str(err.value)
    assert "small_embeddings.tables.language" in msg and "column 2" in msg and "only 2 columns" in msg


def test_rejects_non_integer_or_wrong_rank_input(module: SmallEmbeddings) -> None:
    with pytest.raises(TypeError, match="int64 or int32"):
        module(batch().float())
    with pytest.raises(SmallEmbeddingsError, match=r"\[batch, features\]"):
        module(torch.zeros(4, dtype=torch.long))


def test_invalid_config_is_reported_with_paths() -> None:
    with pytest.raises(ConfigValidationError) as err:
        SmallEmbeddings({"a": {"num_embeddings": 0, "embedding_dim": 4, "index": -1}})
    paths = [p for p, _ in err.value.problems]
    assert "small_embeddings.tables.a.num_embeddings" in paths and "small_embeddings.tables.a.index" in paths
    with pytest.raises(ConfigValidationError, match=r"small_embeddings\.tables\.b\.num_embeddings"):
        SmallEmbeddings({"b": {"embedding_dim": 4, "index": 0}})
    with pytest.raises(ConfigValidationError, match=r"tables\.a\.index: 3 is beyond the data's 2"):
        SmallEmbeddings({"a": {"num_embeddings": 5, "embedding_dim": 4, "index": 3}}, num_discrete_features=2)
    with pytest.raises(ConfigError, match=r"tables\.a\.num_embeddings"):
        SmallEmbeddings({"a": {"num_embeddings": "many", "embedding_dim": 4, "index": 0}})


def test_from_config_accepts_root_dictconfig_with_its_path() -> None:
    root = OmegaConf.create({"model": {"small_embeddings": {"tables": {"x": {"num_embeddings": 3, "embedding_dim": 4, "index": 0}}}}})
    module = SmallEmbeddings.from_config(root.model)
    assert module.table_names == ["x"]
    with pytest.raises(SmallEmbeddingsError, match=r"model\.small_embeddings\.tables\.x"):
        module(torch.tensor([[3]]))


# --------------------------------------------------------------------------- Hydra


@pytest.fixture
def hydra_dir(tmp_path: Path) -> Iterator[Path]:
    """A config dir with a primary config and a small_embeddings preset written in tmp_path."""
    (tmp_path / "small_embeddings").mkdir()
    (tmp_path / "small_embeddings" / "mine.yaml").write_text(
        "defaults:\n  - base\n  - _self_\n\n"
        "tables:\n"
        "  country: {num_embeddings: 250, embedding_dim: 8, index: 0}\n"
        "  device: {name: device_type, num_embeddings: 16, embedding_dim: 4, index: 1}\n"
    )
    (tmp_path / "app.yaml").write_text("defaults:\n  - small_embeddings: mine\n  - _self_\n")
    GlobalHydra.instance().clear()
    yield tmp_path
    GlobalHydra.instance().clear()


def _instantiate(config_dir: Path, overrides=()) -> SmallEmbeddings:
    assert hasattr(recap_embed.modules, "SmallEmbeddings"), (
        "recap_embed.modules must export SmallEmbeddings (the schema's _target_)"
    )
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("app", overrides=list(overrides))
    assert cfg.small_embeddings._target_ == "recap_embed.modules.SmallEmbeddings"
    return instantiate(cfg.small_embeddings)


def test_instantiate_from_a_composed_preset(hydra_dir: Path) -> None:
    module = _instantiate(hydra_dir)
    assert isinstance(module, SmallEmbeddings)
    assert module.table_names == ["country", "device_type"] and module.output_dims == [8, 4]
    assert module(torch.tensor([[249, 15], [0, 0]])).shape == (2, 12)
    with pytest.raises(SmallEmbeddingsError, match=r"small_embeddings\.tables\.device: 1 id\(s\).*16"):
        module(torch.tensor([[0, 16]]))


def test_instantiate_with_command_line_overrides(hydra_dir: Path) -> None:
    module = _instantiate(hydra_dir, ["small_embeddings.tables.country.embedding_dim=16", "~small_embeddings.tables.device"])
    assert module.table_names == ["country"] and module.output_dims == [16]


@pytest.mark.parametrize("preset,names,dim", [("synthetic", ["country", "device", "hour"], 16), ("empty", [], 0)])
def test_package_presets(hydra_dir: Path, preset: str, names: list, dim: int) -> None:
    module = _instantiate(hydra_dir, [f"small_embeddings={preset}"])
    assert module.table_names == names and module.output_dim == dim
    discrete = torch.tensor([[31, 3, 23], [0, 0, 0]])  # synthetic app: country 32, device 4, hour 24
    assert module(discrete).shape == (2, dim)
