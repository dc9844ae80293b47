"""Resemblyzer's GE2E speaker encoder as a pyannote.audio ``Model``.

Why Resemblyzer: it is pretrained on thousands of speakers and its weights (``pretrained.pt``,
17 MB, Apache-2.0) ship inside the PyPI wheel, so it runs offline; pyannote's own embeddings
are hub downloads. Why not ``import resemblyzer``: its package imports librosa and webrtcvad
(numba, a C extension) only for preprocessing we do not use, so it is installed with
``--no-deps`` and this module rebuilds the encoder (3-layer LSTM, 256 units, ReLU+L2 output)
and its input (40-band power mel at 16 kHz, 25 ms / 10 ms, librosa's Slaney mel, the speech
brought to -30 dBFS as Resemblyzer's ``normalize_volume`` does) with torch.

As a pyannote ``Model`` it plugs into ``pipelines.SpeakerDiarization`` unchanged:
``forward(waveforms, weights)`` embeds, per chunk, only the frames where the local speaker is
active (``weights`` are the segmentation masks), in 1.6 s partials averaged as GE2E does.
"""

from __future__ import annotations

import importlib.util
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from pyannote.audio import Model
from torch import nn
from torchaudio.transforms import MelSpectrogram

SAMPLE_RATE = 16000
PARTIAL_FRAMES = 160  # 1.6 s, as GE2E was trained
PARTIAL_STEP = 80
MIN_FRAMES = 10  # fewer active frames than this: no usable evidence (zero embedding -> NaN)
DIMENSION = 256
TARGET_DBFS = -30.0  # Resemblyzer's normalize_volume: the LSTM reads power, not log power


def resemblyzer_weights() -> Path:
    """``pretrained.pt`` inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("resemblyzer is not installed (pip install resemblyzer==0.1.4)")
    return Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"


class ResemblyzerEmbedding(Model):
    """GE2E d-vectors (256-d, L2-normed) of 16 kHz audio; 8 kHz calls are resampled by pyannote."""

    def __init__(self, weights: Path | None = None) -> None:
        super().__init__(sample_rate=SAMPLE_RATE, num_channels=1)
        self.mel = MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=40, power=2.0,
            norm="slaney", mel_scale="slaney", center=True, pad_mode="constant")
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, DIMENSION)
        state = torch.load(weights or resemblyzer_weights(), map_location="cpu",
                           weights_only=False)["model_state"]
        self.load_state_dict(state, strict=False)  # the wheel also stores GE2E's loss scalars
        self.eval()

    @cached_property
    def dimension(self) -> int:
        return DIMENSION

    def _embed_frames(self, mels: torch.Tensor) -> torch.Tensor:
        """(frames, 40) -> (256,): average of L2-normed partial embeddings, L2-normed."""
        n = mels.shape[0]
        if n <= PARTIAL_FRAMES:
            batch = mels[None]
        else:
            starts = list(range(0, n - PARTIAL_FRAMES + 1, PARTIAL_STEP))
            if starts[-1] + PARTIAL_FRAMES < n:
                starts.append(n - PARTIAL_FRAMES)
            batch = torch.stack([mels[s : s + PARTIAL_FRAMES] for s in starts])
        _, (hidden, _) = self.lstm(batch)
        partials = F.relu(self.linear(hidden[-1]))
        partials = partials / partials.norm(dim=1, keepdim=True).clamp_min(1e-8)
        mean = partials.mean(dim=0)
        return mean / mean.norm().clamp_min(1e-8)

    def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``waveforms`` (batch, 1, samples) at 16 kHz, ``weights`` (batch, frames) in [0, 1]
        -> (batch, 256); rows with under 0.1 s of weighted speech are NaN, which pyannote's
        pipeline treats as "no embedding" for that speaker in that chunk."""
        mels = self.mel(waveforms[:, 0]).transpose(1, 2)  # (batch, frames, 40)
        if weights is not None:
            keep = F.interpolate(weights[:, None].float(), size=mels.shape[1],
                                 mode="nearest")[:, 0] > 0.5
        else:
            keep = torch.ones(mels.shape[:2], dtype=torch.bool, device=mels.device)
        # per-frame power of the waveform, to bring the kept frames to TARGET_DBFS
        power = F.avg_pool1d(waveforms[:, :, : (waveforms.shape[2] // 160) * 160] ** 2, 160)[:, 0]
        power = F.pad(power, (0, mels.shape[1] - power.shape[1]), mode="replicate")
        out = torch.full((mels.shape[0], DIMENSION), float("nan"), device=mels.device)
        for i in range(mels.shape[0]):
            frames = mels[i][keep[i]]
            if frames.shape[0] >= MIN_FRAMES:
                mean_power = power[i][keep[i]].mean().clamp_min(1e-10)
                gain = 10 ** (TARGET_DBFS / 10) / mean_power
                out[i] = self._embed_frames(frames * gain)
        return out
