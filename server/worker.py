"""``python -m server.worker``: the command line of the Redis inference worker
(:mod:`server.queue.worker`), e.g. ``python -m server.worker --redis URL --model default
--device auto``. Besides the detector's windows it serves the streaming diarizer's two model
passes (``--diarization``, on by default where the checkpoint and packages are, as for the
server), so the servers of a deployment with a Redis queue need no model compute for MIXED
calls either; each stream has a consumer of its own, sharing the process's models. Apart
from the worker so that the worker can be embedded (tests, tools) without argparse, and this
module stays the entry point that deployments already call."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
from collections.abc import Sequence

import structlog

from callshield.envflags import PREFIX, EnvFlags
from models.inference import load_detector
from server.logs import configure, safe_url
from server.queue.worker import JobHandler, RunPass, ScoreWindows, Worker, WorkerConfig

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
    env.add("--diarization", choices=["off", "on", "auto"], default="auto",
            help="also serve the streaming diarizer's model passes for servers with "
                 "diarization on (auto: when the segmentation checkpoint and packages exist)")
    env.add("--diarization-segmentation", metavar="CKPT", default="",
            help="segmentation checkpoint (default: diarization/checkpoints); the servers' own")
    env.add("--diarization-precision", choices=["auto", "fp32", "bf16"], default="auto",
            help="speaker embedding dtype on CPU (auto: bfloat16 where the CPU has it)")
    env.add("--threads", type=int, default=-1,
            help="torch CPU threads per computation (0: torch's default, one per core; "
                 "default: 1 when the diarizer's passes are served too, since then three "
                 "computations run at once, else 0)")
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


def diarization_handlers(mode: str, segmentation: str, precision: str,
                         device: str) -> list[JobHandler]:
    """The diarizer's model passes (``server.queue.redis_protocol.DIARIZATION_PASSES``) as
    handlers, loaded as the server loads them (:func:`server.speakers.load_diarization`);
    none when ``mode`` is off, or auto without the checkpoint."""
    from server.queue.redis_protocol import DIARIZATION_PASSES
    from server.speakers import load_diarization

    diarization = load_diarization(mode, segmentation, "", 1.0, 0, precision)
    if diarization is None:
        return []
    models = diarization.models.to(device)
    return [RunPass(name, run, device)
            for name, run in zip(DIARIZATION_PASSES, models.passes(), strict=True)]


async def _amain(config: WorkerConfig, handlers: Sequence[JobHandler],
                 half: bool = False) -> None:
    """One consumer per stream served; SIGTERM stops them all (each finishes its batch);
    SIGHUP reloads the detector from its ``--model`` path (server/reload.py)."""
    workers = [Worker(dataclasses.replace(config, model=config.model if i == 0 else h.name), h)
               for i, h in enumerate(handlers)]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: [w.stop() for w in workers])
    reloads: set[asyncio.Task[bool]] = set()

    def hangup() -> None:
        windows = handlers[0]
        if isinstance(windows, ScoreWindows):
            task = asyncio.create_task(windows.reload(config.model, half))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    await asyncio.gather(*(w.run() for w in workers))


def main(argv: Sequence[str] | None = None) -> None:
    config, args = parse_args(argv)
    configure(args.log_level)
    for old, new in args.deprecated_env:
        log.warning("deprecated_environment_variable", variable=old, use=new)
    from models.inference import resolve_device

    device = resolve_device(config.device)
    detector = load_detector(config.model, device=str(device), half=device.type == "cuda")
    handlers: list[JobHandler] = [ScoreWindows(detector)]
    handlers += diarization_handlers(args.diarization, args.diarization_segmentation,
                                     args.diarization_precision, str(device))
    # Measured on 2 cores (README, "Redis queue and workers"): with the passes served, one
    # thread per computation held 10 MIXED calls where torch's default (2) held 5.
    threads = args.threads if args.threads >= 0 else (1 if len(handlers) > 1 else 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr="127.0.0.1")
    log.info("worker_model_loaded", model=detector.name, version=detector.version,
             device=str(device), redis=safe_url(config.redis_url),
             passes=[h.name for h in handlers[1:]])
    asyncio.run(_amain(config, handlers, half=device.type == "cuda"))


if __name__ == "__main__":
    main()
