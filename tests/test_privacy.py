"""Call audio is private: pyannote.audio's telemetry, on by default upstream, is off in every
process that can load it, even one started without ``make`` (no PYANNOTE_METRICS_ENABLED)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.paths import REPO

PROBE = """
import server.app, server.worker, plugins.app  # what `python -m server` and workers import
import diarization.stream  # the streaming diarizer, which imports pyannote.audio
from pyannote.audio.telemetry.metrics import is_metrics_enabled
print(is_metrics_enabled())
"""


def test_pyannote_telemetry_is_off_without_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYANNOTE_METRICS_ENABLED"}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_an_operator_can_still_choose() -> None:
    probe = "import diarization, os; print(os.environ['PYANNOTE_METRICS_ENABLED'])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYANNOTE_METRICS_ENABLED": "true"},
                          timeout=120)
    assert done.stdout.strip() == "true"
