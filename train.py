"""Train a Sapiens model: ``python train.py task=<task> model=<size> data=<data> trainer=<trainer> ...``.

The whole run is described by the composed config (``python train.py --cfg job`` prints it); see
``conf/config.yaml`` for the groups and ``sapiens/run.py`` for what is built from them.
"""

import os
import sys

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from sapiens.config import ConfigError
from sapiens.lit.base import NonFiniteLossError
from sapiens.overrides import quote_brace_patterns
from sapiens.run import run

# Mistakes in the config or the data: reported in one line, without a traceback.
USER_ERRORS = (ConfigError, NonFiniteLossError, FileNotFoundError, ValueError)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (*USER_ERRORS, InstantiationException) as err:
        # InstantiationException: a bad value met while building a component from the config.
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if not isinstance(cause, USER_ERRORS) or os.environ.get("SAPIENS_TRACEBACK"):
            raise
        print(f"error: {cause}\n(set SAPIENS_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv = quote_brace_patterns(sys.argv)
    main()
