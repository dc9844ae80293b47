"""``python -m models train-vocoder CONFIG``: train a vocoder on the training bona fide.

Why here and not downloaded: the detector must see vocoder families other than HiFi-GAN,
and no registry ships 8 kHz Vocos/NSF/LPCNet-style weights. Trained on the corpus' own
train bona fide (and the Speech Commands train part), the vocoder sees nothing the detector
will be judged on: the config's sources are refused when they name a dev or eval split.

Resumable and exact: ``RUN_DIR/last.pt`` holds the step, the generator and discriminator
weights, both optimisers and the RNG state, written every ``checkpoint_every`` steps. Each
step draws its batch from an RNG seeded by ``(seed, step)`` and the learning rate is a
function of the step and the config's ``steps``, so a run stopped and resumed gives the same
weights as one never stopped (on the same machine and thread count). One thread by
default: the vocoder trains in the background beside other work.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import yaml

from models.config_dict import dataclass_from_dict
from models.data.asvspoof import audio_path, read_protocol
from models.data.audio import AudioError
from models.tasks.config import repo_path
from models.vocoders.base import (
    Generator,
    MelParams,
    VocoderConfigError,
    build_generator,
    generator_class,
    save_generator,
)
from models.vocoders.losses import (
    PERIODS,
    STFT_RESOLUTIONS,
    Discriminators,
    discriminator_loss,
    generator_losses,
    multi_resolution_stft_loss,
)

HELD_OUT = re.compile(r"(^|[._-])(dev|eval|test)([._-]|$)", re.IGNORECASE)


@dataclass
class VocoderData:
    # Each entry {protocol: PATH, audio_dir: PATH} (repo-relative); only bona fide lines.
    sources: list[dict[str, str]] = field(default_factory=list)
    segment_seconds: float = 0.64
    # Random level per segment (dB, after peak-normalising each utterance to 0.95, as the
    # vocode path does before analysis): the vocoder must not depend on one input level.
    gain_db: tuple[float, float] = (-9.0, 0.0)
    limit: int | None = None  # first N bona fide items of each source (tests, smoke runs)


@dataclass
class VocoderOptim:
    steps: int = 6000
    batch_size: int = 8
    lr: float = 2e-4
    final_lr_fraction: float = 0.1  # cosine decay to lr * this at ``steps``
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 200
    log_every: int = 50


@dataclass
class VocoderLoss:
    mel: float = 15.0
    stft: float = 1.0
    # The GAN: 0 turns it off (reconstruction losses only). It starts at ``gan_start``, once
    # the reconstruction losses have shaped the spectrum, as in many GAN vocoder recipes.
    gan: float = 1.0
    feature_matching: float = 2.0
    gan_start: int = 0
    # Which discriminator families: "period" (HiFi-GAN's multi-period, on the waveform)
    # and "resolution" (UnivNet's multi-resolution, on spectrograms). The latter costs about
    # twice the former on a CPU; a CPU run may keep only "period" and let the
    # multi-resolution STFT loss hold the spectrum.
    discriminators: list[str] = field(default_factory=lambda: ["period", "resolution"])


@dataclass
class VocoderTrainConfig:
    name: str
    model: dict[str, Any]
    data: VocoderData = field(default_factory=VocoderData)
    optim: VocoderOptim = field(default_factory=VocoderOptim)
    loss: VocoderLoss = field(default_factory=VocoderLoss)
    architecture: str = "vocos"
    output: str | None = None  # exported generator, repo-relative
    purpose: str = ""  # one line for the card: what the vocoder is for

    @classmethod
    def load(cls, path: str | Path) -> VocoderTrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocoder config not found: {path}")
        return cls.from_dict(yaml.safe_load(path.read_text()) or {})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VocoderTrainConfig:
        raw = dict(raw)
        parts: dict[str, Any] = {}
        for key, kind in (("data", VocoderData), ("optim", VocoderOptim),
                          ("loss", VocoderLoss)):
            parts[key] = dataclass_from_dict(kind, raw.pop(key, None) or {},
                                             f"vocoder config {key}", VocoderConfigError)
        config = dataclass_from_dict(cls, raw | parts, "vocoder config", VocoderConfigError)
        # Dispatch through the registry: an unknown architecture or a bad model section
        # is refused here, before any audio is read.
        generator_class(config.architecture).params_class.from_dict(config.model)
        if not config.data.sources:
            raise VocoderConfigError("data.sources is empty: name the training bona fide")
        for source in config.data.sources:
            if set(source) != {"protocol", "audio_dir"}:
                raise VocoderConfigError(f"each data.sources entry needs exactly protocol and "
                                         f"audio_dir: {source}")
            _refuse_held_out(source)
        if config.optim.steps <= 0 or config.optim.batch_size <= 0:
            raise VocoderConfigError("optim.steps and optim.batch_size must be positive")
        if config.loss.gan > 0 and (not config.loss.discriminators or not set(
                config.loss.discriminators) <= {"period", "resolution"}):
            raise VocoderConfigError(f"loss.discriminators {config.loss.discriminators}: "
                                     "name one or both of 'period' and 'resolution'")
        if config.optim.checkpoint_every <= 0:
            raise VocoderConfigError("optim.checkpoint_every must be positive")
        return config

    @property
    def params(self) -> MelParams:
        """The model section as its architecture's params."""
        return generator_class(self.architecture).params_class.from_dict(self.model)

    @property
    def segment(self) -> int:
        hop = self.params.hop
        return max(1, round(self.data.segment_seconds * self.params.sample_rate / hop)) * hop


def _refuse_held_out(source: dict[str, str]) -> None:
    """Dev and eval material never trains a vocoder whose output the detector learns from."""
    # The protocol's file name and the audio folder's last two parts name the split
    # (ASVspoof2019_LA_dev/flac); the folders above them are wherever the data lives.
    names = [Path(source["protocol"]).name, *Path(source["audio_dir"]).parts[-2:]]
    for name in names:
        if HELD_OUT.search(name) or name.lower().endswith((".trl.txt",)):
            raise VocoderConfigError(
                f"data source {source} names a held-out split ({name!r}): vocoders train on "
                "train bona fide only")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Corpus:
    """Every training utterance in memory (peak-normalised to 0.95), with its origin."""

    waves: list[np.ndarray]
    counts: dict[str, int]  # items per protocol

    @property
    def seconds(self) -> float:
        return sum(len(w) for w in self.waves) / 8000.0


def load_corpus(config: VocoderTrainConfig) -> Corpus:
    """The bona fide lines of every source, each utterance peak-normalised. Audio at
    another rate than the model's is refused (not resampled): a resampled copy would teach
    the vocoder a band it never sees at 8 kHz. Silent or empty files are skipped."""
    rate = config.params.sample_rate
    waves: list[np.ndarray] = []
    counts: dict[str, int] = {}
    for source in config.data.sources:
        protocol = repo_path(source["protocol"])
        trials = [t for t in read_protocol(protocol) if t.is_bonafide]
        if config.data.limit is not None:
            trials = trials[: config.data.limit]
        audio_dir = repo_path(source["audio_dir"])
        paths = [audio_path(audio_dir, t.utt_id) for t in trials]  # fail before loading
        used = 0
        for path in paths:
            try:
                data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, OSError) as exc:
                raise AudioError(f"cannot read audio {path}: {exc}") from exc
            if file_rate != rate:
                raise VocoderConfigError(
                    f"{path} is {file_rate} Hz but the vocoder trains at {rate} Hz: train "
                    "on the corpus' own audio, not a resampled copy")
            wave = data.mean(axis=1)
            peak = float(np.abs(wave).max()) if wave.size else 0.0
            if peak > 0:
                waves.append((wave * (0.95 / peak)).astype(np.float32))
                used += 1
        counts[str(source["protocol"])] = used
    if not waves:
        raise VocoderConfigError("the configured sources hold no bona fide audio")
    return Corpus(waves, counts)


def draw_batch(corpus: Corpus, config: VocoderTrainConfig, step: int) -> torch.Tensor:
    """The batch of ``step``: a function of the seed and the step only (exact resume).
    Utterances are drawn in proportion to their length; shorter ones are zero-padded."""
    rng = np.random.default_rng([config.optim.seed, step])
    lengths = np.array([max(len(w), 1) for w in corpus.waves], dtype=np.float64)
    picks = rng.choice(len(corpus.waves), size=config.optim.batch_size, p=lengths / lengths.sum())
    seg = config.segment
    low, high = config.data.gain_db
    batch = np.zeros((config.optim.batch_size, seg), dtype=np.float32)
    for row, index in enumerate(picks):
        wave = corpus.waves[index]
        start = int(rng.integers(0, len(wave) - seg + 1)) if len(wave) > seg else 0
        piece = wave[start : start + seg]
        batch[row, : len(piece)] = piece * (10.0 ** (rng.uniform(low, high) / 20.0))
    return torch.from_numpy(batch)


# --------------------------------------------------------------------------- training


Outputs = list[tuple[torch.Tensor, list[torch.Tensor]]]


def _part(outputs: Outputs, rows: slice) -> Outputs:
    """The rows ``rows`` of every discriminator's score and features."""
    return [(score[rows], [f[rows] for f in features]) for score, features in outputs]


def learning_rate(config: VocoderTrainConfig, step: int) -> float:
    progress = min(step / config.optim.steps, 1.0)
    floor = config.optim.final_lr_fraction
    return config.optim.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Trainer:
    config: VocoderTrainConfig
    generator: Generator
    discriminators: Discriminators | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    step: int = 0

    @classmethod
    def create(cls, config: VocoderTrainConfig) -> Trainer:
        torch.manual_seed(config.optim.seed)
        generator = build_generator(config.architecture, config.model)
        kinds = config.loss.discriminators
        discriminators = (Discriminators(
            periods=PERIODS if "period" in kinds else (),
            resolutions=STFT_RESOLUTIONS if "resolution" in kinds else ())
            if config.loss.gan > 0 else None)
        betas = (0.8, 0.99)  # HiFi-GAN/Vocos
        opt_g = torch.optim.AdamW(generator.parameters(), lr=config.optim.lr, betas=betas)
        opt_d = (torch.optim.AdamW(discriminators.parameters(), lr=config.optim.lr, betas=betas)
                 if discriminators is not None else None)
        return cls(config, generator, discriminators, opt_g, opt_d)

    def train_step(self, real: torch.Tensor) -> dict[str, float]:
        loss_cfg = self.config.loss
        lr = learning_rate(self.config, self.step)
        for opt in (self.opt_g, self.opt_d):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr
        gan_on = self.discriminators is not None and self.step >= loss_cfg.gan_start
        fake = self.generator(real)
        record: dict[str, float] = {}
        if gan_on:
            assert self.discriminators is not None and self.opt_d is not None
            # Real and fake in one pass (half the calls; what dominates a step on a CPU).
            both = self.discriminators(torch.cat([real, fake.detach()]))
            n = real.shape[0]
            d_loss = discriminator_loss(_part(both, slice(None, n)), _part(both, slice(n, None)))
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            record["disc"] = float(d_loss.detach())
        mel = torch.nn.functional.l1_loss(self.generator.mel(fake), self.generator.mel(real))
        stft = multi_resolution_stft_loss(fake, real)
        g_loss = loss_cfg.mel * mel + loss_cfg.stft * stft
        if gan_on:
            assert self.discriminators is not None
            with torch.no_grad():  # the real side is a fixed target for the generator
                real_out = self.discriminators(real)
            adversarial, matching = generator_losses(real_out, self.discriminators(fake))
            g_loss = g_loss + loss_cfg.gan * adversarial + loss_cfg.feature_matching * matching
            record.update(adv=float(adversarial.detach()), fm=float(matching.detach()))
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 100.0)
        self.opt_g.step()
        self.step += 1
        record.update(mel=float(mel.detach()), stft=float(stft.detach()), lr=lr)
        return record

    # ----------------------------------------------------------------- checkpoints

    def save(self, path: Path) -> None:
        state = {
            "step": self.step,
            "config": asdict(self.config),
            "generator": self.generator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "discriminators": (self.discriminators.state_dict()
                               if self.discriminators is not None else None),
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "torch_rng": torch.get_rng_state(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = VocoderTrainConfig.from_dict(state["config"])
        if saved.model != self.config.model or asdict(saved.loss) != asdict(self.config.loss):
            raise VocoderConfigError(
                f"{path} was trained with another model or loss config; use a new --run-dir")
        self.generator.load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.discriminators is not None:
            self.discriminators.load_state_dict(state["discriminators"])
            assert self.opt_d is not None
            self.opt_d.load_state_dict(state["opt_d"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])


def train_vocoder(
    config: VocoderTrainConfig,
    run_dir: str | Path,
    stop_at: int | None = None,
    threads: int | None = None,
    output: str | Path | None = None,
    export_only: bool = False,
    log: Any = None,
) -> Path:
    """Train (or resume) up to ``stop_at`` (default: the config's steps; the schedule always
    spans the config's steps). Once the config's steps are done, or with ``export_only``,
    the generator is exported to ``output`` with its card. Returns the exported file, or
    the run's ``last.pt`` when stopped early."""
    log = log or sys.stderr
    torch.set_num_threads(threads or config.optim.threads)
    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    trainer = Trainer.create(config)
    if last.is_file():
        trainer.load(last)
    elif export_only:
        raise FileNotFoundError(f"nothing to export: no checkpoint {last}")
    corpus = load_corpus(config)
    target = output or config.output
    if target is None:
        raise VocoderConfigError("no output path: set `output` in the config or --output")
    if not export_only:
        stop = min(stop_at or config.optim.steps, config.optim.steps)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
        trainer.generator.train()
        started, first = time.monotonic(), trainer.step
        print(json.dumps({"event": "resume" if first else "start", "step": first,
                          "stop_at": stop, "steps": config.optim.steps,
                          "items": len(corpus.waves), "seconds": round(corpus.seconds, 1),
                          "run_dir": str(run_dir)}), file=log, flush=True)
        while trainer.step < stop:
            record = trainer.train_step(draw_batch(corpus, config, trainer.step))
            if not all(math.isfinite(v) for v in record.values()):
                raise FloatingPointError(f"step {trainer.step}: non-finite loss {record}")
            if trainer.step % config.optim.checkpoint_every == 0 or trainer.step == stop:
                trainer.save(last)
            if trainer.step % config.optim.log_every == 0 or trainer.step == stop:
                rate = (trainer.step - first) / max(time.monotonic() - started, 1e-9)
                print(json.dumps({"step": trainer.step, "steps_per_s": round(rate, 4),
                                  **{k: round(v, 5) for k, v in record.items()}}),
                      file=log, flush=True)
        if trainer.step < config.optim.steps:
            return last
    card = {
        "name": config.name,
        "architecture": trainer.generator.summary,
        "params": asdict(config.params),
        "parameters": sum(p.numel() for p in trainer.generator.parameters()),
        "steps": trainer.step,
        "planned_steps": config.optim.steps,
        "batch": f"{config.optim.batch_size} x {config.segment} samples",
        "losses": _loss_text(config.loss, trainer.step),
        "data": {name: f"{n} bona fide items" for name, n in corpus.counts.items()},
        "data_seconds": round(corpus.seconds, 1),
        "seed": config.optim.seed,
        "purpose": config.purpose,
    }
    exported = save_generator(trainer.generator.eval(), repo_path(target), card)
    exported.with_name(f"{exported.stem.upper()}_CARD.md").write_text(render_card(card))
    return exported


def _loss_text(loss: VocoderLoss, steps: int) -> str:
    text = f"{loss.mel:g} x log-mel L1 + {loss.stft:g} x multi-resolution STFT"
    if loss.gan > 0 and steps > loss.gan_start:
        families = " + ".join({"period": "multi-period 2/3/5/7/11",
                               "resolution": "multi-resolution"}[k]
                              for k in loss.discriminators)
        text += (f"; from step {loss.gan_start}: {loss.gan:g} x LSGAN ({families} "
                 f"discriminators) + {loss.feature_matching:g} x feature matching")
    else:
        text += " (no GAN)"
    return text


def render_card(card: dict[str, Any]) -> str:
    lines = [f"# Vocoder `{card['name']}`", "", card.get("purpose") or "", ""]
    for key in ("architecture", "params", "parameters", "steps", "planned_steps", "batch",
                "losses", "data", "data_seconds", "seed"):
        lines.append(f"- {key}: {card[key]}")
    lines += ["", "Trained by `python -m models train-vocoder` (resumable); generated file."]
    return "\n".join(lines) + "\n"
