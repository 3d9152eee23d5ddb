"""``python -m sapiens.predict source=PATH checkpoint=FILE output_dir=DIR [key=value ...]``.

Also installed as ``sapiens-predict``. The options and their defaults are in
``sapiens/predict/conf/predict.yaml`` (``--cfg job`` prints them composed); the override syntax is
Hydra's, as for ``train.py``: ``checkpoint=[seg.pth,pose.ckpt] boxes=dets.json precision=bf16``.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from sapiens.overrides import RepeatedOverrideError, prepare_overrides
from sapiens.predict.pipeline import run_predict

# Bad sources, files, tasks and options: reported in one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError)


@hydra.main(config_path="conf", config_name="predict", version_base="1.3")
def predict(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_predict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except USER_ERRORS as err:
        if os.environ.get("SAPIENS_TRACEBACK"):
            raise
        print(f"error: {err}\n(set SAPIENS_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # omegaconf's MissingMandatoryValue for source / checkpoint
        if type(err).__name__ != "MissingMandatoryValue" or os.environ.get("SAPIENS_TRACEBACK"):
            raise
        key = getattr(err, "full_key", "?")
        print(
            f"error: {key}=... is required (python -m sapiens.predict source=PATH checkpoint=FILE)",
            file=sys.stderr,
        )
        sys.exit(2)


def main() -> None:
    """Console-script entry point (``sapiens-predict``)."""
    try:  # a key given twice with different values (e.g. a brace pattern bash expanded) is refused
        sys.argv = prepare_overrides(sys.argv, list_keys=None)
    except RepeatedOverrideError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    predict()


if __name__ == "__main__":
    main()
