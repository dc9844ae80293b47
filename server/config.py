"""Server configuration: its flags, each read from the environment too
(:class:`callshield.envflags.EnvFlags`, shared by every callshield program).

The server's variables are ``CALLSHIELD_<FLAG>`` (no scope); the Redis worker's settings that
must agree with the server's fall back to these names (``server/worker.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from callshield.envflags import EnvFlags
from models.verdicts import DEFAULT_RULE, RULES


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    model: str = "default"
    queue: str = "inprocess"  # or "redis"
    redis_url: str = "redis://127.0.0.1:6379/0"
    device: str = "cpu"  # in-process inference device: cpu, cuda or auto
    metrics_port: int = 0  # 0: no metrics endpoint; bound to 127.0.0.1
    metrics_listen: str = ""  # HOST:PORT of the metrics endpoint (overrides metrics_port)
    auth_token: str = ""  # empty: no auth
    # The admin feed (WatchCalls, server/events.py) needs this token; empty: feed disabled
    admin_token: str = ""
    # Seconds of each alert's audio the admin feed may send a watcher that asks (a console
    # keeping flagged audio for review); 0: the feed never carries audio
    feed_flagged_audio: float = 0.0
    tls_cert: str = ""
    tls_key: str = ""
    # Calls holding a slot (streams from their first message on, whether or not a config came
    # yet, and Detect calls) beyond this get RESOURCE_EXHAUSTED
    max_streams: int = 200
    # Slots one client address may hold; 0: half of max_streams, so that one client (a
    # runaway script, an abuser) cannot take every slot. A plugin host that is the only client
    # sets it to max_streams.
    max_streams_per_peer: int = 0
    config_timeout_seconds: float = 10.0  # a stream without its StreamConfig by then is closed
    idle_timeout_seconds: float = 60.0  # a stream whose client sends nothing this long is closed
    max_queue_depth: int = 2000  # windows waiting beyond this refuse new streams
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_inflight_per_stream: int = 8  # windows of one stream queued before it stops reading
    grace_seconds: float = 10.0
    # Detect: recordings longer than this are refused (INVALID_ARGUMENT) from their header,
    # before decoding: the 32 MiB message limit alone admits ~58 h of compressed silence
    max_detect_seconds: float = 3600.0
    # MIXED Detect recordings diarized at once, each with its own offline pipeline (more wait,
    # shortest first): bounds the memory of long recordings without queueing short ones
    # behind one long one
    max_detect_diarizations: int = 2
    log_level: str = "info"
    # hash (keyed hash; the default: a call id may be a caller's number) or plain (safe
    # characters, cut): logs.py
    log_call_ids: str = "hash"
    log_hash_key: str = ""  # key of the call id hash; "" = random per process
    # MIXED streams: off, on, or auto (on when the committed checkpoint and packages exist).
    # Off here so that embedding the server (tests, tools) stays light; `python -m server`
    # defaults to auto (see DIARIZATION_CLI_DEFAULT).
    diarization: str = "off"
    diarization_segmentation: str = ""  # segmentation .ckpt; "" = diarization/checkpoints
    diarization_pipeline: str = ""  # official pyannote pipeline directory for Detect
    diarization_step: float = 1.0  # seconds between two streaming diarization steps
    # the speaker embedding network's dtype: auto = bfloat16 where the CPU has it in hardware
    # (AVX512-BF16/AMX; about 1.8x less diarizer CPU), else float32 (diarization/stream.py)
    diarization_precision: str = "auto"
    # Where the diarizer's model passes run: auto = where windows are scored (with --queue
    # redis, by the Redis workers, which serve them unless started with --diarization off);
    # local = in this process whatever the queue (the SincNet front end, the mel features and
    # the clustering always run here)
    diarization_queue: str = "auto"
    verdict_rule: str = DEFAULT_RULE  # models.verdicts: "evidence" (CUSUM) or "ema" (earlier)
    # Threads one model computation may use (torch intra-op, BLAS); 0: the libraries' default,
    # one per core. The server's parallelism is across calls (the inference thread, each
    # MIXED call's diarizer step in a worker thread); with two per computation on two cores,
    # 12 diarized calls ran 1.7x slower and the diarizer's LSTMs 4x slower in worker threads
    # (README, "Measured"). Applied by `python -m server` (process-wide), not by an
    # embedding `start_server`.
    threads: int = 1

    @property
    def peer_limit(self) -> int:
        """Slots one client address may hold (``max_streams_per_peer``, 0: half the slots)."""
        return self.max_streams_per_peer or max(1, self.max_streams // 2)


DIARIZATION_CLI_DEFAULT = "auto"


def listen_address(value: str) -> str:
    """``--listen`` as gRPC takes it: a bare port (``50051`` or ``:50051``) binds 127.0.0.1, as
    every other listener of the project does, so a service is exposed to other machines only
    when an operator names the interface (``0.0.0.0:50051``, ``[::]:50051``). Raises
    ValueError for anything without a port number."""
    if value.startswith(("unix:", "unix-abstract:")):
        return value
    host, _, port = value.strip().rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {value!r}: expected HOST:PORT, :PORT or PORT")
    return f"{host or '127.0.0.1'}:{port}"


def parser() -> argparse.ArgumentParser:
    """``python -m server``'s flags, each with its ``CALLSHIELD_<FLAG>`` variable."""
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="python -m server",
        description="callshield gRPC detection server (flags also read from CALLSHIELD_<FLAG>)",
    )
    env = EnvFlags(p)
    env.add("--listen", default=d.listen,
            help="HOST:PORT; a bare port (PORT or :PORT) binds 127.0.0.1")
    env.add("--model", default=d.model, help="model name or path")
    env.add("--queue", choices=["inprocess", "redis"], default=d.queue)
    env.add("--redis-url", default=d.redis_url)
    env.add("--device", default=d.device)
    env.add("--metrics-port", type=int, default=d.metrics_port,
            help="Prometheus endpoint on 127.0.0.1:PORT")
    env.add("--metrics-listen", default=d.metrics_listen,
            help="Prometheus endpoint HOST:PORT (e.g. 0.0.0.0:9100 to expose it)")
    env.add("--auth-token", default=d.auth_token)
    env.add("--admin-token", default=d.admin_token,
            help="token of the admin feed (WatchCalls, for the console); never the stream "
                 "token; empty: the feed is disabled. Prefer the environment variable")
    env.add("--feed-flagged-audio", type=float, default=d.feed_flagged_audio,
            metavar="SECONDS",
            help="let the admin feed send each alert's audio (at most SECONDS, up to 60) to "
                 "a watcher that asks (console --keep-flagged-audio); 0: never send audio")
    env.add("--tls-cert", default=d.tls_cert)
    env.add("--tls-key", default=d.tls_key)
    env.add("--max-streams", type=int, default=d.max_streams)
    env.add("--max-streams-per-peer", type=int,
            default=d.max_streams_per_peer,
            help="slots one client address may hold (0: half of --max-streams)")
    env.add("--config-timeout-seconds", type=float,
            default=d.config_timeout_seconds,
            help="close a stream whose StreamConfig has not come by then")
    env.add("--idle-timeout-seconds", type=float,
            default=d.idle_timeout_seconds,
            help="close a stream whose client sent nothing for this long")
    env.add("--max-queue-depth", type=int,
            default=d.max_queue_depth)
    env.add("--max-batch", type=int, default=d.max_batch)
    env.add("--max-wait-ms", type=float, default=d.max_wait_ms)
    env.add("--max-inflight-per-stream", type=int,
            default=d.max_inflight_per_stream)
    env.add("--grace-seconds", type=float,
            default=d.grace_seconds)
    env.add("--max-detect-seconds", type=float,
            default=d.max_detect_seconds,
            help="longest recording Detect accepts (longer: use StreamDetect)")
    env.add("--max-detect-diarizations", type=int, default=d.max_detect_diarizations,
            help="MIXED Detect recordings diarized at once, each with its own pipeline; "
                 "more wait, the shortest first")
    env.add("--log-level", default=d.log_level)
    env.add("--log-call-ids", choices=["plain", "hash"],
            default=d.log_call_ids,
            help="call ids in logs: hash (default: HMAC, so a caller's number sent as a "
                 "call id never reaches a log) or plain (safe characters, at most 64; only "
                 "when call ids are known to carry no personal data)")
    env.add("--log-hash-key", default=d.log_hash_key,
            help="key of the call id hash (default: random per process); prefer "
                 "the environment variable, which ps does not show")
    env.add("--diarization", choices=["off", "on", "auto"],
            default=DIARIZATION_CLI_DEFAULT,
            help="diarize MIXED streams (auto: when the checkpoint exists)")
    env.add("--diarization-segmentation", metavar="CKPT",
            default=d.diarization_segmentation,
            help="segmentation checkpoint (default: diarization/checkpoints)")
    env.add("--diarization-pipeline", metavar="DIR",
            default=d.diarization_pipeline,
            help="local official pyannote pipeline for Detect (loaded offline)")
    env.add("--verdict-rule", choices=sorted(RULES), default=d.verdict_rule,
            help="per-speaker alert rule: evidence (CUSUM over calibrated log-odds, "
                 "default) or ema (the earlier moving average)")
    env.add("--threads", type=int, default=d.threads,
            help="threads per model computation (torch, BLAS); 0: one per core (the "
                 "libraries' default); 1 (default): calls run in parallel instead")
    env.add("--diarization-step", type=float,
            default=d.diarization_step,
            help="seconds between streaming diarization steps (0.25 to 1)")
    env.add("--diarization-precision", choices=["auto", "fp32", "bf16"],
            default=d.diarization_precision,
            help="speaker embedding dtype (auto: bf16 where the CPU has it in hardware)")
    env.add("--diarization-queue", choices=["auto", "local"], default=d.diarization_queue,
            help="where the diarizer's segmentation and embedding passes run (auto: on the "
                 "Redis workers with --queue redis, else here; local: here)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Flags override environment variables, which override the defaults."""
    p = parser()
    args = p.parse_args(argv)
    try:
        args.listen = listen_address(args.listen)
    except ValueError as exc:
        p.error(str(exc))
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.admin_token and args.admin_token == args.auth_token:
        p.error("--admin-token must differ from --auth-token: a stream client must not "
                "watch every call")
    for name in ("config_timeout_seconds", "idle_timeout_seconds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_streams_per_peer < 0:
        p.error("--max-streams-per-peer must be 0 (half of --max-streams) or more")
    if not 0 <= args.feed_flagged_audio <= 60:
        p.error("--feed-flagged-audio must lie in [0, 60] seconds")
    if args.max_detect_seconds <= 0:
        p.error("--max-detect-seconds must be positive")
    if args.max_detect_diarizations < 1:
        p.error("--max-detect-diarizations must be 1 or more")
    if args.threads < 0:
        p.error("--threads must be 0 (one per core) or more")
    if not 0.25 <= args.diarization_step <= 1.0:
        p.error("--diarization-step must lie in [0.25, 1]")
    return ServerConfig(**vars(args))
