"""A Hydra app of its own that happens to use group names recap_embed also uses (`sharding`, `embeddings`,
`embeddings/optimizer`) with its own, unrelated values. Installing recap_embed must change nothing here."""

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg))


if __name__ == "__main__":
    main()
