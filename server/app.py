"""Building, running and draining the grpc.aio server around the servicer.

Health follows the queue (NOT_SERVING while no worker or broker can take jobs), so load
balancers route new calls elsewhere. A drain (SIGTERM) keeps the listener open so that this is
observable: health turns NOT_SERVING first and new calls get UNAVAILABLE from the servicer;
calls in flight get ``grace_seconds`` to end by themselves; streams still open then are ended
by the server as if their client had half-closed (results, summary, then UNAVAILABLE), within
``DRAIN_SUMMARY_SECONDS``, and ``Detect`` calls still running are cancelled and answer
UNAVAILABLE at once (a client whose call the listener closed under it would see INTERNAL);
only then does the listener close and what is left get cancelled.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from models.inference import Detector, load_detector
from server import metrics
from server.auth import BearerTokenInterceptor
from server.config import ServerConfig, listen_address
from server.queue.base import InferenceQueue
from server.queue.factory import make_queue
from server.reflection import enable_server_reflection
from server.reload import ModelReloader, ReloadRefused
from server.service import DetectionServicer
from server.speakers import Diarization, load_diarization

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DetectionService"].full_name
HEALTH_POLL_SECONDS = 1.0
# After the grace: streams ended by the server have this long to send their last results and
# summary before whatever remains is cancelled
DRAIN_SUMMARY_SECONDS = 5.0
# Each step of a stop (the listener and its calls, then each queue) gets this long before the
# next step runs anyway (RunningServer.stop)
CLOSE_STEP_SECONDS = 10.0
MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # Detect takes whole recordings
# The transport's per-stream read-ahead stays at HTTP/2's 64 KiB: with grpc's BDP probing on
# (its default) a stream that this server stops reading (a wedged process, a stream held back
# by max_inflight_per_stream) is still granted 4 MiB, 262 s of 8 kHz audio, which a client
# cannot tell from audio heard; the telephony plugins' stall bound (plugins/bridge.py) counts
# on the push-back. Real-time streams need 16-64 KB/s: 64 KiB a round trip serves them.
GRPC_SERVER_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                       ("grpc.http2.bdp_probe", 0))
log = structlog.get_logger("callshield.app")


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    servicer: DetectionServicer
    queue: InferenceQueue
    health: health.aio.HealthServicer
    _watcher: asyncio.Task[None]
    # the diarizer's model passes, when Redis workers run them (also in health)
    pass_queues: tuple[InferenceQueue, ...] = ()

    async def stop(self, grace: float = 0.0) -> None:
        """Drain (see the module docstring) for ``grace`` seconds, then close the queue;
        ``grace`` 0 cancels open calls at once."""
        await self.health.enter_graceful_shutdown()  # NOT_SERVING, and it stays so
        self._watcher.cancel()
        with suppress(asyncio.CancelledError):
            await self._watcher
        servicer = self.servicer
        servicer.draining = True
        if grace > 0:
            if not await _wait(servicer.idle, grace):
                log.info("drain grace over", open_streams=len(servicer.inputs),
                         open_detects=len(servicer.detects), open_calls=servicer.admitted)
                servicer.end_calls()
                await _wait(servicer.idle, DRAIN_SUMMARY_SECONDS)
        # Each step is bounded, so that a stop always finishes and says what did not close. A
        # handler still awaiting a window (a stream's summary waits for its windows) holds
        # ``server.stop`` until the queue fails that window, and the queue closes after the
        # server: closing the queues once the server is slow to stop releases such handlers.
        stopping = asyncio.ensure_future(self.server.stop(0))
        if not await _finished(stopping, CLOSE_STEP_SECONDS):
            log.warning("server stop waits on open calls: closing the queues under them",
                        open_streams=len(servicer.inputs), open_detects=len(servicer.detects),
                        open_calls=servicer.admitted)
        for queue in (self.queue, *self.pass_queues):
            try:
                async with asyncio.timeout(CLOSE_STEP_SECONDS):
                    await queue.close()
            except TimeoutError:
                log.error("queue did not close", queue=type(queue).__name__,
                          seconds=CLOSE_STEP_SECONDS)
        if await _finished(stopping, CLOSE_STEP_SECONDS):
            stopping.result()  # what the server's stop raised, if anything
        else:
            stopping.cancel()
            log.error("grpc server did not stop", open_calls=servicer.admitted,
                      seconds=2 * CLOSE_STEP_SECONDS)


async def _finished(task: asyncio.Future[None], seconds: float) -> bool:
    """Whether ``task`` ended within ``seconds``; it goes on running if not."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return bool(done)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Whether ``event`` was set within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def _update_health(
    queues: tuple[InferenceQueue, ...], servicer: health.aio.HealthServicer, last: int | None
) -> int:
    """Set both health names from the queues' state (the windows' queue first, then those of
    the diarizer's passes: a MIXED call needs them all); returns the status set."""
    try:
        ok = all([await queue.healthy() for queue in queues])
    except Exception:  # an unreachable broker is a health state, not a crash
        ok = False
    status = (health_pb2.HealthCheckResponse.SERVING if ok
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    if status != last:
        for name in ("", SERVICE_NAME):
            await servicer.set(name, status)
        log.info("health", serving=ok)
    metrics.QUEUE_DEPTH.set(queues[0].depth())
    return status


async def _watch_health(
    queues: tuple[InferenceQueue, ...], servicer: health.aio.HealthServicer, last: int
) -> None:
    while True:
        await asyncio.sleep(HEALTH_POLL_SECONDS)
        last = await _update_health(queues, servicer, last)


def set_threads(threads: int) -> None:
    """Threads per computation for torch and every BLAS/OpenMP library loaded (0: leave the
    libraries' defaults). Process-wide: the command's business, not an embedder's."""
    if threads > 0:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        threadpool_limits(limits=threads)


async def start_server(
    config: ServerConfig, detector: Detector | None = None,
    queue: InferenceQueue | None = None,
) -> RunningServer:
    """Start serving ``config.listen`` (port 0 picks a free one; see ``RunningServer.port``)."""
    detector = detector or load_detector(config.model, device=config.device)
    queue = queue or make_queue(config, detector)
    await queue.start()
    interceptors = [BearerTokenInterceptor(config.auth_token)] if config.auth_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=list(GRPC_SERVER_OPTIONS),
    )
    diarization = load_diarization(config.diarization, config.diarization_segmentation,
                                   config.diarization_pipeline, config.diarization_step,
                                   detector.sample_rate, config.diarization_precision,
                                   config.max_detect_diarizations)
    pass_queues = await _diarization_passes(config, queue, diarization)
    servicer = DetectionServicer(detector, queue, config, diarization)
    servicer.reloader = ModelReloader(servicer, config.model)  # type: ignore[attr-defined]
    pb_grpc.add_DetectionServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
    listen = listen_address(config.listen)
    if config.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
        port = server.add_secure_port(listen, credentials)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    # health is known before the first probe can arrive (else NOT_FOUND, or a stale answer)
    queues = (queue, *pass_queues)
    status = await _update_health(queues, health_servicer, None)
    await server.start()
    watcher = asyncio.create_task(_watch_health(queues, health_servicer, status))
    log.info("serving", listen=listen, port=port, model=detector.name,
             queue=config.queue, diarization=diarization is not None,
             embedding_precision=diarization.models.precision if diarization else None,
             diarization_passes=("redis" if pass_queues else "local") if diarization else None,
             threads=torch.get_num_threads(),
             auth=bool(config.auth_token), tls=bool(config.tls_cert))
    return RunningServer(server, port, servicer, queue, health_servicer, watcher, pass_queues)


async def _diarization_passes(config: ServerConfig, queue: InferenceQueue,
                              diarization: Diarization | None) -> tuple[InferenceQueue, ...]:
    """With a Redis queue (and ``diarization_queue`` auto), the diarizer's model passes go
    to the Redis workers too, on queues beside the windows' one (same broker, same key
    prefix): the queues, started; none when the passes run in this process."""
    if diarization is None or config.diarization_queue == "local":
        return ()
    from server.queue.redis_protocol import DIARIZATION_PASSES
    from server.queue.redis_queue import RedisPass, RedisQueue

    if not isinstance(queue, RedisQueue):
        return ()
    loop = asyncio.get_running_loop()
    queues = tuple(queue.sibling(name) for name in DIARIZATION_PASSES)
    for q in queues:
        await q.start()
    diarization.models.use(*(RedisPass(q, loop) for q in queues))
    return queues


async def _reload_on_signal(running: RunningServer) -> None:
    """SIGHUP: reload the serving path; a refusal is logged (reload.py) and changes nothing."""
    with suppress(ReloadRefused):
        await running.servicer.reloader.reload()  # type: ignore[attr-defined]


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM, then drain; SIGHUP reloads the model from its path
    without dropping calls (server/reload.py)."""
    set_threads(config.threads)
    if config.metrics_listen or config.metrics_port:
        host, port = metrics.listen_address(config.metrics_listen, config.metrics_port)
        metrics.serve(port, host)
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def hangup() -> None:  # SIGHUP: the model's path read again (server/reload.py)
        task = asyncio.create_task(_reload_on_signal(running))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    await stop.wait()
    log.info("draining", open_streams=len(running.servicer.inputs),
             open_calls=running.servicer.admitted, grace_seconds=config.grace_seconds)
    await running.stop(config.grace_seconds)
    log.info("stopped")
