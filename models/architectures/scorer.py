"""One scorer protocol for every architecture, and the checkpoint's record of which one.

Why: the server, the workers, training and the benches must not each know which
architectures exist. Each architecture's module defines one :class:`Scorer` class (how to
build it from a checkpoint, how to score a batch, optionally how to recognise its official
weights); a checkpoint (:mod:`models.checkpoint`) records that class as ``module:Class`` under
``"scorer"``, and loading imports exactly that module, as pyannote.audio's
``Model.from_pretrained`` does with the class it stores. Adding a model is one new file under
``models/architectures/`` whose training config names ``architecture: module:Class``.

A scorer does not train itself: the trainers live in :mod:`models.tasks` (which imports the
scorers, never the reverse), so that scoring a model never imports the training stack.

Checkpoints written before the class was recorded name only their architecture:
:data:`ARCHITECTURES` maps those names (and the short names the training configs use) to
their class.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

#: short architecture name -> its scorer class (see the module docstring)
ARCHITECTURES = {
    "rawnet2": "models.architectures.rawnet2:RawNet2Scorer",
    "aasist": "models.architectures.aasist:AASISTScorer",
    "lcnn": "models.architectures.lcnn:LCNNScorer",
    "lfcc_gmm": "models.architectures.lfcc_gmm:LFCCGMMScorer",
    "whisper_lr": "models.architectures.whisper:WhisperLRScorer",
    "fusion": "models.architectures.fusion:FusionScorer",
}
#: architectures whose official (non-callshield) state_dicts load, tried in this order
OFFICIAL = ("rawnet2", "aasist")
_PACKAGE = "models.architectures."  # a checkpoint may only name a class in here


@runtime_checkable
class Scorer(Protocol):
    """A loaded model as :class:`models.inference.Detector` uses it."""

    architecture: ClassVar[str]  # what GetModel and the model cards report
    model: Any
    device: torch.device  # where it scores (workers log it)
    dtype: torch.dtype

    def score_batch(self, batch: np.ndarray) -> np.ndarray:
        """Raw scores (higher = bona fide) of equal-length waveforms ``(B, T)``."""
        ...

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], device: torch.device,
                        dtype: torch.dtype) -> Scorer: ...

    @classmethod
    def from_official(cls, state: dict[str, Any], device: torch.device,
                      dtype: torch.dtype) -> Scorer | None:
        """The scorer of an official state_dict of this architecture, ``None`` if ``state``
        is not one."""
        ...


def scorer_class(name: str) -> type[Scorer]:
    """The scorer class for a checkpoint's ``scorer`` path or an architecture name."""
    path = ARCHITECTURES.get(name, name)
    module, _, attr = path.partition(":")
    if not attr or not module.startswith(_PACKAGE):
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"unknown architecture {name!r}: use {known} or "
                         f"'{_PACKAGE}<module>:<Class>'")
    cls = getattr(importlib.import_module(module), attr, None)
    if cls is None:
        raise ValueError(f"unknown architecture {name!r}: {module} has no {attr}")
    return cls


def scorer_path(cls: type[Scorer]) -> str:
    """What a checkpoint records for ``cls``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def build_model(architecture: str, model_config: dict[str, Any]) -> Any:
    """An untrained network of a neural ``architecture`` (a name or a scorer path)."""
    build = getattr(scorer_class(architecture), "build", None)
    if build is None:
        raise ValueError(f"{architecture!r} is not a neural architecture")
    return build(model_config)


def official_scorer(state: dict[str, Any], device: torch.device,
                    dtype: torch.dtype) -> Scorer | None:
    """The scorer of an official state_dict, recognised by its keys; ``None``: not one."""
    for name in OFFICIAL:
        scorer = scorer_class(name).from_official(state, device, dtype)
        if scorer is not None:
            return scorer
    return None


class BaseScorer:
    """What the two kinds of scorer below share."""

    architecture: ClassVar[str] = ""

    @classmethod
    def from_official(cls, state: dict[str, Any], device: torch.device,
                      dtype: torch.dtype) -> Scorer | None:
        return None  # most architectures have no official weights to recognise


class LogitsScorer(BaseScorer):
    """A neural network mapping ``(B, T)`` waveforms to logits ``(B, 2)``, class 1 = bona fide;
    the score is the log-odds of bona fide. Subclasses say how to :meth:`build` it."""

    def __init__(self, model: torch.nn.Module, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.model = model.to(device, dtype).eval()
        self.device, self.dtype = device, dtype

    @classmethod
    def build(cls, model_config: dict[str, Any]) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], device: torch.device,
                        dtype: torch.dtype) -> LogitsScorer:
        model = cls.build(state["model_config"])
        model.load_state_dict(state["state_dict"], strict=True)
        return cls(model, device, dtype)

    def raw_scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).float()
        return logits[:, 1] - logits[:, 0]

    def score_batch(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        x = x.to(self.device, self.dtype, non_blocking=True)
        with torch.inference_mode():
            out = self.raw_scores(x)
        return out.float().cpu().numpy().astype(np.float64)


class WaveScorer(BaseScorer):
    """A model whose ``score(list of waveforms)`` gives the raw scores itself (no
    ``nn.Module``: GMMs, a linear head on a foreign encoder, a fusion of detectors), stored
    as ``model_class.state_dict()``."""

    model_class: ClassVar[Any] = None
    device = torch.device("cpu")  # what the workers report: the model is numpy on the CPU
    dtype = torch.float32  # the waveforms' type

    def __init__(self, model: Any) -> None:
        self.model = model

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], device: torch.device,
                        dtype: torch.dtype) -> WaveScorer:
        return cls(cls.model_class.from_state_dict(state["state_dict"]))

    def score_batch(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.score(list(batch)), dtype=np.float64)
