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

Rooms: :mod:`~models.data.augment.channel` (the telephone channel's DSP),
:mod:`~models.data.augment.rawboost` (RawBoost), :mod:`~models.data.augment.config` (the
dataclasses this YAML becomes); this module chains them. The G.711 leg uses the server's own
codec, :mod:`models.data.audio`, so training hears exactly what serving decodes.
"""

from __future__ import annotations

import numpy as np

from models.data.audio import g711_round_trip
from models.data.augment.channel import (
    add_noise,
    apply_gain,
    band_limit,
    packet_loss,
    resample_round_trip,
)
from models.data.augment.config import AugmentConfig, Part
from models.data.augment.rawboost import (
    isd_additive_noise,
    lnl_convolutive_noise,
    ssi_additive_noise,
)

__all__ = ["AugmentConfig", "TelephoneAugment"]


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

        def on(part: Part) -> bool:
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
