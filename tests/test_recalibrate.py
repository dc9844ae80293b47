"""``python -m models calibrate``: recalibration from the console's analyst verdicts.

The end-to-end test runs the real chain: a real server on loopback, the console's own feed
thread writing a real console database (migrated by the console's Alembic scripts), the
example calls streamed over gRPC, verdict rows, the recalibration, and the new model loaded
into the running server with ``ReloadModel``. The other tests write verdicts and window scores
into a real console database directly, to pin the choice, the floors and the refusals.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client import AsyncDetectionClient
from client.audio import read_audio
from console.db import Call, Score, Speaker, Store, Verdict
from models.checkpoint import read_checkpoint
from models.inference import CHECKPOINT_DIR, NAMED_MODELS
from models.tasks.recalibrate import (
    MAX_MARGIN,
    RecalibrateError,
    alerts,
    choose_shift,
    read_labels,
    recalibrate,
    recalibrate_checkpoint,
)
from server.config import ServerConfig
from tests.paths import REPO
from tests.service_fixtures import wait_until

ADMIN = "test-admin-token"


def _default_state() -> dict:
    return read_checkpoint(NAMED_MODELS["default"])


def _model(state: dict) -> str:
    return f"{state['name']} {state['version']}"


def _add_call(store: Store, key: str, model: str, label: str | None, p: float,
              windows: int = 12, threshold: float = 0.5, alerted: bool = True) -> None:
    """A closed call of one speaker "A" speaking throughout, each 1 s hop scored ``p``."""
    from console.db import AlertRow

    with store.session() as s:
        s.add(Call(id=key, server="t", stream_id=key, call_id=key, model=model,
                   alert_threshold=threshold, opened_at=time.time(), status="closed"))
        s.flush()
        s.add(Speaker(call=key, name="A", speech=json.dumps([[0.0, float(windows)]])))
        for i in range(windows):
            s.add(Score(call=key, speaker="A", start=max(0.0, i - 3.0), end=i + 1.0,
                        probability=p))
        if alerted:
            s.add(AlertRow(call=key, speaker="A", start=0.0, end=3.0, probability=p,
                           raised_at=time.time()))
        if label:
            s.add(Verdict(call=key, speaker="A", label=label, user="analyst",
                          created_at=time.time()))


@pytest.fixture
def labelled_db(tmp_path: Path) -> str:
    """20 false alarms scored 0.8, 5 confirmed frauds scored 0.999, 3 unsure, 2 calls of
    another model: as the console stores them."""
    url = f"sqlite:///{tmp_path / 'console.db'}"
    store = Store(url)
    model = _model(_default_state())
    for i in range(20):
        _add_call(store, f"fa{i}", model, "false_alarm", 0.8)
    for i in range(5):
        _add_call(store, f"fraud{i}", model, "confirmed_fraud", 0.999)
    for i in range(3):
        _add_call(store, f"unsure{i}", model, "unsure", 0.9)
    for i in range(2):
        _add_call(store, f"other{i}", "rawnet2-tel v2", "false_alarm", 0.9)
    store.engine.dispose()
    return url


def test_false_alarms_raise_the_offset_and_fraud_stays_flagged(labelled_db: str) -> None:
    state = _default_state()
    labels = read_labels(labelled_db)
    new, report = recalibrate(state, labels)
    assert report["labels"]["false_alarm"] == 20 and report["labels"]["confirmed_fraud"] == 5
    assert report["labels"]["unsure"] == 3
    assert report["labels"]["skipped"] == {"rawnet2-tel v2": 2}
    assert report["before"]["false_alarms"] == 20 and report["before"]["missed_fraud"] == 0
    assert report["after"]["false_alarms"] == 0 and report["after"]["missed_fraud"] == 0
    assert report["replay_agrees_with_server"] == {"speakers": 25, "agree": 25}
    shift = report["shift"]
    assert 0 < shift and report["target_reached"]
    assert new["calibration"]["bias"] == pytest.approx(state["calibration"]["bias"] + shift)
    assert new["calibration"]["scale"] == state["calibration"]["scale"]
    assert new["version"] != state["version"] and new["name"] == state["name"]
    assert new["card"]["recalibrated"]["after"] == report["after"]
    # the base checkpoint dict is left as it was
    assert state["calibration"] == _default_state()["calibration"]
    by_label = {(s.call): s for s in labels}
    assert not alerts(by_label["fa0"], shift) and alerts(by_label["fa0"], 0.0)
    assert alerts(by_label["fraud0"], shift)


def test_choice_stops_before_a_caught_fraud_would_be_missed() -> None:
    # false alarms need a shift of 3, a caught fraud is lost past 2: stop short, say so
    choice = choose_shift([3.0] * 20, [2.0, 5.0], target_false_alarms=0.0)
    assert not choice.target_reached and choice.shift < 2.0
    # room enough: the least shift that meets the target plus a bounded margin
    choice = choose_shift([1.0] * 19 + [-np.inf], [9.0], target_false_alarms=0.0)
    assert choice.target_reached and choice.shift == pytest.approx(1.0 + MAX_MARGIN)
    # the target allows one of twenty to stay: the second-largest decides
    choice = choose_shift([4.0] + [1.0] * 19, [9.0], target_false_alarms=0.05)
    assert choice.shift_for_target == pytest.approx(1.0)
    # no false alarm alerts now: nothing moves
    assert choose_shift([-1.0] * 20, [9.0], 0.05).shift == 0.0


def test_below_the_floor_it_refuses_naming_the_count(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'few.db'}"
    store = Store(url)
    model = _model(_default_state())
    for i in range(7):
        _add_call(store, f"fa{i}", model, "false_alarm", 0.8)
    for i in range(5):
        _add_call(store, f"fraud{i}", model, "confirmed_fraud", 0.999)
    store.engine.dispose()
    with pytest.raises(RecalibrateError, match=r"7 false-alarm verdicts.*at least 20"):
        recalibrate(_default_state(), read_labels(url))
    with pytest.raises(RecalibrateError, match=r"5 confirmed-fraud.*at least 6"):
        recalibrate(_default_state(), read_labels(url), min_false_alarms=5,
                    min_confirmed_fraud=6)


def test_a_recalibrated_model_reads_the_calls_of_its_earlier_calibration(
        labelled_db: str, tmp_path: Path) -> None:
    first = tmp_path / "op1.pt"
    recalibrate_checkpoint("default", first, labelled_db)
    state = read_checkpoint(first)
    # calls scored by the first operator model join the ones scored by the default
    url = labelled_db
    store = Store(url)
    for i in range(3):
        _add_call(store, f"later{i}", _model(state), "false_alarm", 0.97)
    store.engine.dispose()
    second = tmp_path / "op2.pt"
    report = recalibrate_checkpoint(first, second, url)
    assert report["labels"]["false_alarm"] == 23 and report["labels"]["skipped"] == {
        "rawnet2-tel v2": 2}
    again = read_checkpoint(second)
    lineage = again["card"]["recalibrated"]["lineage"]
    assert {_model(_default_state()), _model(state), _model(again)} <= set(lineage)
    assert again["calibration"]["bias"] >= state["calibration"]["bias"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYANNOTE_METRICS_ENABLED": "false"}
    return subprocess.run([sys.executable, "-m", "models", "calibrate", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_cli_writes_the_operator_model_and_prints_before_and_after(
        labelled_db: str, tmp_path: Path) -> None:
    out = tmp_path / "operator.pt"
    done = _cli("--console-db", labelled_db, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "false alarms on the labels: 20 (100.0 %) -> 0 (0.0 %)" in done.stdout
    assert "confirmed fraud missed:     0 (0.0 %) -> 0 (0.0 %)" in done.stdout
    assert "recalibrated" in read_checkpoint(out)["card"]


@pytest.mark.parametrize("case", ["shipped-folder", "missing-db", "not-console", "floor"])
def test_cli_refusals_are_usage_errors(case: str, labelled_db: str, tmp_path: Path) -> None:
    out, db = str(tmp_path / "operator.pt"), labelled_db
    extra: list[str] = []
    if case == "shipped-folder":
        out = str(CHECKPOINT_DIR / "operator.pt")
        expect = "inside"
    elif case == "missing-db":
        db = f"sqlite:///{tmp_path / 'nope.db'}"
        expect = "no console database"
    elif case == "not-console":
        (tmp_path / "other.db").write_bytes(b"")
        db = f"sqlite:///{tmp_path / 'other.db'}"
        expect = "not a console database"
    else:
        extra = ["--min-false-alarms", "21"]
        expect = "at least 21"
    before = sorted(p.name for p in CHECKPOINT_DIR.iterdir())
    done = _cli("--console-db", db, "--out", out, *extra)
    assert done.returncode == 2, done.stderr
    assert expect in done.stderr
    assert not Path(out).exists()
    assert sorted(p.name for p in CHECKPOINT_DIR.iterdir()) == before


async def _stream(client: AsyncDetectionClient, path: Path, call_id: str,
                  threshold: float) -> bool:
    audio = read_audio(path)
    config = audio.config(call_id=call_id, alert_threshold=threshold, interim_results=False)
    alerted = False
    async for r in client.stream(config, audio.chunks()):
        alerted = alerted or r.HasField("alert")
    return alerted


def _wait_closed(store: Store, call_ids: list[str]) -> dict[str, str]:
    """Call ids -> console keys once the feed thread has written them closed."""
    from sqlalchemy import select

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with store.session() as s:
            rows = s.execute(select(Call.call_id, Call.id).where(
                Call.call_id.in_(call_ids), Call.status == "closed")).all()
        if len(rows) == len(call_ids):
            return dict(rows)
        time.sleep(0.2)
    raise AssertionError(f"the console recorded {len(rows)} of {len(call_ids)} calls")


async def test_end_to_end_server_console_calibrate_reload(tmp_path: Path) -> None:
    """A genuine call alerted at a strict stream threshold is labelled a false alarm, the
    spoof call confirmed fraud; the recalibrated model, reloaded into the running server,
    no longer alerts on the genuine call and still alerts on the spoof."""
    from console.feed import Broadcaster, FeedThread
    from server.app import start_server

    url = f"sqlite:///{tmp_path / 'console.db'}"
    store = Store(url)
    running = await start_server(ServerConfig(listen="127.0.0.1:0", admin_token=ADMIN))
    target = f"127.0.0.1:{running.port}"
    feed = FeedThread(store, Broadcaster(), target, ADMIN)
    feed.start()
    genuine, spoof = REPO / "examples" / "bonafide_call.wav", REPO / "examples" / "spoof_call.wav"
    strict = 0.2  # the genuine example alerts at this threshold: a false alarm to fix
    try:
        await wait_until(lambda: feed.state.connected, "the console's feed connects")
        async with AsyncDetectionClient(target) as client:
            before = await asyncio.gather(_stream(client, genuine, "g", strict),
                                          _stream(client, spoof, "s", 0.5))
            assert before == [True, True]
            keys = await asyncio.to_thread(_wait_closed, store, ["g", "s"])
            with store.session() as s:
                s.add(Verdict(call=keys["g"], speaker="A", label="false_alarm",
                              user="analyst", created_at=time.time()))
                s.add(Verdict(call=keys["s"], speaker="A", label="confirmed_fraud",
                              user="analyst", created_at=time.time()))
            out = tmp_path / "operator.pt"
            report = recalibrate_checkpoint("default", out, url, min_false_alarms=1,
                                            min_confirmed_fraud=1, target_false_alarms=0.0)
            assert report["replay_agrees_with_server"] == {"speakers": 2, "agree": 2}
            assert report["after"]["false_alarms"] == 0
            assert report["after"]["missed_fraud"] == 0
            reloaded = await client.reload_model(str(out), admin_token=ADMIN)
            assert reloaded.model.version == read_checkpoint(out)["version"]
            assert reloaded.model.calibration.bias == pytest.approx(
                report["calibration"]["after"]["bias"])
            after = await asyncio.gather(_stream(client, genuine, "g2", strict),
                                         _stream(client, spoof, "s2", 0.5))
            assert after == [False, True]
            await asyncio.to_thread(_wait_closed, store, ["g2", "s2"])
            with store.session() as s:
                from sqlalchemy import select

                models = set(s.scalars(select(Call.model).where(
                    Call.call_id.in_(["g2", "s2"]))))
            assert models == {f"{reloaded.model.name} {reloaded.model.version}"}
    finally:
        feed.stop()
        await running.stop()
        store.engine.dispose()


def test_a_models_adapt_output_is_recalibrated_on_its_own_calls(tmp_path: Path) -> None:
    """``models adapt`` changes the scores themselves (the fusion's genuine reference): its
    calls count, the default's calls are skipped, and the result keeps the adapted model."""
    from tests.test_adapt import _adapt, _callers

    adapted = tmp_path / "adapted.pt"
    done = _adapt("--bonafide", str(_callers(tmp_path / "callers")), "--out", str(adapted),
                  "--max-vocoded-seconds", "2", "--target-false-alarms", "0.1")
    assert done.returncode == 0, done.stderr
    state = read_checkpoint(adapted)
    url = f"sqlite:///{tmp_path / 'console.db'}"
    store = Store(url)
    for i in range(20):
        _add_call(store, f"fa{i}", _model(state), "false_alarm", 0.8)
    for i in range(5):
        _add_call(store, f"fraud{i}", _model(state), "confirmed_fraud", 0.999)
    _add_call(store, "default-call", _model(_default_state()), "false_alarm", 0.9)
    store.engine.dispose()
    out = tmp_path / "operator.pt"
    report = recalibrate_checkpoint(adapted, out, url)
    assert report["labels"]["skipped"] == {_model(_default_state()): 1}
    assert report["after"]["false_alarms"] == 0 and report["after"]["missed_fraud"] == 0
    new = read_checkpoint(out)
    assert new["name"] == state["name"] and new["name"].endswith("-adapted")
    assert new["state_dict"]["reference"] == state["state_dict"]["reference"]
    assert "adapted" in new["card"] and "recalibrated" in new["card"]
