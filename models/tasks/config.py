"""Training configuration: one YAML file per model in ``models/configs/``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DataConfig:
    root: str = "../shared/corpus"
    window_seconds: float = 4.0
    # Random batch crops between these lengths teach the model the 1-4 s windows that the
    # streaming service scores before a full window exists.
    min_crop_seconds: float = 1.0
    short_crop_probability: float = 0.5
    limit: int | None = None  # first N training trials (smoke runs)
    # Extra spoof/bona fide training items, e.g. vocoded bona fide from `python -m models
    # vocode`: each entry {protocol: PATH, audio_dir: PATH}, paths relative to the repo.
    extra: list[dict[str, str]] = field(default_factory=list)
    # Spoofing systems left out of training: leave-one-system-out folds (bench/generalization).
    exclude_systems: list[str] = field(default_factory=list)
    dev_limit: int | None = None
    num_workers: int = 1

    @property
    def root_path(self) -> Path:
        return repo_path(self.root)


def repo_path(path: str | Path) -> Path:
    """Config paths are relative to the repository root, wherever the command runs."""
    path = Path(path)
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


@dataclass
class OptimConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine" (to zero at the last epoch)
    weight_decay: float = 1e-4
    bonafide_weight: float = 9.0  # official recipes: CE weights [0.1, 0.9]
    # "ce": cross-entropy on the two logits; "oc-softmax": the one-class loss of
    # models.architectures.lcnn (bona fide cosine above margins[0], spoofs below margins[1]).
    loss: str = "ce"
    margins: tuple[float, float] = (0.9, 0.2)
    seed: int = 0
    threads: int = 2
    # "dev": export the epoch with the best dev EER; "last": the last epoch. Dev shares its
    # engines with train, so dev EER rewards fitting those engines: recipes chosen on
    # leave-one-system-out scores fix their epoch count and export the last one.
    select: str = "dev"
    device: str = "cpu"  # cpu, cuda or auto (make train-gpu)
    # Sharpness-aware minimisation (Foret et al. 2021; issue 8 lists it among the levers with
    # published gains on unseen attacks): each step first climbs to the worst point within
    # ``sam_rho`` of the weights, then descends with the gradient found there, which favours
    # flat minima. 0 turns it off; ``sam_adaptive`` scales the radius per weight (ASAM,
    # Kwon et al. 2021), so it does not depend on how each layer happens to be scaled.
    sam_rho: float = 0.0
    sam_adaptive: bool = False


@dataclass
class TrainConfig:
    name: str
    architecture: str
    model: dict[str, Any]
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: dict[str, Any] | None = None
    version: str = "1"
    output: str | None = None  # where the final checkpoint goes, relative to the repo

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        raw = yaml.safe_load(Path(path).read_text())
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        raw = dict(raw)
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        data = DataConfig(**(raw.pop("data", None) or {}))
        optim = OptimConfig(**(raw.pop("optim", None) or {}))
        if optim.select not in ("dev", "last"):
            raise ValueError(f"optim.select must be dev or last: {optim.select}")
        if optim.loss not in ("ce", "oc-softmax"):
            raise ValueError(f"optim.loss must be ce or oc-softmax: {optim.loss}")
        optim.margins = (float(optim.margins[0]), float(optim.margins[1]))
        if optim.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.lr_schedule must be constant or cosine: {optim.lr_schedule}")
        return cls(data=data, optim=optim, **raw)
