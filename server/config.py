"""Server configuration: every flag has a ``CALLSHIELD_*`` environment variable, so the same
image runs from a shell, systemd or Kubernetes without a wrapper script."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from server.verdicts import DEFAULT_RULE, RULES


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
    log_level: str = "info"
    log_call_ids: str = "plain"  # plain (safe characters, cut) or hash (keyed hash): logs.py
    log_hash_key: str = ""  # key of the call id hash; "" = random per process
    # MIXED streams: off, on, or auto (on when the committed checkpoint and packages exist).
    # Off here so that embedding the server (tests, tools) stays light; `python -m server`
    # defaults to auto (see DIARIZATION_CLI_DEFAULT).
    diarization: str = "off"
    diarization_segmentation: str = ""  # segmentation .ckpt; "" = diarization/checkpoints
    diarization_pipeline: str = ""  # official pyannote pipeline directory for Detect
    diarization_step: float = 0.5  # seconds between two streaming diarization steps
    verdict_rule: str = DEFAULT_RULE  # server.verdicts: "evidence" (CUSUM) or "ema" (earlier)

    @property
    def peer_limit(self) -> int:
        """Slots one client address may hold (``max_streams_per_peer``, 0: half the slots)."""
        return self.max_streams_per_peer or max(1, self.max_streams // 2)


DIARIZATION_CLI_DEFAULT = "auto"


def _env(name: str, default: object) -> str:
    return os.environ.get(f"CALLSHIELD_{name.upper()}", str(default))


def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Flags override environment variables, which override the defaults."""
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="python -m server",
        description="callshield gRPC detection server (flags also read from CALLSHIELD_<FLAG>)",
    )
    p.add_argument("--listen", default=_env("listen", d.listen), help="host:port")
    p.add_argument("--model", default=_env("model", d.model), help="model name or path")
    p.add_argument("--queue", choices=["inprocess", "redis"], default=_env("queue", d.queue))
    p.add_argument("--redis-url", default=_env("redis_url", d.redis_url))
    p.add_argument("--device", default=_env("device", d.device))
    p.add_argument("--metrics-port", type=int, default=int(_env("metrics_port", d.metrics_port)),
                   help="Prometheus endpoint on 127.0.0.1:PORT")
    p.add_argument("--metrics-listen", default=_env("metrics_listen", d.metrics_listen),
                   help="Prometheus endpoint HOST:PORT (e.g. 0.0.0.0:9100 to expose it)")
    p.add_argument("--auth-token", default=_env("auth_token", d.auth_token))
    p.add_argument("--tls-cert", default=_env("tls_cert", d.tls_cert))
    p.add_argument("--tls-key", default=_env("tls_key", d.tls_key))
    p.add_argument("--max-streams", type=int, default=int(_env("max_streams", d.max_streams)))
    p.add_argument("--max-streams-per-peer", type=int,
                   default=int(_env("max_streams_per_peer", d.max_streams_per_peer)),
                   help="slots one client address may hold (0: half of --max-streams)")
    p.add_argument("--config-timeout-seconds", type=float,
                   default=float(_env("config_timeout_seconds", d.config_timeout_seconds)),
                   help="close a stream whose StreamConfig has not come by then")
    p.add_argument("--idle-timeout-seconds", type=float,
                   default=float(_env("idle_timeout_seconds", d.idle_timeout_seconds)),
                   help="close a stream whose client sent nothing for this long")
    p.add_argument("--max-queue-depth", type=int,
                   default=int(_env("max_queue_depth", d.max_queue_depth)))
    p.add_argument("--max-batch", type=int, default=int(_env("max_batch", d.max_batch)))
    p.add_argument("--max-wait-ms", type=float, default=float(_env("max_wait_ms", d.max_wait_ms)))
    p.add_argument("--max-inflight-per-stream", type=int,
                   default=int(_env("max_inflight_per_stream", d.max_inflight_per_stream)))
    p.add_argument("--grace-seconds", type=float,
                   default=float(_env("grace_seconds", d.grace_seconds)))
    p.add_argument("--max-detect-seconds", type=float,
                   default=float(_env("max_detect_seconds", d.max_detect_seconds)),
                   help="longest recording Detect accepts (longer: use StreamDetect)")
    p.add_argument("--log-level", default=_env("log_level", d.log_level))
    p.add_argument("--log-call-ids", choices=["plain", "hash"],
                   default=_env("log_call_ids", d.log_call_ids),
                   help="call ids in logs: plain (safe characters, at most 64) or hash "
                        "(HMAC; use it when clients may send phone numbers as call ids)")
    p.add_argument("--log-hash-key", default=_env("log_hash_key", d.log_hash_key),
                   help="key of the call id hash (default: random per process); prefer "
                        "the environment variable, which ps does not show")
    p.add_argument("--diarization", choices=["off", "on", "auto"],
                   default=_env("diarization", DIARIZATION_CLI_DEFAULT),
                   help="diarize MIXED streams (auto: when the checkpoint exists)")
    p.add_argument("--diarization-segmentation", metavar="CKPT",
                   default=_env("diarization_segmentation", d.diarization_segmentation),
                   help="segmentation checkpoint (default: diarization/checkpoints)")
    p.add_argument("--diarization-pipeline", metavar="DIR",
                   default=_env("diarization_pipeline", d.diarization_pipeline),
                   help="local official pyannote pipeline for Detect (loaded offline)")
    p.add_argument("--verdict-rule", choices=sorted(RULES),
                   default=_env("verdict_rule", d.verdict_rule),
                   help="per-speaker alert rule: evidence (CUSUM over calibrated log-odds, "
                        "default) or ema (the earlier moving average)")
    p.add_argument("--diarization-step", type=float,
                   default=float(_env("diarization_step", d.diarization_step)),
                   help="seconds between streaming diarization steps (0.25 to 1)")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    for name in ("config_timeout_seconds", "idle_timeout_seconds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_streams_per_peer < 0:
        p.error("--max-streams-per-peer must be 0 (half of --max-streams) or more")
    if args.max_detect_seconds <= 0:
        p.error("--max-detect-seconds must be positive")
    if not 0.25 <= args.diarization_step <= 1.0:
        p.error("--diarization-step must lie in [0.25, 1]")
    return ServerConfig(**vars(args))
