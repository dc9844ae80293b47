"""Tests for the G.711 codecs (models/data/audio.py) and the telephone-channel augmentation
(models/data/augment/)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import signal

from models.data import audio
from models.data import augment as A
from models.data.augment import channel, rawboost
from models.data.augment import config as C

PARTS = tuple(A.AugmentConfig._PARTS)


def _speech_like(sample_rate: int, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """Harmonic 'voice' with an amplitude envelope plus a little noise, peak ~0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 25) if k * 140 < sample_rate / 2)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    x = envelope * voiced + 0.05 * rng.standard_normal(t.shape[0])
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def _only(part: str, **params: object) -> A.AugmentConfig:
    cfg: dict[str, dict[str, object]] = {name: {"p": 0.0} for name in PARTS}
    cfg[part] = {"p": 1.0, **params}
    return A.AugmentConfig.from_dict(cfg)


def _rms_db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-30)


def _check_wave(y: np.ndarray, n: int) -> None:
    assert y.shape == (n,)
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    assert np.abs(y).max(initial=0.0) <= 1.0


# --------------------------------------------------------------------------- G.711


# The reference below is built from the G.711 definition, not from the module's code: each
# code stands for one decision interval of the input magnitude (segment s, step q), its
# decoder output is the middle of that interval, and the last interval of each sign takes
# every larger input (overload). The encoder is the table "magnitude -> code" filled interval
# by interval. Input scaling is audioop's (and Sun g711.c's): 16-bit PCM shifted right to
# 14 bits (mu-law) or 13 bits (A-law); a negative A-law input is one's-complemented. The
# digests are of audioop's outputs over every input (Python 3.11, before its removal), so
# the reference is pinned to the implementation the codecs replaced, and the test needs no
# audioop where it is gone (Python 3.13).
G711_AUDIOOP_SHA256 = {
    "lin2ulaw": "81d633c9e6972a18c74a58720b96cb8ca0bdd096d4060b646dd708c3b846019a",
    "lin2alaw": "38488f6fd710f4686360edc4d38639f96c491595ef93f8eb8d62d5e07ca6ce7b",
    "ulaw2lin": "3dab54339e520bb2c924826e3b72a917a2b612e9fd12fc867500f1d983a75827",
    "alaw2lin": "e04788d110e58ff8c70c93b8480190d973e3b67876b6119abbaec766cc75c174",
}


def _g711_intervals(law: str) -> list[tuple[int, int, int, int]]:
    """``(segment, step, low, high)``: the magnitudes ``low <= m < high`` (14-bit for mu-law,
    13-bit for A-law) that G.711 encodes as ``(segment, step)``."""
    out = []
    for s in range(8):
        for q in range(16):
            if law == "ulaw":  # biased by 33: segment s spans [2^(s+5), 2^(s+6)), steps 2^(s+1)
                out.append((s, q, ((16 + q) << (s + 1)) - 33, ((17 + q) << (s + 1)) - 33))
            elif s == 0:  # A-law: segments 0 and 1 both in steps of 2 ...
                out.append((s, q, 2 * q, 2 * q + 2))
            else:  # ... segment s >= 1 spans [2^(s+4), 2^(s+5)) in steps of 2^s
                out.append((s, q, (16 + q) << s, (17 + q) << s))
    return out


def _g711_reference(law: str) -> tuple[np.ndarray, np.ndarray]:
    """``(codes of all 65536 int16 inputs in order, 16-bit outputs of the 256 codes)``."""
    bits, top = (14, 8192) if law == "ulaw" else (13, 4096)
    by_magnitude = np.full(top + 1, -1, np.int64)  # the last entry: every larger input
    decode = np.zeros(256, np.int64)
    for s, q, low, high in _g711_intervals(law):
        by_magnitude[max(low, 0):min(high, top + 1)] = (s << 4) | q
        middle = (low + high) * (1 << (16 - bits)) // 2  # the interval's middle, 16-bit
        if law == "ulaw":  # sign bit set for positive, the rest inverted
            positive, negative = 0x80 | (~((s << 4) | q) & 0x7F), ~((s << 4) | q) & 0x7F
        else:  # even bits inverted, sign bit set for positive
            positive, negative = ((s << 4) | q) ^ 0xD5, ((s << 4) | q) ^ 0x55
        decode[positive], decode[negative] = middle, -middle
    by_magnitude[by_magnitude < 0] = (7 << 4) | 15  # overload: the last interval
    x = np.arange(-32768, 32768, dtype=np.int64) >> (16 - bits)
    negative = x < 0
    if law == "ulaw":
        sq = by_magnitude[np.minimum(np.abs(x), top)]
        codes = np.where(negative, ~sq & 0x7F, 0x80 | (~sq & 0x7F))
    else:
        sq = by_magnitude[np.minimum(np.where(negative, -x - 1, x), top)]
        codes = np.where(negative, sq ^ 0x55, sq ^ 0xD5)
    return codes.astype(np.uint8), decode.astype(np.int16)


@pytest.fixture(scope="module")
def g711_reference() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import hashlib

    tables = {law: _g711_reference(law) for law in ("ulaw", "alaw")}
    digests = {"lin2ulaw": tables["ulaw"][0].tobytes(), "lin2alaw": tables["alaw"][0].tobytes(),
               "ulaw2lin": tables["ulaw"][1].astype("<i2").tobytes(),
               "alaw2lin": tables["alaw"][1].astype("<i2").tobytes()}
    assert {k: hashlib.sha256(v).hexdigest() for k, v in digests.items()} == \
        G711_AUDIOOP_SHA256, "the reference is not audioop's G.711"
    return tables


def test_g711_encoders_bit_exact_vs_reference(g711_reference: dict[str, Any]) -> None:
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    ulaw, alaw = g711_reference["ulaw"][0], g711_reference["alaw"][0]
    np.testing.assert_array_equal(audio.mulaw_encode(pcm), ulaw)
    np.testing.assert_array_equal(audio.alaw_encode(pcm), alaw)
    np.testing.assert_array_equal(audio.mulaw_encode(raw), ulaw)  # bytes in, as the server has
    np.testing.assert_array_equal(audio.alaw_encode(raw), alaw)


def test_g711_decoders_bit_exact_vs_reference(g711_reference: dict[str, Any]) -> None:
    codes = bytes(range(256))
    ulaw, alaw = g711_reference["ulaw"][1], g711_reference["alaw"][1]
    np.testing.assert_array_equal(audio.mulaw_decode(codes), ulaw)
    np.testing.assert_array_equal(audio.alaw_decode(codes), alaw)
    np.testing.assert_array_equal(audio.mulaw_decode(np.frombuffer(codes, np.uint8)), ulaw)
    np.testing.assert_array_equal(audio.alaw_decode(np.frombuffer(codes, np.uint8)), alaw)


def test_g711_reference_points_and_formula_tables() -> None:
    """Known G.711 code points from the standard's tables, and the vectorised codecs equal to
    the per-segment formulas they were derived from."""
    zero = np.zeros(1, np.int16)
    assert audio.mulaw_encode(zero)[0] == 0xFF and audio.alaw_encode(zero)[0] == 0xD5
    extremes = np.array([0x00, 0x80, 0x7F, 0xFF], np.uint8)
    np.testing.assert_array_equal(audio.mulaw_decode(extremes), [-32124, 32124, 0, 0])
    a_codes = np.array([0x2A, 0xAA, 0x55, 0xD5], np.uint8)
    np.testing.assert_array_equal(audio.alaw_decode(a_codes), [-32256, 32256, -8, 8])
    codes = np.arange(256, dtype=np.uint8)
    ulaw_back = codes.copy()
    ulaw_back[0x7F] = 0xFF  # mu-law's "negative zero" decodes to 0, which encodes as +0
    for enc, dec, back in (
        (audio.mulaw_encode, audio.mulaw_decode, ulaw_back),
        (audio.alaw_encode, audio.alaw_decode, codes),
    ):
        np.testing.assert_array_equal(enc(dec(codes)), back)  # decoding inverts encoding
        assert dec(codes).dtype == np.int16 and enc(zero).dtype == np.uint8
    pcm = np.arange(-32768, 32768, 7, dtype=np.int16)
    np.testing.assert_array_equal(audio._ulaw_encode_formula(pcm), audio.mulaw_encode(pcm))
    np.testing.assert_array_equal(audio._alaw_encode_formula(pcm), audio.alaw_encode(pcm))
    with pytest.raises(TypeError):
        audio.mulaw_encode(np.zeros(4, np.int32))


# --------------------------------------------------------------------------- parts


@pytest.mark.parametrize("sample_rate", [8000, 16000])
@pytest.mark.parametrize("part", PARTS)
def test_each_part_alone_changes_signal_and_keeps_format(part: str, sample_rate: int) -> None:
    params: dict[str, object] = {"loss_rate": [0.3, 0.5]} if part == "packet_loss" else {}
    x = _speech_like(sample_rate)
    x_before = x.copy()
    aug = A.TelephoneAugment(_only(part, **params), sample_rate)
    y = aug(x, np.random.default_rng(1))
    _check_wave(y, x.shape[0])
    assert np.abs(y - x).max() > 1e-3, f"{part} left the signal unchanged"
    np.testing.assert_array_equal(x, x_before)  # the caller's array is never modified


@pytest.mark.parametrize("sample_rate", [8000, 16000])
def test_p_zero_is_identity(sample_rate: int) -> None:
    x = _speech_like(sample_rate)
    y = A.TelephoneAugment(A.AugmentConfig.disabled(), sample_rate)(x, np.random.default_rng(0))
    _check_wave(y, x.shape[0])
    np.testing.assert_array_equal(y, x)
    assert y is not x


@pytest.mark.parametrize("sample_rate", [8000, 16000])
@pytest.mark.parametrize("n", [0, 1, 7, 45, 300, 4001])
def test_all_parts_on_short_and_empty_input(sample_rate: int, n: int) -> None:
    cfg = A.AugmentConfig.from_dict({name: {"p": 1.0} for name in PARTS})
    x = _speech_like(sample_rate)[:n] * 3  # also out of range: output is clipped
    y = A.TelephoneAugment(cfg, sample_rate)(x, np.random.default_rng(n))
    _check_wave(y, n)


def test_silence_stays_finite() -> None:
    cfg = A.AugmentConfig.from_dict({name: {"p": 1.0} for name in PARTS})
    y = A.TelephoneAugment(cfg, 8000)(np.zeros(4000, np.float32), np.random.default_rng(0))
    _check_wave(y, 4000)


def _tone(freq: float, sample_rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("sample_rate", "stop", "pass_"),
    [(8000, (100.0, 3900.0), 1000.0), (16000, (100.0, 6000.0), 1000.0)],
)
def test_band_limit_attenuates_out_of_band_tones(
    sample_rate: int, stop: tuple[float, float], pass_: float
) -> None:
    """Over random edge draws, out-of-band tones lose > 20 dB and 1 kHz passes."""
    aug = A.TelephoneAugment(_only("band_limit"), sample_rate)
    skip = sample_rate // 4  # past the filter's start-up transient
    for seed in range(4):
        for freq in stop:
            x = _tone(freq, sample_rate)
            y = aug(x, np.random.default_rng(seed))
            assert _rms_db(x[skip:]) - _rms_db(y[skip:]) > 20.0, (freq, seed)
        x = _tone(pass_, sample_rate)
        y = aug(x, np.random.default_rng(seed))
        assert abs(_rms_db(x[skip:]) - _rms_db(y[skip:])) < 1.0


@pytest.mark.parametrize("btype", ["lowpass", "highpass"])
@pytest.mark.parametrize("order", [2, 4, 6])
def test_butterworth_sos_matches_scipy(btype: str, order: int) -> None:
    for cutoff in (200.0, 3400.0):
        ref = signal.butter(order, cutoff, btype=btype, fs=8000, output="sos")
        _, h_ref = signal.sosfreqz(ref, 256)
        _, h = signal.sosfreqz(channel.butterworth_sos(order, cutoff, 8000, btype), 256)
        np.testing.assert_allclose(h, h_ref, atol=1e-9)


@pytest.mark.parametrize("color", sorted(channel.NOISE_COLORS))
@pytest.mark.parametrize("snr_db", [10.0, 25.0, 40.0])
def test_additive_noise_snr(color: str, snr_db: float) -> None:
    x = _speech_like(8000)
    y = channel.add_noise(x, snr_db, color, np.random.default_rng(3))
    measured = _rms_db(x) - _rms_db(y - x)
    assert abs(measured - snr_db) < 1.0


def test_rawboost_ssi_snr() -> None:
    x = _speech_like(8000)
    cfg = C.SSIConfig(p=1.0, snr_db=(20.0, 20.0))
    y = rawboost.ssi_additive_noise(x, cfg, 8000, np.random.default_rng(4))
    assert abs(_rms_db(x) - _rms_db(y - x) - 20.0) < 1.0


def test_noise_colors_have_expected_slope() -> None:
    """Pink loses ~3 dB/octave and brown ~6 dB/octave, white is flat."""
    rng = np.random.default_rng(0)
    x = np.full(1 << 15, 0.1, np.float32)  # DC 'signal': only sets the noise power
    for color, slope in (("white", 0.0), ("pink", -3.0), ("brown", -6.0)):
        noise = channel.add_noise(x, 0.0, color, rng) - x
        freqs, psd = signal.welch(noise, fs=8000, nperseg=1024)
        lo = psd[(freqs > 200) & (freqs < 400)].mean()
        hi = psd[(freqs > 1600) & (freqs < 3200)].mean()  # three octaves higher
        assert abs(10 * np.log10(hi / lo) / 3 - slope) < 1.0, color


def test_lnl_overlap_add_equals_direct_convolution() -> None:
    """The block-FFT path computes exactly sum_i conv(x**i, taps_i), delay-compensated."""
    rng = np.random.default_rng(5)
    cfg = C.LnLConfig(p=1.0)
    response, length, delay = rawboost._notch_filters(rng, 3, cfg, np.zeros(3), 8000)
    n_fft = 2 * (response.shape[1] - 1)
    taps = np.fft.irfft(response, n_fft)
    assert np.abs(taps[:, length:]).max() < 1e-9  # taps fit in `length`
    np.testing.assert_allclose(taps[:, :length], taps[:, length - 1 :: -1], atol=1e-12)
    for n in (1, 100, length, 5000):
        x = rng.uniform(-1, 1, (3, n)).astype(np.float32)
        ref = sum(np.convolve(x[i], taps[i, :length]) for i in range(3))[delay : delay + n]
        out = rawboost._overlap_add(x, response, length, delay)
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_packet_loss_zero_and_repeat() -> None:
    x = _speech_like(8000)
    frame = 160
    y = channel.packet_loss(x, 8000, 20.0, 1.0, False, np.random.default_rng(0))
    np.testing.assert_array_equal(y, 0.0)
    y = channel.packet_loss(x, 8000, 20.0, 0.0, True, np.random.default_rng(0))
    np.testing.assert_array_equal(y, x)
    y = channel.packet_loss(x, 8000, 20.0, 0.3, True, np.random.default_rng(2))
    changed = np.flatnonzero(y != x)
    assert changed.size > 0
    # every concealed sample is a copy of a sample a whole number of packets earlier (or 0)
    for t in changed[:: max(1, changed.size // 50)]:
        earlier = x[t - frame :: -frame] if t >= frame else np.zeros(0, np.float32)
        assert y[t] == 0.0 or y[t] in earlier


def test_isd_touches_a_few_percent() -> None:
    x = _speech_like(8000) * 0.5  # impulses stay below full scale: no peak renormalisation
    cfg = C.ISDConfig(p=1.0, max_rate_percent=10.0)
    y = rawboost.isd_additive_noise(x, cfg, np.random.default_rng(0))
    frac = np.mean(y != x)
    assert 0 < frac <= 0.1 + 1e-9
    _check_wave(y, x.shape[0])


# --------------------------------------------------------------------------- pipeline


def test_deterministic_given_seed() -> None:
    x = _speech_like(8000, seconds=2.0)
    for cfg in (A.AugmentConfig(), A.AugmentConfig.from_dict({n: {"p": 1.0} for n in PARTS})):
        aug = A.TelephoneAugment(cfg, 8000)
        outs = [aug(x, np.random.default_rng(seed)) for seed in (11, 11, 12)]
        np.testing.assert_array_equal(outs[0], outs[1])
        assert not np.array_equal(outs[0], outs[2])


def test_default_config_output_valid_over_many_draws() -> None:
    x = _speech_like(8000)
    aug = A.TelephoneAugment(A.AugmentConfig(), 8000)
    rng = np.random.default_rng(0)
    for _ in range(40):
        _check_wave(aug(x, rng), x.shape[0])


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown augmentation part.*'reverb'"):
        A.AugmentConfig.from_dict({"reverb": {"p": 0.5}})
    with pytest.raises(ValueError, match=r"unknown key.*'snr'.*augment\.noise"):
        A.AugmentConfig.from_dict({"noise": {"p": 0.5, "snr": [5, 10]}})


def test_from_dict_parses_yaml_values_and_validates() -> None:
    cfg = A.AugmentConfig.from_dict(
        {"noise": {"p": 1, "snr_db": [5, 15], "colors": ["pink"]}, "gain": None}
    )
    assert cfg.noise == C.NoiseConfig(p=1.0, snr_db=(5.0, 15.0), colors=("pink",))
    assert cfg.gain == C.GainConfig() and cfg.g711 == C.G711Config()
    assert A.AugmentConfig.from_dict({}) == A.AugmentConfig()
    bad = [
        {"noise": {"p": 1.5}},
        {"noise": {"snr_db": [40, 10]}},
        {"noise": {"colors": ["purple"]}},
        {"g711": {"laws": ["g729"]}},
        {"band_limit": {"order": 3}},
        {"band_limit": {"low_hz": [200, 3500]}},
        {"resample": {"qualities": ["best"]}},
    ]
    for d in bad:
        with pytest.raises(ValueError):
            A.AugmentConfig.from_dict(d)
    with pytest.raises(TypeError):
        A.AugmentConfig.from_dict({"noise": {"snr_db": 10}})
    with pytest.raises(TypeError):
        A.AugmentConfig.from_dict({"noise": [0.5]})


def test_rejects_non_mono() -> None:
    aug = A.TelephoneAugment(A.AugmentConfig(), 8000)
    with pytest.raises(ValueError, match="mono"):
        aug(np.zeros((2, 100), np.float32), np.random.default_rng(0))


@pytest.mark.parametrize("n", [1, 45, 4001])
def test_noise_on_odd_lengths(n: int) -> None:
    x = _speech_like(8000)[:n]
    for color in channel.NOISE_COLORS:
        y = channel.add_noise(x, 20.0, color, np.random.default_rng(0))
        assert y.shape == (n,) and y.dtype == np.float32 and np.isfinite(y).all()
    y = rawboost.ssi_additive_noise(x, C.SSIConfig(p=1.0), 8000, np.random.default_rng(0))
    assert y.shape == (n,) and np.isfinite(y).all()


def test_module_docstring_example_is_the_default_config() -> None:
    """The YAML in the module docstring parses, and documents the actual defaults."""
    yaml = pytest.importorskip("yaml")
    doc = A.__doc__ or ""
    start = doc.index("    augment:")
    block = doc[start : doc.index("\n\n", start)]
    parsed = yaml.safe_load(block)["augment"]
    assert set(parsed) == set(PARTS)
    assert A.AugmentConfig.from_dict(parsed) == A.AugmentConfig()
