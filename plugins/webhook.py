"""Alert webhooks: one signed JSON POST per alert to every configured URL.

The signature lets the receiver reject forged alerts: ``X-Callshield-Signature: sha256=<hex>``
is HMAC-SHA256 of the exact body bytes under the shared secret. Delivery is retried with
exponential backoff on connection errors, 429 and 5xx, and bounded (``max_attempts``), so a
receiver that is down never piles up work; a 4xx other than 429 is not retried (the request
itself is wrong).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

import aiohttp
import structlog

SIGNATURE_HEADER = "X-Callshield-Signature"
log = structlog.get_logger("callshield.plugins.webhook")


def sign(secret: str, body: bytes) -> str:
    """The ``X-Callshield-Signature`` value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """For receivers: constant-time check of a ``X-Callshield-Signature`` header."""
    return hmac.compare_digest(sign(secret, body), header)


class WebhookSender:
    def __init__(
        self, urls: Sequence[str], secret: str = "", *, max_attempts: int = 4,
        backoff_seconds: float = 0.5, timeout_seconds: float = 5.0,
    ) -> None:
        self.urls = tuple(urls)
        self.secret = secret
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def send(self, payload: dict[str, Any]) -> dict[str, bool]:
        """POST ``payload`` to every URL concurrently; returns delivered or not per URL."""
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            results = await asyncio.gather(
                *(self._post(session, url, body, headers, payload) for url in self.urls))
        return dict(zip(self.urls, results, strict=True))

    async def _post(
        self, session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
        payload: dict[str, Any],
    ) -> bool:
        bound = log.bind(call_id=payload.get("call_id"), plugin=payload.get("plugin"), url=url)
        for attempt in range(1, self.max_attempts + 1):
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    if response.status < 300:
                        return True
                    retry = response.status == 429 or response.status >= 500
                    bound.warning("webhook refused", status=response.status, attempt=attempt)
                    if not retry:
                        return False
            except (aiohttp.ClientError, TimeoutError) as exc:
                bound.warning("webhook failed", error=type(exc).__name__, attempt=attempt)
            if attempt < self.max_attempts:
                await asyncio.sleep(self.backoff_seconds * 2 ** (attempt - 1))
        bound.error("webhook gave up", attempts=self.max_attempts)
        return False
