"""RawBoost (Tak et al., ICASSP 2022): device- and codec-like distortions that help a
countermeasure on unseen spoofing systems. Three algorithms: convolutive and non-linear
noise (LnL), impulsive signal-dependent noise (ISD) and stationary coloured noise (SSI),
computed with block FFTs rather than the official per-filter time-domain loops so they can
run in the data loader.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from models.data.augment.channel import noise_fft_size, scale_to_snr, spectral_noise
from models.data.augment.config import ISDConfig, LnLConfig, SSIConfig


def _notch_filters(
    rng: np.random.Generator,
    n_filters: int,
    cfg: LnLConfig | SSIConfig,
    gains_db: np.ndarray,
    sample_rate: int,
) -> tuple[np.ndarray, int, int]:
    """RawBoost's random multi-notch FIRs, as spectra: ``(response, length, delay)``.

    Same construction as the official ``genNotchCoeffs`` (``n_bands`` Hamming-windowed
    band-stop FIRs of random centre, width and odd length, cascaded, then scaled to a peak
    gain of ``gains_db``) but for all filters at once: the cascade is a product of spectra.
    ``response`` is the rfft, on a power-of-two grid of size >= max(1024, 2 * length), of
    causal taps of ``length`` whose (linear-phase) centre is at ``delay``; that grid is
    both fine enough for the peak normalisation (freqz's 512 bins) and the block size of
    the overlap-add filtering, so no large FFT of the taps is ever needed. The per-band DC
    normalisation of ``firwin`` is skipped: the peak normalisation cancels it, and it
    divides by ~0 when a notch covers DC.
    """
    nyq = sample_rate / 2
    shape = (n_filters, cfg.n_bands)
    fc = rng.uniform(cfg.center_hz[0], min(cfg.center_hz[1], nyq), shape)
    bw = rng.uniform(cfg.bandwidth_hz[0], cfg.bandwidth_hz[1], shape)
    lo_taps, hi_taps = (ms * sample_rate / 1000 for ms in cfg.taps_ms)
    taps = np.maximum(rng.uniform(lo_taps, hi_taps, shape).astype(np.int64), 3) | 1
    f1 = np.maximum(fc - bw / 2, 1e-3) / sample_rate
    f2 = np.minimum(fc + bw / 2, nyq - 1e-3) / sample_rate
    half = (taps - 1) // 2
    width = int(half.max())
    m = np.arange(-width, width + 1, dtype=np.float64)
    ideal = 2 * f1[..., None] * np.sinc(2 * f1[..., None] * m)
    ideal -= 2 * f2[..., None] * np.sinc(2 * f2[..., None] * m)
    ideal[..., width] += 1.0  # all-pass minus band-pass = band-stop
    window = 0.54 + 0.46 * np.cos(2 * np.pi * m / (taps - 1)[..., None])
    band_stop = np.where(np.abs(m) <= half[..., None], window * ideal, 0.0)
    length = cfg.n_bands * 2 * width + 1
    n_fft = 1 << max(10, (2 * length - 1).bit_length())
    response = np.prod(sfft.rfft(band_stop, n_fft, axis=-1), axis=1)
    peak = np.maximum(np.abs(response).max(axis=-1, keepdims=True), 1e-12)
    response *= (10.0 ** (gains_db / 20.0))[:, None] / peak
    return response, length, cfg.n_bands * width


def _overlap_add(signals: np.ndarray, response: np.ndarray, length: int, delay: int) -> np.ndarray:
    """``sum_i conv(signals[i], taps_i)``, delay-compensated and cut to the input length.

    Block FFT convolution on the small grid of ``response``: cheaper than whole-utterance
    FFTs (which would also need a large FFT of every filter) and exact.
    """
    n = signals.shape[1]
    n_fft = 2 * (response.shape[1] - 1)
    hop = n_fft - length + 1  # >= length - 1, so a block's tail only reaches the next block
    n_blocks = -(-(n + delay) // hop)
    padded = np.zeros((signals.shape[0], n_blocks * hop), np.float32)
    padded[:, :n] = signals
    blocks = sfft.rfft(padded.reshape(signals.shape[0], n_blocks, hop), n_fft, axis=-1)
    blocks = (blocks * response.astype(np.complex64)[:, None, :]).sum(axis=0)
    out_blocks = sfft.irfft(blocks, n_fft, axis=-1)
    out = np.zeros((n_blocks + 1) * hop, np.float32)
    out[: n_blocks * hop] += out_blocks[:, :hop].ravel()
    tail = np.zeros((n_blocks, hop), np.float32)
    tail[:, : n_fft - hop] = out_blocks[:, hop:]
    out[hop:] += tail.ravel()
    return out[delay : delay + n]


def lnl_convolutive_noise(
    wave: np.ndarray, cfg: LnLConfig, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """RawBoost algorithm 1: sum of random multi-notch filters applied to ``x**1..x**n``.

    The linear term models the channel/device response, the higher powers its
    non-linearity (at ``nonlinear_gain_db``). The linear-phase filters are re-centred so
    the output is not delayed.
    """
    n = wave.shape[0]
    gains = np.concatenate(
        [
            rng.uniform(*cfg.gain_db, 1),
            rng.uniform(*cfg.nonlinear_gain_db, cfg.n_powers - 1),
        ]
    )
    response, length, delay = _notch_filters(rng, cfg.n_powers, cfg, gains, sample_rate)
    powers = np.empty((cfg.n_powers, n), np.float32)
    powers[0] = wave
    for i in range(1, cfg.n_powers):  # repeated products: much cheaper than float pow
        np.multiply(powers[i - 1], wave, out=powers[i])
    out = _overlap_add(powers, response, length, delay)
    out -= out.mean()
    return _peak_normalise(out)


def isd_additive_noise(wave: np.ndarray, cfg: ISDConfig, rng: np.random.Generator) -> np.ndarray:
    """RawBoost algorithm 2: impulses proportional to the signal on a random few % of samples.

    Signal-dependent clicks/crackle, as from a bad contact or codec overload.
    """
    n = wave.shape[0]
    count = int(n * rng.uniform(0, cfg.max_rate_percent) / 100)
    out = wave.copy()
    if count == 0:
        return out
    idx = rng.choice(n, count, replace=False)
    factor = (2 * rng.random(count) - 1) * (2 * rng.random(count) - 1)
    out[idx] += (cfg.g_sd * wave[idx] * factor).astype(np.float32)
    return _peak_normalise(out)


def ssi_additive_noise(
    wave: np.ndarray, cfg: SSIConfig, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """RawBoost algorithm 3: stationary noise, coloured by a random multi-notch filter.

    Only the filter's magnitude matters for Gaussian noise, so it is interpolated from the
    design grid onto the noise spectrum instead of filtering in the time domain.
    """
    n = wave.shape[0]
    response, _, _ = _notch_filters(rng, 1, cfg, rng.uniform(*cfg.gain_db, 1), sample_rate)
    design = np.abs(response[0])
    m = noise_fft_size(n)
    grid = np.linspace(0.0, design.shape[0] - 1, m // 2 + 1)
    shape = np.interp(grid, np.arange(design.shape[0]), design).astype(np.float32)
    noise = spectral_noise(n, shape, rng)
    return scale_to_snr(wave, noise, rng.uniform(*cfg.snr_db))


def _peak_normalise(wave: np.ndarray) -> np.ndarray:
    """Rescale to a peak of 1 only when it exceeds 1, as RawBoost's ``normWav(x, 0)``."""
    peak = float(np.abs(wave).max(initial=0.0))
    if peak > 1.0:
        wave = wave / peak
    return wave.astype(np.float32)

