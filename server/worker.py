"""``python -m server.worker``: the command line of the Redis inference worker
(:mod:`server.queue.worker`), e.g. ``python -m server.worker --redis URL --model default
--device auto``. Apart from the worker so that the worker can be embedded (tests, tools) without
argparse, and this module stays the entry point that deployments already call."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Sequence

import structlog

from models.inference import Detector, load_detector
from server.logs import configure, safe_url
from server.queue.worker import Worker, WorkerConfig

log = structlog.get_logger("callshield.worker")


def _env(name: str, default: object) -> str:
    return os.environ.get(f"CALLSHIELD_{name.upper()}", str(default))


def parse_args(argv: Sequence[str] | None = None) -> tuple[WorkerConfig, argparse.Namespace]:
    d = WorkerConfig()
    p = argparse.ArgumentParser(
        prog="python -m server.worker",
        description="callshield Redis inference worker (flags also read from CALLSHIELD_<FLAG>)")
    p.add_argument("--redis", "--redis-url", dest="redis_url",
                   default=_env("redis_url", d.redis_url))
    p.add_argument("--model", default=_env("model", d.model), help="model name or path")
    p.add_argument("--device", default=_env("worker_device", d.device),
                   help="auto (CUDA fp16 if present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--max-batch", type=int, default=int(_env("max_batch", d.max_batch)))
    p.add_argument("--max-wait-ms", type=float, default=float(_env("max_wait_ms", d.max_wait_ms)))
    p.add_argument("--block-ms", type=int, default=d.block_ms)
    p.add_argument("--claim-idle-ms", type=int,
                   default=int(_env("claim_idle_ms", d.claim_idle_ms)))
    p.add_argument("--max-attempts", type=int, default=d.max_attempts)
    p.add_argument("--heartbeat-ttl", type=float, default=d.heartbeat_ttl)
    p.add_argument("--consumer", default=d.consumer, help="worker id (default host-pid)")
    p.add_argument("--prefix", default=_env("redis_prefix", d.prefix),
                   help="key prefix (several deployments can share one Redis)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--metrics-port", type=int, default=int(_env("worker_metrics_port", 0)))
    p.add_argument("--log-level", default=_env("log_level", "info"))
    args = p.parse_args(argv)
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
