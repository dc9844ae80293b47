"""Real calls: a spoofed call is flagged and a bona fide one is not, on both queue backends
(needs the trained default model; the examples are cut from ../shared/calls, see
examples/README.md)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from client import AsyncDetectionClient, verdict_name
from server.app import RunningServer
from tests.paths import require
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import EXAMPLES, SHARED_CALLS


async def _verdicts(server: RunningServer, name: str, split: bool = False) -> dict[str, str]:
    async with AsyncDetectionClient(f"127.0.0.1:{server.port}") as client:
        responses = [r async for r in client.stream_file(EXAMPLES / name, split=split)]
    summary = responses[-1].summary
    assert summary.audio_seconds == pytest.approx(30.0)
    return {v.speaker: verdict_name(v.state) for v in summary.speakers}


async def test_bonafide_call_is_not_flagged(backend_server: RunningServer) -> None:
    assert "spoof" not in (await _verdicts(backend_server, "bonafide_call.wav")).values()


async def test_spoofed_call_is_flagged(backend_server: RunningServer) -> None:
    assert (await _verdicts(backend_server, "spoof_call.wav")) == {"A": "spoof"}


async def test_spoofed_party_is_flagged_in_split_mode(backend_server: RunningServer) -> None:
    verdicts = await _verdicts(backend_server, "spoof_call_stereo.wav", split=True)
    assert verdicts["B"] == "spoof" and verdicts["A"] != "spoof"


@pytest.mark.parametrize(("example", "source"), [
    ("bonafide_call.wav", "call_dev_00.flac"), ("spoof_call.wav", "call_dev_04.flac"),
    ("spoof_call_stereo.wav", "call_dev_03_stereo.flac"),
])
def test_examples_are_cut_from_the_shared_calls(example: str, source: str) -> None:
    require(SHARED_CALLS / source)
    cut, rate = soundfile.read(EXAMPLES / example, dtype="int16", always_2d=True)
    full, full_rate = soundfile.read(SHARED_CALLS / source, dtype="int16", always_2d=True)
    assert rate == full_rate == 8000 and cut.shape[0] == 30 * rate
    np.testing.assert_array_equal(cut, full[: cut.shape[0]])
    assert (EXAMPLES / example).stat().st_size < 1_000_000
    # 16-bit PCM: what `client stream` sends as LINEAR16 without conversion.
    assert soundfile.info(EXAMPLES / example).subtype == "PCM_16"
