"""The Redis wire format (``server/queue/redis_protocol.py``) as a contract between versions: a
server and its workers are upgraded at different times, so the field names and the bytes of
their values are pinned here, as the previous version wrote them, and every message must
round-trip through a real redis-server unchanged."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
import redis
from redis.connection import Encoder

from server.queue.base import WindowScore
from server.queue.redis_protocol import (
    ArrayMessage,
    ErrorMessage,
    JobMessage,
    MalformedMessage,
    RedisKeys,
    ScoreMessage,
    decode_audio,
    decode_payload,
    encode_audio,
    result_from_fields,
)

JOB = JobMessage(
    token="9f1c", job_id="call-1:w3", stream_id="s1", reply="callshield:results:abc",
    enqueued_at=1700000000.25, deadline=1700000015.25, audio_key="callshield:audio:9f1c",
    audio_format="f32", samples=32000)
SCORE = JOB.scored(WindowScore("ignored", -1.2345678901234567, 0.8125, "rawnet2-tel"),
                   batch=7, worker="host-12")
ERROR = JOB.failed("audio payload expired", worker="host-12")


def wire(fields: dict[str, str | int | float]) -> dict[bytes, bytes]:
    """What ``XADD`` stores for ``fields``: redis-py's own encoding of each value."""
    encoder = Encoder("utf-8", "strict", decode_responses=False)
    return {name.encode(): encoder.encode(value) for name, value in fields.items()}


# As the version before redis_protocol.py wrote them (server/queue/redis_queue.py:submit and
# server/worker.py:_publish): a change here breaks mixed-version deployments.
OLD_JOB = {b"token": b"9f1c", b"job": b"call-1:w3", b"stream": b"s1",
           b"reply": b"callshield:results:abc", b"t": b"1700000000.25",
           b"deadline": b"1700000015.25", b"audio": b"callshield:audio:9f1c", b"fmt": b"f32",
           b"n": b"32000"}
OLD_SCORE = {b"token": b"9f1c", b"job": b"call-1:w3", b"score": b"-1.2345678901234567",
             b"p": b"0.8125", b"model": b"rawnet2-tel", b"batch": b"7", b"worker": b"host-12"}
OLD_ERROR = {b"token": b"9f1c", b"job": b"call-1:w3", b"error": b"audio payload expired",
             b"worker": b"host-12"}


def test_field_names_and_bytes_are_pinned() -> None:
    assert wire(JOB.to_fields()) == OLD_JOB
    assert wire(SCORE.to_fields()) == OLD_SCORE
    assert wire(ERROR.to_fields()) == OLD_ERROR
    keys = RedisKeys("default", "callshield")
    assert (keys.jobs, keys.workers, keys.heartbeat("w1"), keys.audio("t"), keys.results("s")) == (
        "callshield:jobs:default", "callshield:workers:default",
        "callshield:worker:default:w1", "callshield:audio:t", "callshield:results:s")


def test_messages_of_the_previous_version_parse() -> None:
    assert JobMessage.from_fields(OLD_JOB) == JOB
    assert result_from_fields(OLD_SCORE) == ScoreMessage.from_fields(OLD_SCORE) == SCORE
    assert result_from_fields(OLD_ERROR) == ErrorMessage.from_fields(OLD_ERROR) == ERROR
    # What the previous readers tolerated: no deadline (none), no batch (1), no t (unused).
    lean = JobMessage.from_fields({k: v for k, v in OLD_JOB.items() if k not in (b"t",
                                                                                b"deadline")})
    assert lean.deadline == math.inf and math.isnan(lean.enqueued_at)
    assert result_from_fields({k: v for k, v in OLD_SCORE.items() if k != b"batch"}).batch == 1


@pytest.mark.parametrize(("fields", "problem"), [
    ({k: v for k, v in OLD_JOB.items() if k != b"audio"}, "no 'audio' field"),
    (OLD_JOB | {b"n": b"many"}, "'n' is not a number"),
])
def test_malformed_jobs_are_named(fields: dict[bytes, bytes], problem: str) -> None:
    with pytest.raises(MalformedMessage, match=problem):
        JobMessage.from_fields(fields)


def test_malformed_results_are_named() -> None:
    with pytest.raises(MalformedMessage, match="no 'score' field"):
        result_from_fields({k: v for k, v in OLD_SCORE.items() if k != b"score"})


# A model-pass job (the diarizer's, issue 9): a window job plus its payload's shape, so that
# a worker of the previous version, which never reads a pass's stream, would still parse it.
PASS_JOB = JobMessage(
    token="77ab", job_id="diarization-segmentation-3:0", stream_id="diarization-segmentation-3",
    reply="callshield:results:abc", enqueued_at=1700000000.5, deadline=1700000015.5,
    audio_key="callshield:audio:77ab", audio_format="f32", samples=6, shape=(2, 3))
ROW = np.array([[0.25, -1.5, 3.0], [1e-8, 0.0, -0.0]], np.float32)
ARRAY = PASS_JOB.answered(ROW, batch=4, worker="host-12")


def test_model_pass_messages_are_pinned() -> None:
    assert wire(PASS_JOB.to_fields()) == {
        b"token": b"77ab", b"job": b"diarization-segmentation-3:0",
        b"stream": b"diarization-segmentation-3", b"reply": b"callshield:results:abc",
        b"t": b"1700000000.5", b"deadline": b"1700000015.5",
        b"audio": b"callshield:audio:77ab", b"fmt": b"f32", b"n": b"6", b"shape": b"2,3"}
    assert wire(ARRAY.to_fields()) == {
        b"token": b"77ab", b"job": b"diarization-segmentation-3:0",
        b"array": ROW.astype("<f4").tobytes(), b"shape": b"2,3", b"batch": b"4",
        b"worker": b"host-12"}
    assert JobMessage.from_fields(wire(PASS_JOB.to_fields())) == PASS_JOB
    back = result_from_fields(wire(ARRAY.to_fields()))
    assert isinstance(back, ArrayMessage) and back == ARRAY and back.array.dtype == np.float32
    payload = decode_payload(encode_audio(ROW.reshape(-1), "f32"), PASS_JOB)
    assert payload.shape == (2, 3) and np.array_equal(payload, ROW)
    with pytest.raises(MalformedMessage, match="array of 20 bytes"):
        result_from_fields(wire(ARRAY.to_fields()) | {b"array": b"x" * 20})
    with pytest.raises(MalformedMessage, match="not a shape"):
        JobMessage.from_fields(wire(PASS_JOB.to_fields()) | {b"shape": b"2,x"})


def test_messages_round_trip_through_redis(redis_server: str) -> None:
    client = redis.Redis.from_url(redis_server)
    stream = f"t{uuid.uuid4().hex[:8]}:roundtrip"
    try:
        for message in (JOB, SCORE, ERROR, PASS_JOB, ARRAY):
            client.xadd(stream, message.to_fields())
        (_, job), (_, score), (_, error), (_, pass_job), (_, array) = client.xrange(stream)
        assert JobMessage.from_fields(job) == JOB
        assert result_from_fields(score) == SCORE  # repr(float): the score exactly
        assert result_from_fields(error) == ERROR
        assert JobMessage.from_fields(pass_job) == PASS_JOB
        assert result_from_fields(array) == ARRAY  # the bytes of the rows exactly
    finally:
        client.delete(stream)
        client.close()


@pytest.mark.parametrize(("fmt", "tolerance"), [("f32", 0.0), ("i16", 1 / 32768)])
def test_audio_round_trips(fmt: str, tolerance: float) -> None:
    audio = (0.1 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32)
    payload = encode_audio(audio, fmt)
    assert len(payload) == audio.size * (4 if fmt == "f32" else 2)
    back = decode_audio(payload, fmt, audio.size)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, audio, rtol=0, atol=tolerance)
    with pytest.raises(ValueError, match="header says 7999"):
        decode_audio(payload, fmt, audio.size - 1)
