"""A neural source-filter (NSF) vocoder at telephone rate: F0 and log-mel in, samples out.

Why this family (Wang & Yamagishi 2019, "Neural source-filter waveform models"): HiFi-GAN
(V01/V02) learns its periodicity with transposed-convolution upsamplers and Vocos (V03)
predicts STFT phase frame by frame; an NSF generator is handed its periodicity outright.
A sine source at the input's F0 (a few harmonics, noise where a frame is unvoiced) is
shaped into speech by dilated convolutions at the sample rate, conditioned on the mel
frames. Its harmonics are locked to an estimated pitch track, its unvoiced sounds are
filtered noise, and its errors are a pitch tracker's (octave jumps, voicing flips at
onsets): a third fingerprint for the detector, unlike either of the others.

The F0 is estimated from the input waveform inside the generator's ``forward`` by the small
deterministic tracker below (YIN's cumulative mean normalised difference, Cheveigné &
Kawahara 2002, on the mel's 10 ms frame centres, 60-400 Hz), so training and copy-synthesis
use the very same pitch track and no external tracker is needed. The tracker's range and
thresholds are constants of the family, not hyper-parameters: a checkpoint is only right
with the pitch track it was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.vocoders.base import Generator, MelParams, VocoderConfigError

F0_MIN = 60.0  # Hz: below any adult speaker's modal voice in the corpus
F0_MAX = 400.0  # Hz: above children's speech; 8 kHz leaves 10 harmonics at the top
DIP = 0.15  # YIN's absolute threshold: the first lag whose normalised difference dips below
VOICING = 0.35  # a frame is voiced when its best dip is below this ...
FLOOR_DB = -60.0  # ... and its level above this (dB re full scale; silence is unvoiced)
SINE_AMPLITUDE = 0.1  # the source's scale in NSF
VOICED_NOISE = 0.003  # noise beside the sines in voiced samples (NSF's values)


@dataclass(frozen=True)
class NsfParams(MelParams):
    """The mel analysis plus the source's harmonics and the filter's sizes."""

    harmonics: int = 7  # sines at 1..harmonics x F0 (each silenced above 4 kHz)
    channels: int = 16  # of every filter block's dilated convolutions
    blocks: int = 3
    layers: int = 4  # per block, dilations 1, 2, 4, ...
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.harmonics, self.channels, self.blocks, self.layers) <= 0:
            raise VocoderConfigError(
                f"harmonics {self.harmonics}, channels {self.channels}, blocks {self.blocks} "
                f"and layers {self.layers} must be positive")
        if self.kernel < 3 or self.kernel % 2 == 0:
            raise VocoderConfigError(f"kernel {self.kernel}: need an odd size >= 3 (a centred "
                                     "filter keeps the output aligned with the source)")
        if self.layers > 12:
            raise VocoderConfigError(f"layers {self.layers}: at most 12 per block (dilation "
                                     "2**11 already reaches 0.26 s at 8 kHz)")


# --------------------------------------------------------------------------- pitch


Pitch = tuple[torch.Tensor, torch.Tensor]  # F0 in Hz (0 where unvoiced), voiced flags


def estimate_f0(wave: torch.Tensor, sample_rate: int, hop: int) -> Pitch:
    """``(batch, samples)`` -> F0 in Hz (0 where unvoiced) and the voiced flags, both
    ``(batch, samples // hop + 1)``: one per mel frame, centred on the same samples.

    Each frame spans one longest period (1 / 60 Hz) either side of its centre; the
    difference function comes from one FFT cross-correlation and running energies (constant
    memory per frame, whatever the file's length), in float64 so that silence cannot turn
    rounding into a dip. The period is YIN's first dip below ``DIP`` (else the deepest one),
    refined by a parabola through its neighbours."""
    lag_max = math.ceil(sample_rate / F0_MIN)
    lag_min = max(2, math.floor(sample_rate / F0_MAX))
    width = lag_max
    x = F.pad(wave.detach().to(torch.float64), (lag_max, lag_max))
    frames = x.unfold(-1, 2 * lag_max, hop)  # (batch, frames, 2 * lag_max), centred
    n = 1 << (3 * lag_max).bit_length()
    spectrum = torch.fft.rfft(frames, n)
    head = torch.fft.rfft(frames[..., :width], n)
    corr = torch.fft.irfft(head.conj() * spectrum, n)[..., : lag_max + 1]
    energy = F.pad(torch.cumsum(frames**2, -1), (1, 0))
    lags = torch.arange(lag_max + 1)
    shifted = energy[..., lags + width] - energy[..., lags]
    diff = torch.clamp(energy[..., width : width + 1] + shifted - 2 * corr, min=0.0)
    running = torch.cumsum(diff[..., 1:], -1)
    cmnd = torch.cat([torch.ones_like(diff[..., :1]),
                      diff[..., 1:] * lags[1:] / torch.clamp(running, min=1e-12)], -1)

    search = cmnd[..., lag_min:lag_max]  # lags lag_min .. lag_max - 1 (each has a right one)
    below = search < DIP
    first = torch.where(below.any(-1), below.to(torch.int8).argmax(-1), search.shape[-1])
    index = torch.arange(search.shape[-1])
    rising = (search <= cmnd[..., lag_min + 1 : lag_max + 1]) & (index >= first[..., None])
    dip = torch.where(rising.any(-1), rising.to(torch.int8).argmax(-1), search.shape[-1] - 1)
    best = torch.where(below.any(-1), dip, search.argmin(-1)) + lag_min
    y0, y1, y2 = (torch.gather(cmnd, -1, (best + k)[..., None])[..., 0] for k in (-1, 0, 1))
    curve = y0 - 2 * y1 + y2
    shift = torch.where(curve > 1e-12, 0.5 * (y0 - y2) / torch.clamp(curve, min=1e-12), 0.0)
    f0 = sample_rate / (best + torch.clamp(shift, -1.0, 1.0))
    level = torch.sqrt(energy[..., -1] / frames.shape[-1])
    voiced = (y1 < VOICING) & (level > 10.0 ** (FLOOR_DB / 20.0)) & (f0 >= F0_MIN) & (
        f0 <= F0_MAX)
    return torch.where(voiced, f0, 0.0).to(torch.float32), voiced


def fill_unvoiced(f0: torch.Tensor, voiced: torch.Tensor) -> torch.Tensor:
    """F0 carried across unvoiced frames by linear interpolation between voiced neighbours
    (held flat at the ends), so the source's frequency never ramps toward 0 Hz at a voicing
    boundary; all-unvoiced rows stay 0."""
    out = f0.detach().cpu().numpy().astype(np.float64)
    flags = voiced.detach().cpu().numpy()
    frames = np.arange(out.shape[-1])
    for row in range(out.shape[0]):
        known = np.flatnonzero(flags[row])
        if known.size:
            out[row] = np.interp(frames, known, out[row, known])
    return torch.from_numpy(out.astype(np.float32)).to(f0.device)


def upsample(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """``(batch, channels, frames)`` -> ``(batch, channels, (frames - 1) * hop)``: linear
    between frame centres, sample ``k * hop`` being frame ``k``."""
    count = frames.shape[-1]
    return F.interpolate(frames, size=(count - 1) * hop + 1, mode="linear",
                         align_corners=True)[..., :-1]


# --------------------------------------------------------------------------- model


class SineSource(nn.Module):
    """Harmonics 1..H of the sample-rate F0 (0.1 amplitude, silenced above Nyquist and in
    unvoiced samples), Gaussian noise everywhere (stronger where unvoiced), merged into one
    excitation by a learned linear layer and tanh (NSF's source module)."""

    def __init__(self, harmonics: int, sample_rate: int) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.register_buffer("orders", torch.arange(1, harmonics + 1, dtype=torch.float64),
                             persistent=False)
        self.merge = nn.Linear(harmonics, 1)

    def forward(self, f0: torch.Tensor, voiced: torch.Tensor,
                rng: torch.Generator | None) -> torch.Tensor:
        """``f0``, ``voiced``: ``(batch, samples)`` -> excitation ``(batch, 1, samples)``.
        ``rng``: the noise and starting phases' generator (None: torch's global one, for
        training; a fixed one in eval mode makes copy-synthesis repeatable)."""
        batch, samples = f0.shape
        cycles = torch.cumsum(f0.to(torch.float64) / self.sample_rate, -1)
        phase = torch.remainder(cycles[:, None, :] * self.orders[:, None], 1.0)
        if self.training:
            phase = phase + torch.rand(batch, len(self.orders), 1, generator=rng,
                                       dtype=torch.float64)
        sines = torch.sin(2 * math.pi * phase).to(f0.dtype)
        audible = (f0[:, None, :] * self.orders[:, None].to(f0.dtype)) < self.sample_rate / 2
        sines = SINE_AMPLITUDE * sines * audible * voiced[:, None, :]
        scale = voiced * VOICED_NOISE + (1 - voiced) * (SINE_AMPLITUDE / 3)
        noise = torch.randn(sines.shape, generator=rng) * scale[:, None, :]
        return torch.tanh(self.merge((sines + noise).transpose(1, 2))).transpose(1, 2)


class FilterBlock(nn.Module):
    """Dilated convolutions with gated activations and residuals over the excitation,
    conditioned on the upsampled frames; its output is added to its input (NSF's neural
    filter block)."""

    def __init__(self, channels: int, layers: int, kernel: int) -> None:
        super().__init__()
        self.channels = channels
        self.expand = nn.Conv1d(1, channels, 1)
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, 2 * channels, kernel, dilation=2**i,
                      padding=(kernel - 1) // 2 * 2**i) for i in range(layers))
        self.mix = nn.ModuleList(nn.Conv1d(channels, channels, 1) for _ in range(layers))
        self.out = nn.Conv1d(channels, 1, 1)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.expand(x))
        for conv, mix in zip(self.convs, self.mix, strict=True):
            y = conv(h) + condition
            h = h + mix(torch.tanh(y[:, : self.channels]) * torch.sigmoid(y[:, self.channels :]))
        return x + self.out(h)


class NsfGenerator(Generator):
    """Wave -> (log-mel, F0) -> sine source -> filter blocks -> wave."""

    architecture = "nsf"
    params_class = NsfParams
    summary = ("NSF: log-mel + YIN F0 -> sine-harmonic/noise source -> dilated-conv "
               "filter blocks -> waveform")
    params: NsfParams

    def __init__(self, params: NsfParams) -> None:
        super().__init__(params)
        width = 4 * params.channels
        # Frame-rate conditioning: mel, log F0 and the voiced flag -> one (2 x channels)
        # bias per filter block, upsampled to the samples (cheap: the convolutions that
        # cost are those at the sample rate).
        self.condition = nn.Sequential(
            nn.Conv1d(params.n_mels + 2, width, 5, padding=2), nn.LeakyReLU(0.1),
            nn.Conv1d(width, width, 5, padding=2), nn.LeakyReLU(0.1),
            nn.Conv1d(width, params.blocks * 2 * params.channels, 1))
        self.source = SineSource(params.harmonics, params.sample_rate)
        self.blocks = nn.ModuleList(FilterBlock(params.channels, params.layers, params.kernel)
                                    for _ in range(params.blocks))

    def pitch(self, wave: torch.Tensor) -> Pitch:
        """The frame F0 (Hz, 0 unvoiced) and voiced flags this generator uses for ``wave``."""
        return estimate_f0(wave, self.params.sample_rate, self.params.hop)

    def synthesize(self, mel: torch.Tensor, f0: torch.Tensor,
                   voiced: torch.Tensor) -> torch.Tensor:
        """``(batch, n_mels, frames)`` and ``(batch, frames)`` F0/voiced ->
        ``(batch, (frames - 1) * hop)``."""
        hop = self.params.hop
        flags = voiced.to(mel.dtype)
        filled = fill_unvoiced(f0, voiced)
        log_f0 = torch.log(torch.clamp(filled, min=F0_MIN) / 100.0)
        condition = upsample(self.condition(torch.cat(
            [mel, log_f0[:, None], flags[:, None]], 1)), hop)
        f0_samples = upsample(filled[:, None], hop)[:, 0]
        voiced_samples = (upsample(flags[:, None], hop)[:, 0] >= 0.5).to(mel.dtype)
        rng = None if self.training else torch.Generator().manual_seed(0)
        x = self.source(f0_samples, voiced_samples, rng)
        for block, bias in zip(self.blocks, condition.chunk(len(self.blocks), 1), strict=True):
            x = block(x, bias)
        return x[:, 0]

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Copy-synthesis of ``(batch, samples)``, ``samples`` a multiple of ``hop``: same
        shape out."""
        f0, voiced = self.pitch(wave)
        return self.synthesize(self.mel(wave), f0, voiced)
