"""The Redis wire format: every key name, field name and encoding that servers and workers
exchange, and nothing else (arq's ``jobs.py`` and ``constants.py`` in one module).

Why one module: a server and its workers are deployed separately and upgraded at different
times, so the format is a contract between two versions of the code, not an internal detail.
With the field names written on both sides by hand, a rename on one side would pass every unit
test and fail only between processes. Here each message is a dataclass whose ``to_fields`` and
``from_fields`` are the only code that touches the names; ``tests/test_redis_protocol.py`` pins
them, and the values' encodings, byte for byte.

Layout (all keys under ``{prefix}:``, ``callshield`` by default; :class:`RedisKeys`)::

    jobs:{model}          stream, one entry per window (MAXLEN ~ trimmed); consumer group
                          ``workers``; fields: :class:`JobMessage`
    audio:{token}         the window's samples (:func:`encode_audio`), SET with EX: an
                          abandoned payload expires by itself, whatever happens to its job
    results:{server_id}   stream the owning server XREADs; fields: :class:`ScoreMessage` or
                          :class:`ErrorMessage`
    workers:{model}       set of worker ids; ``worker:{model}:{id}`` is each one's heartbeat,
                          a key with a TTL

``{model}`` is a detector's name for scoring windows, or one of :data:`DIARIZATION_PASSES`
for the streaming diarizer's model passes: the same jobs, carrying a float32 array of the
``shape`` field's shape instead of a window, answered with an :class:`ArrayMessage` (the
pass's output row for that input) instead of a score.

Values are what redis-py writes for the Python types given (``str`` as UTF-8, ``int`` and
``float`` as their ``repr``); scores travel as ``repr(float)`` so that they round-trip exactly.

Audio travels as float32 by default: bit-exact with in-process scoring, 128 KB for a 4 s window
at 8 kHz, which loopback or a LAN moves in well under a millisecond. ``i16`` halves that for
thin links, at the cost of a quantisation noise at -96 dBFS (below telephone codecs' own, but it
moves raw scores by ~1e-4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from server.queue.base import WindowScore

AUDIO_FORMATS = ("f32", "i16")
GROUP = "workers"
# The streaming diarizer's two model passes (diarization.models.DiarizationModels.passes):
# the segmentation model after its SincNet front end, over one call's 5 s buffer features,
# and GE2E's LSTM over one 1.6 s partial of mel frames.
SEGMENTATION_PASS = "diarization-segmentation"
EMBEDDING_PASS = "diarization-embedding"
DIARIZATION_PASSES = (SEGMENTATION_PASS, EMBEDDING_PASS)

Fields = Mapping[bytes, bytes]
"""A stream entry as redis-py returns it (``decode_responses`` off)."""
FieldValues = dict[str, str | int | float]
"""A stream entry as ``XADD`` takes it."""


class MalformedMessage(ValueError):
    """A stream entry that lacks a field or holds a value of the wrong type."""


@dataclass(frozen=True)
class RedisKeys:
    """Every key name in one place, so that servers and workers cannot disagree."""

    model: str
    prefix: str = "callshield"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs:{self.model}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers:{self.model}"

    def heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{self.model}:{worker_id}"

    def audio(self, token: str) -> str:
        return f"{self.prefix}:audio:{token}"

    def results(self, server_id: str) -> str:
        return f"{self.prefix}:results:{server_id}"


def as_text(value: bytes | str | None) -> str:
    """A Redis reply (bytes, as redis-py returns them here) as text; None as ``""``."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _required(fields: Fields, name: str) -> bytes:
    try:
        return fields[name.encode()]
    except KeyError:
        raise MalformedMessage(f"no {name!r} field") from None


_Number = TypeVar("_Number", int, float)


def _number(fields: Fields, name: str, kind: Callable[[bytes], _Number],
            default: bytes | None = None) -> _Number:
    raw = fields.get(name.encode(), default)
    if raw is None:
        raise MalformedMessage(f"no {name!r} field")
    try:
        return kind(raw)
    except ValueError:
        raise MalformedMessage(f"field {name!r} is not a number: {raw!r}") from None


@dataclass(frozen=True)
class JobMessage:
    """One window to score, as a server adds it to ``jobs:{model}``.

    ``token`` is the server's key for the answer (unique per submission: a resubmitted window
    gets a new one); ``job_id`` is the window's own id, echoed back for logs and errors;
    ``reply`` is the results stream of the server that waits; a worker past ``deadline`` (epoch
    seconds) answers with an error instead of scoring, since the server has given up.
    ``shape``: the payload's array shape for a model-pass job (``()``: a window of
    ``samples`` samples, and no ``shape`` field on the wire, as before model passes).
    """

    token: str
    job_id: str
    stream_id: str
    reply: str
    enqueued_at: float  # epoch seconds, when the server added it
    deadline: float  # epoch seconds
    audio_key: str
    audio_format: str
    samples: int
    shape: tuple[int, ...] = ()

    def to_fields(self) -> FieldValues:
        fields: FieldValues = {
            "token": self.token, "job": self.job_id, "stream": self.stream_id,
            "reply": self.reply, "t": self.enqueued_at, "deadline": self.deadline,
            "audio": self.audio_key, "fmt": self.audio_format, "n": self.samples}
        if self.shape:
            fields["shape"] = encode_shape(self.shape)
        return fields

    def answered(self, array: np.ndarray, batch: int, worker: str) -> ArrayMessage:
        """The answer to this model-pass job: its output ``array``, from a pass over
        ``batch`` inputs."""
        return ArrayMessage(token=self.token, job_id=self.job_id,
                            array=np.ascontiguousarray(array, dtype=np.float32),
                            batch=batch, worker=worker)

    def scored(self, score: WindowScore, batch: int, worker: str) -> ScoreMessage:
        """The answer to this job: ``score`` came from a forward over ``batch`` windows."""
        return ScoreMessage(token=self.token, job_id=self.job_id, score=score.score,
                            spoof_probability=score.spoof_probability, model=score.model,
                            batch=batch, worker=worker)

    def failed(self, error: str, worker: str) -> ErrorMessage:
        """The answer to this job when ``worker`` gave up on it."""
        return ErrorMessage(token=self.token, job_id=self.job_id, error=error, worker=worker)

    @classmethod
    def from_fields(cls, fields: Fields) -> JobMessage:
        """Raises :class:`MalformedMessage`. A missing ``deadline`` is none (old servers may not
        write it) and a missing ``t`` is NaN: neither is needed to score the window."""
        return cls(
            token=as_text(_required(fields, "token")), job_id=as_text(_required(fields, "job")),
            stream_id=as_text(_required(fields, "stream")),
            reply=as_text(_required(fields, "reply")),
            enqueued_at=_number(fields, "t", float, b"nan"),
            deadline=_number(fields, "deadline", float, b"inf"),
            audio_key=as_text(_required(fields, "audio")),
            audio_format=as_text(_required(fields, "fmt")),
            samples=_number(fields, "n", int),
            shape=_shape(fields, "shape") if b"shape" in fields else (),
        )


@dataclass(frozen=True)
class ScoreMessage:
    """A scored window, as a worker adds it to its server's ``results:{server_id}``."""

    token: str
    job_id: str
    score: float  # raw model score, higher = more likely bona fide
    spoof_probability: float
    model: str
    batch: int  # windows scored in the same forward
    worker: str

    def to_fields(self) -> FieldValues:
        return {"token": self.token, "job": self.job_id, "score": repr(self.score),
                "p": repr(self.spoof_probability), "model": self.model, "batch": self.batch,
                "worker": self.worker}

    @classmethod
    def from_fields(cls, fields: Fields) -> ScoreMessage:
        """Raises :class:`MalformedMessage`; a missing ``batch`` counts as 1."""
        return cls(
            token=as_text(_required(fields, "token")), job_id=as_text(fields.get(b"job")),
            score=_number(fields, "score", float), spoof_probability=_number(fields, "p", float),
            model=as_text(fields.get(b"model")), batch=_number(fields, "batch", int, b"1"),
            worker=as_text(fields.get(b"worker")),
        )


@dataclass(frozen=True, eq=False)
class ArrayMessage:
    """A model pass's output for one job, as a worker adds it to ``results:{server_id}``:
    float32, little-endian, inline (a few KB: 293 frames x 7 classes of segmentation, or one
    256-d embedding), so the server needs no second round trip."""

    token: str
    job_id: str
    array: np.ndarray
    batch: int  # inputs of the same pass
    worker: str

    def to_fields(self) -> FieldValues:
        return {"token": self.token, "job": self.job_id,
                "array": np.ascontiguousarray(self.array, dtype="<f4").tobytes(),
                "shape": encode_shape(self.array.shape), "batch": self.batch,
                "worker": self.worker}

    @classmethod
    def from_fields(cls, fields: Fields) -> ArrayMessage:
        shape = _shape(fields, "shape")
        data = _required(fields, "array")
        if len(data) != 4 * int(np.prod(shape)):
            raise MalformedMessage(f"array of {len(data)} bytes, shape {shape}")
        return cls(token=as_text(_required(fields, "token")), job_id=as_text(fields.get(b"job")),
                   array=np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32),
                   batch=_number(fields, "batch", int, b"1"),
                   worker=as_text(fields.get(b"worker")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArrayMessage) and (
            (self.token, self.job_id, self.batch, self.worker)
            == (other.token, other.job_id, other.batch, other.worker)
            and self.array.shape == other.array.shape
            and bool(np.array_equal(self.array, other.array)))


@dataclass(frozen=True)
class ErrorMessage:
    """A window a worker gave up on (expired, bad payload, inference failed, retried too
    often): the server fails that window at once rather than waiting for its timeout."""

    token: str
    job_id: str
    error: str
    worker: str

    def to_fields(self) -> FieldValues:
        return {"token": self.token, "job": self.job_id, "error": self.error,
                "worker": self.worker}

    @classmethod
    def from_fields(cls, fields: Fields) -> ErrorMessage:
        return cls(token=as_text(_required(fields, "token")), job_id=as_text(fields.get(b"job")),
                   error=as_text(_required(fields, "error")),
                   worker=as_text(fields.get(b"worker")))


ResultMessage = ScoreMessage | ArrayMessage | ErrorMessage


def result_from_fields(fields: Fields) -> ResultMessage:
    """An entry of a results stream: an error when it has an ``error`` field, a model pass's
    output when it has an ``array``, else a score. Raises :class:`MalformedMessage`."""
    if b"error" in fields:
        return ErrorMessage.from_fields(fields)
    if b"array" in fields:
        return ArrayMessage.from_fields(fields)
    return ScoreMessage.from_fields(fields)


def encode_shape(shape: tuple[int, ...]) -> str:
    """``(80, 293)`` -> ``"80,293"``."""
    return ",".join(str(int(n)) for n in shape)


def _shape(fields: Fields, name: str) -> tuple[int, ...]:
    raw = as_text(_required(fields, name))
    try:
        shape = tuple(int(n) for n in raw.split(","))
    except ValueError:
        raise MalformedMessage(f"field {name!r} is not a shape: {raw!r}") from None
    if not shape or min(shape) < 0:
        raise MalformedMessage(f"field {name!r} is not a shape: {raw!r}")
    return shape


def encode_audio(audio: np.ndarray, fmt: str) -> bytes:
    if fmt == "f32":
        return np.ascontiguousarray(audio, dtype="<f4").tobytes()
    if fmt == "i16":
        scaled = np.clip(np.round(np.asarray(audio, np.float64) * 32768.0), -32768, 32767)
        return scaled.astype("<i2").tobytes()
    raise ValueError(f"unknown audio format {fmt!r} (one of {AUDIO_FORMATS})")


def decode_payload(data: bytes, message: JobMessage) -> np.ndarray:
    """A job's payload: its window (1-D), or its model-pass input (``shape``). Raises
    ValueError when the payload does not match the message."""
    audio = decode_audio(data, message.audio_format, message.samples)
    if not message.shape:
        return audio
    if int(np.prod(message.shape)) != message.samples:
        raise ValueError(f"shape {message.shape} does not hold {message.samples} values")
    return audio.reshape(message.shape)


def decode_audio(data: bytes, fmt: str, samples: int) -> np.ndarray:
    """Samples as float32; raises ValueError when the payload does not match its header."""
    if fmt == "f32":
        audio = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif fmt == "i16":
        audio = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    else:
        raise ValueError(f"unknown audio format {fmt!r}")
    if audio.shape[0] != samples:
        raise ValueError(f"payload has {audio.shape[0]} samples, header says {samples}")
    return audio


async def ensure_group(client: aioredis.Redis, jobs_key: str) -> bool:
    """``XGROUP CREATE jobs workers 0 MKSTREAM`` unless the group exists; True when it was
    created. Servers and workers both call it: after a Redis restart without persistence the
    stream and group are gone, and a server's ``XADD`` alone would recreate the stream without
    the group, which workers cannot read (``NOGROUP``). From id 0, so that windows added before
    the group existed are still delivered."""
    try:
        await client.xgroup_create(jobs_key, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


def is_nogroup(exc: BaseException) -> bool:
    """Redis lost the stream or its consumer group (a restart without persistence, a FLUSHALL,
    an XGROUP DESTROY): recreate them rather than retry."""
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")
