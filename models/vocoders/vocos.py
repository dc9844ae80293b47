"""A Vocos-style vocoder at telephone rate: log-mel in, STFT magnitude and phase out, iSTFT.

Why this family: HiFi-GAN (the V01/V02 copy-synthesis systems) upsamples with transposed
convolutions in the time domain, which leaves its own periodic artefacts. A Vocos generator
(Siuzdenko 2023; iSTFTNet is the same idea with a shorter upsampler) never works on samples:
a ConvNeXt stack runs at the frame rate and a linear head predicts, per frame, the log
magnitude and the phase of every STFT bin, which an inverse STFT turns into a waveform. Its
traces are those of spectral-domain phase prediction (smeared transients, phase
inconsistency between overlapping frames), not of an upsampler, so a detector that saw both
families learns more than one vocoder's fingerprint.

Everything runs at the corpus' 8 kHz: the mel analysis (``n_mels`` Slaney bands 0-4 kHz,
``n_fft``/``hop`` at 8 kHz, natural log clamped at 1e-5) is part of the model, so a
checkpoint carries the exact front end it was trained with and cannot be fed another one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.config_dict import dataclass_from_dict
from models.errors import ModelError


class VocoderConfigError(ModelError, ValueError):
    """A vocoder's hyper-parameters that cannot work (named in the message)."""


@dataclass(frozen=True)
class VocosParams:
    """Hyper-parameters of the generator; stored in every checkpoint."""

    sample_rate: int = 8000
    n_fft: int = 320
    hop: int = 80
    n_mels: int = 64
    dim: int = 128
    intermediate: int = 384
    layers: int = 8

    def __post_init__(self) -> None:
        if self.sample_rate != 8000:
            raise VocoderConfigError(
                f"sample_rate {self.sample_rate}: the vocoders trained here work at the "
                "corpus' 8 kHz (its audio is 8 kHz telephone band; another rate would train on "
                "resampled audio with nothing above 4 kHz)")
        if self.hop <= 0 or self.n_fft < self.hop or self.n_fft % 2:
            raise VocoderConfigError(
                f"n_fft {self.n_fft} / hop {self.hop}: need an even n_fft >= hop > 0")
        if not (0 < self.n_mels <= self.n_fft // 2 + 1):
            raise VocoderConfigError(f"n_mels {self.n_mels} must be in 1..{self.n_fft // 2 + 1}")
        if min(self.dim, self.intermediate, self.layers) <= 0:
            raise VocoderConfigError("dim, intermediate and layers must be positive")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VocosParams:
        return dataclass_from_dict(cls, raw, "vocoder model", VocoderConfigError)


class MelFrontEnd(nn.Module):
    """Log-mel analysis with centred frames: ``len // hop + 1`` frames for ``len`` samples."""

    def __init__(self, params: VocosParams) -> None:
        super().__init__()
        import torchaudio

        self.n_fft, self.hop = params.n_fft, params.hop
        fbank = torchaudio.functional.melscale_fbanks(
            n_freqs=params.n_fft // 2 + 1, f_min=0.0, f_max=params.sample_rate / 2,
            n_mels=params.n_mels, sample_rate=params.sample_rate, norm="slaney",
            mel_scale="slaney")
        self.register_buffer("fbank", fbank.T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(params.n_fft), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(batch, samples)`` -> ``(batch, n_mels, frames)``."""
        spec = torch.stft(wave, self.n_fft, self.hop, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        return torch.log(torch.clamp(self.fbank @ spec.abs(), min=1e-5))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7-tap conv, LayerNorm, inverted bottleneck, layer scale, residual."""

    def __init__(self, dim: int, intermediate: int, scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1 = nn.Linear(dim, intermediate)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(intermediate, dim)
        self.gamma = nn.Parameter(torch.full((dim,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)
        y = self.pw2(self.act(self.pw1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


class VocosGenerator(nn.Module):
    """Mel frames -> per-frame STFT (log magnitude, phase) -> inverse STFT."""

    def __init__(self, params: VocosParams) -> None:
        super().__init__()
        self.params = params
        self.mel = MelFrontEnd(params)
        self.embed = nn.Conv1d(params.n_mels, params.dim, 7, padding=3)
        self.norm = nn.LayerNorm(params.dim, eps=1e-6)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(params.dim, params.intermediate, 1.0 / params.layers)
            for _ in range(params.layers))
        self.final_norm = nn.LayerNorm(params.dim, eps=1e-6)
        self.head = nn.Linear(params.dim, params.n_fft + 2)
        self.register_buffer("window", torch.hann_window(params.n_fft), persistent=False)
        self.apply(_init)

    @property
    def sample_rate(self) -> int:
        return self.params.sample_rate

    def synthesize(self, mel: torch.Tensor) -> torch.Tensor:
        """``(batch, n_mels, frames)`` -> ``(batch, (frames - 1) * hop)``."""
        x = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        x = self.head(self.final_norm(x.transpose(1, 2))).transpose(1, 2)
        log_mag, phase = x.chunk(2, dim=1)
        # exp() of an untrained head can overflow; Vocos clips the magnitude the same way.
        mag = torch.clamp(torch.exp(log_mag), max=1e2)
        spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
        return torch.istft(spec, self.params.n_fft, self.params.hop, window=self.window,
                           center=True)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Copy-synthesis of ``(batch, samples)``, ``samples`` a multiple of ``hop``: same
        shape out."""
        return self.synthesize(self.mel(wave))


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv1d | nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class VocoderNotFoundError(ModelError, FileNotFoundError):
    """A trained vocoder's checkpoint is not there; the message says how to train it."""


def save_generator(generator: VocosGenerator, path: str | Path, card: dict[str, Any]) -> Path:
    """The small shipped file: hyper-parameters, weights, and the facts of its training."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in generator.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"kind": "vocos", "params": asdict(generator.params), "state": state,
                "card": card}, tmp)
    tmp.replace(path)
    return path


def load_generator(path: str | Path, hint: str = "") -> tuple[VocosGenerator, dict[str, Any]]:
    """A generator in eval mode and its card, from any of the three files a run leaves:
    the exported generator (``output`` of the config), a training checkpoint
    (``RUN_DIR/last.pt``), or the run folder itself (its ``last.pt``), so that a run still in
    progress can already be listened to. A missing file says how to make it."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise VocoderNotFoundError(f"vocoder checkpoint not found: {path}" +
                                   (f" (train it with `{hint}`)" if hint else ""))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and size errors alike
        raise VocoderConfigError(f"{path} is not a readable vocoder checkpoint: {exc}") from exc
    if isinstance(raw, dict) and "generator" in raw and "config" in raw and "step" in raw:
        # A training checkpoint: its config's model section, its step in the card.
        params, state = raw["config"].get("model", {}), raw["generator"]
        card: dict[str, Any] = {"name": raw["config"].get("name", path.stem),
                                "steps": int(raw["step"]), "training_checkpoint": str(path)}
    elif isinstance(raw, dict) and raw.get("kind") == "vocos":
        params, state, card = raw["params"], raw["state"], dict(raw.get("card") or {})
    else:
        raise VocoderConfigError(f"{path} is not a vocoder checkpoint written by train-vocoder")
    generator = VocosGenerator(VocosParams.from_dict(params))
    generator.load_state_dict(state)
    generator.eval()
    return generator, card
