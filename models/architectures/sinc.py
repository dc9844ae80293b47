"""Fixed mel-scaled sinc band-pass filter banks, built as the official RawNet2 and AASIST do.

The official code builds the bank with a mix of float32 torch tensors and float64 numpy
scalars; the exact dtype path matters at the 1e-7 level, so it is reproduced step by step
here, once, at construction time (the official RawNet2 rebuilds it on every forward).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EdgeLayout = Literal["baseline", "eurecom"]


def _to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595 * np.log10(1 + hz / 700)


def _to_hz(mel: np.ndarray) -> np.ndarray:
    return 700 * (10 ** (mel / 2595) - 1)


def mel_sinc_bank(
    n_filters: int, kernel_size: int, sample_rate: int, layout: EdgeLayout = "baseline"
) -> torch.Tensor:
    """Return the ``(n_filters, kernel_size)`` Hamming-windowed sinc band-pass bank.

    ``layout="baseline"`` is the ASVspoof 2021 / clovaai / AASIST construction (n+1 mel
    edges spanning 0..sr/2); ``"eurecom"`` is the ICASSP 2021 release (n+3 edges, so the
    last band stops short of Nyquist). An even ``kernel_size`` is forced odd, as upstream.
    """
    if kernel_size % 2 == 0:
        kernel_size += 1
    nfft = 512
    f = int(sample_rate / 2) * np.linspace(0, 1, int(nfft / 2) + 1)
    fmel = _to_mel(f)
    n_edges = n_filters + 1 if layout == "baseline" else n_filters + 3
    edges = _to_hz(np.linspace(np.min(fmel), np.max(fmel), n_edges))
    hsupp = torch.arange(-(kernel_size - 1) / 2, (kernel_size - 1) / 2 + 1)
    window = torch.tensor(np.hamming(kernel_size), dtype=torch.float32)
    bank = torch.zeros(n_filters, kernel_size)
    for i in range(n_filters):
        fmin, fmax = edges[i], edges[i + 1]
        h_high = (2 * fmax / sample_rate) * np.sinc((2 * fmax * hsupp / sample_rate).numpy())
        h_low = (2 * fmin / sample_rate) * np.sinc((2 * fmin * hsupp / sample_rate).numpy())
        bank[i] = window * torch.tensor(h_high - h_low, dtype=torch.float32)
    return bank


def _fast_fft_size(n: int) -> int:
    """Smallest 2^a * 3^b * 5^c >= n: pocketfft is fastest on such sizes."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def conv1d_valid(
    x: torch.Tensor,
    bank: torch.Tensor,
    method: str = "auto",
    spectrum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Valid (unpadded) convolution of ``x (B, 1, T)`` with every filter of ``bank (C, K)``.

    Same result as ``F.conv1d(x, bank[:, None])`` (cross-correlation; the sinc filters are
    symmetric anyway). Long filters go through the FFT: 1025 taps cost ~2.6 GFLOP per
    4 s window in the time domain and a small fraction of that in the frequency domain.
    ``spectrum`` is the bank's precomputed :func:`filter_spectrum` for this input length.
    """
    kernel = bank.shape[-1]
    if method == "auto":
        method = "fft" if kernel > 200 else "direct"
    if method == "direct":
        return F.conv1d(x, bank.unsqueeze(1))
    length = x.shape[-1]
    n = _fast_fft_size(length + kernel - 1)
    if spectrum is None:
        spectrum = filter_spectrum(bank, n)
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * spectrum, n=n)
    return y[..., kernel - 1 : length]


def filter_spectrum(bank: torch.Tensor, n: int) -> torch.Tensor:
    """``(C, n // 2 + 1)`` spectrum of the flipped bank (flipping turns convolution into
    the correlation ``F.conv1d`` computes)."""
    return torch.fft.rfft(bank.flip(-1), n=n)


class SincFilterBank(nn.Module):
    """Non-learned sinc front end. The bank is a non-persistent buffer: it follows ``.to()``
    and never appears in a state_dict, so official checkpoints load with ``strict=True``."""

    def __init__(
        self,
        n_filters: int,
        kernel_size: int,
        sample_rate: int,
        layout: EdgeLayout = "baseline",
        method: str = "auto",
    ) -> None:
        super().__init__()
        self.method = method
        self._spectra: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.register_buffer(
            "filters", mel_sinc_bank(n_filters, kernel_size, sample_rate, layout), persistent=False
        )

    @property
    def kernel_size(self) -> int:
        return int(self.filters.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "direct" or (self.method == "auto" and self.kernel_size <= 200):
            return conv1d_valid(x, self.filters, "direct")
        # Streaming windows come in a handful of lengths: keep each one's filter spectrum.
        # The FFT runs in float32 even for half-precision models (cuFFT half needs 2^k sizes).
        n = _fast_fft_size(x.shape[-1] + self.kernel_size - 1)
        key = (n, x.device)
        spectrum = self._spectra.get(key)
        if spectrum is None:
            if len(self._spectra) >= 8:
                self._spectra.clear()
            spectrum = filter_spectrum(self.filters.float(), n)
            self._spectra[key] = spectrum
        return conv1d_valid(x.float(), self.filters, "fft", spectrum).to(x.dtype)
