"""Shared fixtures. ``redis_server`` is a private redis-server on a free port: tests never touch
a system Redis (which may hold someone's data, or not exist at all)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

os.environ["PYANNOTE_METRICS_ENABLED"] = "false"


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
        pytest.skip("redis-server is not installed and this user cannot apt-get install it "
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
