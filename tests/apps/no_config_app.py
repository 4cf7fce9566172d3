"""A Hydra app with no config files at all: every node comes from recap_embed's groups."""

import hydra
from omegaconf import OmegaConf


@hydra.main(config_path=None, version_base=None)
def main(cfg) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))


if __name__ == "__main__":
    main()
