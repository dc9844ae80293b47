"""The plugins' configuration: ``python -m plugins serve``'s flags, each also read from
``CALLSHIELD_PLUGINS_<FLAG>`` (:class:`callshield.envflags.EnvFlags`: secrets belong there, not
on the command line, where ``ps`` shows them), and the settings they make (the addresses they
name: :mod:`plugins.addresses`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field

from callshield.envflags import PREFIX, EnvFlags
from plugins.addresses import Network, parse_hostport, parse_networks
from plugins.asterisk import AmiTarget
from plugins.audiosocket import DEFAULT_SLIN_TYPES, parse_slin_types
from plugins.bridge import DetectorLink
from plugins.siprec.server import SiprecSettings, parse_port_range
from plugins.twilio import TwilioSettings
from plugins.webhook import WebhookSender


@dataclass(frozen=True)
class PluginSettings:
    audiosocket: str = ""  # "host:port"; empty: off
    twilio: str = ""  # "host:port/path"
    freeswitch: str = ""
    audiohook: str = ""
    asterisk_alerts: AmiTarget | None = None
    slin_types: Mapping[int, int] = field(default_factory=lambda: dict(DEFAULT_SLIN_TYPES))
    twilio_settings: TwilioSettings = field(default_factory=TwilioSettings)
    audiohook_api_key: str = ""
    audiosocket_allow: tuple[Network, ...] = ()  # empty: any source
    audiohook_client_secret: str = ""  # base64, as Genesys shows it; empty: unsigned allowed
    siprec: SiprecSettings = field(default_factory=SiprecSettings)  # listen "": off


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m plugins")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the telephony plugins")
    env = EnvFlags(s, prefix=f"{PREFIX}PLUGINS_")
    flags = {
        "audiosocket": "Asterisk AudioSocket TCP listen address, e.g. :9092",
        "twilio": "Twilio Media Streams WebSocket, e.g. :8080/twilio",
        "freeswitch": "FreeSWITCH mod_audio_fork/mod_audio_stream WebSocket, e.g. :8080/fork",
        "audiohook": "Genesys AudioHook WebSocket, e.g. :8080/audiohook",
        "siprec": "SIPREC recording server, SIP on UDP and TCP, e.g. 0.0.0.0:5060",
        "siprec_rtp_ports": "UDP ports for SIPREC RTP (even: RTP, odd: RTCP)",
        "siprec_allow": "source networks SIPREC accepts SIP and RTP from, e.g. 10.1.2.0/24 "
                        "(default: any that reaches the listener)",
        "siprec_tls": "SIPREC over TLS as well, on this address, e.g. 0.0.0.0:5061",
        "siprec_tls_cert": "PEM certificate chain of --siprec-tls",
        "siprec_tls_key": "PEM private key of --siprec-tls",
        "detector": "detection server host:port",
        "detector_token": "bearer token for the detection server",
        "ami": "Asterisk AMI host:port for alerts (Setvar)",
        "ami_username": "", "ami_secret": "",
        "slin_types": "extra AudioSocket slin types, e.g. 0x12=16000 (0x10=8000 always)",
        "audiosocket_allow": "source networks AudioSocket accepts, e.g. 10.1.2.0/24,"
                             "192.0.2.7 (default: any that reaches the listener)",
        "twilio_auth_token": "checks X-Twilio-Signature and authenticates the call update",
        "twilio_public_url": "the <Stream url> of your TwiML, exactly, e.g. "
                             "wss://calls.example.com/twilio (what Twilio signs)",
        "twilio_signing_key": "secret of HMAC-SHA256 signatures (default: the auth token)",
        "twilio_api_base": "Twilio REST API base URL",
        "twilio_account_sid": "default: the stream's accountSid",
        "twilio_alert_url": "call update Url on an alert ($speaker, $score, $call_sid)",
        "twilio_alert_twiml": "call update Twiml on an alert (instead of a URL)",
        "audiohook_api_key": "required X-API-KEY of AudioHook connections",
        "audiohook_client_secret": "the integration's client secret (base64): requires "
                                   "signed AudioHook requests",
        "webhook_secret": "HMAC-SHA256 key of X-Callshield-Signature",
        "log_level": "",
    }
    defaults = {"detector": "127.0.0.1:50051", "twilio_api_base": "https://api.twilio.com",
                "log_level": "info", "siprec_rtp_ports": "40000-40999"}
    for name, help_text in flags.items():
        env.add("--" + name.replace("_", "-"), default=defaults.get(name, ""),
                help=help_text or None)
    env.add("--webhook", action="append", default=[],
            help="alert webhook URL (repeatable; the variable: comma-separated)")
    env.add("--alert-threshold", type=float, default=0.0)
    env.add("--twilio-trust-proxy", action="store_true", default=False,
            help="rebuild the signed URL from X-Forwarded-Host/-Proto (behind your "
            "own proxy only: clients can set them)")
    env.add("--reconnect-seconds", type=float, default=30.0,
            help="a detector gone mid-call: reconnect within this long (the audio "
            "meanwhile is a reported gap), else end the call's fork")
    env.add("--log-call-ids", choices=("hashed", "plain"), default="hashed",
            help="SIPREC: Call-IDs and participants' AORs in the logs (plain), or a digest "
            "of the Call-ID only (hashed)")
    env.add("--metrics-port", type=int, default=0)
    return p


def settings_from(args: argparse.Namespace) -> tuple[PluginSettings, DetectorLink]:
    alerts: AmiTarget | None = None
    if args.ami:
        host, port = parse_hostport(args.ami, "127.0.0.1")
        alerts = AmiTarget(host, port, args.ami_username, args.ami_secret)
    twilio = TwilioSettings(
        auth_token=args.twilio_auth_token, public_url=args.twilio_public_url,
        signing_key=args.twilio_signing_key, trust_proxy=args.twilio_trust_proxy,
        api_base=args.twilio_api_base, account_sid=args.twilio_account_sid,
        alert_url=args.twilio_alert_url, alert_twiml=args.twilio_alert_twiml)
    settings = PluginSettings(
        audiosocket=args.audiosocket, twilio=args.twilio, freeswitch=args.freeswitch,
        audiohook=args.audiohook, asterisk_alerts=alerts,
        slin_types=parse_slin_types(args.slin_types), twilio_settings=twilio,
        audiosocket_allow=parse_networks(args.audiosocket_allow),
        audiohook_api_key=args.audiohook_api_key,
        audiohook_client_secret=args.audiohook_client_secret,
        siprec=SiprecSettings(listen=args.siprec,
                              rtp_ports=parse_port_range(args.siprec_rtp_ports),
                              allow=parse_networks(args.siprec_allow),
                              log_call_ids=args.log_call_ids, tls_listen=args.siprec_tls,
                              tls_cert=args.siprec_tls_cert, tls_key=args.siprec_tls_key))
    webhook = WebhookSender(args.webhook, args.webhook_secret) if args.webhook else None
    detector = DetectorLink(args.detector, token=args.detector_token or None,
                            alert_threshold=args.alert_threshold, webhook=webhook,
                            reconnect_seconds=args.reconnect_seconds)
    return settings, detector
