"""A user's Hydra app that composes recap_embed's groups (used by the tests)."""

import hydra
from omegaconf import OmegaConf

from recap_embed.config import table_specs


@hydra.main(config_path="conf", config_name="train", version_base=None)
def main(cfg) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))
    dims = {spec.key: spec.embedding_dim for spec in table_specs(cfg.embeddings)}
    print(f"DIMS {dims}")


if __name__ == "__main__":
    main()
