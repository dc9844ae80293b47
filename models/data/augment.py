"""Telephone-channel data augmentation for countermeasure (spoof vs bona fide) training.

Training corpora are clean studio or TTS/VC audio, while the detector listens to phone
calls: band-limited, G.711-companded, resampled, noisy, with lost packets. Showing the
model those channels at training time keeps it from learning "clean = spoof / bona fide"
shortcuts, and RawBoost (Tak et al., ICASSP 2022) adds the device/codec-like distortions
that help on unseen spoofing systems.

Everything works on float32 mono numpy waveforms in [-1, 1] with an explicit
``numpy.random.Generator``, so a DataLoader worker seeded per epoch is reproducible. With
the default probabilities the chain costs ~1.3 ms of CPU per 4 s 8 kHz utterance on one
core (block-FFT filtering, closed-form filter design, lookup-table G.711), so it can run
in the loader.

Parameters are in physical units (Hz, ms, dB), so one config means the same channel at
8 and 16 kHz; frequency ranges are clipped below Nyquist at run time. Every part has a
probability ``p``; ``p: 0`` switches it off. Example training-config section (any key
left out keeps its default; an unknown key is an error)::

    augment:
      g711:         {p: 0.5, laws: [mulaw, alaw]}
      band_limit:   {p: 0.5, low_hz: [200, 400], high_hz: [3000, 3600], order: 4}
      resample:     {p: 0.25, ratios: [0.75, 0.875, 1.378125, 2.0], qualities: [LQ, MQ, HQ]}
      packet_loss:  {p: 0.1, loss_rate: [0.01, 0.1], frame_ms: [10, 20, 30, 40],
                     repeat_prob: 0.5}
      noise:        {p: 0.3, snr_db: [10, 40], colors: [white, pink, brown]}
      gain:         {p: 0.5, gain_db: [-10, 6]}
      rawboost_lnl: {p: 0.25, n_bands: 5, center_hz: [20, 8000], bandwidth_hz: [100, 1000],
                     taps_ms: [0.625, 6.25], gain_db: [0, 0], nonlinear_gain_db: [-20, -5],
                     n_powers: 5}
      rawboost_isd: {p: 0.1, max_rate_percent: 10, g_sd: 2}
      rawboost_ssi: {p: 0.25, snr_db: [10, 40], n_bands: 5, center_hz: [20, 8000],
                     bandwidth_hz: [100, 1000], taps_ms: [0.625, 6.25], gain_db: [0, 0]}

used as ``TelephoneAugment(AugmentConfig.from_dict(cfg["augment"]), sample_rate=8000)``.

The G.711 codecs are public because the streaming server decodes MULAW/ALAW payloads
with them; they are bit-exact to the ITU-T G.711 reference (Sun g711.c, as in audioop).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import scipy.fft as sfft
import soxr
from scipy import signal

__all__ = [
    "NOISE_COLORS",
    "AugmentConfig",
    "BandLimitConfig",
    "G711Config",
    "GainConfig",
    "LnLConfig",
    "ISDConfig",
    "NoiseConfig",
    "PacketLossConfig",
    "ResampleConfig",
    "SSIConfig",
    "TelephoneAugment",
    "add_noise",
    "alaw_decode",
    "alaw_encode",
    "apply_gain",
    "band_limit",
    "butterworth_sos",
    "g711_round_trip",
    "isd_additive_noise",
    "lnl_convolutive_noise",
    "mulaw_decode",
    "mulaw_encode",
    "packet_loss",
    "resample_round_trip",
    "ssi_additive_noise",
]

# --------------------------------------------------------------------------- G.711

_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], np.int32)


def _ulaw_encode_formula(pcm16: np.ndarray) -> np.ndarray:
    """G.711 mu-law encoder on the 14-bit magnitude, as the Sun reference (and audioop)."""
    pcm = pcm16.astype(np.int32) >> 2
    neg = pcm < 0
    mask = np.where(neg, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), 8159) + 0x21  # clip, then add the 0x84 bias >> 2
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left")
    code = (seg << 4) | ((mag >> np.minimum(seg + 1, 8)) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _ulaw_decode_formula(codes: np.ndarray) -> np.ndarray:
    u = ~codes.astype(np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_encode_formula(pcm16: np.ndarray) -> np.ndarray:
    """G.711 A-law encoder on the 13-bit value, as the Sun reference (and audioop)."""
    pcm = pcm16.astype(np.int32) >> 3
    pos = pcm >= 0
    mask = np.where(pos, 0xD5, 0x55)
    mag = np.where(pos, pcm, -pcm - 1)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")
    quant = np.where(seg < 2, mag >> 1, mag >> np.clip(seg, 2, 8)) & 0xF
    code = np.where(seg >= 8, 0x7F, (seg << 4) | quant)
    return (code ^ mask).astype(np.uint8)


def _alaw_decode_formula(codes: np.ndarray) -> np.ndarray:
    a = codes.astype(np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = ((a & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
    t = t << np.maximum(seg - 1, 0)
    return np.where(a & 0x80, t, -t).astype(np.int16)


# Tables indexed by the int16 bit pattern / the code byte: one gather per sample is several
# times faster than the branchy formula, and the server decodes every 20 ms packet.
_ALL_PCM = np.arange(65536, dtype=np.uint16).view(np.int16)
_ALL_CODES = np.arange(256, dtype=np.uint8)
_ULAW_ENC = _ulaw_encode_formula(_ALL_PCM)
_ULAW_DEC = _ulaw_decode_formula(_ALL_CODES)
_ALAW_ENC = _alaw_encode_formula(_ALL_PCM)
_ALAW_DEC = _alaw_decode_formula(_ALL_CODES)
for _table in (_ULAW_ENC, _ULAW_DEC, _ALAW_ENC, _ALAW_DEC):
    _table.flags.writeable = False


def _as_pcm16(pcm: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    if isinstance(pcm, bytes | bytearray | memoryview):
        return np.frombuffer(pcm, dtype="<i2")
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16:
        raise TypeError(f"G.711 encoders take int16 PCM, got {pcm.dtype}")
    return pcm


def _as_codes(codes: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    if isinstance(codes, bytes | bytearray | memoryview):
        return np.frombuffer(codes, dtype=np.uint8)
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"G.711 decoders take uint8 codes, got {codes.dtype}")
    return codes


def mulaw_encode(pcm: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    """int16 PCM (array, or little-endian bytes) -> uint8 mu-law codes, same shape."""
    return _ULAW_ENC[_as_pcm16(pcm).view(np.uint16)]


def mulaw_decode(codes: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    """uint8 mu-law codes (array or bytes) -> int16 PCM, same shape."""
    return _ULAW_DEC[_as_codes(codes)]


def alaw_encode(pcm: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    """int16 PCM (array, or little-endian bytes) -> uint8 A-law codes, same shape."""
    return _ALAW_ENC[_as_pcm16(pcm).view(np.uint16)]


def alaw_decode(codes: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    """uint8 A-law codes (array or bytes) -> int16 PCM, same shape."""
    return _ALAW_DEC[_as_codes(codes)]


_ROUND_TRIP = {"mulaw": _ULAW_DEC[_ULAW_ENC], "alaw": _ALAW_DEC[_ALAW_ENC]}


def g711_round_trip(wave: np.ndarray, law: str) -> np.ndarray:
    """Quantise to 16-bit PCM, then encode and decode with G.711 ``"mulaw"`` or ``"alaw"``."""
    pcm = np.clip(np.rint(wave * 32768.0), -32768, 32767).astype(np.int16)
    return _ROUND_TRIP[law][pcm.view(np.uint16)].astype(np.float32) * np.float32(1 / 32768)


# --------------------------------------------------------------------------- channel parts


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
    """Resample to ``mid_rate`` and back (soxr), trimmed or zero-padded to the input length.

    Down-and-up removes the band above ``mid_rate / 2``; up-and-down leaves the resampler's
    ripple and imaging residue, which differs between soxr qualities.
    """
    mid = soxr.resample(wave, sample_rate, mid_rate, quality=quality)
    out = soxr.resample(mid, mid_rate, sample_rate, quality=quality)
    return _fit_length(np.asarray(out, dtype=np.float32), wave.shape[0])


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


def _spectral_noise(n: int, shape: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of length ``n`` with power spectrum ``|shape|**2`` (on an rfft grid).

    Drawing the spectrum directly costs one inverse FFT instead of filtering white noise.
    ``shape`` is sampled on ``len(shape)`` bins of an rfft of size ``_noise_fft_size(n)``.
    """
    if shape is None:
        return rng.standard_normal(n, dtype=np.float32)
    k = shape.shape[0]
    spec = np.empty(k, np.complex64)
    spec.real = rng.standard_normal(k, dtype=np.float32)
    spec.imag = rng.standard_normal(k, dtype=np.float32)
    spec *= shape
    return sfft.irfft(spec, n=2 * (k - 1))[:n]


def _noise_fft_size(n: int) -> int:
    """Even (so the rfft grid ends at Nyquist), FFT-friendly and >= ``n``."""
    return 2 * sfft.next_fast_len(max(1, -(-n // 2)), real=True)


def _scale_to_snr(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
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
        m = _noise_fft_size(n)
        bins = np.arange(m // 2 + 1, dtype=np.float32)
        bins[0] = np.inf  # no DC
        shape = bins**-slope
    return _scale_to_snr(wave, _spectral_noise(n, shape, rng), snr_db)


def apply_gain(wave: np.ndarray, gain_db: float) -> np.ndarray:
    """Scale by ``gain_db`` and saturate at full scale, like an overdriven ADC."""
    return np.clip(wave * np.float32(10.0 ** (gain_db / 20.0)), -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- RawBoost


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
    m = _noise_fft_size(n)
    grid = np.linspace(0.0, design.shape[0] - 1, m // 2 + 1)
    shape = np.interp(grid, np.arange(design.shape[0]), design).astype(np.float32)
    noise = _spectral_noise(n, shape, rng)
    return _scale_to_snr(wave, noise, rng.uniform(*cfg.snr_db))


def _peak_normalise(wave: np.ndarray) -> np.ndarray:
    """Rescale to a peak of 1 only when it exceeds 1, as RawBoost's ``normWav(x, 0)``."""
    peak = float(np.abs(wave).max(initial=0.0))
    if peak > 1.0:
        wave = wave / peak
    return wave.astype(np.float32)


# --------------------------------------------------------------------------- config


def _check_range(name: str, rng_: tuple[float, float], lo: float = -math.inf) -> None:
    if len(rng_) != 2 or not lo <= rng_[0] <= rng_[1]:
        raise ValueError(f"{name} must be [min, max] with {lo} <= min <= max, got {rng_}")


def _check_choices(name: str, values: tuple[Any, ...], allowed: tuple[Any, ...] = ()) -> None:
    if not values:
        raise ValueError(f"{name} must not be empty")
    bad = [v for v in values if allowed and v not in allowed]
    if bad:
        raise ValueError(f"{name}: unknown {bad}; allowed {list(allowed)}")


@dataclass(frozen=True)
class _Part:
    """Base of the per-part configs: ``p`` is the probability of applying the part."""

    p: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"{type(self).__name__}.p must be in [0, 1], got {self.p}")


@dataclass(frozen=True)
class G711Config(_Part):
    """G.711 round trip with a law drawn uniformly from ``laws``."""

    p: float = 0.5
    laws: tuple[str, ...] = ("mulaw", "alaw")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choices("g711.laws", self.laws, ("mulaw", "alaw"))


@dataclass(frozen=True)
class BandLimitConfig(_Part):
    """Telephone band 300-3400 Hz with jittered edges (Butterworth HP + LP of ``order``)."""

    p: float = 0.5
    low_hz: tuple[float, float] = (200.0, 400.0)
    high_hz: tuple[float, float] = (3000.0, 3600.0)
    order: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("band_limit.low_hz", self.low_hz, 1.0)
        _check_range("band_limit.high_hz", self.high_hz, 1.0)
        if self.low_hz[1] >= self.high_hz[0]:
            raise ValueError("band_limit: low_hz must lie entirely below high_hz")
        if self.order < 2 or self.order % 2:
            raise ValueError(f"band_limit.order must be even and >= 2, got {self.order}")


@dataclass(frozen=True)
class ResampleConfig(_Part):
    """Round trip through ``sample_rate * ratio`` (ratio and soxr quality drawn uniformly).

    Defaults at 8 kHz: 6k, 7k, 11.025k, 16k.
    """

    p: float = 0.25
    ratios: tuple[float, ...] = (0.75, 0.875, 1.378125, 2.0)
    qualities: tuple[str, ...] = ("LQ", "MQ", "HQ")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choices("resample.ratios", self.ratios)
        if any(r <= 0 for r in self.ratios):
            raise ValueError(f"resample.ratios must be > 0, got {self.ratios}")
        _check_choices("resample.qualities", self.qualities, ("QQ", "LQ", "MQ", "HQ", "VHQ"))


@dataclass(frozen=True)
class PacketLossConfig(_Part):
    """Independent packet losses; zeroed, or repeated with probability ``repeat_prob``."""

    p: float = 0.1
    loss_rate: tuple[float, float] = (0.01, 0.1)
    frame_ms: tuple[float, ...] = (10.0, 20.0, 30.0, 40.0)
    repeat_prob: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("packet_loss.loss_rate", self.loss_rate, 0.0)
        if self.loss_rate[1] > 1:
            raise ValueError("packet_loss.loss_rate must be within [0, 1]")
        _check_choices("packet_loss.frame_ms", self.frame_ms)
        if any(f <= 0 for f in self.frame_ms):
            raise ValueError(f"packet_loss.frame_ms must be > 0, got {self.frame_ms}")
        if not 0.0 <= self.repeat_prob <= 1.0:
            raise ValueError("packet_loss.repeat_prob must be in [0, 1]")


@dataclass(frozen=True)
class NoiseConfig(_Part):
    """Additive Gaussian noise of a colour drawn from ``colors`` at a uniform SNR in dB."""

    p: float = 0.3
    snr_db: tuple[float, float] = (10.0, 40.0)
    colors: tuple[str, ...] = ("white", "pink", "brown")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("noise.snr_db", self.snr_db)
        _check_choices("noise.colors", self.colors, tuple(NOISE_COLORS))


@dataclass(frozen=True)
class GainConfig(_Part):
    """Uniform gain in dB, saturating at full scale."""

    p: float = 0.5
    gain_db: tuple[float, float] = (-10.0, 6.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("gain.gain_db", self.gain_db)


@dataclass(frozen=True)
class _NotchBank(_Part):
    """Shared RawBoost filter parameters, in physical units.

    The official 16 kHz defaults are 10-100 taps (0.625-6.25 ms) and centres 20-8000 Hz;
    keeping ms and Hz gives the same filter shapes at 8 kHz, with centres clipped to Nyquist.
    """

    n_bands: int = 5
    center_hz: tuple[float, float] = (20.0, 8000.0)
    bandwidth_hz: tuple[float, float] = (100.0, 1000.0)
    taps_ms: tuple[float, float] = (0.625, 6.25)
    gain_db: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.n_bands < 1:
            raise ValueError(f"{name}.n_bands must be >= 1")
        _check_range(f"{name}.center_hz", self.center_hz, 0.0)
        _check_range(f"{name}.bandwidth_hz", self.bandwidth_hz, 0.0)
        _check_range(f"{name}.taps_ms", self.taps_ms, 0.0)
        _check_range(f"{name}.gain_db", self.gain_db)


@dataclass(frozen=True)
class LnLConfig(_NotchBank):
    """RawBoost 1. ``nonlinear_gain_db`` is the official gain range minus its 5..20 dB bias."""

    p: float = 0.25
    nonlinear_gain_db: tuple[float, float] = (-20.0, -5.0)
    n_powers: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("rawboost_lnl.nonlinear_gain_db", self.nonlinear_gain_db)
        if self.n_powers < 1:
            raise ValueError("rawboost_lnl.n_powers must be >= 1")


@dataclass(frozen=True)
class ISDConfig(_Part):
    """RawBoost 2: up to ``max_rate_percent`` % of samples get impulses of ``g_sd * x``."""

    p: float = 0.1
    max_rate_percent: float = 10.0
    g_sd: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.max_rate_percent <= 100.0:
            raise ValueError("rawboost_isd.max_rate_percent must be in [0, 100]")


@dataclass(frozen=True)
class SSIConfig(_NotchBank):
    """RawBoost 3: filtered white noise at a uniform SNR."""

    p: float = 0.25
    snr_db: tuple[float, float] = (10.0, 40.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("rawboost_ssi.snr_db", self.snr_db)


def _part_from_dict(cls: type[_Part], name: str, values: dict[str, Any] | None) -> _Part:
    """Build one part config, turning YAML lists into tuples and rejecting unknown keys."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise TypeError(f"augment.{name} must be a mapping, got {type(values).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in augment.{name}; expected some of {sorted(defaults)}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        default = defaults[key]
        if isinstance(default, tuple):
            if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
                raise TypeError(f"augment.{name}.{key} must be a list, got {value!r}")
            kind = type(default[0])
            kwargs[key] = tuple(kind(v) for v in value)
        elif isinstance(default, bool):
            kwargs[key] = bool(value)
        else:
            kwargs[key] = type(default)(value)
    return cls(**kwargs)


@dataclass(frozen=True)
class AugmentConfig:
    """All augmentation parts, one sub-config each (see the module docstring for YAML)."""

    g711: G711Config = field(default_factory=G711Config)
    band_limit: BandLimitConfig = field(default_factory=BandLimitConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    packet_loss: PacketLossConfig = field(default_factory=PacketLossConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    gain: GainConfig = field(default_factory=GainConfig)
    rawboost_lnl: LnLConfig = field(default_factory=LnLConfig)
    rawboost_isd: ISDConfig = field(default_factory=ISDConfig)
    rawboost_ssi: SSIConfig = field(default_factory=SSIConfig)

    _PARTS: ClassVar[dict[str, type[_Part]]] = {
        "g711": G711Config,
        "band_limit": BandLimitConfig,
        "resample": ResampleConfig,
        "packet_loss": PacketLossConfig,
        "noise": NoiseConfig,
        "gain": GainConfig,
        "rawboost_lnl": LnLConfig,
        "rawboost_isd": ISDConfig,
        "rawboost_ssi": SSIConfig,
    }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AugmentConfig:
        """Build from a training-config mapping; missing parts/keys keep their defaults."""
        d = d or {}
        if not isinstance(d, dict):
            raise TypeError(f"augment config must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls._PARTS))
        if unknown:
            raise ValueError(
                f"unknown augmentation part(s) {unknown}; expected some of {sorted(cls._PARTS)}"
            )
        parts = {name: _part_from_dict(cls._PARTS[name], name, d.get(name)) for name in d}
        return cls(**parts)  # type: ignore[arg-type]

    @classmethod
    def disabled(cls) -> AugmentConfig:
        """Every part off: a base to switch single parts on (evaluation, tests)."""
        return cls.from_dict({name: {"p": 0.0} for name in cls._PARTS})


# --------------------------------------------------------------------------- pipeline


class TelephoneAugment:
    """Random telephone channel: ``augment(wave, rng)`` -> same length, float32, in [-1, 1].

    Order follows the signal path: talker device (RawBoost convolutive, impulsive and
    stationary noise), room/background noise, input level and ADC clipping, sample-rate
    conversions, the telephone band filter, the G.711 codec, and finally packet loss on
    the network. Each part is applied independently with its own ``p``.
    """

    def __init__(self, config: AugmentConfig, sample_rate: int) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.config = config
        self.sample_rate = sample_rate

    def __repr__(self) -> str:
        return f"TelephoneAugment(sample_rate={self.sample_rate}, config={self.config})"

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(wave, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected a mono 1-D waveform, got shape {x.shape}")
        if x.shape[0] == 0:
            return x.copy()
        c, sr = self.config, self.sample_rate

        def on(part: _Part) -> bool:
            return part.p > 0.0 and rng.random() < part.p

        if on(c.rawboost_lnl):
            x = lnl_convolutive_noise(x, c.rawboost_lnl, sr, rng)
        if on(c.rawboost_isd):
            x = isd_additive_noise(x, c.rawboost_isd, rng)
        if on(c.rawboost_ssi):
            x = ssi_additive_noise(x, c.rawboost_ssi, sr, rng)
        if on(c.noise):
            color = c.noise.colors[rng.integers(len(c.noise.colors))]
            x = add_noise(x, rng.uniform(*c.noise.snr_db), color, rng)
        if on(c.gain):
            x = apply_gain(x, rng.uniform(*c.gain.gain_db))
        if on(c.resample):
            ratio = c.resample.ratios[rng.integers(len(c.resample.ratios))]
            quality = c.resample.qualities[rng.integers(len(c.resample.qualities))]
            x = resample_round_trip(x, sr, max(1, round(sr * ratio)), quality)
        if on(c.band_limit):
            low = rng.uniform(*c.band_limit.low_hz)
            high = rng.uniform(*c.band_limit.high_hz)
            x = band_limit(x, low, high, c.band_limit.order, sr)
        if on(c.g711):
            x = g711_round_trip(x, c.g711.laws[rng.integers(len(c.g711.laws))])
        if on(c.packet_loss):
            pl = c.packet_loss
            frame_ms = pl.frame_ms[rng.integers(len(pl.frame_ms))]
            repeat = bool(rng.random() < pl.repeat_prob)
            x = packet_loss(x, sr, frame_ms, rng.uniform(*pl.loss_rate), repeat, rng)
        # nan_to_num copies, so the caller's array is never written to.
        x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).astype(np.float32, copy=False)
        return np.clip(x, -1.0, 1.0, out=x)
