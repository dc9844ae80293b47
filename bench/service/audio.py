"""Real call audio for the service bench, cut into the chunks a client sends.

Stream ``k`` takes call ``k % n`` of ``../shared/calls`` (else ``examples/``), cut from just
before one of its turns, so that streams differ and speech starts after a short silence, as a
call's does. MIXED streams send the mono call; SPLIT streams send one party per channel: the
call's ``*_stereo.flac`` where it exists, else a stereo copy built from the call's own turn
list (``<call>.json``: party A's turns on the left channel, party B's on the right), which is
what a telephony platform that records each leg apart delivers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.audio import CHUNK_SECONDS, read_audio
from devstack import ROOT, SHARED
from server.windowing import SPEECH_FRAME_SECONDS, speech_seconds

SHARED_CALLS = SHARED / "calls"
EXAMPLES = ROOT / "examples"
# A stream's cut starts 0.2 to 1.2 s before a turn (spread over one hop by a golden-ratio
# sequence): the time to first verdict depends on where speech starts against the 1 s window
# grid, so a fixed lead-in would measure one lucky (or unlucky) phase only.
LEAD_IN_MIN_S = 0.2


@dataclass(frozen=True)
class StreamAudio:
    """One stream's audio, pre-cut into the chunks the client sends."""

    source: str
    offset_s: float
    sample_rate: int
    channels: int
    chunks: tuple[bytes, ...]
    chunk_ends: tuple[float, ...]  # seconds from stream start at which each chunk ends
    speech_chunk: int  # index of the first chunk with speech; -1 if none

    def completing_chunk(self, end_s: float) -> int:
        """Index of the first chunk whose end reaches ``end_s`` (the last chunk for a time
        past the end: the half-close that follows it completes what is left)."""
        i = int(np.searchsorted(self.chunk_ends, end_s - 1e-6))
        return min(i, len(self.chunks) - 1)


def cut(pcm: np.ndarray, rate: int, source: str, offset_s: float, seconds: float) -> StreamAudio:
    """``seconds`` of int16 ``(frames, channels)`` ``pcm`` from ``offset_s``, looped when the
    file is shorter, in ``CHUNK_SECONDS`` chunks."""
    need = int(seconds * rate)
    part = pcm[int(offset_s * rate):]
    if part.shape[0] < need:  # a short file: loop it rather than send less
        part = np.tile(pcm, (math.ceil(need / pcm.shape[0]) + 1, 1))
    part = part[:need]
    step = int(round(CHUNK_SECONDS * rate))
    chunks, ends, speech = [], [], -1
    for i, s in enumerate(range(0, part.shape[0], step)):
        block = part[s : s + step]
        chunks.append(block.astype("<i2").tobytes())
        ends.append((s + block.shape[0]) / rate)
        mono = block.astype(np.float32).mean(axis=1) / 32768
        if speech < 0 and speech_seconds(mono, rate) >= SPEECH_FRAME_SECONDS - 1e-9:
            speech = i
    return StreamAudio(source, offset_s, rate, int(part.shape[1]), tuple(chunks), tuple(ends),
                       speech)


def _turns(path: Path) -> list[dict[str, object]]:
    meta = path.with_suffix(".json")
    return list(json.loads(meta.read_text()).get("turns", [])) if meta.exists() else []


def stereo_from_turns(mono: np.ndarray, rate: int, turns: list[dict[str, object]]) -> np.ndarray:
    """Party A's turns on the left channel, party B's on the right, silence elsewhere; an
    overlap is heard on both channels (the mixture holds both voices there)."""
    out = np.zeros((mono.shape[0], 2), np.int16)
    for turn in turns:
        side = 0 if turn.get("party") == "A" else 1
        a, b = int(float(turn["start"]) * rate), int(float(turn["end"]) * rate)  # type: ignore[arg-type]
        out[a:b, side] = mono[a:b]
    return out


def lead_in(k: int) -> float:
    return LEAD_IN_MIN_S + (k * 0.6180339887) % 1.0


@dataclass(frozen=True)
class _Call:
    name: str
    mono: np.ndarray  # int16 (frames, 1)
    stereo: np.ndarray  # int16 (frames, 2), one party per channel
    stereo_source: str  # "file" or "turns"
    rate: int
    starts: tuple[float, ...]  # turn starts a stream may begin just before


class AudioPool:
    """Audio for any number of streams of either channel mode (see the module docstring)."""

    def __init__(self, seconds: float) -> None:
        files = sorted(p for p in SHARED_CALLS.glob("*.flac") if "stereo" not in p.name)
        if not files:
            files = sorted(p for p in EXAMPLES.glob("*.wav") if "stereo" not in p.name)
        if not files:
            raise FileNotFoundError(f"no call audio in {SHARED_CALLS} or {EXAMPLES}")
        self.seconds = seconds
        self.calls: list[_Call] = []
        for path in files:
            audio = read_audio(path)
            mono = (audio.pcm.mean(axis=1, keepdims=True).astype(np.int16) if audio.channels > 1
                    else audio.pcm)
            turns = _turns(path)
            pair = path.with_name(f"{path.stem}_stereo{path.suffix}")
            if pair.exists():
                stereo, how = read_audio(pair).pcm, "file"
            elif turns:
                stereo, how = stereo_from_turns(mono[:, 0], audio.sample_rate, turns), "turns"
            else:  # no turn list: both parties on both channels (still two lanes of work)
                stereo, how = np.repeat(mono, 2, axis=1), "duplicated"
            starts = [float(t["start"]) for t in turns]  # type: ignore[arg-type]
            fits = tuple(t for t in starts if t - LEAD_IN_MIN_S + seconds <= audio.seconds)
            self.calls.append(_Call(str(path.relative_to(ROOT.parent)), mono, stereo, how,
                                    audio.sample_rate, fits or (0.0,)))
        self._cache: dict[tuple[int, float, str], StreamAudio] = {}

    @property
    def sources(self) -> dict[str, str]:
        """Each call, with where its SPLIT (stereo) version comes from."""
        return {c.name: c.stereo_source for c in self.calls}

    def get(self, k: int, seconds: float, mode: str = "mixed") -> StreamAudio:
        """Stream ``k``'s first ``seconds`` (at most the pool's length), mono for ``mixed``,
        one party per channel for ``split``."""
        key = (k, min(seconds, self.seconds), mode)
        if key not in self._cache:
            call = self.calls[k % len(self.calls)]
            offset = max(0.0, call.starts[(k // len(self.calls)) % len(call.starts)] - lead_in(k))
            pcm = call.stereo if mode == "split" else call.mono
            self._cache[key] = cut(pcm, call.rate, call.name, offset, key[1])
        return self._cache[key]
