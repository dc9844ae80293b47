"""ASVspoof 2019 LA layout reader.

Works unchanged on the real ASVspoof 2019 LA download and on ``shared/corpus`` (same layout,
8 kHz)::

    ROOT/ASVspoof2019_LA_{train,dev,eval}/flac/UTT_ID.flac
    ROOT/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.{train.trn,dev.trl,eval.trl}.txt

Protocol lines are ``SPEAKER UTT_ID - SYSTEM_ID bonafide|spoof``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from models.data.audio import AudioError, load_audio, random_crop, repeat_pad
from models.errors import ModelError

Split = Literal["train", "dev", "eval"]
PROTOCOL_NAMES = {
    "train": "ASVspoof2019.LA.cm.train.trn.txt",
    "dev": "ASVspoof2019.LA.cm.dev.trl.txt",
    "eval": "ASVspoof2019.LA.cm.eval.trl.txt",
}
BONAFIDE = 1
SPOOF = 0


@dataclass(frozen=True)
class Trial:
    speaker: str
    utt_id: str
    system: str
    label: int  # 1 bona fide, 0 spoof

    @property
    def is_bonafide(self) -> bool:
        return self.label == BONAFIDE


class ProtocolError(ModelError, ValueError):
    pass


def read_protocol(path: str | Path) -> list[Trial]:
    """Parse a CM protocol. Eval protocols without keys (``SPEAKER UTT_ID``) are not
    accepted: every line must carry its key, and a malformed line names its number."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"protocol file not found: {path}")
    trials = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5 or parts[4] not in ("bonafide", "spoof"):
            raise ProtocolError(f"{path}:{number}: expected 'SPEAKER UTT_ID - SYSTEM KEY'")
        speaker, utt, _, system, key = parts
        trials.append(Trial(speaker, utt, system, BONAFIDE if key == "bonafide" else SPOOF))
    if not trials:
        raise ProtocolError(f"protocol {path} has no trials")
    return trials


def audio_path(audio_dir: str | Path, utt_id: str) -> Path:
    """``DIR/UTT_ID.flac``, else ``DIR/UTT_ID.wav``; a missing file is an error naming it."""
    audio_dir = Path(audio_dir)
    for ext in (".flac", ".wav"):
        candidate = audio_dir / f"{utt_id}{ext}"
        if candidate.is_file():
            return candidate
    raise AudioError(f"no audio for {utt_id} in {audio_dir} (looked for .flac and .wav)")


@dataclass(frozen=True)
class ASVspoofSplit:
    """One split of a corpus root: its protocol and its audio folder."""

    root: Path
    split: Split

    @property
    def protocol_path(self) -> Path:
        return self.root / "ASVspoof2019_LA_cm_protocols" / PROTOCOL_NAMES[self.split]

    @property
    def audio_dir(self) -> Path:
        return self.root / f"ASVspoof2019_LA_{self.split}" / "flac"

    def trials(self) -> list[Trial]:
        return read_protocol(self.protocol_path)


def leave_out(trials: Sequence[Trial], systems: Sequence[str]) -> list[Trial]:
    """``trials`` without the spoofs of ``systems`` (a leave-one-system-out training set)."""
    out = set(systems)
    return [t for t in trials if t.system not in out]


class TrialDataset(Dataset):
    """Waveforms of a list of trials at the model's rate, fitted to ``num_samples``.

    Training takes a random crop (plus augmentation); evaluation takes the first
    ``num_samples`` (repeat-padded), as the official recipes do. ``num_samples=None``
    returns whole utterances for variable-length scoring. ``audio_dir`` is one folder, or
    one folder per trial (corpus items mixed with vocoded ones).
    """

    def __init__(
        self,
        trials: Sequence[Trial],
        audio_dir: str | Path | Sequence[str | Path],
        sample_rate: int,
        num_samples: int | None,
        train: bool = False,
        augment: object | None = None,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.trials = list(trials)
        if isinstance(audio_dir, str | Path):
            self.audio_dirs = [Path(audio_dir)] * len(self.trials)
        else:
            self.audio_dirs = [Path(d) for d in audio_dir]
            if len(self.audio_dirs) != len(self.trials):
                raise ValueError("one audio folder per trial, or one for all")
        self.sample_rate = sample_rate
        self.num_samples = num_samples
        self.train = train
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.trials)

    def waveform(self, index: int) -> np.ndarray:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        trial = self.trials[index]
        wave = load_audio(audio_path(self.audio_dirs[index], trial.utt_id), self.sample_rate)
        if self._cache is not None:
            self._cache[index] = wave
        return wave

    def preload(self) -> TrialDataset:
        """Decode every file once, before DataLoader workers fork and share the cache."""
        for index in range(len(self)):
            self.waveform(index)
        return self

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        wave = self.waveform(index)
        if self.train:
            # Seeded per (seed, epoch, item): reproducible whatever the worker layout.
            rng = np.random.default_rng((self.seed, self.epoch, index))
            if self.num_samples is not None:
                wave = random_crop(wave, self.num_samples, rng)
            if self.augment is not None:
                wave = self.augment(wave, rng)
        elif self.num_samples is not None:
            wave = repeat_pad(wave, self.num_samples)
        return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), self.trials[
            index
        ].label
