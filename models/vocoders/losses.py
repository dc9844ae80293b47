"""Training objectives of the vocoders: spectral reconstruction, and a small GAN.

Why both: reconstruction losses on magnitudes alone (log-mel L1, multi-resolution STFT)
fix the spectral envelope quickly but say little about phase, which an iSTFT vocoder must
predict outright; left there, it sounds phasey. Discriminators that look at the waveform
in periodic slices (multi-period, HiFi-GAN) and at spectrograms of several resolutions
(multi-resolution, UnivNet/Vocos) push the phase toward what real speech does. The
discriminators here are HiFi-GAN's and UnivNet's layouts with far fewer channels, sized
for CPU training at 8 kHz.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

# (n_fft, hop, win) at 8 kHz: Parallel WaveGAN's three resolutions scaled from 24 kHz.
STFT_RESOLUTIONS: tuple[tuple[int, int, int], ...] = ((128, 32, 80), (256, 64, 200),
                                                     (512, 128, 400))
PERIODS: tuple[int, ...] = (2, 3, 5, 7, 11)  # HiFi-GAN's, co-prime


def _magnitude(wave: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    window = torch.hann_window(win, device=wave.device)
    spec = torch.stft(wave, n_fft, hop, win, window, center=True, return_complex=True)
    return torch.sqrt(torch.clamp(spec.real**2 + spec.imag**2, min=1e-7))


def multi_resolution_stft_loss(
    fake: torch.Tensor, real: torch.Tensor,
    resolutions: Sequence[tuple[int, int, int]] = STFT_RESOLUTIONS,
) -> torch.Tensor:
    """Spectral convergence plus log-magnitude L1, averaged over resolutions (Yamamoto
    et al. 2020)."""
    total = fake.new_zeros(())
    for n_fft, hop, win in resolutions:
        f, r = _magnitude(fake, n_fft, hop, win), _magnitude(real, n_fft, hop, win)
        convergence = torch.linalg.norm(r - f) / torch.clamp(torch.linalg.norm(r), min=1e-7)
        total = total + convergence + F.l1_loss(torch.log(f), torch.log(r))
    return total / len(resolutions)


def _convolve(layers: nn.ModuleList, post: nn.Module,
              x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A discriminator's convolutions (leaky ReLU between them) over its view of the audio:
    the logits, flattened per item, and every layer's output (the feature-matching loss
    compares them between real and generated audio)."""
    features = []
    for layer in layers:
        x = F.leaky_relu(layer(x), 0.1)
        features.append(x)
    x = post(x)
    features.append(x)
    return x.flatten(1), features


class PeriodDiscriminator(nn.Module):
    """The waveform folded into ``period`` columns, 2-D convolutions along time only;
    HiFi-GAN's layout at an eighth of its channels (8 kHz, one CPU thread)."""

    def __init__(self, period: int, channels: Sequence[int] = (8, 16, 32, 64)) -> None:
        super().__init__()
        self.period = period
        layers, previous = [], 1
        for ch in channels:
            layers.append(weight_norm(nn.Conv2d(previous, ch, (5, 1), (3, 1), (2, 0))))
            previous = ch
        layers.append(weight_norm(nn.Conv2d(previous, previous, (5, 1), 1, (2, 0))))
        self.layers = nn.ModuleList(layers)
        self.post = weight_norm(nn.Conv2d(previous, 1, (3, 1), 1, (1, 0)))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, t = wave.shape
        if t % self.period:
            wave = F.pad(wave, (0, self.period - t % self.period), mode="reflect")
        x = wave.view(b, 1, -1, self.period)
        return _convolve(self.layers, self.post, x)


class ResolutionDiscriminator(nn.Module):
    """2-D convolutions over one resolution's magnitude spectrogram. UnivNet's layout with
    8 channels and strides over frequency as well as time: at 32 channels and time-only
    strides the three of them cost fifty times a generator step on one CPU thread."""

    def __init__(self, resolution: tuple[int, int, int], channels: int = 8) -> None:
        super().__init__()
        self.resolution = resolution
        c = channels
        self.layers = nn.ModuleList([
            weight_norm(nn.Conv2d(1, c, (3, 9), (2, 1), (1, 4))),
            weight_norm(nn.Conv2d(c, c, (3, 9), (2, 2), (1, 4))),
            weight_norm(nn.Conv2d(c, c, (3, 9), (2, 2), (1, 4))),
            weight_norm(nn.Conv2d(c, c, (3, 9), (1, 2), (1, 4))),
            weight_norm(nn.Conv2d(c, c, (3, 3), padding=(1, 1))),
        ])
        self.post = weight_norm(nn.Conv2d(c, 1, (3, 3), padding=(1, 1)))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = _magnitude(wave, *self.resolution).unsqueeze(1)  # (b, 1, freq, frames)
        return _convolve(self.layers, self.post, x)


class Discriminators(nn.Module):
    """Multi-period (2, 3, 5, 7, 11) and multi-resolution discriminators together (either
    family may be left out)."""

    def __init__(self, periods: Sequence[int] = PERIODS,
                 resolutions: Sequence[tuple[int, int, int]] = STFT_RESOLUTIONS) -> None:
        super().__init__()
        self.members = nn.ModuleList(
            [PeriodDiscriminator(p) for p in periods]
            + [ResolutionDiscriminator(r) for r in resolutions])

    def forward(self, wave: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [member(wave) for member in self.members]


def discriminator_loss(real: list[tuple[torch.Tensor, list[torch.Tensor]]],
                       fake: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> torch.Tensor:
    """Least-squares GAN (HiFi-GAN): real toward 1, fake toward 0."""
    return sum((torch.mean((1 - r) ** 2) + torch.mean(f**2)
                for (r, _), (f, _) in zip(real, fake, strict=True)), torch.zeros(()))


def generator_losses(real: list[tuple[torch.Tensor, list[torch.Tensor]]],
                     fake: list[tuple[torch.Tensor, list[torch.Tensor]]],
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial (fake toward 1) and feature-matching (L1 on every hidden layer) losses,
    each averaged over discriminators."""
    adversarial = torch.zeros(())
    matching = torch.zeros(())
    for (_, real_feats), (score, fake_feats) in zip(real, fake, strict=True):
        adversarial = adversarial + torch.mean((1 - score) ** 2)
        matching = matching + sum((F.l1_loss(f, r.detach())
                                   for r, f in zip(real_feats, fake_feats, strict=True)),
                                  torch.zeros(())) / len(fake_feats)
    return adversarial / len(fake), matching / len(fake)
