"""Reading audio files and fitting waveforms to a model's input length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """Audio that cannot be used, with the item named in the message."""


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read a WAV or FLAC file as mono float32 in [-1, 1] at ``sample_rate``.

    Any input rate is accepted and resampled (soxr HQ): operators bring 8 kHz telephone
    audio and 16 kHz studio corpora to the same models.
    """
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"cannot read audio {path}: {exc}") from exc
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if wave.size == 0:
        raise AudioError(f"audio {path} is empty")
    return resample(wave, rate, sample_rate)


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return np.ascontiguousarray(wave, dtype=np.float32)
    return soxr.resample(wave, rate_in, rate_out, quality="HQ").astype(np.float32, copy=False)


def repeat_pad(wave: np.ndarray, length: int) -> np.ndarray:
    """Tile a short waveform up to ``length`` and cut a long one, as the official
    ASVspoof baselines do (``pad`` in their data_utils), rather than zero-padding, which
    would teach the model that silence is a class cue."""
    if wave.shape[0] == 0:
        raise ValueError("cannot pad an empty waveform")
    if wave.shape[0] >= length:
        return wave[:length]
    reps = int(np.ceil(length / wave.shape[0]))
    return np.tile(wave, reps)[:length]


def random_crop(wave: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``length`` excerpt (training); repeat-padded when the input is shorter."""
    if wave.shape[0] <= length:
        return repeat_pad(wave, length)
    start = int(rng.integers(0, wave.shape[0] - length + 1))
    return wave[start : start + length]
