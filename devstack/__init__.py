"""The development stack, written once: free ports, a private redis-server (installed when it is
missing and we are root), Redis workers, the server (as a process, or in this process), used by
the tests (``tests/conftest.py``, ``tests/service_fixtures.py``), the benches (``bench/``) and
``make run-redis`` (``python -m devstack``).

Why a top-level package of its own, outside ``server/``: it is a developer harness (it may run
``apt-get`` for a missing redis-server and knows ``../shared`` beside the checkout), so it must
not ship in the wheel, which packages ``server`` (``pyproject.toml`` lists the packages it
carries; ``tests/test_wheel.py`` checks that this one is not among them). It depends on
``server`` (everything it starts is ``python -m server`` or ``python -m server.worker``, and it
reads the queue's key layout, :class:`RedisKeys`, to tell when a worker is alive); the tests,
the benches and ``make run-redis`` depend on it, and it on none of them: under ``tests/`` the
benches would import the tests, under ``bench/`` the tests would import the benchmarks.

Nothing here is imported by the running service; heavy imports (gRPC, the app, the model) stay
inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from server.queue.redis_protocol import RedisKeys

if TYPE_CHECKING:
    from models.inference import Detector
    from server.app import RunningServer
    from server.queue.base import InferenceQueue

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # developer material beside the checkout (never in the repo)
START_TIMEOUT_S = 180.0  # model loading on a loaded 2-core machine is slow


class StackError(RuntimeError):
    """A part of the stack is missing, died, or did not come up in time."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """The environment of every child: this checkout first on the path, no telemetry and no
    model download (nothing leaves the machine)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYANNOTE_METRICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1"}


def redis_server_binary() -> str | None:
    """``redis-server`` on the PATH; as root on a bare image (CI), installed from Debian first
    rather than skipping everything that needs it. None when it cannot be had."""
    found = shutil.which("redis-server")
    if found or os.geteuid() != 0:
        return found
    subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], check=False,
                   capture_output=True, timeout=600,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("redis-server")


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _spawn(cmd: Sequence[str], output: IO[bytes] | int | None,
           own_group: bool = False) -> subprocess.Popen[bytes]:
    """A child of this checkout. ``own_group``: a process group of its own, so that a Ctrl-C
    on the terminal reaches only us and we stop the children in order."""
    return subprocess.Popen(list(cmd), cwd=ROOT, env=child_env(), stdout=output,
                            stderr=subprocess.STDOUT if output is not None else None,
                            process_group=0 if own_group else None)


def start_redis(port: int = 0, *, directory: str = "/tmp", output: IO[bytes] | int | None =
                subprocess.DEVNULL, own_group: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway redis-server on 127.0.0.1 (a free port unless ``port``), without persistence;
    returns the process and its URL once it answers PING. Raises :class:`StackError`."""
    binary = redis_server_binary()
    if binary is None:
        raise StackError("redis-server is not installed and this user cannot apt-get install "
                         "it (install the redis-server package)")
    port = port or free_port()
    proc = _spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", directory, "--loglevel", "warning"],
                  output, own_group)
    deadline = time.monotonic() + 10
    while not redis_ping(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise StackError(f"redis-server did not start on port {port}")
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM (the server drains, a worker finishes its batch), SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_worker(url: str, consumer: str, *args: str, model: str = "default",
                 output: IO[bytes] | int | None = None,
                 own_group: bool = False) -> subprocess.Popen[bytes]:
    """A real ``python -m server.worker`` on ``url``; ``args``: more of its flags."""
    return _spawn([sys.executable, "-m", "server.worker", "--redis", url, "--model", model,
                   "--consumer", consumer, *args], output, own_group)


def live_workers(url: str, model: str = "default", prefix: str = "callshield") -> int:
    """Workers whose heartbeat is alive, counted as the server's health check counts them
    (:meth:`RedisQueue.live_workers`); 0 when Redis does not answer."""
    import redis

    keys = RedisKeys(model, prefix)
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        members = client.smembers(keys.workers)
        return int(client.exists(*(keys.heartbeat(m.decode()) for m in members))) if members \
            else 0
    except redis.RedisError:
        return 0
    finally:
        client.close()


def wait_worker(url: str, consumer: str, proc: subprocess.Popen[bytes], *,
                model: str = "default", prefix: str = "callshield",
                within: float = 90.0) -> None:
    """Until worker ``consumer``'s heartbeat key exists (it loads the model first). Raises
    :class:`StackError` when it exits or is not ready ``within`` seconds."""
    import redis

    client = redis.Redis.from_url(url)
    key = RedisKeys(model, prefix).heartbeat(consumer)
    deadline = time.monotonic() + within
    try:
        while not client.exists(key):
            if proc.poll() is not None:
                raise StackError(f"worker {consumer} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise StackError(f"worker {consumer} not ready after {within:g} s")
            time.sleep(0.1)
    finally:
        client.close()


def health_serving(target: str) -> bool:
    """The server at ``target`` answers its overall health check with SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@asynccontextmanager
async def serving(detector: Detector, inference_queue: InferenceQueue | None = None,
                  **overrides: Any) -> AsyncIterator[RunningServer]:
    """The server in this process on a free 127.0.0.1 port (``overrides``: ServerConfig
    fields; ``inference_queue`` replaces the configured backend); stopped, with open streams
    cancelled at once, on exit."""
    from dataclasses import replace

    from server.app import start_server
    from server.config import ServerConfig

    config = replace(ServerConfig(listen="127.0.0.1:0"), **overrides)
    running = await start_server(config, detector=detector, queue=inference_queue)
    try:
        yield running
    finally:
        await running.stop(0)


class ChromiumMissing(StackError):
    """Debian's chromium and chromium-driver are not installed."""


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 1000, *, page_load_timeout: float = 60.0,
             hide_scrollbars: bool = False) -> Iterator[Any]:
    """Headless Debian chromium driven by Selenium: the real browser behind the console's
    tests and ``make bench-console``, set up once so both see the same page
    (``hide_scrollbars`` for screenshots only: it changes the page's layout width)."""
    path, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (path and driver_path):
        raise ChromiumMissing("needs Debian's chromium and chromium-driver "
                              "(scripts/install-system.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = path
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                *(["--hide-scrollbars"] if hide_scrollbars else [])):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(page_load_timeout)
    try:
        yield driver
    finally:
        driver.quit()


def noise_pcm(seconds: float, rate: int = 8000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """int16 ``(frames, channels)`` noise at about -20 dBFS: loud enough for the server's
    energy gate to count as speech, so a stack driven with it scores every window."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.1, (int(seconds * rate), channels))
    return np.clip(x * 32768, -32768, 32767).astype(np.int16)


@dataclass
class Stack:
    """The processes behind one queue backend: [redis-server, ``workers`` workers,] the gRPC
    server, each a child process as in production.

    Started and stopped synchronously (``Popen``, ``wait``), so that a failing start or an
    interrupted run always stops what it started, in order: the server first (it drains its
    streams), then the workers (they finish their batch), then Redis. With ``logs`` the
    children write to files in a temporary folder, whose tail is shown when one dies; without,
    to this process's terminal. Every child has its own process group: a Ctrl-C reaches only
    this process, which then stops them in that order.
    """

    queue: str = "redis"  # or "inprocess"
    model: str = "default"
    workers: int = 2
    listen: str = ""  # "": 127.0.0.1 on a free port
    redis_port: int = 0  # 0: a free one
    metrics_port: int = 0  # 0: no metrics endpoint
    server_args: Sequence[str] = ()  # more flags of python -m server
    worker_args: Sequence[str] = ()  # more flags of python -m server.worker
    consumer_prefix: str = "worker"  # workers are {consumer_prefix}-1, -2, ...
    logs: bool = False
    start_timeout: float = START_TIMEOUT_S
    redis_url: str = ""
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    logdir: Path | None = None

    def __post_init__(self) -> None:
        if self.queue not in ("redis", "inprocess"):
            raise ValueError(f"unknown queue {self.queue!r}; use redis or inprocess")
        self.listen = self.listen or f"127.0.0.1:{free_port()}"

    @property
    def target(self) -> str:
        """Where a client connects: the listen address, with 127.0.0.1 for a wildcard host."""
        host, _, port = self.listen.rpartition(":")
        return f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @contextlib.contextmanager
    def _log(self, name: str) -> Iterator[IO[bytes] | None]:
        """Where child ``name`` writes: its log file, or (None) this process's terminal. The
        file is closed here once the child is started: the child holds its own descriptor."""
        if self.logdir is None:
            yield None
            return
        with (self.logdir / f"{name}.log").open("wb") as output:
            yield output

    def _check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = ""
                if self.logdir is not None:
                    tail = ":\n" + (self.logdir / f"{name}.log").read_text(
                        errors="replace")[-3000:]
                raise StackError(f"{name} exited with {proc.returncode}{tail}")

    def start(self) -> None:
        """Start every part and wait until the server is SERVING with every worker alive.
        Raises :class:`StackError` (after stopping what it started)."""
        if self.logs:
            self.logdir = Path(tempfile.mkdtemp(prefix=f"callshield-stack-{self.queue}-"))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        server_cmd = [sys.executable, "-m", "server", "--listen", self.listen, "--model",
                      self.model, "--queue", self.queue]
        if self.metrics_port:
            server_cmd += ["--metrics-port", str(self.metrics_port)]
        if self.queue == "redis":
            with self._log("redis") as out:
                proc, self.redis_url = start_redis(
                    self.redis_port, directory=str(self.logdir or tempfile.gettempdir()),
                    output=out, own_group=True)
            self.procs.append(("redis", proc))
            for i in range(1, self.workers + 1):
                with self._log(f"worker{i}") as out:
                    proc = start_worker(self.redis_url, f"{self.consumer_prefix}-{i}",
                                        *self.worker_args, model=self.model, output=out,
                                        own_group=True)
                self.procs.append((f"worker{i}", proc))
            server_cmd += ["--redis-url", self.redis_url]
        with self._log("server") as out:
            self.procs.append(("server", _spawn([*server_cmd, *self.server_args], out, True)))
        deadline = time.monotonic() + self.start_timeout
        while not (health_serving(self.target) and (
                self.queue != "redis" or live_workers(self.redis_url, self.model)
                >= self.workers)):
            self._check_alive()
            if time.monotonic() > deadline:
                raise StackError(f"{self.queue} stack not serving after "
                                 f"{self.start_timeout:.0f} s; logs in {self.logdir}")
            time.sleep(0.25)

    def stop(self, timeout: float = 30.0) -> None:
        for _name, proc in reversed(self.procs):  # server, then workers, then redis
            stop_process(proc, timeout)
        self.procs.clear()
        if self.logdir is not None:
            shutil.rmtree(self.logdir, ignore_errors=True)
            self.logdir = None

    def wait(self) -> None:
        """Until SIGINT or SIGTERM, or until any part exits (then the rest is stopped too)."""
        stopping: list[int] = []
        previous = {sig: signal.signal(sig, lambda s, _f: stopping.append(s))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stopping and all(p.poll() is None for _, p in self.procs):
                time.sleep(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> None:
    """``make run-redis``: a private redis-server, workers and the server with the Redis queue,
    in the foreground; Ctrl-C (or SIGTERM) stops every one of them, server first."""
    p = argparse.ArgumentParser(prog="python -m devstack", description=main.__doc__)
    p.add_argument("--listen", default="127.0.0.1:50051")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="auto", help="the workers' device")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--redis-port", type=int, default=0, help="default: a free one")
    args = p.parse_args(argv)
    stack = Stack(queue="redis", model=args.model, workers=args.workers, listen=args.listen,
                  redis_port=args.redis_port, worker_args=("--device", args.device),
                  start_timeout=600.0)
    with contextlib.suppress(KeyboardInterrupt):
        try:
            stack.start()
            print(f"redis-server on {stack.redis_url}; server on {stack.listen} with "
                  f"{args.workers} workers; Ctrl-C stops everything", file=sys.stderr)
            stack.wait()
        finally:
            stack.stop()

