"""What every vocoder family trained here shares: the mel analysis, the checkpoint files.

Why one place: the families differ in how they turn mel frames into samples, not in what
they hear. Each one's generator owns the same log-mel front end (``n_mels`` Slaney bands
0-4 kHz, ``n_fft``/``hop`` at 8 kHz, natural log clamped at 1e-5), so a checkpoint carries
the exact analysis it was trained with, the log-mel loss compares like with like across
families, and one loader reads any family's file, telling them apart by the architecture
named in it (``models.vocoders.ARCHITECTURES``).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn

from models.config_dict import dataclass_from_dict
from models.errors import ModelError
from models.vocoders import ARCHITECTURES


class VocoderConfigError(ModelError, ValueError):
    """A vocoder's hyper-parameters that cannot work (named in the message)."""


class VocoderNotFoundError(ModelError, FileNotFoundError):
    """A trained vocoder's checkpoint is not there; the message says how to train it."""


@dataclass(frozen=True)
class MelParams:
    """The mel analysis every family is conditioned on; each family's params class adds
    its own fields. Stored in every checkpoint."""

    sample_rate: int = 8000
    n_fft: int = 320
    hop: int = 80
    n_mels: int = 64

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

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        return dataclass_from_dict(cls, raw, "vocoder model", VocoderConfigError)


class MelFrontEnd(nn.Module):
    """Log-mel analysis with centred frames: ``len // hop + 1`` frames for ``len`` samples."""

    def __init__(self, params: MelParams) -> None:
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


class Generator(nn.Module):
    """A family's generator: copy-synthesis of ``(batch, samples)`` (a multiple of ``hop``)
    to the same shape, through its own ``mel`` front end."""

    architecture: ClassVar[str]  # its key in ARCHITECTURES, written into exported files
    params_class: ClassVar[type[MelParams]]
    summary: ClassVar[str]  # one line for the card

    def __init__(self, params: MelParams) -> None:
        super().__init__()
        self.params = params
        self.mel = MelFrontEnd(params)

    @property
    def sample_rate(self) -> int:
        return self.params.sample_rate


def init_weights(module: nn.Module) -> None:
    """Small truncated-normal weights, zero biases (Vocos' init; the NSF filter uses it too)."""
    if isinstance(module, nn.Conv1d | nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def generator_class(architecture: str) -> type[Generator]:
    """The generator of an ``architecture`` named in a config or a checkpoint."""
    if architecture not in ARCHITECTURES:
        raise VocoderConfigError(f"architecture {architecture!r}: not one of "
                                 f"{', '.join(ARCHITECTURES)}")
    module, _, name = ARCHITECTURES[architecture].partition(":")
    cls: type[Generator] = getattr(importlib.import_module(module), name)
    return cls


def build_generator(architecture: str, model: dict[str, Any]) -> Generator:
    """A new generator of ``architecture`` from a config's ``model`` section (validated)."""
    cls = generator_class(architecture)
    return cls(cls.params_class.from_dict(model))


def save_generator(generator: Generator, path: str | Path, card: dict[str, Any]) -> Path:
    """The small shipped file: architecture, hyper-parameters, weights, and the facts of
    its training."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in generator.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"kind": generator.architecture, "params": asdict(generator.params),
                "state": state, "card": card}, tmp)
    tmp.replace(path)
    return path


def load_generator(path: str | Path, hint: str = "") -> tuple[Generator, dict[str, Any]]:
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
        # A training checkpoint: its config's architecture and model section, its step.
        config = raw["config"]
        architecture, params, state = (config.get("architecture", "vocos"),
                                       config.get("model", {}), raw["generator"])
        card: dict[str, Any] = {"name": config.get("name", path.stem),
                                "steps": int(raw["step"]), "training_checkpoint": str(path)}
    elif isinstance(raw, dict) and raw.get("kind") in ARCHITECTURES:
        architecture, params, state = raw["kind"], raw["params"], raw["state"]
        card = dict(raw.get("card") or {})
    else:
        raise VocoderConfigError(f"{path} is not a vocoder checkpoint written by train-vocoder")
    generator = build_generator(architecture, params)
    generator.load_state_dict(state)
    generator.eval()
    return generator, card
