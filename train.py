"""Train a Sapiens model: ``python train.py task=<task> model=<size> data=<data> trainer=<trainer> ...``.

The whole run is described by the composed config (``python train.py --cfg job`` prints it); see
``conf/config.yaml`` for the groups and ``sapiens/run.py`` for what is built from them.
"""

import sys

import hydra
from omegaconf import DictConfig

from sapiens.errors import exit_on_user_error
from sapiens.overrides import RepeatedOverrideError, prepare_overrides
from sapiens.run import run


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception as err:
        exit_on_user_error(err)  # mistakes in the config, the data or the disk: one line
        raise


if __name__ == "__main__":
    try:
        sys.argv = prepare_overrides(sys.argv)
    except RepeatedOverrideError as err:
        exit_on_user_error(err)
        raise
    main()
