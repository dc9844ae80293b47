"""Which trainer trains which architecture: ``python -m models train`` dispatches here.

Why here and not on the scorers: a scorer builds and scores a model and is imported by every
server and worker; training pulls in data loaders, augmentation and optimisers. Keeping the
choice of trainer in :mod:`models.tasks` lets the import run one way (tasks import the
scorers and the checkpoint format, never the reverse).
"""

from __future__ import annotations

import json
from pathlib import Path

from models.architectures.scorer import LogitsScorer, scorer_class
from models.tasks.config import TrainConfig


def train(config: TrainConfig, run_dir: str | Path, progress: bool = True,
          export_only: bool = False) -> str:
    """Train the model ``config`` describes into ``run_dir`` and export its checkpoint;
    returns what the command prints.

    Every logits network (``LogitsScorer``) trains with the one neural task
    (:mod:`models.tasks.antispoofing`); LFCC+GMM fits by EM (:mod:`models.tasks.gmm`). The
    others (fusion, the Whisper probe) are fitted from other models' scores by their own
    release steps, not by this command."""
    cls = scorer_class(config.architecture)
    if issubclass(cls, LogitsScorer):
        from models.tasks.antispoofing import train as train_network

        result = train_network(config, run_dir, progress=progress, export_only=export_only)
        return (f"best epoch {result.best_epoch + 1}: dev EER {100 * result.best_dev_eer:.2f}%\n"
                f"checkpoint: {result.checkpoint}")
    if cls.architecture == "lfcc_gmm":
        from models.tasks.gmm import train_lfcc_gmm

        return json.dumps(train_lfcc_gmm(config, run_dir), indent=2)
    raise ValueError(f"{cls.architecture} is not trained by `python -m models train`")
