"""Units of the stream pipeline: decoding, settings, windows, aggregation (no network)."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import soundfile
import soxr

from callshield.v1 import detection_pb2 as pb
from models.data.audio import alaw_encode, mulaw_encode, resample
from models.verdicts import EmaRule, State
from server.audio import (
    MAX_CHUNK_BYTES,
    BlockResampler,
    StreamDecoder,
    decode_container,
    decode_raw,
    pcm_from_bytes,
)
from server.errors import DecodeCancelled, InvalidArgument, InvalidAudio
from server.lanes import Lanes
from server.settings import parse_settings
from server.windowing import Windower


def _pcm(n: int, channels: int = 1) -> np.ndarray:
    return (np.arange(n * channels, dtype=np.int32) % 2000 - 1000).astype(np.int16).reshape(
        n, channels)


def test_decoders_agree_on_g711_and_linear16() -> None:
    pcm = _pcm(800)[:, 0]
    linear = pcm_from_bytes(pcm.astype("<i2").tobytes(), pb.AUDIO_ENCODING_LINEAR16, 1)
    mulaw = pcm_from_bytes(mulaw_encode(pcm).tobytes(), pb.AUDIO_ENCODING_MULAW, 1)
    alaw = pcm_from_bytes(alaw_encode(pcm).tobytes(), pb.AUDIO_ENCODING_ALAW, 1)
    assert linear.shape == mulaw.shape == alaw.shape == (800, 1)
    assert np.abs(mulaw - linear).max() < 0.002 and np.abs(alaw - linear).max() < 0.002


def test_split_deinterleaves_and_mixed_downmixes() -> None:
    stereo = np.stack([np.full(80, 1000), np.full(80, -3000)], axis=1).astype("<i2")
    split = StreamDecoder(pb.AUDIO_ENCODING_LINEAR16, 8000, 2, True, 8000).decode(
        stereo.tobytes()).channels
    assert [round(float(c[0]) * 32768) for c in split] == [1000, -3000]
    mixed = StreamDecoder(pb.AUDIO_ENCODING_LINEAR16, 8000, 2, False, 8000).decode(
        stereo.tobytes()).channels
    assert len(mixed) == 1 and round(float(mixed[0][0]) * 32768) == -1000


def test_streaming_resampler_keeps_duration() -> None:
    decoder = StreamDecoder(pb.AUDIO_ENCODING_LINEAR16, 16000, 1, False, 8000)
    chunk = _pcm(1600).astype("<i2").tobytes()
    total = sum(decoder.decode(chunk).channels[0].shape[0] for _ in range(10))
    total += decoder.flush().channels[0].shape[0]
    assert total == 8000


def test_mixed_decoder_hands_the_diarizer_the_client_rate_mono() -> None:
    """A diarized MIXED stream: the lanes get the model's rate, the diarizer the same chunk
    downmixed at the client's own rate (a 16 kHz client keeps its 4-8 kHz band); at 8 kHz
    both are the very same samples, so an 8 kHz call is diarized as before."""
    stereo = _pcm(1600, 2)
    decoder = StreamDecoder(pb.AUDIO_ENCODING_LINEAR16, 16000, 2, False, 8000, 16000)
    chunks = [decoder.decode(stereo.tobytes()), decoder.flush()]
    mono = np.concatenate([c.mono for c in chunks if c.mono is not None])
    np.testing.assert_array_equal(mono, stereo.mean(axis=1, dtype=np.float32) / 32768)
    assert sum(c.channels[0].shape[0] for c in chunks) == 800
    assert StreamDecoder(pb.AUDIO_ENCODING_LINEAR16, 16000, 2, False, 8000).decode(
        stereo.tobytes()).mono is None  # nobody asked: no copy
    telephone = StreamDecoder(pb.AUDIO_ENCODING_MULAW, 8000, 1, False, 8000, 8000).decode(
        mulaw_encode(_pcm(800)[:, 0]).tobytes())
    np.testing.assert_array_equal(telephone.mono, telephone.channels[0])


def test_detect_decodes_the_diarizer_mono_straight_to_its_rate() -> None:
    """Detect decodes a MIXED recording once, block by block, to the model's rate and to the
    diarizer's 16 kHz. At 48 kHz that is the client's band down to 8 kHz; at 8 kHz it is,
    to the bit, what offline diarization made of the model-rate audio before (the one-shot
    resample of it)."""
    rng = np.random.default_rng(1)
    pcm = np.clip(rng.normal(0, 0.1, (48000 * 12, 2)) * 32768, -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, 48000, format="WAV", subtype="PCM_16")
    recording = decode_container(buffer.getvalue(), 8000, False, 3600, mono_rate=16000)
    assert recording.audio.shape == (8000 * 12, 1) and recording.mono is not None
    np.testing.assert_allclose(recording.mono, soxr.resample(
        pcm.astype(np.float32).mean(axis=1) / 32768, 48000, 16000, quality="HQ"), atol=1e-6)
    telephone = pcm[::6, 0].astype("<i2")
    raw = decode_raw(telephone.tobytes(), pb.AUDIO_ENCODING_LINEAR16, 8000, 1, 8000, False,
                     3600, mono_rate=16000)
    np.testing.assert_array_equal(raw.mono, resample(raw.audio[:, 0], 8000, 16000))
    assert decode_container(buffer.getvalue(), 8000, False, 3600).mono is None


@pytest.mark.parametrize(("data", "message"), [
    (b"\x00\x01\x02", "not a whole number"), (b"", "empty"),
    (b"\x00" * (MAX_CHUNK_BYTES + 2), "exceeds"),
])
def test_decoder_rejects_bad_chunks(data: bytes, message: str) -> None:
    decoder = StreamDecoder(pb.AUDIO_ENCODING_LINEAR16, 8000, 1, False, 8000)
    with pytest.raises(InvalidAudio, match=message):
        decoder.decode(data)


def test_settings_defaults_and_labels() -> None:
    cfg = pb.StreamConfig(encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=8000, channels=2,
                          channel_mode=pb.CHANNEL_MODE_SPLIT)
    s = parse_settings(cfg, 4.0)
    assert (s.window_seconds, s.hop_seconds, s.alert_threshold) == (4.0, 1.0, 0.5)
    assert s.speakers == ("A", "B")
    cfg.party_labels[:] = ["agent", "caller"]
    assert parse_settings(cfg, 4.0).speakers == ("agent", "caller")
    cfg.party_labels[:] = ["agent"]
    with pytest.raises(InvalidArgument, match="one party label per channel"):
        parse_settings(cfg, 4.0)


def test_windows_grow_then_slide_with_a_bounded_buffer() -> None:
    w = Windower(8000, 4.0, 1.0)
    windows = []
    for _ in range(70):  # 7 s in 100 ms chunks
        windows += w.push(np.full(800, 0.1, np.float32))
    assert [(x.start, x.end) for x in windows] == [
        (0, 1), (0, 2), (0, 3), (0, 4), (1, 5), (2, 6), (3, 7)]
    assert all(x.audio.shape[0] == (x.end - x.start) * 8000 for x in windows)
    assert w._buf.shape[0] <= 4 * 8000
    assert windows[-1].speech_total == pytest.approx(7.0)
    assert w.flush() == []  # nothing unscored
    w.push(np.full(4000, 0.1, np.float32))
    (tail,) = w.flush()
    assert (tail.start, tail.end) == (3.5, 7.5)


def test_speech_ranges_reach_the_end_of_a_tail_too_short_to_score() -> None:
    """A call whose last 0.3 s (under the half hop a final window needs) is speech: no
    window, and still the speaker's last range ends with the call (a real 30 s call's last
    range ended at 29.5 s)."""
    w = Windower(8000, 4.0, 1.0)
    for _ in range(73):  # 7.3 s in 100 ms chunks
        w.push(np.full(800, 0.1, np.float32))
    assert w.flush() == []
    assert w.speech.ranges == [[0.0, pytest.approx(7.3)]]
    assert w.flush() == []  # idempotent
    assert w.speech.ranges == [[0.0, pytest.approx(7.3)]]


def test_silence_is_not_speech() -> None:
    w = Windower(8000, 4.0, 1.0)
    (window,) = w.push(np.full(8000, 1e-4, np.float32))
    assert not window.has_speech and window.speech_total == 0


def test_ema_rule_hysteresis_and_one_alert_per_speaker() -> None:
    track = EmaRule("B", threshold=0.5)
    probs = [0.9, 0.9, 0.9, 0.45, 0.1, 0.1, 0.9, 0.9]
    updates = [track.update(p, i, i + 1, float(i + 1)) for i, p in enumerate(probs)]
    assert track.state == State.SPOOF_SUSPECTED
    alerts = [u.alert for u in updates if u.alert is not None]
    assert len(alerts) == 1 and alerts[0].speaker == "B"
    # unknown for the first second of speech, then confirmed by two windows
    assert [u.changed for u in updates][:3] == [False, True, False]
    assert track.final_verdict().state == State.SPOOF_SUSPECTED


def test_ema_rule_low_scores_become_likely_bonafide() -> None:
    track = EmaRule("A")
    for i in range(4):
        track.update(0.05, i, i + 1, float(i + 1))
    assert track.state == State.LIKELY_BONAFIDE and not track.alerted


def test_states_are_the_protobuf_numbers() -> None:
    for state in State:
        assert pb.SpeakerState.Value(f"SPEAKER_STATE_{state.name}") == state


def test_summary_lists_speakers_heard_in_order_of_first_speech() -> None:
    """A silent leg or a label that never got a window has no verdict to report; the rest
    come in the order they first spoke, whatever order their labels were made in."""
    lanes = Lanes(8000, 4.0, 1.0, speakers=("caller", "agent", "B"))
    lanes.lane("agent").rule.update(0.1, 4.0, 8.0, 3.0)
    lanes.lane("caller").rule.update(0.1, 6.0, 10.0, 2.0)
    summary = lanes.summary()
    assert [s.verdict.speaker for s in summary] == ["agent", "caller"]
    assert all(s.verdict.speech_seconds > 0 for s in summary)


def test_detect_decoding_block_by_block_equals_whole_recording_resampling() -> None:
    """Detect decodes and resamples in 10 s blocks (bounded memory, cancellable): the result
    is the one-shot resampling of the whole recording, for containers and raw samples."""
    rng = np.random.default_rng(0)
    pcm = np.clip(rng.normal(0, 0.1, (16000 * 25, 2)) * 32768, -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, 16000, format="WAV", subtype="PCM_16")
    whole = soxr.resample(pcm.astype(np.float32) / 32768, 16000, 8000, quality="HQ")
    split = decode_container(buffer.getvalue(), 8000, True, 3600).audio
    np.testing.assert_allclose(split, whole, atol=1e-6)
    mixed = decode_container(buffer.getvalue(), 8000, False, 3600).audio
    np.testing.assert_allclose(mixed[:, 0], soxr.resample(
        pcm.astype(np.float32).mean(axis=1) / 32768, 16000, 8000, quality="HQ"), atol=1e-6)
    raw = decode_raw(pcm.astype("<i2").tobytes(), pb.AUDIO_ENCODING_LINEAR16, 16000, 2, 8000,
                     True, 3600).audio
    np.testing.assert_allclose(raw, whole, atol=1e-6)
    with pytest.raises(InvalidAudio, match="over the 20 s limit"):
        decode_container(buffer.getvalue(), 8000, True, 20)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(DecodeCancelled):
        decode_container(buffer.getvalue(), 8000, True, 3600, cancel)


def test_detect_decoding_fills_one_array_sized_from_the_header() -> None:
    """A long Detect is never held twice (its blocks and their concatenation): the decoded
    audio and mono go into arrays allocated once from the announced length, and a wrong or
    missing length still gives the same samples."""
    rng = np.random.default_rng(1)
    source = rng.normal(0, 0.1, (16000 * 25, 2)).astype(np.float32)
    results = {}
    for frames in (source.shape[0], 16000, None):
        out = BlockResampler(16000, 8000, 2, False, 16000, frames)
        allocated = (out._audio.data, out._mono_out.data)
        for start in range(0, source.shape[0], 160000):
            out.push(source[start : start + 160000])
        recording = out.result()
        if frames == source.shape[0]:
            assert np.shares_memory(recording.audio, allocated[0])
            assert np.shares_memory(recording.mono, allocated[1])
        results[frames] = recording
    exact = results[source.shape[0]]
    assert exact.audio.shape == (8000 * 25, 1) and exact.mono.shape == (16000 * 25,)
    for other in (results[16000], results[None]):
        np.testing.assert_array_equal(other.audio, exact.audio)
        np.testing.assert_array_equal(other.mono, exact.mono)


def test_flac_without_a_length_in_its_header_is_refused_cleanly() -> None:
    """A FLAC written to a pipe has 0 total samples in its STREAMINFO (libsndfile reports an
    unknown length and fails seeking past its last frame): refused with a message that says
    why, before any decoding."""
    buffer = io.BytesIO()
    soundfile.write(buffer, _pcm(8000 * 30), 8000, format="FLAC", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    # "fLaC", a 4-byte block header, then STREAMINFO: 36 bits of total samples from byte 21
    data[21] &= 0xF0
    data[22:26] = b"\0\0\0\0"
    assert soundfile.info(io.BytesIO(bytes(data))).frames == 2**63 - 1
    with pytest.raises(InvalidAudio, match="header does not give its length"):
        decode_container(bytes(data), 8000, False, 3600)


def test_errors_map_to_their_documented_statuses() -> None:
    """One table (server/errors.py) chooses the status; a label or threshold problem is an
    invalid argument, not invalid audio."""
    import grpc

    from server.errors import ClientTimeout, Draining, Overloaded, grpc_status
    from server.queue.base import QueueUnavailable

    assert grpc_status(InvalidAudio("a"))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "a")
    assert grpc_status(InvalidArgument("b"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status(ClientTimeout("c"))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert grpc_status(Overloaded("d"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_status(Draining("e")) == (grpc.StatusCode.UNAVAILABLE, "e",
                                          (("grpc-retry-pushback-ms", "1000"),))
    assert grpc_status(QueueUnavailable("f"))[:2] == (
        grpc.StatusCode.UNAVAILABLE, "inference unavailable: f")
    cfg = pb.StreamConfig(encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=8000,
                          alert_threshold=1.5)
    with pytest.raises(InvalidArgument, match="alert_threshold") as raised:
        parse_settings(cfg, 4.0)
    assert not isinstance(raised.value, InvalidAudio)
