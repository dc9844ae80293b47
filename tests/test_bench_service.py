"""The service bench measures what ``make run`` serves, with both channel modes: the server's
flags come from the Makefile, SPLIT audio puts one party per channel, and the capacity search
reports an honest bracket within its trial budget."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from bench.service.audio import stereo_from_turns
from bench.service.driver import find_capacity
from bench.service.stack import make_run_flags


def test_the_server_flags_are_those_of_make_run() -> None:
    assert make_run_flags() == ["--model", "default"]  # --listen and --queue: the stack's
    recipe = ("run: install ## x\n\t$(PY) -m server --listen 127.0.0.1:50051 --model fusion "
              "--queue inprocess --diarization=off --tls\n\nlint:\n")
    assert make_run_flags(recipe) == ["--model", "fusion", "--diarization=off", "--tls"]


def test_split_audio_has_one_party_per_channel() -> None:
    rate = 8000
    mono = np.arange(1, 4 * rate + 1, dtype=np.int16)
    turns = [{"party": "A", "start": 0.0, "end": 1.5}, {"party": "B", "start": 1.0, "end": 3.0}]
    stereo = stereo_from_turns(mono, rate, turns)
    assert stereo.shape == (4 * rate, 2)
    assert (stereo[: rate, 0] == mono[: rate]).all() and not stereo[: rate, 1].any()
    assert (stereo[int(1.5 * rate) : 3 * rate, 1] == mono[int(1.5 * rate) : 3 * rate]).all()
    assert not stereo[int(1.5 * rate) :, 0].any()
    assert (stereo[rate : int(1.5 * rate)] != 0).all()  # the overlap: heard on both sides
    assert not stereo[3 * rate :].any()


@dataclass
class _Trial:
    held: bool


def _search(limit: int, ladder: list[int]) -> tuple[int, int | None, list[int]]:
    async def measure(n: int) -> _Trial:
        return _Trial(n <= limit)

    c = asyncio.run(find_capacity(measure, ladder, budget_s=60.0, resolution=2))  # type: ignore[arg-type]
    return c.streams, c.first_failing, c.trials


def test_capacity_search_climbs_then_bisects_once() -> None:
    ladder = [1, 5, 10, 20, 50, 100]
    assert _search(37, ladder) == (35, 50, [1, 5, 10, 20, 50, 35])
    assert _search(12, ladder) == (10, 15, [1, 5, 10, 20, 15])
    assert _search(500, ladder) == (100, None, ladder)  # the bracket stays open
    assert _search(0, ladder) == (0, 1, [1])
    assert _search(3, ladder) == (3, 5, [1, 5, 3])
