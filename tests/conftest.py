"""Shared fixtures. ``redis_server`` is a private redis-server on a free port: tests never touch
a system Redis (which may hold someone's data, or not exist at all). ``start_worker`` starts a
real ``python -m server.worker`` on it; ``redis_backend`` is a key prefix with one such worker
for the whole session (the Redis side of ``backend_server`` in service_fixtures.py).

Session fixtures live here, not in service_fixtures.py: fixtures star-imported into several
test modules are set up once per module, whatever their scope."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis

from tests.paths import missing

if TYPE_CHECKING:
    from server.queue.redis_queue import RedisQueue

os.environ["PYANNOTE_METRICS_ENABLED"] = "false"

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found or os.geteuid() != 0:
        return found
    # Root on a bare CI image: install it rather than skip the queue tests.
    subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], check=False,
                   capture_output=True, timeout=600,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("redis-server")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start a throwaway redis-server; returns the process and its URL."""
    binary = _redis_server_binary()
    if binary is None:
        missing("redis-server is not installed and this user cannot apt-get install it "
                    "(install the redis-server package to run the Redis queue tests)")
    port = port or free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", "/tmp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not _ping(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    jobs after 1 s (``--claim-idle-ms``), so that tests which kill one stay short. Later flags
    in ``extra`` override these."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYANNOTE_METRICS_ENABLED": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "server.worker", "--redis", url, "--model", "default",
         "--device", "cpu", "--prefix", prefix, "--consumer", consumer, "--threads", "1",
         "--claim-idle-ms", "1000", "--heartbeat-ttl", "2", "--log-level", "info", *extra],
        cwd=ROOT, env=env)


def wait_ready(url: str, prefix: str, consumer: str, proc: subprocess.Popen[bytes]) -> None:
    """Until the worker's heartbeat key exists (it loads the model first)."""
    from server.queue.redis_protocol import RedisKeys

    client = redis.Redis.from_url(url)
    key = RedisKeys("default", prefix).heartbeat(consumer)
    deadline = time.monotonic() + 90
    try:
        while not client.exists(key):
            assert proc.poll() is None, f"worker {consumer} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"worker {consumer} not ready after 90 s"
            time.sleep(0.1)
    finally:
        client.close()


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
