"""``python -m models train`` as a command (a tiny RawNet2 for a few steps on real 1 s clips
of the corpus, each flag overriding its config) and ``python -m models evaluate
--asv-scores`` (min t-DCF against values worked out by hand from the ASVspoof 2019 cost
model). tests/test_training.py covers what training computes; here it is the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models.data.asvspoof import ASVspoofSplit
from models.inference import load_detector
from tests.paths import CORPUS, REPO, require
from tests.test_training import TINY_RAWNET2

ENV = {**os.environ, "PYANNOTE_METRICS_ENABLED": "false", "PYTHONPATH": str(REPO)}


def run_models(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "models", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_train_command_flags_override_the_config(tmp_path: Path) -> None:
    """The config asks for 5 epochs on 400 trials, on CUDA, into ``config.pt``; the flags say
    1 epoch on 24 trials (3 steps of 8), on the CPU, into ``model.pt``. What was trained and
    where it went must follow the flags (the card records the config it ran)."""
    config = {
        "name": "tiny-cli", "architecture": "rawnet2", "model": TINY_RAWNET2,
        "output": str(tmp_path / "config.pt"),
        "data": {"root": str(require(CORPUS)), "window_seconds": 1.0, "limit": 400,
                 "dev_limit": 16, "num_workers": 0, "short_crop_probability": 0.0},
        "optim": {"epochs": 5, "batch_size": 8, "lr": 0.003, "seed": 0, "threads": 1,
                  "device": "cuda"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out, run_dir = tmp_path / "model.pt", tmp_path / "run"
    done = run_models("train", str(path), "--run-dir", str(run_dir), "--epochs", "1",
                      "--limit", "24", "--output", str(out), "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(out) in done.stdout
    # --quiet: neither the per-epoch lines nor the progress bar ("epoch 1/1")
    assert "epoch 1: loss" not in done.stdout and "epoch 1/1" not in done.stderr
    assert not (tmp_path / "config.pt").exists()
    detector = load_detector(out)
    assert detector.name == "tiny-cli" and detector.sample_rate == 8000
    card = detector.card
    assert card["epochs_trained"] == 1 and len(card["history"]) == 1
    assert card["config"]["data"]["limit"] == 24
    assert card["config"]["optim"]["device"] == "cpu"
    assert (run_dir / "last.pt").is_file() and (run_dir / "card.json").is_file()
    assert 0.0 <= card["dev_eer"]["pooled"] <= 1.0


# ASVspoof 2019 cost model: priors P(target) = 0.95 x 0.99, P(non-target) = 0.95 x 0.01,
# P(spoof) = 0.05; costs C_miss = 1, C_fa = 10 for both systems. The ASV scores below: six
# target trials above six non-target ones, six spoofs above all. Its operating point is the
# official EER threshold, which for separated scores is the highest non-target score, and a
# score equal to the threshold is accepted (as upstream): P_fa_asv = 1/6, P_miss_asv = 0,
# every spoof accepted. Hence C1 = 0.9405 x 1 - 0.0095 x 10 x 1/6 and C2 = 10 x 0.05 x 1,
# normalised by min(C1, C2).
C1, C2 = 0.95 * 0.99 - 0.95 * 0.01 * 10 / 6, 10 * 0.05


@pytest.fixture
def protocol(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """Four bona fide and eight spoof trials of the dev protocol (two systems)."""
    split = ASVspoofSplit(require(CORPUS), "dev")
    lines = split.protocol_path.read_text().splitlines()
    bona = [line for line in lines if line.endswith("bonafide")][:4]
    spoof = [line for line in lines if line.endswith("spoof") and line.split()[3] in
             ("T01", "T02")][:8]
    path = tmp_path / "protocol.txt"
    path.write_text("\n".join(bona + spoof) + "\n")
    return path, [line.split()[1] for line in bona], [line.split()[1] for line in spoof]


def _evaluate(tmp_path: Path, protocol: Path, scores: dict[str, float],
              *extra: str) -> subprocess.CompletedProcess:
    score_file, asv = tmp_path / "cm.txt", tmp_path / "asv.txt"
    score_file.write_text("".join(f"{u} {s}\n" for u, s in scores.items()))
    asv.write_text("".join(f"spk{i} target {3.0 + i / 10}\n" for i in range(6))
                   + "".join(f"spk{i} nontarget {-3.0 - i / 10}\n" for i in range(6))
                   + "".join(f"spk{i} spoof {4.0 + i / 10}\n" for i in range(6)))
    return run_models("evaluate", "--scores", str(score_file), "--protocol", str(protocol),
                      "--asv-scores", str(asv), *extra)


def test_evaluate_asv_scores_gives_min_tdcf(
    tmp_path: Path, protocol: tuple[Path, list[str], list[str]]
) -> None:
    """A CM that separates the classes: min t-DCF 0 (a command that mixed up bona fide and
    spoof would see them perfectly reversed: 1, the cost of a CM that accepts or rejects
    everything). One bona fide trial scored below every spoof: at best it is missed
    (C1 x 1/4), or every spoof is accepted (C2): min(C1/4, C2) / min(C1, C2), in the plain
    report."""
    path, bona, spoof = protocol
    good = {u: 5.0 + i for i, u in enumerate(bona)} | {u: -5.0 - i for i, u in enumerate(spoof)}
    done = _evaluate(tmp_path, path, good, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["min_tdcf"] == pytest.approx(0.0, abs=1e-9)
    text = _evaluate(tmp_path, path, good | {bona[0]: -100.0})
    assert text.returncode == 0, text.stderr[-2000:]
    assert f"min t-DCF: {min(C1 / 4, C2) / min(C1, C2):.4f}" in text.stdout
