"""Inference: run fine-tuned models on images, folders, videos and shards (see ``__main__`` for the CLI).

The Python API is :class:`Predictor`; its typed results are in :mod:`sapiens.predict.results`.
"""

from sapiens.predict.predictor import Predictor
from sapiens.predict.results import DepthResult, NormalResult, PoseResult, Prediction, SegResult

__all__ = ["DepthResult", "NormalResult", "PoseResult", "Prediction", "Predictor", "SegResult"]
