"""``python -m models score`` and ``evaluate`` end to end, and their errors (exit code 2)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from models.data.asvspoof import ASVspoofSplit, read_protocol
from models.inference import NAMED_MODELS, load_detector
from tests.paths import CORPUS, REPO, require

ENV = {**os.environ, "PYANNOTE_METRICS_ENABLED": "false", "PYTHONPATH": str(REPO)}


def run_models(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "models", *args], cwd=REPO, env=ENV, capture_output=True,
        text=True, timeout=600,
    )


@pytest.fixture
def small_protocol(tmp_path):
    split = ASVspoofSplit(require(CORPUS), "dev")
    lines = split.protocol_path.read_text().splitlines()
    bona = [line for line in lines if line.endswith("bonafide")][:12]
    spoof = [line for line in lines if line.endswith("spoof")][:24]
    path = tmp_path / "small.trl.txt"
    path.write_text("\n".join(bona + spoof) + "\n")
    return path, split.audio_dir


def test_score_then_evaluate(tmp_path, small_protocol):
    protocol, audio_dir = small_protocol
    out = tmp_path / "scores.txt"
    done = run_models("score", "--model", "default", "--protocol", str(protocol),
                      "--audio-dir", str(audio_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = out.read_text().split("\n")[:-1]
    assert [line.split()[0] for line in lines] == [t.utt_id for t in read_protocol(protocol)]
    assert all(len(line.split()) == 2 for line in lines)
    done = run_models("evaluate", "--scores", str(out), "--protocol", str(protocol), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    systems = {t.system for t in read_protocol(protocol) if not t.is_bonafide}
    assert result["trials"] == len(lines) and set(result["eer_per_system"]) == systems
    # The same EER as computed here from the written scores.
    from models.cli import evaluate, read_scores

    expected = evaluate(read_scores(out), read_protocol(protocol))
    assert result["eer"] == pytest.approx(expected["pooled"])
    text = run_models("evaluate", "--scores", str(out), "--protocol", str(protocol))
    assert text.returncode == 0, text.stderr
    assert f"pooled EER: {100 * expected['pooled']:.2f}%" in text.stdout


def test_missing_audio_is_named_and_exits_2(tmp_path, small_protocol):
    protocol, audio_dir = small_protocol
    first = read_protocol(protocol)[0].utt_id
    partial = tmp_path / "audio"
    partial.mkdir()
    for trial in read_protocol(protocol)[1:]:
        shutil.copy(audio_dir / f"{trial.utt_id}.flac", partial)
    done = run_models("score", "--protocol", str(protocol), "--audio-dir", str(partial),
                      "--out", str(tmp_path / "s.txt"))
    assert done.returncode == 2 and first in done.stderr
    (partial / f"{first}.flac").write_bytes(b"garbage")
    done = run_models("score", "--protocol", str(protocol), "--audio-dir", str(partial),
                      "--out", str(tmp_path / "s.txt"))
    assert done.returncode == 2 and first in done.stderr


def test_missing_files_exit_2(tmp_path, small_protocol):
    protocol, audio_dir = small_protocol
    done = run_models("score", "--protocol", str(tmp_path / "nope.txt"), "--audio-dir",
                      str(audio_dir), "--out", str(tmp_path / "s.txt"))
    assert done.returncode == 2 and "nope.txt" in done.stderr
    done = run_models("evaluate", "--scores", str(tmp_path / "none.txt"),
                      "--protocol", str(protocol))
    assert done.returncode == 2 and "none.txt" in done.stderr
    done = run_models("score", "--model", str(tmp_path / "model.pt"), "--protocol",
                      str(protocol), "--audio-dir", str(audio_dir), "--out", "x.txt")
    assert done.returncode == 2 and "model.pt" in done.stderr


@pytest.mark.slow
def test_default_model_reproduces_its_card_on_dev(tmp_path):
    """The acceptance line: score + evaluate on the dev split gives the model card's EER."""
    split = ASVspoofSplit(require(CORPUS), "dev")
    card = load_detector(NAMED_MODELS["default"]).card
    out = tmp_path / "dev.txt"
    done = run_models("score", "--model", "default", "--protocol", str(split.protocol_path),
                      "--audio-dir", str(split.audio_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    done = run_models("evaluate", "--scores", str(out), "--protocol",
                      str(split.protocol_path), "--json")
    result = json.loads(done.stdout)
    # The card was measured on one CPU; another one's float rounding can move a trial that
    # sits on the threshold across it (an AVX2-only AMD EPYC: 4.74 % against the card's
    # 4.57 %, one bona fide trial of 396). One trial of each class moves the EER by at most
    # 1/bona fide + 1/spoof trials: that much is tolerated, and no more.
    trials = split.trials()
    bona = sum(t.is_bonafide for t in trials)

    def one_flip(system: str | None = None) -> float:
        spoof = sum(not t.is_bonafide and system in (None, t.system) for t in trials)
        return 1 / bona + 1 / spoof

    assert result["eer"] == pytest.approx(card["dev_eer"]["pooled"], abs=one_flip())
    for system, eer in result["eer_per_system"].items():
        assert eer == pytest.approx(card["dev_eer"][system], abs=one_flip(system))
