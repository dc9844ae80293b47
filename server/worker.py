"""``python -m server.worker``: the command line of the Redis inference worker
(:mod:`server.queue.worker`), e.g. ``python -m server.worker --redis URL --model default
--device auto``. Apart from the worker so that the worker can be embedded (tests, tools) without
argparse, and this module stays the entry point that deployments already call."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

import structlog

from models.inference import Detector, load_detector
from server.config import PREFIX, EnvFlags
from server.logs import configure, safe_url
from server.queue.worker import Worker, WorkerConfig

log = structlog.get_logger("callshield.worker")


# Read from CALLSHIELD_<FLAG> when CALLSHIELD_WORKER_<FLAG> is not set: what must agree with
# the servers of the deployment, which one environment file may serve both.
SHARED_WITH_SERVER = ("redis_url", "model", "max_batch", "max_wait_ms", "log_level")
# Names these settings had before the CALLSHIELD_WORKER_ scope; still read, with a warning.
DEPRECATED_ENV = {"claim_idle_ms": f"{PREFIX}CLAIM_IDLE_MS", "prefix": f"{PREFIX}REDIS_PREFIX"}


def parser() -> argparse.ArgumentParser:
    """The worker's flags, each with its ``CALLSHIELD_WORKER_<FLAG>`` variable (and, for the
    settings shared with the server, ``CALLSHIELD_<FLAG>`` after it)."""
    d = WorkerConfig()
    p = argparse.ArgumentParser(
        prog="python -m server.worker",
        description="callshield Redis inference worker (flags also read from "
                    "CALLSHIELD_WORKER_<FLAG>)")
    env = EnvFlags(p, prefix=f"{PREFIX}WORKER_", shared=SHARED_WITH_SERVER,
                   deprecated=DEPRECATED_ENV)
    env.add("--redis", "--redis-url", dest="redis_url", default=d.redis_url)
    env.add("--model", default=d.model, help="model name or path")
    env.add("--device", default=d.device,
            help="auto (CUDA fp16 if present, else CPU), cpu, cuda, cuda:N")
    env.add("--max-batch", type=int, default=d.max_batch)
    env.add("--max-wait-ms", type=float, default=d.max_wait_ms)
    env.add("--block-ms", type=int, default=d.block_ms)
    env.add("--claim-idle-ms", type=int, default=d.claim_idle_ms)
    env.add("--max-attempts", type=int, default=d.max_attempts)
    env.add("--heartbeat-ttl", type=float, default=d.heartbeat_ttl)
    env.add("--consumer", default=d.consumer, help="worker id (default host-pid)")
    env.add("--prefix", default=d.prefix,
            help="key prefix (several deployments can share one Redis)")
    env.add("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    env.add("--metrics-port", type=int, default=0)
    env.add("--log-level", default="info")
    p.set_defaults(deprecated_env=env.deprecated_used)  # read while the flags were added
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[WorkerConfig, argparse.Namespace]:
    """Flags override environment variables, which override the defaults."""
    args = parser().parse_args(argv)
    config = WorkerConfig(
        redis_url=args.redis_url, model=args.model, device=args.device,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, block_ms=args.block_ms,
        claim_idle_ms=args.claim_idle_ms, max_attempts=args.max_attempts,
        heartbeat_ttl=args.heartbeat_ttl, consumer=args.consumer, prefix=args.prefix)
    return config, args


async def _amain(config: WorkerConfig, detector: Detector) -> None:
    worker = Worker(config, detector)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


def main(argv: Sequence[str] | None = None) -> None:
    config, args = parse_args(argv)
    configure(args.log_level)
    for old, new in args.deprecated_env:
        log.warning("deprecated_environment_variable", variable=old, use=new)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from models.inference import resolve_device

    device = resolve_device(config.device)
    detector = load_detector(config.model, device=str(device), half=device.type == "cuda")
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr="127.0.0.1")
    log.info("worker_model_loaded", model=detector.name, version=detector.version,
             device=str(device), redis=safe_url(config.redis_url))
    asyncio.run(_amain(config, detector))


if __name__ == "__main__":
    main()
