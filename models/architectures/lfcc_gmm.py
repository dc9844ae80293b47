"""LFCC front end + two diagonal GMMs: the classic ASVspoof 2019/2021 baseline.

Follows the official MATLAB baseline (``lfcc_bp.m``, Sahidullah et al., Interspeech 2015;
Todisco et al., Interspeech 2019): 20 ms Hamming frames with 50 % overlap, |FFT|^2,
20 linearly spaced triangular filters, ``log10(. + eps)``, orthonormal DCT-II keeping c0,
then HTK deltas and double deltas of half-width 1 (``width 3``) -> 60 dims per frame. The
score is the average frame log-likelihood ratio between a bona fide and a spoof GMM.

Departures from the baseline, and why:
- pre-emphasis (0.97, the usual cepstral front-end choice) is on by default; upstream has
  none. On the dev part it made no difference beyond seed noise (4.8 vs 5.1 % EER with
  128 components); set 0 to match upstream exactly;
- deltas are normalised as in the MATLAB baseline (``/ 2`` for width 3); the Python port of
  the 2021 baseline leaves that factor out, which only rescales two thirds of the features;
- frames are only taken where a whole window fits (upstream zero-pads the last one), and a
  signal shorter than one window is zero-padded to one, so every utterance gets a score;
- the GMMs are trained on a seeded random subsample of frames, to bound the fit time;
- ``static=False`` drops the static cepstra and keeps only deltas and double deltas
  (``2 * n_ceps`` dims). A fixed channel (microphone, line) adds a constant to the static
  cepstra, which the deltas cancel; without the statics the GMMs cannot key on the
  recording conditions of the training speakers. Leave-one-system-out on the dev part
  (``experiments/gmm-exploration.md``), 32 components: 19.7-20.1 % pooled EER over seeds
  0-2 against 24.3-26.0 % with the statics (23.3 % for the 128-component classic recipe),
  and half the bona fide digit false alarms at a matched spoof miss rate. Without statics
  more components fit worse to unseen engines (128: 21.5 %), hence
  ``models/configs/lfcc_gmm_dd.yaml`` (the shipped ``lfcc_gmm.pt``, version 2) uses 32.
  The class default stays on, so a checkpoint without the key (version 1) loads with statics.
- ``vad_db > 0`` drops the frames whose energy is more than ``vad_db`` dB below the
  utterance's loudest frame, in training and scoring alike (0: keep every frame). Pauses
  and line noise carry no trace of the engine, but their frames vote in the average
  log-likelihood ratio just the same; the deltas are taken before the drop, so a kept
  frame's deltas still see its true neighbours. The level is relative to the utterance's
  own peak, so it does not depend on the caller's gain. Leave-one-system-out with
  ``static=False``, 30 dB (``experiments/gmm-exploration.md``, "Quiet-frame gate"): the
  same pooled EER within seed noise, alone and fused with RawNet2, and a lower worst
  held-out engine at every seed and size. Off by default (checkpoints written before it
  keep every frame).

Unlike the neural architectures this is not an ``nn.Module``: the GMMs are fitted with EM
(scikit-learn) and scored with numpy. Its parameters still live in a flat dict of tensors
and plain values, so a checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from functools import cache, cached_property
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.fft import dct
from sklearn.mixture import GaussianMixture

from models.architectures.scorer import WaveScorer

__all__ = ["DiagonalGMM", "LFCCGMM", "LFCCFeatures", "LFCCGMMConfig", "deltas", "lfcc",
           "linear_filterbank"]

FloatArray = NDArray[np.float64]
StateDict = dict[str, torch.Tensor | int | float | str]

_ARCH = "lfcc_gmm"
_STATE_VERSION = 1
_CLASSES = ("bonafide", "spoof")
# Frames scored per matrix product: bounds the (frames, components) buffer to ~32 MB at 512.
_SCORE_CHUNK = 8192


@dataclass(frozen=True)
class LFCCFeatures:
    """The LFCC front end's settings, shared by every model that reads LFCCs (this GMM and
    :mod:`models.architectures.lcnn`). Defaults are tuned for 8 kHz telephone audio.

    ``n_fft`` is 256 at 8 kHz (the baseline's 512 at 16 kHz: the same ~31 Hz bin spacing).
    ``f_max=None`` means Nyquist.
    """

    sample_rate: int = 8000
    n_filters: int = 20
    n_ceps: int = 20
    n_fft: int = 256
    win_ms: float = 20.0
    hop_ms: float = 10.0
    preemphasis: float = 0.97
    f_min: float = 0.0
    f_max: float | None = None
    delta_width: int = 3
    static: bool = True

    def __post_init__(self) -> None:
        if self.win_length < 2 or self.hop_length < 1:
            raise ValueError(
                f"win_ms={self.win_ms}, hop_ms={self.hop_ms} give a window of "
                f"{self.win_length} and a hop of {self.hop_length} samples"
            )
        if self.n_fft < self.win_length:
            raise ValueError(f"n_fft={self.n_fft} is shorter than the window ({self.win_length})")
        if not 0 <= self.f_min < self.band_max_hz <= self.sample_rate / 2:
            raise ValueError(
                f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={self.f_min}, "
                f"f_max={self.band_max_hz}, sample_rate={self.sample_rate}"
            )
        if not 1 <= self.n_ceps <= self.n_filters:
            raise ValueError(f"need 1 <= n_ceps <= n_filters, got {self.n_ceps}, {self.n_filters}")
        if self.delta_width < 3 or self.delta_width % 2 == 0:
            raise ValueError(f"delta_width must be odd and >= 3, got {self.delta_width}")

    @property
    def band_max_hz(self) -> float:
        return self.sample_rate / 2 if self.f_max is None else float(self.f_max)

    @property
    def win_length(self) -> int:
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def feature_dim(self) -> int:
        return (3 if self.static else 2) * self.n_ceps


@dataclass(frozen=True)
class LFCCGMMConfig(LFCCFeatures):
    """Front-end and GMM settings. ``max_frames_per_class`` caps the frames each GMM is
    fitted on (0: use all).

    GMM size: the baseline uses 512 components on ~25 h of 16 kHz audio. On the 1 h training
    part here (100k bona fide / 261k spoof frames), 128 components fitted on 50k frames per
    class give 4.8-5.5 % dev EER over seeds 0-2 and fit in 50-95 s on one busy core; 256
    components on 100k frames gave 4.3 % in ~4.5 min, 64 components on 100k frames 7.3 %.
    """

    vad_db: float = 0.0
    n_components: int = 128
    max_iter: int = 100
    tol: float = 1e-3
    reg_covar: float = 1e-6
    init_params: str = "k-means++"
    seed: int = 0
    max_frames_per_class: int = 50_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vad_db < 0:
            raise ValueError(f"vad_db must be >= 0 (0: keep every frame), got {self.vad_db}")
        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}")


def linear_filterbank(config: LFCCFeatures) -> FloatArray:
    """``(n_fft // 2 + 1, n_filters)`` triangles with linearly spaced edges, as MATLAB ``trimf``.

    Bins outside ``[f_min, f_max]`` get zero weight, the same as the baseline cutting the
    spectrum to that band before applying the filters.
    """
    freqs = np.linspace(0.0, config.sample_rate / 2, config.n_fft // 2 + 1)
    edges = np.linspace(config.f_min, config.band_max_hz, config.n_filters + 2)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - left) / (centre - left)
    falling = (right - freqs[None, :]) / (right - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).T


@cache
def _front_end(config: LFCCFeatures) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The Hamming window, the filterbank and the kept rows of the orthonormal DCT-II as a
    matrix, built once per setting (the config is frozen, so it keys the cache): they were
    rebuilt for every window, and a service scores thousands of windows with one setting
    (with the two changes below, a GMM v2 score went from 2.2 to 1.5 ms a four-second window
    on one thread here, the same scores to 1e-15). Read-only, so scoring threads share them."""
    window = np.hamming(config.win_length)
    bank = linear_filterbank(config)
    basis = dct(np.eye(config.n_filters), type=2, norm="ortho", axis=0)[: config.n_ceps].T.copy()
    for array in (window, bank, basis):
        array.setflags(write=False)
    return window, bank, basis


def _logsumexp_rows(x: FloatArray) -> FloatArray:
    """``log(sum(exp(x), axis=1))``, stable. SciPy's general version (checks, weights,
    broadcasting) was about a quarter of a GMM score; a finite ``(frames, components)`` block
    needs none of it."""
    top = x.max(axis=1)
    return top + np.log(np.exp(x - top[:, None]).sum(axis=1))


def deltas(features: FloatArray, width: int = 3) -> FloatArray:
    """HTK regression deltas along axis 0 (frames), edges replicated, as the baseline's ``Deltas``.

    ``d[t] = sum_n n * (x[t+n] - x[t-n]) / (2 * sum_n n^2)`` for ``n = 1..width // 2``.
    """
    half = width // 2
    padded = np.pad(features, ((half, half), (0, 0)), mode="edge")
    n_frames = features.shape[0]
    out = np.zeros_like(features, dtype=np.float64)
    for n in range(1, half + 1):  # loops over the window taps only, never over frames
        out += n * (padded[half + n : half + n + n_frames] - padded[half - n : half - n + n_frames])
    return out / (2 * sum(n * n for n in range(1, half + 1)))


def lfcc(wave: NDArray[np.floating], config: LFCCGMMConfig) -> FloatArray:
    """``(frames, 3 * n_ceps)`` static + delta + double-delta LFCCs of one waveform, or
    ``(frames, 2 * n_ceps)`` deltas and double deltas only when ``config.static`` is off;
    with ``config.vad_db`` only the frames within that many dB of the loudest one."""
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a mono 1-D waveform, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("waveform contains NaN/inf samples")
    if config.preemphasis:
        x = np.concatenate((x[:1], x[1:] - config.preemphasis * x[:-1]))
    win, hop = config.win_length, config.hop_length
    if x.size < win:
        x = np.pad(x, (0, win - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop]
    window, bank, dct_basis = _front_end(config)
    bins = np.fft.rfft(frames * window, n=config.n_fft)
    spectrum = bins.real**2 + bins.imag**2  # |X|^2 without |X|'s square root (hypot)
    static = np.log10(spectrum @ bank + np.finfo(np.float64).eps) @ dct_basis
    d1 = deltas(static, config.delta_width)
    d2 = deltas(d1, config.delta_width)
    feats = np.concatenate((static, d1, d2) if config.static else (d1, d2), axis=1)
    if config.vad_db > 0:
        # Energy of the pre-emphasised, unwindowed frame; the loudest frame always stays.
        log_energy = 10 * np.log10(np.sum(frames**2, axis=1) + 1e-12)
        feats = feats[log_energy >= log_energy.max() - config.vad_db]
    return feats


@dataclass(frozen=True)
class DiagonalGMM:
    """Diagonal-covariance GMM parameters and a numpy log-likelihood.

    Scoring from these arrays (instead of the fitted sklearn object) makes a reloaded model
    give bit-identical scores to the one that was trained, with no sklearn state to pickle.
    """

    weights: FloatArray  # (K,)
    means: FloatArray  # (K, D)
    covariances: FloatArray  # (K, D)

    def __post_init__(self) -> None:
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covariances.shape != (k, d):
            raise ValueError(
                f"inconsistent GMM shapes: weights {self.weights.shape}, means "
                f"{self.means.shape}, covariances {self.covariances.shape}"
            )
        if np.any(self.covariances <= 0):
            raise ValueError("GMM covariances must be positive")

    @classmethod
    def from_sklearn(cls, gmm: GaussianMixture) -> DiagonalGMM:
        return cls(
            weights=np.asarray(gmm.weights_, dtype=np.float64),
            means=np.asarray(gmm.means_, dtype=np.float64),
            covariances=np.asarray(gmm.covariances_, dtype=np.float64),
        )

    @cached_property
    def _terms(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Per-component constant, ``(mu / var).T`` and ``(-0.5 / var).T``: fixed once fitted,
        so computed on the first score, not on every one."""
        precisions = 1.0 / self.covariances
        const = (
            np.log(self.weights)
            - 0.5 * self.means.shape[1] * np.log(2 * np.pi)
            - 0.5 * np.sum(np.log(self.covariances), axis=1)
            - 0.5 * np.sum(self.means**2 * precisions, axis=1)
        )
        return const, np.ascontiguousarray((self.means * precisions).T), \
            np.ascontiguousarray((-0.5 * precisions).T)

    def frame_log_likelihood(self, x: FloatArray) -> FloatArray:
        """``log p(x_t)`` for each row of ``x (T, D)``."""
        const, linear, quadratic = self._terms
        out = np.empty(x.shape[0], dtype=np.float64)
        for start in range(0, x.shape[0], _SCORE_CHUNK):
            chunk = x[start : start + _SCORE_CHUNK]
            # -0.5 * (x - mu)^2 / var expanded, so each chunk is two matrix products.
            log_comp = const + chunk @ linear + (chunk**2) @ quadratic
            out[start : start + chunk.shape[0]] = _logsumexp_rows(log_comp)
        return out


class LFCCGMM:
    """LFCC front end with one GMM per class; ``score`` is the mean frame log-likelihood ratio."""

    def __init__(self, config: LFCCGMMConfig | None = None) -> None:
        self.config = config or LFCCGMMConfig()
        self.gmms: dict[str, DiagonalGMM] = {}
        self.fit_seconds: float | None = None

    @property
    def is_fitted(self) -> bool:
        return set(self.gmms) == set(_CLASSES)

    def features(self, wave: NDArray[np.floating]) -> FloatArray:
        return lfcc(wave, self.config)

    def _pooled_frames(
        self, waves: list[NDArray[np.floating]], rng: np.random.Generator
    ) -> FloatArray:
        # float32 while pooling halves the peak memory; the GMM fit itself runs in float64.
        feats = [self.features(w).astype(np.float32) for w in waves]
        pooled = np.concatenate(feats, axis=0)
        cap = self.config.max_frames_per_class
        if cap and pooled.shape[0] > cap:
            pooled = pooled[np.sort(rng.choice(pooled.shape[0], size=cap, replace=False))]
        return pooled.astype(np.float64)

    def fit(
        self,
        bonafide_waves: list[NDArray[np.floating]],
        spoof_waves: list[NDArray[np.floating]],
    ) -> LFCCGMM:
        """Fit both GMMs. Deterministic for a given config (seed) and input order."""
        if not bonafide_waves or not spoof_waves:
            raise ValueError(
                f"need waveforms of both classes, got {len(bonafide_waves)} bona fide and "
                f"{len(spoof_waves)} spoof"
            )
        started = time.perf_counter()
        cfg = self.config
        gmms: dict[str, DiagonalGMM] = {}
        for offset, (name, waves) in enumerate(
            zip(_CLASSES, (bonafide_waves, spoof_waves), strict=True)
        ):
            rng = np.random.default_rng([cfg.seed, offset])
            frames = self._pooled_frames(waves, rng)
            if frames.shape[0] < cfg.n_components:
                raise ValueError(
                    f"{name}: {frames.shape[0]} frames cannot fit {cfg.n_components} components"
                )
            gmm = GaussianMixture(
                n_components=cfg.n_components,
                covariance_type="diag",
                tol=cfg.tol,
                reg_covar=cfg.reg_covar,
                max_iter=cfg.max_iter,
                init_params=cfg.init_params,
                random_state=cfg.seed + offset,
            ).fit(frames)
            gmms[name] = DiagonalGMM.from_sklearn(gmm)
        self.gmms = gmms
        self.fit_seconds = time.perf_counter() - started
        return self

    def score(self, waves: list[NDArray[np.floating]]) -> FloatArray:
        """Per-utterance ``mean_t log p(x_t | bona fide) - mean_t log p(x_t | spoof)``."""
        if not self.is_fitted:
            raise RuntimeError("LFCCGMM is not fitted: call fit() or from_state_dict() first")
        if not waves:
            return np.zeros(0, dtype=np.float64)
        feats = [self.features(w) for w in waves]
        lengths = np.array([f.shape[0] for f in feats])
        frames = np.concatenate(feats, axis=0)
        bona_ll = self.gmms["bonafide"].frame_log_likelihood(frames)
        llr = bona_ll - self.gmms["spoof"].frame_log_likelihood(frames)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        return np.add.reduceat(llr, starts) / lengths

    def state_dict(self) -> StateDict:
        """Flat dict of plain values and float64 tensors, loadable with ``weights_only=True``."""
        if not self.is_fitted:
            raise RuntimeError("cannot export an unfitted LFCCGMM")
        state: StateDict = {"arch": _ARCH, "version": _STATE_VERSION}
        for key, value in asdict(self.config).items():
            if value is not None:  # not a plain state value; a missing key restores the default
                state[f"config.{key}"] = value
        for name, gmm in self.gmms.items():
            state[f"{name}.weights"] = torch.from_numpy(gmm.weights.copy())
            state[f"{name}.means"] = torch.from_numpy(gmm.means.copy())
            state[f"{name}.covariances"] = torch.from_numpy(gmm.covariances.copy())
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LFCCGMM:
        if state.get("arch") != _ARCH:
            raise ValueError(f"not an {_ARCH} state dict (arch={state.get('arch')!r})")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported {_ARCH} state version {state.get('version')!r}")
        names = {f.name for f in fields(LFCCGMMConfig)}
        config_kwargs = {k[7:]: v for k, v in state.items() if k.startswith("config.")}
        unknown = set(config_kwargs) - names
        if unknown:
            raise ValueError(f"unknown config keys in state dict: {sorted(unknown)}")
        model = cls(LFCCGMMConfig(**config_kwargs))

        def array(key: str) -> FloatArray:
            if key not in state:
                raise ValueError(f"{_ARCH} state dict lacks {key!r}")
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{key} must be a tensor, got {type(value).__name__}")
            return value.detach().cpu().to(torch.float64).numpy()

        model.gmms = {
            name: DiagonalGMM(
                weights=array(f"{name}.weights"),
                means=array(f"{name}.means"),
                covariances=array(f"{name}.covariances"),
            )
            for name in _CLASSES
        }
        for name, gmm in model.gmms.items():
            if gmm.means.shape[1] != model.config.feature_dim:
                raise ValueError(
                    f"{name} GMM has {gmm.means.shape[1]} dims, the config's features "
                    f"{model.config.feature_dim}"
                )
        return model


class LFCCGMMScorer(WaveScorer):
    architecture = _ARCH
    model_class = LFCCGMM
