"""Training task for the LFCC+GMM baseline: EM on pooled frames, no epochs.

Dev trials are scored exactly as ``python -m models score`` scores them (first window,
repeat-padded), so the model card's EER is what the CLIs reproduce.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from models.architectures.lfcc_gmm import LFCCGMM, LFCCGMMConfig
from models.checkpoint import save_checkpoint
from models.data.asvspoof import ASVspoofSplit, TrialDataset
from models.inference import fit_calibration
from models.tasks.antispoofing import eer_by_system, subset
from models.tasks.config import REPO_ROOT, TrainConfig


def train_lfcc_gmm(config: TrainConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    gmm_config = LFCCGMMConfig(**config.model)
    rate = gmm_config.sample_rate
    window = int(round(config.data.window_seconds * rate))
    root = config.data.root_path
    train_split, dev_split = ASVspoofSplit(root, "train"), ASVspoofSplit(root, "dev")
    train_set = TrialDataset(
        subset(train_split.trials(), config.data.limit, 1), train_split.audio_dir, rate, None
    )
    dev_set = TrialDataset(subset(dev_split.trials(), config.data.dev_limit, 2),
                           dev_split.audio_dir, rate, window)
    began = time.time()
    waves = [train_set.waveform(i) for i in range(len(train_set))]
    labels = [t.label for t in train_set.trials]
    model = LFCCGMM(gmm_config).fit(
        [w for w, y in zip(waves, labels, strict=True) if y == 1],
        [w for w, y in zip(waves, labels, strict=True) if y == 0],
    )
    scores = model.score([dev_set[i][0].numpy() for i in range(len(dev_set))])
    dev_labels = np.array([t.label for t in dev_set.trials])
    eers = eer_by_system(scores, dev_labels, [t.system for t in dev_set.trials])
    card = {"config": asdict(config), "training_seconds": round(time.time() - began, 1),
            "dev_eer": eers}
    out = Path(config.output) if config.output else run_dir / "model.pt"
    out = out if out.is_absolute() else REPO_ROOT / out
    save_checkpoint(
        out, architecture="lfcc_gmm", name=config.name, version=config.version,
        sample_rate=rate, window_seconds=config.data.window_seconds,
        model_config=config.model, state_dict=model.state_dict(),
        calibration=vars(fit_calibration(scores, dev_labels)), card=card,
    )
    (run_dir / "card.json").write_text(json.dumps(card, indent=2))
    return {"checkpoint": str(out), **card}
