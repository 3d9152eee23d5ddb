"""Train a Sapiens model: ``python train.py task=<task> model=<size> data=<data> trainer=<trainer> ...``.

The whole run is described by the composed config (``python train.py --cfg job`` prints it); see
``conf/config.yaml`` for the groups and ``sapiens/run.py`` for what is built from them.
"""

import os
import re
import sys

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from sapiens.config import ConfigError
from sapiens.lit.base import NonFiniteLossError
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


def quote_brace_patterns(argv: list[str]) -> list[str]:
    """Quote override values holding shard brace patterns (``{000000..009999}``), which Hydra's
    override grammar would otherwise read as a dict: ``data.train_shards=/d/{0..9}.tar`` works."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and re.search(r"\{\d+\.\.\d+\}", value) and value[:1] not in "'\"":
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


if __name__ == "__main__":
    sys.argv = quote_brace_patterns(sys.argv)
    main()
