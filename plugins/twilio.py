"""Twilio Media Streams: the WebSocket server a ``<Stream>`` (or ``<Start><Stream>``) connects to.

The messages (``start``, ``media``, ``stop``, track pairing) are
:mod:`plugins.protocols.twilio`; this module checks the upgrade request and updates the live
call on an alert.

With an auth token (or a signing key) configured, the upgrade request must carry a valid
``X-Twilio-Signature``: base64 HMAC of the URL Twilio requested, under the auth token, or
HMAC-SHA256 under the signing key when ``X-Twilio-Webhooks-Signature-Settings`` names
``algorithm=HMAC_SHA256``. Which URL Twilio signed is the one thing a proxy hides: it is the
``url`` of ``<Stream>`` in the TwiML, so ``public_url`` takes exactly that (a bare base URL
``wss://host`` still gets the request's path appended); without it the URL is rebuilt from the
Host header (and ``X-Forwarded-Host``/``-Proto`` when the proxy is trusted). As Twilio's own
``RequestValidator`` does, each URL is tried with and without its default port, because
Twilio's back end signs either form.
Alerts go back through the REST call update (``POST {api_base}/2010-04-01/Accounts/
{AccountSid}/Calls/{CallSid}.json``) with the configured ``Url`` or ``Twiml``, in which
``$speaker``, ``$score`` and ``$call_sid`` are substituted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from string import Template
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from plugins import metrics
from plugins.bridge import DetectorLink
from plugins.delivery import SpoofAlert
from plugins.protocols.twilio import TwilioProtocol
from plugins.session import PlatformCall
from plugins.transports import WebSocketTransport

PLUGIN = TwilioProtocol.plugin
REST_TIMEOUT_SECONDS = 10.0
log = structlog.get_logger("callshield.plugins.twilio")


HASHES = {"HMAC_SHA1": hashlib.sha1, "HMAC_SHA256": hashlib.sha256}
SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"


def signature(secret: str, url: str, params: dict[str, str] | None = None,
              algorithm: str = "HMAC_SHA1") -> str:
    """Twilio's request signature: URL, then each POST parameter name+value sorted by name."""
    data = url + "".join(k + v for k, v in sorted((params or {}).items()))
    digest = hmac.new(secret.encode(), data.encode(), HASHES[algorithm]).digest()
    return base64.b64encode(digest).decode()


def signature_algorithm(settings_header: str) -> str:
    """The algorithm ``X-Twilio-Webhooks-Signature-Settings`` names (``key=...,algorithm=
    HMAC_SHA256``); without the header it is the Auth Token's HMAC_SHA1."""
    for part in settings_header.split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip() == "algorithm" and value.strip():
            return value.strip().upper()
    return "HMAC_SHA1"


def port_variants(url: str) -> list[str]:
    """``url`` as given, without its port, and with the scheme's default port (443 for
    wss/https, else 80): Twilio signs either form for the same endpoint."""
    parts = urlsplit(url)
    if parts.port is not None:
        bare = parts._replace(netloc=parts.netloc.rsplit(":", 1)[0]).geturl()
        return [url, bare]
    port = 443 if parts.scheme in ("wss", "https") else 80
    return [url, parts._replace(netloc=f"{parts.netloc}:{port}").geturl()]


def signed_urls(public_url: str, path_qs: str, host: str, schemes: tuple[str, ...]) -> list[str]:
    """Every URL Twilio may have signed for a request to ``path_qs`` on ``host``."""
    if public_url:
        parts = urlsplit(public_url)
        if parts.path in ("", "/"):  # a base URL: the request supplies path and query
            bases = [public_url.rstrip("/") + path_qs]
        else:  # the Stream URL itself; its query, when it has none, is the request's
            _, q, query = path_qs.partition("?")
            bases = [public_url + (q + query if q and not parts.query else "")]
    else:
        bases = [f"{scheme}://{host}{path_qs}" for scheme in schemes]
    return [url for base in bases for url in port_variants(base)]


@dataclass(frozen=True)
class TwilioSettings:
    auth_token: str = ""  # empty (and no signing_key): no signature check, no REST update
    public_url: str = ""  # the Stream URL of the TwiML, e.g. wss://calls.example.com/twilio
    signing_key: str = ""  # secret of HMAC_SHA256 signatures (default: the auth token)
    trust_proxy: bool = False  # rebuild the URL from X-Forwarded-Host/-Proto
    api_base: str = "https://api.twilio.com"
    account_sid: str = ""  # default: the start message's accountSid
    alert_url: str = ""  # REST update Url=... (TwiML app to branch to)
    alert_twiml: str = ""  # or Twiml=...


class TwilioMediaStreams:
    def __init__(self, detector: DetectorLink, settings: TwilioSettings) -> None:
        self.detector = detector
        self.settings = settings

    def check_signature(self, request: web.Request) -> str | None:
        """None when the signature is valid, else why not (for the log; never the secret)."""
        s = self.settings
        algorithm = signature_algorithm(request.headers.get(SETTINGS_HEADER, ""))
        if algorithm not in HASHES:
            return f"unsupported signature algorithm {algorithm[:20]!r}"
        secret = s.signing_key if algorithm != "HMAC_SHA1" and s.signing_key else s.auth_token
        host, schemes = request.host, ("wss", "https")
        if s.trust_proxy:
            host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
            proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
            if proto in ("http", "ws"):
                schemes = ("ws", "http")
        urls = signed_urls(s.public_url, request.path_qs, host, schemes)
        header = request.headers.get("X-Twilio-Signature", "")
        if any(hmac.compare_digest(signature(secret, url, None, algorithm), header)
               for url in urls):
            return None
        checked = sorted({url.partition("?")[0] for url in urls})
        return f"{algorithm} over {', '.join(checked)}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.settings.auth_token or self.settings.signing_key:
            problem = self.check_signature(request)
            if problem is not None:
                metrics.PROTOCOL_ERRORS.labels(PLUGIN, "signature").inc()
                log.warning("bad X-Twilio-Signature: upgrade refused", checked=problem,
                            hint="--twilio-public-url must be the <Stream url> of the TwiML")
                return web.Response(status=403, text="invalid X-Twilio-Signature")
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        protocol = TwilioProtocol()

        async def update(alert: SpoofAlert) -> None:
            account_sid = self.settings.account_sid or protocol.account_sid
            await self.update_call(account_sid, protocol.call_sid, alert)

        await PlatformCall(self.detector, protocol, WebSocketTransport(socket), update).run()
        return socket

    async def update_call(self, account_sid: str, call_sid: str, alert: SpoofAlert) -> None:
        """The REST call update that hands the live call to the alert TwiML."""
        s = self.settings
        if not (s.alert_url or s.alert_twiml) or not s.auth_token:
            return
        values = {"speaker": alert.speaker, "score": f"{alert.spoof_probability:.3f}",
                  "call_sid": call_sid}
        form = ({"Url": Template(s.alert_url).safe_substitute(values), "Method": "POST"}
                if s.alert_url else {"Twiml": Template(s.alert_twiml).safe_substitute(values)})
        url = f"{s.api_base.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
        auth = aiohttp.BasicAuth(account_sid, s.auth_token)
        timeout = aiohttp.ClientTimeout(total=REST_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(auth=auth, timeout=timeout) as http:
            async with http.post(url, data=form) as response:
                if response.status >= 300:
                    raise RuntimeError(f"Twilio call update: HTTP {response.status}")
