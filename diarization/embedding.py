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
from collections.abc import Callable
from functools import cache, cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from pyannote.audio import Model
from torch import nn
from torchaudio.transforms import MelSpectrogram

from diarization.batching import ConcurrentBatcher

SAMPLE_RATE = 16000
PARTIAL_FRAMES = 160  # 1.6 s, as GE2E was trained
PARTIAL_STEP = 80
MIN_FRAMES = 10  # fewer active frames than this: no usable evidence (zero embedding -> NaN)
DIMENSION = 256
TARGET_DBFS = -30.0  # Resemblyzer's normalize_volume: the LSTM reads power, not log power


@cache
def bf16_lstm_supported() -> bool:
    """Whether this CPU runs an LSTM under bfloat16 autocast at all: oneDNN emulates bfloat16
    on AVX-512 CPUs without it, but on AVX2-only CPUs (an AMD EPYC of 2026-12-04) it cannot
    build the LSTM primitive and every forward fails. Probed once on a tiny LSTM."""
    lstm = nn.LSTM(4, 2, 1, batch_first=True)
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 2, 4))
    except RuntimeError:
        return False
    return True


def resemblyzer_weights() -> Path:
    """``pretrained.pt`` inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("resemblyzer is not installed (pip install resemblyzer==0.1.4)")
    return Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"


class ResemblyzerEmbedding(Model):
    """GE2E d-vectors (256-d, L2-normed) of 16 kHz audio; 8 kHz calls are resampled by pyannote."""

    def __init__(self, weights: Path | None = None, bf16: bool = False) -> None:
        """``bf16``: run the LSTM and the projection in bfloat16 (the mel features stay
        float32); see ``diarization.models.DiarizationModels``."""
        super().__init__(sample_rate=SAMPLE_RATE, num_channels=1)
        if bf16 and not bf16_lstm_supported():  # at start-up, not at a call's first step
            raise ValueError("this CPU cannot run the speaker embedding LSTM in bfloat16 "
                             "(oneDNN needs AVX-512); use precision fp32 or auto")
        self.bf16 = bf16
        self.mel = MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=40, power=2.0,
            norm="slaney", mel_scale="slaney", center=True, pad_mode="constant")
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, DIMENSION)
        state = torch.load(weights or resemblyzer_weights(), map_location="cpu",
                           weights_only=False)["model_state"]
        self.load_state_dict(state, strict=False)  # the wheel also stores GE2E's loss scalars
        self.eval()
        # how the partials' LSTM pass runs: batched across concurrent calls here, or by
        # Redis workers (DiarizationModels.use)
        self.batcher: Callable[[list[torch.Tensor]], torch.Tensor] = ConcurrentBatcher(
            self._partial_embeddings)

    @cached_property
    def dimension(self) -> int:
        return DIMENSION

    @staticmethod
    def _partials(mels: torch.Tensor) -> list[torch.Tensor]:
        """(frames, 40) -> GE2E's partials: 1.6 s stretches every 0.8 s, the last one flush
        with the end; one shorter partial when there is less than 1.6 s."""
        n = mels.shape[0]
        if n <= PARTIAL_FRAMES:
            return [mels]
        starts = list(range(0, n - PARTIAL_FRAMES + 1, PARTIAL_STEP))
        if starts[-1] + PARTIAL_FRAMES < n:
            starts.append(n - PARTIAL_FRAMES)
        return [mels[s : s + PARTIAL_FRAMES] for s in starts]

    @torch.inference_mode()
    def _partial_embeddings(self, partials: list[torch.Tensor]) -> torch.Tensor:
        """Partials (frames, 40) -> (n, 256) L2-normed: one LSTM batch per length (no
        padding, which would change the last state, and packed sequences leave the fast
        bfloat16 path: 5x slower)."""
        out = torch.empty(len(partials), DIMENSION, device=partials[0].device)
        for length in sorted({x.shape[0] for x in partials}):
            rows = [j for j, x in enumerate(partials) if x.shape[0] == length]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                _, (hidden, _) = self.lstm(torch.stack([partials[j] for j in rows]))
                out[rows] = F.relu(self.linear(hidden[-1])).float()
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def _embed_many(self, utterances: list[torch.Tensor]) -> torch.Tensor:
        """[(frames, 40), ...] -> (len, 256): per utterance the average of its L2-normed
        partial embeddings, L2-normed. The partials of all utterances (and of other calls'
        concurrent steps: :class:`~diarization.batching.ConcurrentBatcher`) go through the
        LSTM together."""
        partials = [self._partials(u) for u in utterances]
        owner = torch.tensor([i for i, ps in enumerate(partials) for _ in ps])
        out = self.batcher([x for ps in partials for x in ps])
        mean = torch.zeros(len(utterances), DIMENSION, device=out.device).index_add_(
            0, owner.to(out.device), out)
        return mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``waveforms`` (batch, 1, samples) at 16 kHz, ``weights`` (batch, frames) in [0, 1]
        -> (batch, 256); rows with under 0.1 s of weighted speech are NaN, which pyannote's
        pipeline treats as "no embedding" for that speaker in that chunk. A single waveform
        with several rows of ``weights`` is read once: the streaming diarizer's speakers of
        one buffer."""
        mels = self.mel(waveforms[:, 0]).transpose(1, 2)  # (batch or 1, frames, 40)
        rows = waveforms.shape[0] if weights is None else weights.shape[0]
        if weights is not None:
            keep = F.interpolate(weights[:, None].float(), size=mels.shape[1],
                                 mode="nearest")[:, 0] > 0.5
        else:
            keep = torch.ones(mels.shape[:2], dtype=torch.bool, device=mels.device)
        # per-frame power of the waveform, to bring the kept frames to TARGET_DBFS
        power = F.avg_pool1d(waveforms[:, :, : (waveforms.shape[2] // 160) * 160] ** 2, 160)[:, 0]
        power = F.pad(power, (0, mels.shape[1] - power.shape[1]), mode="replicate")
        out = torch.full((rows, DIMENSION), float("nan"), device=mels.device)
        kept, utterances = [], []
        for i in range(rows):
            w = 0 if mels.shape[0] == 1 else i
            frames = mels[w][keep[i]]
            if frames.shape[0] >= MIN_FRAMES:
                mean_power = power[w][keep[i]].mean().clamp_min(1e-10)
                kept.append(i)
                utterances.append(frames * (10 ** (TARGET_DBFS / 10) / mean_power))
        if utterances:
            out[kept] = self._embed_many(utterances)
        return out
