"""Train a Sapiens model: ``python train.py task=<task> model=<size> data=<data> trainer=<trainer> ...``.

The whole run is described by the composed config (``python train.py --cfg job`` prints it); see
``conf/config.yaml`` for the groups and ``sapiens/run.py`` for what is built from them.
"""

import sys

import hydra
from omegaconf import DictConfig

from sapiens.config import ConfigError
from sapiens.lit.base import NonFiniteLossError
from sapiens.run import run


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, NonFiniteLossError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
