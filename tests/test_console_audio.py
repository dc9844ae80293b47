"""Flagged audio in the console (``--keep-flagged-audio``), through a real detection server
and real consoles: the alert's audio is kept and played on the call page to analysts only,
nothing is kept by a console that does not ask, and the retention deletes it on its schedule
and when the console starts.

One server allows 20 s of flagged audio (``--feed-flagged-audio``); two consoles watch it at
once, one keeping 3 s of each alert and one keeping none, so one streamed call answers both.
The server that does not allow audio is covered by ``test_console_feed``.
"""

from __future__ import annotations

import io
import time
import uuid
import wave
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import requests
from sqlalchemy import func, select, update

from console.db import FlaggedClip, Store
from models.data.audio import load_audio
from models.inference import Detector
from tests.service_fixtures import EXAMPLES
from tests.service_fixtures import detector as detector  # noqa: F401 (session fixture)
from tests.test_console import (
    WAIT,
    Console,
    console_thread,
    cropped,
    finished_call,
    login,
    screenshot_on_failure,
    server_thread,
    wait_for,
)
from tests.test_console import browser as browser  # noqa: F401 (module fixture)

KEEP_SECONDS = 3.0
DAY = 86400.0


def clips_in(console: Console) -> int:
    with console.app.state.store.session() as s:
        return int(s.scalar(select(func.count()).select_from(FlaggedClip)) or 0)


def test_flagged_audio_is_kept_for_analysts_and_purged(
        detector: Detector, browser: Any, tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # the spoof call's first 10 s: party B (Flite TTS, from 3.35 s) alerts at 2-8 s
    short = cropped(EXAMPLES / "spoof_call.wav", 10.0, tmp_path / "short.wav")
    call_id = f"audio-{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        target = stack.enter_context(server_thread(detector, feed_flagged_audio=20.0))
        keep = stack.enter_context(console_thread(
            target, tmp_path, "keep.db", keep_flagged_audio=KEEP_SECONDS,
            purge_every_seconds=0.2))
        off = stack.enter_context(console_thread(target, tmp_path, "off.db"))
        ana, vic = login(keep, "ana"), login(keep, "vic")
        call = finished_call(keep, ana, call_id, short)
        api = f"{keep.url}/api/calls/{call['id']}"
        data = ana.get(api, timeout=10).json()

        # kept: the alert's last 3 s, as the server heard the call
        assert len(data["alerts"]) == 1 and len(data["clips"]) == 1
        alert, clip = data["alerts"][0], data["clips"][0]
        assert clip["speaker"] == alert["speaker"]
        assert abs(clip["end"] - alert["end"]) < 0.01
        assert abs(clip["start"] - max(alert["start"], alert["end"] - KEEP_SECONDS)) < 0.01
        audio_url = f"{keep.url}/calls/{call['id']}/audio/{clip['id']}.wav"
        r = ana.get(audio_url, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        assert "no-store" in r.headers["cache-control"]
        with wave.open(io.BytesIO(r.content)) as w:
            assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
            rate = w.getframerate()
            got = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32)
        assert got.shape[0] == round((clip["end"] - clip["start"]) * rate)
        first = round(clip["start"] * rate)
        heard = load_audio(short, rate)[first:first + got.shape[0]]
        assert np.corrcoef(heard, got / 32767)[0, 1] > 0.9  # the call's audio of that range

        # played on the call page, to analysts only
        page = ana.get(f"{keep.url}/calls/{call['id']}", timeout=10).text
        assert f'src="/calls/{call["id"]}/audio/{clip["id"]}.wav"' in page
        viewer_page = vic.get(f"{keep.url}/calls/{call['id']}", timeout=10).text
        assert "<audio" not in viewer_page and "analysts only" in viewer_page
        assert vic.get(audio_url, timeout=10).status_code == 403
        anonymous = requests.get(audio_url, allow_redirects=False, timeout=10)
        assert anonymous.status_code == 303 and anonymous.headers["location"] == "/login"
        assert ana.get(f"{keep.url}/calls/other/audio/{clip['id']}.wav",
                       timeout=10).status_code == 404
        assert "<td>listen</td>" in ana.get(f"{keep.url}/audit", timeout=10).text
        with screenshot_on_failure(browser, "flagged-audio"):
            browser.get(keep.url + "/login")
            browser.find_element(By.ID, "username").send_keys("ana")
            browser.find_element(By.ID, "password").send_keys("correct horse battery")
            browser.find_element(By.ID, "login").click()
            WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.ID, "calls"))
            browser.get(f"{keep.url}/calls/{call['id']}")
            browser.execute_script("document.querySelector('audio').load()")
            duration: Callable[[Any], Any] = lambda d: d.execute_script(  # noqa: E731
                "const a = document.querySelector('audio');"
                "return a.readyState >= 1 && !a.error ? a.duration : 0")
            played = WebDriverWait(browser, WAIT, poll_frequency=0.1).until(
                duration, "the browser loading the flagged audio")
            assert abs(played - (clip["end"] - clip["start"])) < 0.05

        # nothing kept by the console that keeps no audio (same server, same call)
        s_off = login(off, "ana")
        wait_for(lambda: any(c["call_id"] == call_id and c["status"] == "closed"
                             for c in s_off.get(f"{off.url}/export/calls.json",
                                                timeout=10).json()),
                 "the call closed in the console without audio")
        off_call = next(c for c in s_off.get(f"{off.url}/export/calls.json", timeout=10).json()
                        if c["call_id"] == call_id)
        assert off_call["alerted"]
        assert s_off.get(f"{off.url}/api/calls/{off_call['id']}", timeout=10).json()[
            "clips"] == []
        assert clips_in(off) == 0
        assert "<audio" not in s_off.get(f"{off.url}/calls/{off_call['id']}", timeout=10).text

        # retention, on its schedule: the clip kept 31 days ago (30 by default) goes
        with keep.app.state.store.session() as s:
            row = s.get(FlaggedClip, clip["id"])
            assert row is not None
            aged = {k: getattr(row, k) for k in (
                "call", "speaker", "alert_start", "start", "end", "sample_rate", "wav")}
            s.execute(update(FlaggedClip).values(kept_at=time.time() - 31 * DAY))
        wait_for(lambda: not ana.get(api, timeout=10).json()["clips"], "the scheduled purge")
        assert ana.get(audio_url, timeout=10).status_code == 404
        assert clips_in(keep) == 0
        assert "<td>purge_audio</td>" in ana.get(f"{keep.url}/audit", timeout=10).text

        # ...and when a console starts: an aged clip is gone before the first page
        store = Store(f"sqlite:///{tmp_path / 'keep.db'}")
        with store.session() as s:
            s.add(FlaggedClip(**aged, kept_at=time.time() - 2 * DAY))
            s.add(FlaggedClip(**{**aged, "alert_start": -1.0}, kept_at=time.time()))
        with console_thread(target, tmp_path, "keep.db",
                            flagged_audio_retention_days=1.0) as again:
            with again.app.state.store.session() as s:
                left = s.scalars(select(FlaggedClip.alert_start)).all()
            assert left == [-1.0]  # the one kept today stays
        store.engine.dispose()
