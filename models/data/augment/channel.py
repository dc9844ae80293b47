"""The telephone channel between a talker and the detector: band filter, sample-rate
conversions, packet loss, background noise, input gain. One function per stage, each a pure
function of a float32 mono waveform (and an explicit ``numpy.random.Generator`` where it
draws), so :class:`models.data.augment.TelephoneAugment` composes them and the tests check
each alone. The G.711 leg is :func:`models.data.audio.g711_round_trip` (the server's codec).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft as sfft
from scipy import signal

from models.data.audio import resample


def butterworth_sos(order: int, cutoff_hz: float, sample_rate: int, btype: str) -> np.ndarray:
    """Digital Butterworth ``"lowpass"``/``"highpass"`` SOS, same as ``scipy.signal.butter``.

    Closed-form bilinear biquads (RBJ cookbook with the Butterworth pole Qs): ``butter``
    spends ~0.5 ms in zpk->sos conversion, more than filtering a whole utterance, and the
    edges are redrawn for every utterance. ``order`` must be even.
    """
    if order < 2 or order % 2:
        raise ValueError(f"Butterworth order must be even and >= 2, got {order}")
    if btype not in ("lowpass", "highpass"):
        raise ValueError(f"btype must be 'lowpass' or 'highpass', got {btype!r}")
    w0 = 2 * math.pi * cutoff_hz / sample_rate
    cos_w0, sin_w0 = math.cos(w0), math.sin(w0)
    sos = np.empty((order // 2, 6))
    for k in range(order // 2):
        alpha = sin_w0 * math.cos(math.pi * (2 * k + 1) / (2 * order))  # sin(w0) / (2 Q_k)
        b1 = 1 - cos_w0 if btype == "lowpass" else -(1 + cos_w0)
        b0 = abs(b1) / 2
        a0 = 1 + alpha
        sos[k] = [b0 / a0, b1 / a0, b0 / a0, 1.0, -2 * cos_w0 / a0, (1 - alpha) / a0]
    return sos


def band_limit(
    wave: np.ndarray, low_hz: float, high_hz: float, order: int, sample_rate: int
) -> np.ndarray:
    """Causal Butterworth high-pass at ``low_hz`` then low-pass at ``high_hz``.

    Causal on purpose: a real line/handset filter has non-linear phase, and a zero-phase
    filter would hide that from the model. ``high_hz`` is clipped below Nyquist.
    """
    high_hz = min(high_hz, 0.95 * sample_rate / 2)
    sos = np.concatenate(
        [
            butterworth_sos(order, low_hz, sample_rate, "highpass"),
            butterworth_sos(order, high_hz, sample_rate, "lowpass"),
        ]
    )
    return signal.sosfilt(sos, wave).astype(np.float32)


def resample_round_trip(
    wave: np.ndarray, sample_rate: int, mid_rate: int, quality: str = "HQ"
) -> np.ndarray:
    """Resample to ``mid_rate`` and back (soxr ``quality``), trimmed or zero-padded to the
    input length.

    Down-and-up removes the band above ``mid_rate / 2``; up-and-down leaves the resampler's
    ripple and imaging residue, which differs between soxr qualities.
    """
    mid = resample(wave, sample_rate, mid_rate, quality)
    return _fit_length(resample(mid, mid_rate, sample_rate, quality), wave.shape[0])


def _fit_length(wave: np.ndarray, length: int) -> np.ndarray:
    """soxr rounds the output length at each rate change; the round trip may be 1 off."""
    if wave.shape[0] >= length:
        return wave[:length]
    return np.pad(wave, (0, length - wave.shape[0]))


def packet_loss(
    wave: np.ndarray,
    sample_rate: int,
    frame_ms: float,
    loss_rate: float,
    repeat: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Drop whole packets of ``frame_ms`` (independently, with ``loss_rate``).

    A lost packet becomes silence, or (``repeat``) a copy of the last packet received, the
    crudest packet-loss concealment. The packet grid starts at a random offset because
    call packetisation is not aligned with the utterance.
    """
    n = wave.shape[0]
    frame = max(1, round(frame_ms * sample_rate / 1000))
    offset = int(rng.integers(0, frame))  # packet k covers [k * frame - offset, ...)
    n_frames = (n + offset + frame - 1) // frame
    lost = np.flatnonzero(rng.random(n_frames) < loss_rate)
    out = wave.copy()
    last_good, prev = -1, -2
    for k in lost.tolist():  # a few dozen packets at most: a Python loop is cheapest
        if k != prev + 1:  # a new burst repeats the packet just before it
            last_good = k - 1
        prev = k
        start, stop = max(k * frame - offset, 0), min((k + 1) * frame - offset, n)
        out[start:stop] = 0.0
        if repeat and last_good >= 0:
            src = last_good * frame - offset + (start - (k * frame - offset))
            lo = max(src, 0)
            out[start + lo - src : stop] = wave[lo : src + stop - start]
    return out


def spectral_noise(n: int, shape: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of length ``n`` with power spectrum ``|shape|**2`` (on an rfft grid).

    Drawing the spectrum directly costs one inverse FFT instead of filtering white noise.
    ``shape`` is sampled on ``len(shape)`` bins of an rfft of size ``noise_fft_size(n)``.
    """
    if shape is None:
        return rng.standard_normal(n, dtype=np.float32)
    k = shape.shape[0]
    spec = np.empty(k, np.complex64)
    spec.real = rng.standard_normal(k, dtype=np.float32)
    spec.imag = rng.standard_normal(k, dtype=np.float32)
    spec *= shape
    return sfft.irfft(spec, n=2 * (k - 1))[:n]


def noise_fft_size(n: int) -> int:
    """Even (so the rfft grid ends at Nyquist), FFT-friendly and >= ``n``."""
    return 2 * sfft.next_fast_len(max(1, -(-n // 2)), real=True)


def scale_to_snr(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Add ``noise`` scaled so that the utterance-level SNR is exactly ``snr_db``."""
    p_signal = float(np.dot(wave, wave))
    p_noise = float(np.dot(noise, noise))
    if p_signal <= 0.0 or p_noise <= 0.0:  # SNR undefined for silence: leave it alone
        return wave.copy()
    gain = math.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (wave + np.float32(gain) * noise).astype(np.float32)


NOISE_COLORS = {"white": 0.0, "pink": 0.5, "brown": 1.0}  # amplitude slope: |H(f)| ~ f**-x


def add_noise(wave: np.ndarray, snr_db: float, color: str, rng: np.random.Generator) -> np.ndarray:
    """Add white/pink/brown Gaussian noise at exactly ``snr_db`` over the utterance (no clip)."""
    n = wave.shape[0]
    slope = NOISE_COLORS[color]
    shape = None
    if slope:
        m = noise_fft_size(n)
        bins = np.arange(m // 2 + 1, dtype=np.float32)
        bins[0] = np.inf  # no DC
        shape = bins**-slope
    return scale_to_snr(wave, spectral_noise(n, shape, rng), snr_db)


def apply_gain(wave: np.ndarray, gain_db: float) -> np.ndarray:
    """Scale by ``gain_db`` and saturate at full scale, like an overdriven ADC."""
    return np.clip(wave * np.float32(10.0 ** (gain_db / 20.0)), -1.0, 1.0).astype(np.float32)

