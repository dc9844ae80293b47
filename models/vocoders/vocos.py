"""A Vocos-style vocoder at telephone rate: log-mel in, STFT magnitude and phase out, iSTFT.

Why this family: HiFi-GAN (the V01/V02 copy-synthesis systems) upsamples with transposed
convolutions in the time domain, which leaves its own periodic artefacts. A Vocos generator
(Siuzdenko 2023; iSTFTNet is the same idea with a shorter upsampler) never works on samples:
a ConvNeXt stack runs at the frame rate and a linear head predicts, per frame, the log
magnitude and the phase of every STFT bin, which an inverse STFT turns into a waveform. Its
traces are those of spectral-domain phase prediction (smeared transients, phase
inconsistency between overlapping frames), not of an upsampler, so a detector that saw both
families learns more than one vocoder's fingerprint.

Everything runs at the corpus' 8 kHz; the mel analysis, shared with the NSF family, is part
of the model (``models.vocoders.base``), so a checkpoint carries the exact front end it was
trained with and cannot be fed another one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.vocoders.base import Generator, MelParams, VocoderConfigError, init_weights


@dataclass(frozen=True)
class VocosParams(MelParams):
    """The mel analysis plus the ConvNeXt stack's sizes; stored in every checkpoint."""

    dim: int = 128
    intermediate: int = 384
    layers: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.dim, self.intermediate, self.layers) <= 0:
            raise VocoderConfigError("dim, intermediate and layers must be positive")


class ConvNeXtBlock(nn.Module):
    """Depthwise 7-tap conv, LayerNorm, inverted bottleneck, layer scale, residual."""

    def __init__(self, dim: int, intermediate: int, scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1 = nn.Linear(dim, intermediate)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(intermediate, dim)
        self.gamma = nn.Parameter(torch.full((dim,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)
        y = self.pw2(self.act(self.pw1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


class VocosGenerator(Generator):
    """Mel frames -> per-frame STFT (log magnitude, phase) -> inverse STFT."""

    architecture = "vocos"
    params_class = VocosParams
    summary = "Vocos-style: log-mel -> ConvNeXt -> STFT magnitude+phase -> iSTFT"
    params: VocosParams

    def __init__(self, params: VocosParams) -> None:
        super().__init__(params)
        self.embed = nn.Conv1d(params.n_mels, params.dim, 7, padding=3)
        self.norm = nn.LayerNorm(params.dim, eps=1e-6)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(params.dim, params.intermediate, 1.0 / params.layers)
            for _ in range(params.layers))
        self.final_norm = nn.LayerNorm(params.dim, eps=1e-6)
        self.head = nn.Linear(params.dim, params.n_fft + 2)
        self.register_buffer("window", torch.hann_window(params.n_fft), persistent=False)
        self.apply(init_weights)

    def synthesize(self, mel: torch.Tensor) -> torch.Tensor:
        """``(batch, n_mels, frames)`` -> ``(batch, (frames - 1) * hop)``."""
        x = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        x = self.head(self.final_norm(x.transpose(1, 2))).transpose(1, 2)
        log_mag, phase = x.chunk(2, dim=1)
        # exp() of an untrained head can overflow; Vocos clips the magnitude the same way.
        mag = torch.clamp(torch.exp(log_mag), max=1e2)
        spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
        return torch.istft(spec, self.params.n_fft, self.params.hop, window=self.window,
                           center=True)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Copy-synthesis of ``(batch, samples)``, ``samples`` a multiple of ``hop``: same
        shape out."""
        return self.synthesize(self.mel(wave))
