"""StreamDetect, Detect and GetModel end to end over real gRPC on 127.0.0.1."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from models.data.audio import mulaw_encode
from models.inference import Detector
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import collect, linear16_chunks, noise_pcm, requests, stream_config


def _kinds(responses: list[pb.StreamDetectResponse], kind: str) -> list:
    return [getattr(r, kind) for r in responses if r.WhichOneof("event") == kind]


async def test_stream_windows_verdicts_and_summary(stub: pb_grpc.DetectionServiceStub) -> None:
    responses = await collect(stub, requests(stream_config(), linear16_chunks(noise_pcm(6.0))))
    windows = _kinds(responses, "window")
    assert [(w.start_seconds, w.end_seconds) for w in windows] == [
        (0, 1), (0, 2), (0, 3), (0, 4), (1, 5), (2, 6)]
    assert all(w.speaker == "A" and 0 <= w.spoof_probability <= 1 for w in windows)
    assert all(w.model for w in windows)
    verdicts = _kinds(responses, "verdict")
    assert len(verdicts) == len(windows)  # interim results: one verdict per window
    assert verdicts[-1].speech_seconds == pytest.approx(6.0)
    assert responses[-1].WhichOneof("event") == "summary"
    summary = responses[-1].summary
    assert summary.call_id == "test-call" and summary.windows_scored == 6
    assert summary.audio_seconds == pytest.approx(6.0)
    assert [v.speaker for v in summary.speakers] == ["A"]
    assert summary.speakers[0].state != pb.SPEAKER_STATE_UNSPECIFIED
    assert len(_kinds(responses, "alert")) <= 1


async def test_without_interim_results_only_changes_are_sent(
    stub: pb_grpc.DetectionServiceStub,
) -> None:
    cfg = stream_config(interim_results=False)
    responses = await collect(stub, requests(cfg, linear16_chunks(noise_pcm(4.0))))
    assert not _kinds(responses, "window")
    assert 1 <= len(_kinds(responses, "verdict")) <= 2
    assert responses[-1].summary.windows_scored == 4


async def test_split_mode_scores_each_party_and_skips_silence(
    stub: pb_grpc.DetectionServiceStub,
) -> None:
    pcm = noise_pcm(3.0, channels=2)
    pcm[:, 1] = 0  # the second party never speaks
    cfg = stream_config(channels=2, channel_mode=pb.CHANNEL_MODE_SPLIT,
                        party_labels=["agent", "caller"])
    responses = await collect(stub, requests(cfg, linear16_chunks(pcm)))
    assert {w.speaker for w in _kinds(responses, "window")} == {"agent"}
    summary = responses[-1].summary
    # the silent party has no verdict to report: the summary names only who spoke
    assert [v.speaker for v in summary.speakers] == ["agent"]
    assert summary.speakers[0].speech_seconds > 0
    # and when it spoke: one range over the 3 s of noise, in call time
    ranges = [(r.start_seconds, r.end_seconds) for r in summary.speakers[0].speech]
    assert len(ranges) == 1 and ranges[0][0] < 0.1 and 2.9 < ranges[0][1] <= 3.0


async def test_mulaw_at_16_khz_is_resampled(stub: pb_grpc.DetectionServiceStub) -> None:
    codes = mulaw_encode(noise_pcm(2.5, rate=16000)[:, 0]).tobytes()
    chunks = [codes[i : i + 1600] for i in range(0, len(codes), 1600)]
    cfg = stream_config(encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=16000)
    responses = await collect(stub, requests(cfg, chunks))
    windows = _kinds(responses, "window")
    assert [(w.start_seconds, w.end_seconds) for w in windows] == [(0, 1), (0, 2), (0, 2.5)]


async def test_detect_whole_wav_and_raw(stub: pb_grpc.DetectionServiceStub) -> None:
    pcm = noise_pcm(5.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, 8000, format="WAV", subtype="PCM_16")
    response = await stub.Detect(pb.DetectRequest(audio=buffer.getvalue()))
    assert [(w.start_seconds, w.end_seconds) for w in response.windows][-1] == (1, 5)
    assert response.summary.windows_scored == 5
    raw = await stub.Detect(pb.DetectRequest(
        audio=pcm.astype("<i2").tobytes(), config=stream_config()))
    np.testing.assert_allclose([w.spoof_probability for w in raw.windows],
                               [w.spoof_probability for w in response.windows], atol=1e-5)


async def test_get_model(stub: pb_grpc.DetectionServiceStub, detector: Detector) -> None:
    model = await stub.GetModel(pb.GetModelRequest())
    assert (model.name, model.sample_rate_hz) == (detector.name, detector.sample_rate)
    assert model.window_seconds == detector.window_seconds
    assert model.calibration.scale == pytest.approx(detector.calibration.scale)
