"""``python -m models train`` picks the trainer of a config's architecture
(``models.tasks.trainers``): the scorers no longer train themselves, so a wrong or missing
case here would train nothing or the wrong kind of model. The neural path through the
command is tests/test_models_cli.py; here the GMM path, by EM on real corpus audio, and the
refusal for an architecture that no trainer fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.architectures.lfcc_gmm import LFCCGMMScorer
from models.inference import load_detector
from models.tasks.config import TrainConfig
from models.tasks.trainers import train
from tests.paths import CORPUS, require


def _config(tmp_path: Path, architecture: str, model: dict) -> TrainConfig:
    return TrainConfig.from_dict({
        "name": "tiny-gmm", "architecture": architecture, "model": model,
        "output": str(tmp_path / "model.pt"),
        "data": {"root": str(require(CORPUS)), "window_seconds": 1.0, "limit": 40,
                 "dev_limit": 24},
    })


def test_an_lfcc_gmm_config_trains_by_em_into_a_gmm_checkpoint(tmp_path: Path) -> None:
    config = _config(tmp_path, "lfcc_gmm", {"sample_rate": 8000, "n_fft": 256,
                                            "n_components": 2, "max_iter": 5})
    printed = json.loads(train(config, tmp_path / "run"))
    assert printed["checkpoint"] == str(tmp_path / "model.pt")
    detector = load_detector(tmp_path / "model.pt")
    assert isinstance(detector.scorer, LFCCGMMScorer)
    assert detector.model.config.n_components == 2  # the config's model, not a default
    assert set(printed["dev_eer"]) >= {"pooled"}


def test_an_architecture_no_trainer_fits_is_refused(tmp_path: Path) -> None:
    """A fusion is fitted from other models' scores by its release step, not trained."""
    with pytest.raises(ValueError, match="fusion is not trained by `python -m models train`"):
        train(_config(tmp_path, "fusion", {}), tmp_path / "run")
    assert not (tmp_path / "model.pt").exists()
