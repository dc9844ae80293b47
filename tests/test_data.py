"""ASVspoof 2019 LA reader on ../shared/corpus, and the official input handling."""

import numpy as np
import pytest
import soundfile as sf

from models.data.asvspoof import (
    ASVspoofSplit,
    ProtocolError,
    TrialDataset,
    audio_path,
    read_protocol,
)
from models.data.audio import AudioError, load_audio, random_crop, repeat_pad
from tests.paths import CORPUS, require


def test_reads_both_splits_with_documented_counts():
    root = require(CORPUS)
    train = ASVspoofSplit(root, "train").trials()
    dev = ASVspoofSplit(root, "dev").trials()
    assert len(train) == 4120 and sum(t.is_bonafide for t in train) == 1114
    assert len(dev) == 1464 and sum(t.is_bonafide for t in dev) == 396
    assert {t.system for t in dev if not t.is_bonafide} == {f"T0{i}" for i in range(1, 7)}
    assert {t.system for t in dev if t.is_bonafide} == {"-"}
    assert not {t.speaker for t in train if t.is_bonafide} & {
        t.speaker for t in dev if t.is_bonafide
    }


def test_audio_is_8khz_and_resampled_on_request():
    split = ASVspoofSplit(require(CORPUS), "dev")
    trial = split.trials()[0]
    path = audio_path(split.audio_dir, trial.utt_id)
    assert sf.info(str(path)).samplerate == 8000
    wave8 = load_audio(path, 8000)
    wave16 = load_audio(path, 16000)
    assert wave8.dtype == np.float32 and abs(wave16.shape[0] - 2 * wave8.shape[0]) <= 2


def test_dataset_eval_first_window_and_train_random_crop():
    split = ASVspoofSplit(require(CORPUS), "dev")
    trials = split.trials()[:4]
    eval_set = TrialDataset(trials, split.audio_dir, 8000, 32000)
    x, label = eval_set[0]
    raw = eval_set.waveform(0)
    assert x.shape == (32000,) and label == trials[0].label
    np.testing.assert_array_equal(x.numpy()[: min(32000, raw.shape[0])], raw[:32000])
    train_set = TrialDataset(trials, split.audio_dir, 8000, 1000, train=True, seed=1)
    a, _ = train_set[0]
    b, _ = train_set[0]
    train_set.epoch = 1
    c, _ = train_set[0]
    assert a.shape == (1000,)
    assert np.array_equal(a, b)  # seeded per (seed, epoch, item)
    assert not np.array_equal(a, c)


def test_repeat_pad_and_crop():
    wave = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(repeat_pad(wave, 12), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    np.testing.assert_array_equal(repeat_pad(wave, 3), [0, 1, 2])
    crop = random_crop(np.arange(100, dtype=np.float32), 10, np.random.default_rng(0))
    assert crop.shape == (10,) and np.all(np.diff(crop) == 1)
    with pytest.raises(ValueError, match="empty"):
        repeat_pad(np.zeros(0, dtype=np.float32), 4)


def test_protocol_errors_name_the_problem(tmp_path):
    with pytest.raises(ProtocolError, match="not found"):
        read_protocol(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("LA_0079 LA_T_1 - - bonafide\nLA_0079 LA_T_2 - A01\n")
    with pytest.raises(ProtocolError, match="bad.txt:2"):
        read_protocol(bad)
    with pytest.raises(AudioError, match="LA_T_9"):
        audio_path(tmp_path, "LA_T_9")
    junk = tmp_path / "junk.flac"
    junk.write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="junk.flac"):
        load_audio(junk, 8000)
