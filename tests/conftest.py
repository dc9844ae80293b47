"""Shared fixtures. ``redis_server`` is a private redis-server on a free port: tests never touch
a system Redis (which may hold someone's data, or not exist at all). ``start_worker`` starts a
real ``python -m server.worker`` on it; ``redis_backend`` is a key prefix with one such worker
for the whole session (the Redis side of ``backend_server`` in service_fixtures.py).

Session fixtures live here, not in service_fixtures.py: fixtures star-imported into several
test modules are set up once per module, whatever their scope."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

import devstack
from devstack import free_port as free_port
from devstack import stop_process as stop_process
from tests.paths import missing

if TYPE_CHECKING:
    from server.queue.redis_queue import RedisQueue

os.environ["PYANNOTE_METRICS_ENABLED"] = "false"


def start_redis(port: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway redis-server (:func:`devstack.start_redis`); missing material when
    it cannot be had."""
    if devstack.redis_server_binary() is None:
        missing("redis-server is not installed and this user cannot apt-get install it "
                "(install the redis-server package to run the Redis queue tests)")
    return devstack.start_redis(port)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL ``redis://127.0.0.1:PORT/0`` of a redis-server private to this test session."""
    proc, url = start_redis()
    try:
        yield url
    finally:
        stop_process(proc)


def start_worker(url: str, prefix: str, consumer: str, *extra: str) -> subprocess.Popen[bytes]:
    """A real Redis worker on the default model, one CPU thread; it takes over a dead worker's
    jobs after 1 s (``--claim-idle-ms``), so that tests which kill one stay short. Without the
    diarizer's passes (pyannote's import would slow every start), unless ``extra`` says
    ``--diarization on``: later flags override these."""
    return devstack.start_worker(
        url, consumer, "--device", "cpu", "--prefix", prefix, "--threads", "1",
        "--claim-idle-ms", "1000", "--heartbeat-ttl", "2", "--log-level", "info",
        "--diarization", "off", *extra)


def wait_ready(url: str, prefix: str, consumer: str, proc: subprocess.Popen[bytes]) -> None:
    """Until the worker's heartbeat key exists (it loads the model first)."""
    devstack.wait_worker(url, consumer, proc, prefix=prefix)


@dataclass(frozen=True)
class RedisBackend:
    """A key prefix on the session's redis-server (``url``)."""

    url: str
    prefix: str

    def queue(self, **kwargs: Any) -> RedisQueue:
        """A server-side queue on this prefix (``serving`` starts it)."""
        from server.queue.redis_queue import RedisQueue

        return RedisQueue(self.url, "default", prefix=self.prefix, **kwargs)


@pytest.fixture(scope="session")
def redis_backend(redis_server: str) -> Iterator[RedisBackend]:
    """A prefix of its own (the Redis queue tests use theirs) with one real worker on it for
    the rest of the session, started by the first test that asks for the Redis backend."""
    backend = RedisBackend(redis_server, f"g{uuid.uuid4().hex[:8]}")
    proc = start_worker(redis_server, backend.prefix, "shared", "--log-level", "warning")
    try:
        wait_ready(redis_server, backend.prefix, "shared", proc)
        yield backend
    finally:
        stop_process(proc)
