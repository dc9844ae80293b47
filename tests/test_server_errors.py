"""Every bad input gets INVALID_ARGUMENT with a message naming the problem, and a bad stream
never disturbs a good one on the same server.

Streams are checked with the blocking gRPC client: the asyncio client may report a server's
early status as INTERNAL "Internal error from Core" when a write races the server's trailers
(grpc/grpc#36066, fix pending in grpc/grpc#43486); the server's status is the same either way.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from server.app import RunningServer
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import linear16_chunks, noise_pcm, requests, stream_config

AUDIO = linear16_chunks(noise_pcm(0.3))
BAD_STREAMS = {
    "audio before config": (requests(None, AUDIO), "first request must carry a StreamConfig"),
    "second config": (requests(stream_config(), AUDIO[:1])
                      + [pb.StreamDetectRequest(config=stream_config())], "second StreamConfig"),
    "unknown encoding": (requests(stream_config(encoding=7), AUDIO), "unknown audio encoding"),
    "unspecified encoding": (requests(stream_config(encoding=0), AUDIO),
                             "unknown audio encoding"),
    "rate too low": (requests(stream_config(sample_rate_hz=4000), AUDIO), "sample_rate_hz 4000"),
    "rate too high": (requests(stream_config(sample_rate_hz=96000), AUDIO),
                      "sample_rate_hz 96000"),
    "three channels": (requests(stream_config(channels=3), AUDIO), "channels must be 1 or 2"),
    "odd LINEAR16 bytes": (requests(stream_config(), [b"\x00\x01\x02"]), "not a whole number"),
    "empty chunk": (requests(stream_config(), [b""]), "empty audio chunk"),
    "oversized chunk": (requests(stream_config(), [b"\x00" * (64 * 1024 + 2)]), "exceeds"),
    "bad threshold": (requests(stream_config(alert_threshold=1.5), AUDIO), "alert_threshold"),
    "hop over window": (requests(stream_config(window_seconds=2, hop_seconds=3), AUDIO),
                        "hop_seconds"),
    "empty stream": ([], "empty stream"),
}


def _stream(port: int, reqs: list[pb.StreamDetectRequest]) -> list[pb.StreamDetectResponse]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return list(pb_grpc.DetectionServiceStub(channel).StreamDetect(iter(reqs)))


@pytest.mark.parametrize("case", BAD_STREAMS, ids=list(BAD_STREAMS))
async def test_bad_stream_is_invalid_argument(backend_server: RunningServer, case: str) -> None:
    reqs, message = BAD_STREAMS[case]
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(_stream, backend_server.port, reqs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


@pytest.mark.parametrize(("request_", "message"), [
    (pb.DetectRequest(audio=b"this is not audio at all, just text" * 10), "not a readable WAV"),
    (pb.DetectRequest(audio=b""), "empty audio"),
    (pb.DetectRequest(audio=b"\x00\x01\x02", config=stream_config()), "not a whole number"),
    (pb.DetectRequest(audio=b"\x00\x01", config=stream_config(sample_rate_hz=100)),
     "sample_rate_hz 100"),
])
async def test_bad_detect_is_invalid_argument(
    backend_stub: pb_grpc.DetectionServiceStub, request_: pb.DetectRequest, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await backend_stub.Detect(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    # no server internals: soundfile's own message names "<_io.BytesIO object at 0x...>"
    assert "0x" not in info.value.details() and "object at" not in info.value.details()


async def test_bad_streams_do_not_disturb_a_good_one(backend_server: RunningServer) -> None:
    good_requests = requests(stream_config(), linear16_chunks(noise_pcm(4.0)))
    streams = [good_requests] + [reqs for reqs, _ in BAD_STREAMS.values()]
    results = await asyncio.gather(
        *(asyncio.to_thread(_stream, backend_server.port, reqs) for reqs in streams),
        return_exceptions=True)
    assert results[0][-1].summary.windows_scored == 4
    assert all(isinstance(r, grpc.RpcError) for r in results[1:])
    assert not backend_server.servicer.sessions
