"""LFCC front end and the two-GMM baseline: shapes, deltas, a toy fit, checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from models.architectures.lfcc_gmm import (
    LFCCGMM,
    DiagonalGMM,
    LFCCGMMConfig,
    deltas,
    lfcc,
    linear_filterbank,
)

SR = 8000
# Small enough to fit in well under a second.
TOY = LFCCGMMConfig(n_components=4, max_iter=500, max_frames_per_class=2000)


def _noise(rng: np.random.Generator, seconds: float = 0.5) -> np.ndarray:
    return (0.1 * rng.standard_normal(int(SR * seconds))).astype(np.float32)


def _harmonic(rng: np.random.Generator, seconds: float = 0.5) -> np.ndarray:
    """Voiced-like signal: harmonics of a random f0 below 3.4 kHz with falling amplitude."""
    t = np.arange(int(SR * seconds)) / SR
    f0 = rng.uniform(100, 200)
    harmonics = np.arange(1, int(3400 // f0) + 1)
    phases = rng.uniform(0, 2 * np.pi, harmonics.size)
    x = np.sum(
        np.sin(2 * np.pi * f0 * harmonics[:, None] * t + phases[:, None]) / harmonics[:, None], 0
    )
    x = 0.1 * x / np.max(np.abs(x)) + 1e-3 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def test_feature_shape_for_one_second_at_8k() -> None:
    cfg = LFCCGMMConfig()
    assert (cfg.win_length, cfg.hop_length) == (160, 80)
    feats = lfcc(_noise(np.random.default_rng(0), seconds=1.0), cfg)
    # 1 + (8000 - 160) // 80 = 99 full 20 ms frames, 20 static + 20 delta + 20 double delta.
    assert feats.shape == (99, 60)
    assert np.all(np.isfinite(feats))


def test_short_and_silent_signals_still_give_a_frame() -> None:
    cfg = LFCCGMMConfig()
    assert lfcc(np.zeros(50, dtype=np.float32), cfg).shape == (1, 60)
    assert np.all(np.isfinite(lfcc(np.zeros(4000, dtype=np.float32), cfg)))


def test_frame_count_follows_config() -> None:
    cfg = LFCCGMMConfig(sample_rate=16000, n_fft=512, win_ms=25, hop_ms=10, n_ceps=13)
    assert lfcc(np.zeros(16000, dtype=np.float32), cfg).shape == (1 + (16000 - 400) // 160, 39)


def test_static_off_keeps_only_the_deltas() -> None:
    wave = _harmonic(np.random.default_rng(3), seconds=1.0)
    full = lfcc(wave, LFCCGMMConfig())
    dyn_cfg = LFCCGMMConfig(static=False)
    dyn = lfcc(wave, dyn_cfg)
    assert dyn.shape == (full.shape[0], dyn_cfg.feature_dim) == (99, 40)
    np.testing.assert_array_equal(dyn, full[:, 20:])
    # A fixed channel gain moves the static c0 of every frame; the deltas do not see it.
    louder = lfcc(4 * wave, dyn_cfg)
    np.testing.assert_allclose(louder, dyn, atol=1e-9)
    assert np.abs(lfcc(4 * wave, LFCCGMMConfig())[:, 0] - full[:, 0]).min() > 0.5


def test_vad_drops_quiet_frames_only() -> None:
    """Half a second of speech-like sound, then half a second 40 dB down: a 30 dB gate keeps
    the loud half with its deltas as they were (taken before the drop), at any gain."""
    rng = np.random.default_rng(5)
    loud = _harmonic(rng, seconds=0.5)
    wave = np.concatenate((loud, 0.01 * _harmonic(rng, seconds=0.5)))
    plain_cfg = LFCCGMMConfig(static=False)
    gated_cfg = LFCCGMMConfig(static=False, vad_db=30.0)
    plain, gated = lfcc(wave, plain_cfg), lfcc(wave, gated_cfg)
    assert plain.shape == (99, 40)
    loud_frames = 1 + (loud.size - 160) // 80  # frames wholly inside the loud half
    assert loud_frames <= gated.shape[0] < loud_frames + 3
    np.testing.assert_array_equal(gated, plain[: gated.shape[0]])
    np.testing.assert_allclose(lfcc(0.25 * wave, gated_cfg), gated, atol=1e-6)  # same frames
    # Silence still gives a frame; an even signal keeps every frame.
    assert lfcc(np.zeros(4000, dtype=np.float32), gated_cfg).shape[0] >= 1
    noise = _noise(rng, seconds=1.0)
    assert lfcc(noise, gated_cfg).shape == lfcc(noise, plain_cfg).shape
    with pytest.raises(ValueError, match="vad_db must be >= 0"):
        LFCCGMMConfig(vad_db=-1.0)


def test_vad_round_trip_and_old_checkpoints(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    cfg = LFCCGMMConfig(n_components=4, max_iter=500, max_frames_per_class=2000,
                        static=False, vad_db=30.0)
    quiet_tail = [np.concatenate((_harmonic(rng), 1e-3 * _noise(rng))) for _ in range(6)]
    model = LFCCGMM(cfg).fit(quiet_tail, [_noise(rng) for _ in range(6)])
    state = model.state_dict()
    assert state["config.vad_db"] == 30.0
    torch.save(state, tmp_path / "vad.pt")
    restored = LFCCGMM.from_state_dict(torch.load(tmp_path / "vad.pt", weights_only=True))
    assert restored.config == cfg
    probe = [quiet_tail[0], _noise(rng)]
    np.testing.assert_array_equal(restored.score(probe), model.score(probe))
    # Written before the option existed: no config.vad_db, every frame kept.
    old = LFCCGMM.from_state_dict({k: v for k, v in state.items() if k != "config.vad_db"})
    assert old.config.vad_db == 0.0
    assert not np.array_equal(old.score(probe[:1]), model.score(probe[:1]))


def test_deltas_of_a_linear_ramp() -> None:
    slope = np.array([0.5, -2.0, 3.0])
    x = np.arange(10)[:, None] * slope + np.array([1.0, 0.0, -4.0])
    d1 = deltas(x, width=3)
    # (x[t+1] - x[t-1]) / 2 = slope inside; the replicated edge frame halves it at both ends.
    np.testing.assert_allclose(d1[1:-1], np.broadcast_to(slope, (8, 3)))
    np.testing.assert_allclose(d1[[0, -1]], np.broadcast_to(slope / 2, (2, 3)))
    d2 = deltas(d1, width=3)
    np.testing.assert_allclose(d2[2:-2], 0.0, atol=1e-12)
    np.testing.assert_allclose(d2[[0, 1]], np.broadcast_to(slope / 4, (2, 3)))
    np.testing.assert_allclose(d2[[-2, -1]], np.broadcast_to(-slope / 4, (2, 3)))
    # A wider regression window still recovers the slope away from the edges.
    np.testing.assert_allclose(deltas(x, width=5)[2:-2], np.broadcast_to(slope, (6, 3)))


def test_linear_filterbank_is_triangular_and_linear() -> None:
    cfg = LFCCGMMConfig()
    bank = linear_filterbank(cfg)
    assert bank.shape == (cfg.n_fft // 2 + 1, cfg.n_filters)
    assert np.all(bank >= 0) and np.all(bank <= 1)
    peaks = np.argmax(bank, axis=0)
    # Centres are equally spaced in Hz: 4000 / 21 Hz apart, i.e. ~6.1 bins of 31.25 Hz.
    assert np.all(np.abs(np.diff(peaks) - (4000 / 21) / 31.25) <= 1)


def test_cepstra_are_the_dct_of_the_log_filterbank_energies() -> None:
    """The front end's cached window, filterbank and DCT matrix give the textbook pipeline's
    numbers: Hamming frames, |FFT|^2, triangles, log10, orthonormal DCT-II, first n_ceps."""
    from scipy.fft import dct

    cfg = LFCCGMMConfig(n_filters=40, n_ceps=30, preemphasis=0.0)
    x = _harmonic(np.random.default_rng(3))
    win, hop = cfg.win_length, cfg.hop_length
    frames = np.stack([x[i : i + win] for i in range(0, x.size - win + 1, hop)]).astype(float)
    power = np.abs(np.fft.rfft(frames * np.hamming(win), n=cfg.n_fft)) ** 2
    log_energy = np.log10(power @ linear_filterbank(cfg) + np.finfo(np.float64).eps)
    expected = dct(log_energy, type=2, norm="ortho", axis=1)[:, : cfg.n_ceps]
    np.testing.assert_allclose(lfcc(x, cfg)[:, : cfg.n_ceps], expected, rtol=1e-9, atol=1e-9)
    # a second config must not get the first one's cached matrices
    other = LFCCGMMConfig(n_filters=20, n_ceps=20, preemphasis=0.0)
    assert lfcc(x, other).shape == (frames.shape[0], 60)


def test_diagonal_gmm_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)) * rng.uniform(0.5, 2, 6)
    gmm = GaussianMixture(3, covariance_type="diag", random_state=0).fit(x)
    ours = DiagonalGMM.from_sklearn(gmm).frame_log_likelihood(x)
    np.testing.assert_allclose(ours, gmm.score_samples(x), rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def toy_model() -> LFCCGMM:
    rng = np.random.default_rng(0)
    return LFCCGMM(TOY).fit([_harmonic(rng) for _ in range(6)], [_noise(rng) for _ in range(6)])


def test_toy_fit_separates_held_out(toy_model: LFCCGMM) -> None:
    rng = np.random.default_rng(1)
    bona = toy_model.score([_harmonic(rng) for _ in range(5)])
    spoof = toy_model.score([_noise(rng) for _ in range(5)])
    assert bona.shape == spoof.shape == (5,)
    assert bona.min() > spoof.max()


def test_fit_is_deterministic(toy_model: LFCCGMM) -> None:
    rng = np.random.default_rng(0)
    again = LFCCGMM(TOY).fit([_harmonic(rng) for _ in range(6)], [_noise(rng) for _ in range(6)])
    probe = [_harmonic(np.random.default_rng(5)), _noise(np.random.default_rng(6))]
    np.testing.assert_array_equal(again.score(probe), toy_model.score(probe))


def test_state_dict_round_trip(toy_model: LFCCGMM, tmp_path: Path) -> None:
    state = toy_model.state_dict()
    assert all(isinstance(v, torch.Tensor | int | float | str) for v in state.values())
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 0, "model": state}, path)
    loaded = torch.load(path, weights_only=True)
    restored = LFCCGMM.from_state_dict(loaded["model"])
    assert restored.config == toy_model.config
    rng = np.random.default_rng(2)
    probe = [_harmonic(rng), _noise(rng), _harmonic(rng, seconds=0.01)]
    np.testing.assert_array_equal(restored.score(probe), toy_model.score(probe))


def test_static_off_round_trip_and_old_checkpoints(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cfg = LFCCGMMConfig(n_components=4, max_iter=500, max_frames_per_class=2000, static=False)
    model = LFCCGMM(cfg).fit([_harmonic(rng) for _ in range(6)], [_noise(rng) for _ in range(6)])
    assert model.gmms["bonafide"].means.shape == (4, 40)
    state = model.state_dict()
    assert state["config.static"] is False
    torch.save(state, tmp_path / "dyn.pt")
    restored = LFCCGMM.from_state_dict(torch.load(tmp_path / "dyn.pt", weights_only=True))
    assert restored.config == cfg
    probe = [_harmonic(rng), _noise(rng)]
    np.testing.assert_array_equal(restored.score(probe), model.score(probe))
    # A checkpoint written before the option existed has no config.static: statics on.
    old = {k: v for k, v in state.items() if k != "config.static"}
    with pytest.raises(ValueError, match="40 dims, the config's features 60"):
        LFCCGMM.from_state_dict(old)


def test_shipped_checkpoint_is_the_delta_only_recipe() -> None:
    """``--model lfcc-gmm`` is version 2: no statics, quiet frames dropped, calibrated on
    its leave-one-system-out scores (its card says so)."""
    from models.inference import NAMED_MODELS, load_detector

    detector = load_detector("lfcc-gmm")
    assert NAMED_MODELS["lfcc-gmm"].is_file()
    config = detector.model.config
    assert not config.static and config.vad_db == 30.0 and config.feature_dim == 40
    assert (detector.name, detector.version) == ("lfcc-gmm", "2")
    assert "calibration_source" in detector.card and set(detector.card["loso"]["per_engine_eer"])
    score = detector.scores([_harmonic(np.random.default_rng(4), seconds=1.0)])
    assert score.shape == (1,) and np.isfinite(score).all()


def test_errors() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        LFCCGMM().score([np.zeros(800, dtype=np.float32)])
    with pytest.raises(ValueError, match="both classes"):
        LFCCGMM(TOY).fit([], [np.zeros(800, dtype=np.float32)])
    with pytest.raises(ValueError, match="not an lfcc_gmm state dict"):
        LFCCGMM.from_state_dict({"arch": "rawnet2"})
    with pytest.raises(ValueError, match="n_fft=128 is shorter"):
        LFCCGMMConfig(n_fft=128)
    with pytest.raises(ValueError, match="n_ceps <= n_filters"):
        LFCCGMMConfig(n_ceps=30)
    with pytest.raises(ValueError, match="mono 1-D"):
        lfcc(np.zeros((2, 800)), LFCCGMMConfig())


def test_delta_only_recipe_config() -> None:
    from models.tasks.config import REPO_ROOT, TrainConfig

    config = TrainConfig.load(REPO_ROOT / "models" / "configs" / "lfcc_gmm_dd.yaml")
    gmm = LFCCGMMConfig(**config.model)
    assert gmm.static is False and gmm.vad_db == 30.0 and gmm.feature_dim == 40
    assert config.output == "models/checkpoints/lfcc_gmm.pt"  # the shipped recipe
    classic = TrainConfig.load(REPO_ROOT / "experiments" / "configs" / "lfcc_gmm.yaml")
    assert LFCCGMMConfig(**classic.model).static  # the reference recipe keeps its statics
    assert not str(classic.output).startswith("models/checkpoints")
    from models.tasks.recipes import GMM_DD  # the LOSO recipe measures this very config

    assert {k: config.model[k] for k in GMM_DD} == GMM_DD
