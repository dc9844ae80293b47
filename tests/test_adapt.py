"""``python -m models adapt``: an operator's own genuine recordings turned into their model.

Real clips (Speech Commands train speakers, one folder per caller), the real default model,
a real HiFi-GAN copy-synthesis, and the adapted checkpoint loaded by path in a real server
scored over gRPC."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from client import AsyncDetectionClient
from models.inference import load_detector
from models.tasks.adapt import adapt_checkpoint, find_recordings, split_fit_check, windows
from server.config import ServerConfig
from tests.paths import REPO, SHARED, require

EXTRA = SHARED / "extra-bonafide" / "speech-commands"


def _callers(root: Path, speakers: int = 6, per_speaker: int = 3) -> Path:
    """Links to real short answers of ``speakers`` train speakers, a folder per caller."""
    rows = list(csv.DictReader((require(EXTRA) / "metadata.tsv").open(), delimiter="\t"))
    by_speaker: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row["split"] == "train":
            by_speaker[row["speaker"]].append(row["utt_id"])
    for speaker in sorted(by_speaker)[:speakers]:
        (root / speaker).mkdir(parents=True)
        for utt in by_speaker[speaker][:per_speaker]:
            (root / speaker / f"{utt}.flac").symlink_to(EXTRA / "flac" / f"{utt}.flac")
    return root


def _adapt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYANNOTE_METRICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "models", "adapt", "--threads", "1", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("adapt")
    callers = _callers(tmp / "callers")
    out = tmp / "operator.pt"
    done = _adapt("--bonafide", str(callers), "--out", str(out),
                  "--max-vocoded-seconds", "2", "--target-false-alarms", "0.1")
    assert done.returncode == 0, done.stderr
    return out, callers, done.stdout


def test_split_keeps_each_caller_on_one_side(tmp_path: Path) -> None:
    callers = _callers(tmp_path / "c", speakers=8)
    fit, check = split_fit_check(find_recordings(callers))
    assert fit and check
    assert not {r.speaker for r in fit} & {r.speaker for r in check}
    again = split_fit_check(list(reversed(find_recordings(callers))))
    assert {r.path for r in again[1]} == {r.path for r in check}  # order does not matter


def test_windows_cover_a_recording_as_the_service_does() -> None:
    wave = np.arange(10_000, dtype=np.float32)
    parts = windows(wave, 4000)
    assert [len(p) for p in parts] == [4000, 4000, 4000]
    assert np.array_equal(parts[2][:2000], wave[8000:])  # the tail, repeat-padded
    assert len(windows(wave[:100], 4000)) == 1


def test_adapted_checkpoint_meets_its_target_and_says_what_it_was_fitted_on(
        adapted: tuple[Path, Path, str]) -> None:
    import json

    out, _, stdout = adapted
    report = json.loads(stdout)
    base = load_detector("default")
    model = load_detector(out)
    assert model.name == f"{base.name}-adapted"
    card = model.card["adapted"]
    assert card == report
    assert card["recordings"]["fit_speakers"] >= 1 and card["recordings"]["check_speakers"] >= 1
    assert card["reference_widened"] is True  # the default is a bona-normal fusion
    assert card["before"]["windows"]["copies"] >= 1  # the copies were made and scored
    # The threshold moved to where the target says, on the fitting windows themselves.
    assert card["after"]["false_alarms_fit"] <= 0.1 + 1 / card["after"]["windows"]["fit"]
    assert model.calibration.scale == pytest.approx(base.calibration.scale)
    assert model.calibration.bias != pytest.approx(base.calibration.bias)
    # The widened reference is the base's plus one score per fitting window and part.
    fused_base = torch.load(load_detector_path("default"), weights_only=True)["state_dict"]
    fused = torch.load(out, weights_only=True)["state_dict"]
    for before, after in zip(fused_base["reference"], fused["reference"], strict=True):
        assert len(after) == len(before) + card["before"]["windows"]["fit"]


def load_detector_path(name: str) -> Path:
    from models.inference import NAMED_MODELS

    return NAMED_MODELS[name]


def test_adapt_is_deterministic(adapted: tuple[Path, Path, str], tmp_path: Path) -> None:
    out, callers, _ = adapted
    again = tmp_path / "again.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI run was: another thread count rounds otherwise
    try:
        adapt_checkpoint("default", again, bonafide=callers, max_vocoded_seconds=2.0,
                         target_false_alarms=0.1)
    finally:
        torch.set_num_threads(threads)
    a, b = torch.load(out, weights_only=True), torch.load(again, weights_only=True)
    assert a["calibration"] == b["calibration"]
    assert a["state_dict"]["reference"] == b["state_dict"]["reference"]


async def test_adapted_model_loads_in_the_server_by_path(
        adapted: tuple[Path, Path, str]) -> None:
    from server.app import start_server

    out, _, _ = adapted
    running = await start_server(ServerConfig(listen="127.0.0.1:0", model=str(out)))
    try:
        async with AsyncDetectionClient(f"127.0.0.1:{running.port}") as client:
            model = await client.get_model()
            assert model.name.endswith("-adapted")
            response = await client.detect_file(REPO / "examples" / "spoof_call.wav")
            assert len(response.windows) > 0
            assert response.summary.audio_seconds > 10
    finally:
        await running.stop(0)


@pytest.mark.parametrize("case", ["missing", "empty", "one-caller", "target", "bad-audio"])
def test_bad_input_is_a_clear_error(case: str, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    extra: list[str] = []
    if case == "missing":
        folder = tmp_path / "nope"
        expect = "not a folder"
    elif case == "empty":
        expect = "no .wav or .flac"
    elif case == "one-caller":
        _callers(tmp_path / "one", speakers=1)
        folder = tmp_path / "one"
        expect = "at least two speakers"
    elif case == "target":
        _callers(folder / "x", speakers=3)
        extra = ["--target-false-alarms", "0.7"]
        expect = "between 0 and 0.5"
    else:
        (folder / "a").mkdir()
        (folder / "b").mkdir()
        (folder / "a" / "x.wav").write_bytes(b"RIFF....not audio")
        (folder / "b" / "y.wav").write_bytes(b"RIFF....not audio")
        expect = "unreadable audio"
    done = _adapt("--bonafide", str(folder), "--out", str(tmp_path / "o.pt"), *extra)
    assert done.returncode == 2
    assert expect in done.stderr
    assert not (tmp_path / "o.pt").exists()

