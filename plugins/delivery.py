"""Where a call's alerts and summary go, apart from the protocols and the sockets.

The first alert per speaker goes to the platform's own back channel (AMI channel variables,
the Twilio REST call update, or in band on the call's socket: :func:`in_band`) and to the
webhook; at a call's normal end its ``call_summary`` goes to the webhook. Each delivery runs
in its own task (:class:`Deliveries`), so that neither a slow receiver nor a failed one can
fail or stall the call; a failure is logged and counted, and the call goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import structlog

from callshield.v1 import detection_pb2 as pb
from plugins import metrics
from plugins.protocols.events import Outbound
from plugins.webhook import WebhookSender

DELIVERY_SECONDS = 30.0  # at shutdown: pending alert deliveries (webhook retries) or give up


@dataclass(frozen=True)
class SpoofAlert:
    """One alert as platforms and webhooks receive it (no audio, no caller number)."""

    plugin: str
    call_id: str
    speaker: str
    spoof_probability: float
    start_seconds: float
    end_seconds: float
    verdict: str = "spoof"
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spoof_probability"] = round(self.spoof_probability, 4)
        data["type"] = "spoof_alert"
        return data


def summary_event(plugin: str, call_id: str, summary: pb.StreamSummary, alerts: int,
                  extra: dict[str, str],
                  gaps: list[tuple[float, float]] | None = None) -> dict[str, Any]:
    """The webhook's ``call_summary`` payload: per speaker its final state, score, speech
    seconds and the call-time ranges it spoke in, in order of first speech, and the stretches
    of call time (seconds) no detector heard (no audio, no caller number)."""
    return {
        "type": "call_summary", "plugin": plugin, "call_id": call_id,
        "audio_seconds": round(summary.audio_seconds, 3),
        "windows_scored": summary.windows_scored, "alerts": alerts, "extra": dict(extra),
        "gaps": [[round(a, 3), round(b, 3)] for a, b in gaps or []],
        "speakers": [{"speaker": v.speaker, "state": pb.SpeakerState.Name(v.state),
                      "spoof_probability": round(v.spoof_probability, 4),
                      "speech_seconds": round(v.speech_seconds, 3),
                      "speech": [[round(r.start_seconds, 2), round(r.end_seconds, 2)]
                                 for r in v.speech]}
                     for v in summary.speakers],
    }


AlertSink = Callable[[SpoofAlert], Awaitable[None]]


class InBandProtocol(Protocol):
    def alert(self, data: dict[str, Any]) -> Outbound | None: ...


class InBandTransport(Protocol):
    @property
    def closed(self) -> bool: ...

    async def send(self, message: Outbound) -> None: ...


def in_band(protocol: InBandProtocol, transport: InBandTransport) -> AlertSink:
    """The alert as a message on the call's own connection (FreeSWITCH, AudioHook)."""
    async def send(alert: SpoofAlert) -> None:
        message = None if transport.closed else protocol.alert(alert.to_dict())
        if message is None:
            raise ConnectionError(f"{alert.plugin} connection already closing")
        await transport.send(message)
    return send


def webhook_sink(sender: WebhookSender) -> AlertSink:
    async def send(alert: SpoofAlert) -> None:
        results = await sender.send(alert.to_dict())
        if not all(results.values()):
            failed = [url for url, ok in results.items() if not ok]
            raise RuntimeError(f"not delivered to {len(failed)} of {len(results)} URLs")
    return send


class Deliveries:
    """The process's deliveries in flight (and other fire-and-forget call work), so that
    shutdown can let them end (bounded) before the event loop goes."""

    def __init__(self, webhook: WebhookSender | None) -> None:
        self.webhook = webhook if webhook is not None and webhook.urls else None
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def alert(self, alert: SpoofAlert, platform: AlertSink | None,
              log: structlog.stdlib.BoundLogger) -> None:
        if platform is not None:
            self.spawn(_deliver(alert, "platform", platform, log))
        if self.webhook is not None:
            self.spawn(_deliver(alert, "webhook", webhook_sink(self.webhook), log))

    def summary(self, plugin: str, event: dict[str, Any],
                log: structlog.stdlib.BoundLogger) -> None:
        if self.webhook is not None:
            self.spawn(_send_summary(self.webhook, plugin, event, log))

    async def drain(self, seconds: float = DELIVERY_SECONDS) -> None:
        """Wait (bounded) for the deliveries still in flight; cancel the rest."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=seconds)
        for task in set(self._tasks):
            task.cancel()


async def _deliver(alert: SpoofAlert, channel: str, sink: AlertSink,
                   log: structlog.stdlib.BoundLogger) -> None:
    try:
        await sink(alert)
    except Exception as exc:  # a failed back channel is logged; the call goes on
        metrics.ALERTS.labels(alert.plugin, channel, "failed").inc()
        log.error("alert delivery failed", channel=channel, error=f"{type(exc).__name__}: {exc}")
    else:
        metrics.ALERTS.labels(alert.plugin, channel, "delivered").inc()
        log.info("alert delivered", channel=channel, speaker=alert.speaker)


async def _send_summary(webhook: WebhookSender, plugin: str, event: dict[str, Any],
                        log: structlog.stdlib.BoundLogger) -> None:
    results = await webhook.send(event)
    outcome = "delivered" if all(results.values()) else "failed"
    metrics.SUMMARIES.labels(plugin, outcome).inc()
    log.info("summary " + outcome, channel="webhook")
