"""The calls estimate (``bench.calls``): its bookkeeping, and that its path from a simulated
call to a verdict is the server's own (the same alert as a real ``server.session.Session``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from bench.calls import (
    DEFAULT_SETTING,
    RATE,
    SimCall,
    call_outcome,
    corpus_voices,
    cut_call,
    replay_call,
    score_windows,
    spoof_call,
)
from diarization.simulate import Segment, SimConfig
from tests.paths import CORPUS, require


def _constructed_call() -> SimCall:
    # A genuine caller, a synthetic back-channel word labelled "bonafide" (as the simulator
    # labelled every back-channel before issue 28's fix), then the synthetic voice's own turn:
    # the delay counts from the voice, whatever a segment's label says.
    segments = [Segment(0.5, 2.0, "caller", "bonafide"), Segment(2.4, 3.1, "agent", "bonafide"),
                Segment(4.0, 6.0, "agent", "spoof")]
    return SimCall("c", "spoof", "T01", "T01", np.zeros(7 * RATE, np.float32), segments,
                   frozenset({"agent"}))


def test_the_delay_counts_from_the_first_synthetic_word_whatever_its_label() -> None:
    call = _constructed_call()
    assert call.first_synthetic == 2.4
    assert call.seconds == 7.0
    assert call.turns()[1] == (2.4, 3.1, "agent")
    # Streaming labels A (the agent) and B (the caller): the earliest synthetic alert counts.
    out = call_outcome(["agent"], call.first_synthetic, {"A": 7.5},
                       {"A": "agent", "B": "caller"})
    assert out == {"spoof_flagged": True, "genuine_flagged": False, "delay_s": 5.1}


def test_a_flagged_genuine_voice_or_stray_label_is_a_false_alarm_not_a_hit() -> None:
    out = call_outcome(["agent"], 2.4, {"B": 5.0, "C": 6.0}, {"A": "agent", "B": "caller",
                                                              "C": None})
    assert out == {"spoof_flagged": False, "genuine_flagged": True, "delay_s": None}
    bona = call_outcome([], None, {"A": 3.0}, {"A": "caller"})
    assert bona["spoof_flagged"] is None and bona["genuine_flagged"]


def test_a_spoof_call_gives_the_alert_a_server_session_gives() -> None:
    """A simulated call whose synthetic party is a copy-synthesis engine the default trained
    on (Griffin-Lim, T04: 0.5 % dev EER) is flagged, through the server's lanes and rule, at
    the very call time a real ``Session`` with the in-process queue raises its alert."""
    import asyncio

    from models.inference import load_detector
    from server.audio import Decoded
    from server.queue.inprocess import InProcessQueue
    from server.session import Session
    from server.settings import DEFAULT_HOP_SECONDS, StreamSettings
    from server.speakers import TurnsAttributor

    spoof, bona = corpus_voices(require(CORPUS))
    call = spoof_call("T04", 0, spoof["T04"], bona, SimConfig(min_seconds=14, max_seconds=18))
    assert call.synthetic and call.first_synthetic is not None
    synthetic = next(iter(call.synthetic))
    detector = load_detector("default")
    cut = cut_call(call, detector.window_seconds, None)
    score_windows({"fold": detector}, cut["reference"]["windows"])
    record = {"uri": call.uri, "synthetic": sorted(call.synthetic),
              "first_synthetic": call.first_synthetic, **cut}
    out = replay_call(record, "reference", "fold", DEFAULT_SETTING)
    assert out["spoof_flagged"] and not out["genuine_flagged"]
    assert out["delay_s"] is not None and out["delay_s"] >= 0

    async def session_alerts() -> dict[str, float]:
        settings = StreamSettings(encoding=1, sample_rate=RATE, channels=1, split=False,
                                  call_id="calls-bench", speakers=(),
                                  window_seconds=detector.window_seconds,
                                  hop_seconds=DEFAULT_HOP_SECONDS, interim_results=False,
                                  alert_threshold=DEFAULT_SETTING.threshold)
        queue = InProcessQueue(detector)
        await queue.start()

        async def chunks() -> AsyncIterator[Decoded]:
            step = RATE // 10
            for i in range(0, call.audio.shape[0], step):
                yield Decoded([call.audio[i:i + step]])

        try:
            session = Session(settings, queue, RATE, "s", attributor=TurnsAttributor(
                call.turns(), RATE), verdict_rule=DEFAULT_SETTING.rule)
            return {r.alert.speaker: r.alert.end_seconds async for r in session.run(chunks())
                    if r.HasField("alert")}
        finally:
            await queue.close()

    alerts = asyncio.run(session_alerts())
    assert set(alerts) == {synthetic}
    assert alerts[synthetic] - call.first_synthetic == pytest.approx(out["delay_s"], abs=0.011)


def test_the_gpu_script_trains_the_folds_of_the_default_s_neural_parts() -> None:
    """`make train-gpu` (one short lent GPU run) must train exactly the folds that the calls
    estimate in full mode needs, the default's LCNN parts, and hand them to it: a default
    whose parts change and a script that still trains the old ones disagree here."""
    import re

    from models.tasks.recipes import SHIPPED_RECIPES
    from tests.paths import REPO

    script = (REPO / "scripts" / "train-gpu.sh").read_text()
    trained = set(re.findall(r"^folds (\S+)", script, flags=re.M))
    assert trained == set(SHIPPED_RECIPES)
    assert re.search(r"-m bench\.calls --mode full --loso-runs \"\$OUT/loso\"", script)
    assert "--runs \"$OUT/loso\"" in script
