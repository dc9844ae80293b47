"""The callshield checkpoint format: what a checkpoint records, and how it is read and written.

Why its own module: the loaders (:mod:`models.inference`), the trainers (:mod:`models.tasks`)
and the release steps all read or write this one dict, and none of them should have to import
the others to do so. It knows the scorer registry (:mod:`models.architectures.scorer`) only to
record which class a checkpoint is for.

A callshield checkpoint is a ``torch.save``d dict (loadable with ``weights_only=True``)::

    {"format": "callshield/1", "architecture": "rawnet2" | "aasist" | "lcnn" | "lfcc_gmm" |
     "whisper_lr" | "fusion",
     "scorer": "models.architectures.<module>:<Class>",
     "name": str, "version": str, "sample_rate": int, "window_seconds": float,
     "model_config": dict, "state_dict": dict, "calibration": {"scale", "bias"}, "card": dict}

``scorer`` names the architecture's scorer class, which builds and scores the model;
checkpoints older than that key are mapped by ``architecture``. A file without
``"format": "callshield/1"`` is an official state_dict (AASIST ``.pth``, RawNet2 ``.pth`` or
``.pth.xz``), which :func:`models.inference.load_detector` recognises by its keys.
"""

from __future__ import annotations

import io
import lzma
from pathlib import Path
from typing import Any

import torch

from models.architectures.scorer import scorer_class, scorer_path

FORMAT = "callshield/1"
#: the fields :func:`save_checkpoint` refuses to write without
REQUIRED = frozenset({"architecture", "name", "version", "sample_rate", "window_seconds",
                      "state_dict"})


def is_callshield(state: dict[str, Any]) -> bool:
    """Whether a loaded dict is a callshield checkpoint (else: an official state_dict)."""
    return state.get("format") == FORMAT


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict stored at ``path`` (``.xz``-compressed or not), on the CPU, tensors only."""
    path = Path(path)
    if path.suffix == ".xz":
        return torch.load(io.BytesIO(lzma.open(path).read()), map_location="cpu",
                          weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(path: str | Path, **fields: Any) -> None:
    """Write a callshield checkpoint (the fields are in the module docstring), atomically.

    ``architecture`` may be a short name or a scorer path: the checkpoint records both the
    class's short name and its path."""
    missing = REQUIRED - set(fields)
    if missing:
        raise ValueError(f"checkpoint fields missing: {sorted(missing)}")
    cls = scorer_class(fields.get("scorer") or fields["architecture"])
    fields["architecture"], fields["scorer"] = cls.architecture, scorer_path(cls)
    fields.setdefault("model_config", {})
    fields.setdefault("calibration", {"scale": 1.0, "bias": 0.0})
    fields.setdefault("card", {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, **fields}, tmp)
    tmp.replace(path)
