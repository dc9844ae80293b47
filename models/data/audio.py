"""The project's one audio module: G.711 codecs, decoding files and bytes, downmixing and
resampling, fitting waveforms to a model's input length.

Why here: the server, the training data, diarization and the tests all need the same codec
and the same resampler, and they must agree bit for bit (a model trained on G.711 audio
companded by one codec is served audio decoded by the same tables). ``models/data/audio.py``
was already where every one of them read audio files; it imports only numpy, soundfile and
soxr (no torch, nothing of training), and the server already depends on ``models`` to score,
so it adds no dependency to any of them. Training-only channel simulation stays in
``models.data.augment``. What belongs to the gRPC API (encodings as protobuf enums, size and
duration limits, error messages for clients) stays in ``server/audio.py``.

Waveforms are float32 in [-1, 1]; 16-bit PCM maps to it by a division by 32768, exact in
float32, so decode -> encode round trips are lossless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from models.errors import ModelError

__all__ = [
    "SAMPLE_BYTES",
    "AudioError",
    "StreamResampler",
    "alaw_decode",
    "alaw_encode",
    "downmix",
    "g711_round_trip",
    "load_audio",
    "mulaw_decode",
    "mulaw_encode",
    "pcm_decode",
    "random_crop",
    "repeat_pad",
    "resample",
]


class AudioError(ModelError, ValueError):
    """Audio that cannot be used, with the item named in the message."""


# --------------------------------------------------------------------------- files


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read a WAV or FLAC file as mono float32 in [-1, 1] at ``sample_rate``.

    Any input rate is accepted and resampled (soxr HQ): operators bring 8 kHz telephone
    audio and 16 kHz studio corpora to the same models.
    """
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"cannot read audio {path}: {exc}") from exc
    wave = downmix(data)
    if wave.size == 0:
        raise AudioError(f"audio {path} is empty")
    return resample(wave, rate, sample_rate)


# --------------------------------------------------------------------------- downmix, resample


def downmix(frames: np.ndarray) -> np.ndarray:
    """``(frames, channels)`` float32 -> mono ``(frames,)``: the mean of the channels (a
    stereo call mixes both parties at equal level, as a mono line would)."""
    return frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]


def resample(wave: np.ndarray, rate_in: int, rate_out: int, quality: str = "HQ") -> np.ndarray:
    """A whole waveform to another rate (soxr, HQ unless told), float32. Equal rates return
    the input as float32 (soxr would return it unchanged too)."""
    if rate_in == rate_out:
        return np.ascontiguousarray(wave, dtype=np.float32)
    return soxr.resample(wave, rate_in, rate_out, quality=quality).astype(np.float32, copy=False)


class StreamResampler:
    """Blocks ``(frames, channels)`` at one rate -> one float32 waveform per output at another,
    downmixed to one output unless ``split`` (one per channel).

    Streaming: soxr keeps its filter state between blocks, so block boundaries leave no
    clicks and a stream is never held whole at its source rate. Used by the server for every
    chunk and every Detect recording, and by streaming diarization, so both hear the same
    samples.
    """

    def __init__(
        self, rate_in: int, rate_out: int, channels: int = 1, split: bool = False
    ) -> None:
        self.channels, self.split = channels, split
        self.outputs = channels if split else 1
        self._resamplers = [
            soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality="HQ")
            if rate_in != rate_out else None
            for _ in range(self.outputs)
        ]

    def push(self, block: np.ndarray, last: bool = False) -> list[np.ndarray]:
        """Resample the next block (``last``: and flush the filters' tail)."""
        mono = block if self.split else block.mean(axis=1, keepdims=True, dtype=np.float32)
        out = []
        for ch, resampler in enumerate(self._resamplers):
            x = np.ascontiguousarray(mono[:, ch], dtype=np.float32)
            out.append(x if resampler is None else resampler.resample_chunk(x, last=last))
        return out

    def flush(self) -> list[np.ndarray]:
        """The filters' tail, at the end of the stream."""
        return self.push(np.zeros((0, self.channels), np.float32), last=True)


# --------------------------------------------------------------------------- model input length


def repeat_pad(wave: np.ndarray, length: int) -> np.ndarray:
    """Tile a short waveform up to ``length`` and cut a long one, as the official
    ASVspoof baselines do (``pad`` in their data_utils), rather than zero-padding, which
    would teach the model that silence is a class cue."""
    if wave.shape[0] == 0:
        raise ValueError("cannot pad an empty waveform")
    if wave.shape[0] >= length:
        return wave[:length]
    reps = int(np.ceil(length / wave.shape[0]))
    return np.tile(wave, reps)[:length]


def random_crop(wave: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``length`` excerpt (training); repeat-padded when the input is shorter."""
    if wave.shape[0] <= length:
        return repeat_pad(wave, length)
    start = int(rng.integers(0, wave.shape[0] - length + 1))
    return wave[start : start + length]


# --------------------------------------------------------------------------- G.711
# Bit-exact to the ITU-T G.711 reference (Sun g711.c, as in audioop, gone in Python 3.13).

_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], np.int32)


def _ulaw_encode_formula(pcm16: np.ndarray) -> np.ndarray:
    """G.711 mu-law encoder on the 14-bit magnitude, as the Sun reference (and audioop)."""
    pcm = pcm16.astype(np.int32) >> 2
    neg = pcm < 0
    mask = np.where(neg, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), 8159) + 0x21  # clip, then add the 0x84 bias >> 2
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left")
    code = (seg << 4) | ((mag >> np.minimum(seg + 1, 8)) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _ulaw_decode_formula(codes: np.ndarray) -> np.ndarray:
    u = ~codes.astype(np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_encode_formula(pcm16: np.ndarray) -> np.ndarray:
    """G.711 A-law encoder on the 13-bit value, as the Sun reference (and audioop)."""
    pcm = pcm16.astype(np.int32) >> 3
    pos = pcm >= 0
    mask = np.where(pos, 0xD5, 0x55)
    mag = np.where(pos, pcm, -pcm - 1)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")
    quant = np.where(seg < 2, mag >> 1, mag >> np.clip(seg, 2, 8)) & 0xF
    code = np.where(seg >= 8, 0x7F, (seg << 4) | quant)
    return (code ^ mask).astype(np.uint8)


def _alaw_decode_formula(codes: np.ndarray) -> np.ndarray:
    a = codes.astype(np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = ((a & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
    t = t << np.maximum(seg - 1, 0)
    return np.where(a & 0x80, t, -t).astype(np.int16)


# Tables indexed by the int16 bit pattern / the code byte: one gather per sample is several
# times faster than the branchy formula, and the server decodes every 20 ms packet.
_ALL_PCM = np.arange(65536, dtype=np.uint16).view(np.int16)
_ALL_CODES = np.arange(256, dtype=np.uint8)
_ULAW_ENC = _ulaw_encode_formula(_ALL_PCM)
_ULAW_DEC = _ulaw_decode_formula(_ALL_CODES)
_ALAW_ENC = _alaw_encode_formula(_ALL_PCM)
_ALAW_DEC = _alaw_decode_formula(_ALL_CODES)
for _table in (_ULAW_ENC, _ULAW_DEC, _ALAW_ENC, _ALAW_DEC):
    _table.flags.writeable = False

Buffer = np.ndarray | bytes | bytearray | memoryview


def _as_pcm16(pcm: Buffer) -> np.ndarray:
    if isinstance(pcm, bytes | bytearray | memoryview):
        return np.frombuffer(pcm, dtype="<i2")
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16:
        raise TypeError(f"G.711 encoders take int16 PCM, got {pcm.dtype}")
    return pcm


def _as_codes(codes: Buffer) -> np.ndarray:
    if isinstance(codes, bytes | bytearray | memoryview):
        return np.frombuffer(codes, dtype=np.uint8)
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"G.711 decoders take uint8 codes, got {codes.dtype}")
    return codes


def mulaw_encode(pcm: Buffer) -> np.ndarray:
    """int16 PCM (array, or little-endian bytes) -> uint8 mu-law codes, same shape."""
    return _ULAW_ENC[_as_pcm16(pcm).view(np.uint16)]


def mulaw_decode(codes: Buffer) -> np.ndarray:
    """uint8 mu-law codes (array or bytes) -> int16 PCM, same shape."""
    return _ULAW_DEC[_as_codes(codes)]


def alaw_encode(pcm: Buffer) -> np.ndarray:
    """int16 PCM (array, or little-endian bytes) -> uint8 A-law codes, same shape."""
    return _ALAW_ENC[_as_pcm16(pcm).view(np.uint16)]


def alaw_decode(codes: Buffer) -> np.ndarray:
    """uint8 A-law codes (array or bytes) -> int16 PCM, same shape."""
    return _ALAW_DEC[_as_codes(codes)]


_ROUND_TRIP = {"mulaw": _ULAW_DEC[_ULAW_ENC], "alaw": _ALAW_DEC[_ALAW_ENC]}


def g711_round_trip(wave: np.ndarray, law: str) -> np.ndarray:
    """Quantise to 16-bit PCM, then encode and decode with G.711 ``"mulaw"`` or ``"alaw"``
    (one table lookup: what a G.711 leg of a call does to float audio)."""
    pcm = np.clip(np.rint(wave * 32768.0), -32768, 32767).astype(np.int16)
    return _ROUND_TRIP[law][pcm.view(np.uint16)].astype(np.float32) * np.float32(1 / 32768)


# --------------------------------------------------------------------------- raw bytes

SAMPLE_BYTES = {"LINEAR16": 2, "MULAW": 1, "ALAW": 1}
_DECODERS = {
    "LINEAR16": lambda data: np.frombuffer(data, dtype="<i2"),
    "MULAW": mulaw_decode,
    "ALAW": alaw_decode,
}


def pcm_decode(data: bytes, codec: str) -> np.ndarray:
    """Raw samples in ``codec`` (``SAMPLE_BYTES``' keys; channels interleaved) -> float32 in
    [-1, 1], one value per sample. The caller checks that ``data`` holds whole frames."""
    return _DECODERS[codec](data).astype(np.float32) / 32768.0
