"""LFCC-LCNN: a light CNN over linear-frequency cepstra, the discriminative twin of LFCC+GMM.

Why this model: on leave-one-system-out folds (engines never seen in training) the best
single model here was LFCC+GMM on deltas only (``bench/results/generalization.md``), while
RawNet2 trained on raw waveforms fit the six training engines and missed new ones. The
LFCC-LCNN of Wang & Yamagishi (Interspeech 2021, the ASVspoof 2021 LA/DF baseline) keeps the
front end that generalizes and learns a discriminative back end over it; with the one-class
softmax of Zhang et al. (IEEE SPL 2021: bona fide compact around one direction, every spoof
merely pushed away from it) it gave 2.19 % EER on the unseen ASVspoof 2019 LA attacks against
about 4.7 % for a plain softmax.

The front end is the one of :mod:`models.architectures.lfcc_gmm` computed in torch (the
same filterbank, frames and deltas; a test checks it against the numpy code), so the two
models read the same features:

- ``static: false`` keeps only deltas and double deltas: a fixed channel (microphone, line)
  adds a constant to the static cepstra that the deltas cancel;
- ``cmn: true`` instead keeps the statics minus their mean over the window (cepstral mean
  normalisation), which removes the same constant and keeps the spectral shape;
- ``freq_mask`` (training only) replaces up to that many adjacent filterbank bands with the
  frame's mean log energy before the DCT (SpecAugment-style): a new engine's artefacts may
  sit in other bands than the training engines'.

Network: Max-Feature-Map convolutions (LCNN, Wu et al. 2018) in three stages, mean and
standard deviation over time, a 64-dimensional embedding and either a 2-way linear layer
(``head: softmax``) or the one-class head (``head: oc-softmax``). With the one-class head the
logits are ``(-alpha*s/2, alpha*s/2)`` for the cosine ``s`` between the embedding and the
learned bona fide direction, so every caller (scoring, calibration, the LOSO benches) sees the
same two-logit model whatever the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import dct
from torch import nn

from models.architectures.lfcc_gmm import LFCCFeatures, linear_filterbank
from models.architectures.pooling import StridedMaxPool2d
from models.architectures.scorer import LogitsScorer
from models.config_dict import dataclass_from_dict

__all__ = ["LCNN", "LCNNConfig", "LCNNScorer", "LFCCFrontEnd"]


@dataclass(frozen=True)
class LCNNConfig(LFCCFeatures):
    """The LFCC front end's settings (:class:`LFCCFeatures`, deltas only by default), the
    ``cmn`` and ``freq_mask`` options above, and the network's."""

    static: bool = False
    cmn: bool = False
    freq_mask: int = 0
    channels: tuple[int, ...] = (8, 16, 24)
    embedding: int = 64
    dropout: float = 0.5
    head: str = "oc-softmax"  # or "softmax"
    alpha: float = 20.0  # one-class head: logit scale of the cosine

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head not in ("softmax", "oc-softmax"):
            raise ValueError(f"head must be softmax or oc-softmax, got {self.head!r}")
        if len(self.channels) != 3:
            raise ValueError(f"channels: three stages, got {self.channels}")
        if self.delta_width != 3:
            raise ValueError(f"the LCNN front end takes deltas of width 3, got {self.delta_width}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LCNNConfig:
        return dataclass_from_dict(cls, raw, "LCNN config")

    @property
    def feature_dim(self) -> int:
        return (3 if self.static or self.cmn else 2) * self.n_ceps


class LFCCFrontEnd(nn.Module):
    """``(B, T)`` waveforms -> ``(B, frames, dims)`` LFCCs, as :func:`lfcc_gmm.lfcc` without
    the quiet-frame gate (a network weighs frames itself)."""

    def __init__(self, config: LCNNConfig) -> None:
        super().__init__()
        self.config = config
        self.win, self.hop = config.win_length, config.hop_length
        self.register_buffer("window", torch.hamming_window(self.win, periodic=False,
                                                            dtype=torch.float64).float())
        self.register_buffer("filterbank", torch.from_numpy(linear_filterbank(config)).float())
        basis = dct(np.eye(config.n_filters), type=2, norm="ortho", axis=0)[: config.n_ceps]
        self.register_buffer("dct", torch.from_numpy(basis.T.copy()).float())

    @staticmethod
    def deltas(x: torch.Tensor) -> torch.Tensor:
        """HTK deltas of half-width 1 along frames (dim 1), edges replicated: the front
        end's ``delta_width`` 3, the only width the LCNN uses."""
        padded = torch.cat((x[:, :1], x, x[:, -1:]), dim=1)
        return (padded[:, 2:] - padded[:, :-2]) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.preemphasis:
            x = torch.cat((x[:, :1], x[:, 1:] - cfg.preemphasis * x[:, :-1]), dim=1)
        if x.shape[1] < self.win:
            x = F.pad(x, (0, self.win - x.shape[1]))
        frames = x.unfold(1, self.win, self.hop) * self.window
        bins = torch.fft.rfft(frames, n=cfg.n_fft)
        spectrum = bins.real.square() + bins.imag.square()  # |X|^2 without |X|'s square root
        log_energy = torch.log10(spectrum @ self.filterbank + torch.finfo(torch.float64).eps)
        if self.training and cfg.freq_mask > 0:
            log_energy = self._mask_bands(log_energy)
        static = log_energy @ self.dct
        d1 = self.deltas(static)
        d2 = self.deltas(d1)
        if cfg.cmn:
            return torch.cat((static - static.mean(dim=1, keepdim=True), d1, d2), dim=2)
        return torch.cat((static, d1, d2) if cfg.static else (d1, d2), dim=2)

    def _mask_bands(self, log_energy: torch.Tensor) -> torch.Tensor:
        batch, _, bands = log_energy.shape
        width = torch.randint(0, self.config.freq_mask + 1, (batch, 1), device=log_energy.device)
        start = (torch.rand(batch, 1, device=log_energy.device) * (bands - width + 1)).long()
        band = torch.arange(bands, device=log_energy.device)[None, :]
        masked = ((band >= start) & (band < start + width))[:, None, :]
        return torch.where(masked, log_energy.mean(dim=2, keepdim=True), log_energy)


class MFMConv(nn.Module):
    """A convolution to ``2 * out`` channels followed by Max-Feature-Map (the max of the two
    halves): LCNN's competitive activation, which keeps half the maps per location."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, 2 * cout, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return torch.maximum(a, b)


class LCNN(nn.Module):
    """LFCC front end, three MFM stages, mean+std pooling over time, embedding, head."""

    def __init__(self, config: LCNNConfig) -> None:
        super().__init__()
        self.config = config
        self.frontend = LFCCFrontEnd(config)
        c1, c2, c3 = config.channels
        self.body = nn.Sequential(
            MFMConv(1, c1, 5), StridedMaxPool2d(2),
            MFMConv(c1, c1, 1), nn.BatchNorm2d(c1), MFMConv(c1, c2, 3), StridedMaxPool2d(2),
            nn.BatchNorm2d(c2),
            MFMConv(c2, c2, 1), nn.BatchNorm2d(c2), MFMConv(c2, c3, 3), StridedMaxPool2d(2),
            nn.BatchNorm2d(c3),
        )
        pooled_dims = c3 * (config.feature_dim // 8)
        self.dropout = nn.Dropout(config.dropout)
        self.embed = nn.Linear(2 * pooled_dims, config.embedding)
        if config.head == "softmax":
            self.out = nn.Linear(config.embedding, 2)
        else:
            self.center = nn.Parameter(torch.randn(config.embedding))

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.frontend(x)  # (B, frames, dims)
        if feats.shape[1] < 8:  # the three pools need 8 frames
            feats = F.pad(feats, (0, 0, 0, 8 - feats.shape[1]), mode="replicate")
        h = self.body(feats.unsqueeze(1))  # (B, C, frames/8, dims/8)
        h = h.permute(0, 2, 1, 3).flatten(2)  # (B, frames/8, C*dims/8)
        pooled = torch.cat((h.mean(dim=1), h.std(dim=1, unbiased=False)), dim=1)
        return self.embed(self.dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.forward_embedding(x)
        if self.config.head == "softmax":
            return self.out(emb)
        s = F.cosine_similarity(emb, self.center[None, :], dim=1)
        half = 0.5 * self.config.alpha * s
        return torch.stack((-half, half), dim=1)


def oc_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                    margins: tuple[float, float], weight: torch.Tensor) -> torch.Tensor:
    """One-class softmax (Zhang et al. 2021) from the two logits of :class:`LCNN`: bona fide
    (label 1) cosines pushed above ``margins[0]``, spoofs below ``margins[1]``, class-weighted
    like the cross-entropy it replaces."""
    d = logits[:, 1] - logits[:, 0]  # alpha * cosine
    real, fake = margins
    loss = torch.where(labels == 1, F.softplus(alpha * real - d), F.softplus(d - alpha * fake))
    w = weight[labels]
    return (w * loss).sum() / w.sum()


class LCNNScorer(LogitsScorer):
    architecture = "lcnn"

    @classmethod
    def build(cls, model_config: dict[str, Any]) -> LCNN:
        return LCNN(LCNNConfig.from_dict(model_config))
