"""megavod: MEGA (Memory Enhanced Global-Local Aggregation, CVPR 2020) video object detection.

The public API (README "Python API"):

* :func:`load` -> :class:`Detector`: a preset or YAML config and/or a weight file (the authors' ``.pth``
  or megavod's ``.safetensors``), on ``device="auto"``;
* :meth:`Detector.stream` (one :class:`FrameResult` per frame, offline or online) and
  :meth:`Detector.detect` (-> :class:`VideoPredictions` with ``save_json`` / ``save_csv`` / ``to_coco``);
* :func:`evaluate` (the ImageNet VID protocol) and :func:`train`;
* :func:`load_config`, :class:`Config`; the method table: :class:`MethodSpec`, :func:`register_method`.
"""

from megavod.api import Detector, FrameResult, evaluate, load, train
from megavod.config import Config, load_config
from megavod.data.predictions import VideoPredictions, read_predictions
from megavod.errors import ConfigError, MegavodError, StreamError
from megavod.registry import MethodSpec, get_method, method_names, register_method, unregister_method

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "Detector", "FrameResult", "MegavodError", "MethodSpec", "StreamError", "VideoPredictions",
    "evaluate", "get_method", "load", "load_config", "method_names", "read_predictions", "register_method",
    "train", "unregister_method",
]
