"""``client``: stream or score an audio file against a callshield server.

Exit codes: 0 no spoof suspected, 3 spoof suspected, 2 usage error (bad flags, unreadable
file), 1 any other error (server unreachable, rejected request).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import soundfile
from rich.console import Console
from rich.live import Live
from rich.table import Table

from callshield.v1 import detection_pb2 as pb
from client.audio import AudioFile, read_audio
from client.events import EventFormatter
from client.sync import DetectionClient, paced

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SPOOF = 0, 1, 2, 3
MAX_PLATFORM_CHARS = 64  # the server's limit on StreamConfig.platform


def _platform(value: str) -> str:
    """A ``--platform`` name: shown by the console as given, so short and printable."""
    if len(value) > MAX_PLATFORM_CHARS or not value.isprintable():
        raise argparse.ArgumentTypeError(
            f"a platform name is at most {MAX_PLATFORM_CHARS} printable characters")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="client", description="callshield client",
        epilog="exit codes: 0 no spoof suspected, 3 spoof suspected, 2 usage error, 1 error",
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("file", help="WAV or FLAC file")
    common.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    common.add_argument("--token", help="bearer token, when the server requires one")
    common.add_argument("--tls", action="store_true", help="connect with TLS")
    common.add_argument("--ca-cert", help="PEM file of the server's CA (implies --tls)")
    common.add_argument("--json", action="store_true", help="one JSON object per line")
    common.add_argument("--split", action="store_true",
                        help="stereo file with one party per channel (speakers A and B)")
    s = sub.add_parser("stream", parents=[common], help="stream a file as a live call")
    pace = s.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=True,
                      help="send audio at its real pace (default)")
    pace.add_argument("--fast", dest="realtime", action="store_false",
                      help="send as fast as the server takes it")
    s.add_argument("--call-id", help="call reference (default: random)")
    s.add_argument("--platform", type=_platform, default="cli",
                   help="where the call comes from (StreamConfig.platform, e.g. asterisk, "
                        "twilio): shown with the call by the console (default: cli)")
    s.add_argument("--threshold", type=float, default=0.0, help="alert threshold (0: server's)")
    sub.add_parser("detect", parents=[common], help="score a whole file at once")
    return p


class LiveView:
    """Per-speaker table, redrawn on every event (only on a terminal)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.alerts: list[str] = []

    def update(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "window":
            row = self.rows.setdefault(event["speaker"], {})
            row["window"] = event["spoof_probability"]
            row["at"] = event["end"]
        elif kind == "verdict":
            self.rows.setdefault(event["speaker"], {}).update(event)
        elif kind == "alert":
            self.alerts.append(f"ALERT speaker {event['speaker']}: spoof suspected "
                               f"{event['start']:.1f}-{event['end']:.1f} s "
                               f"(p={event['spoof_probability']:.2f})")

    def render(self) -> Table:
        table = Table(title="callshield", caption="\n".join(self.alerts) or None)
        for column in ("speaker", "at (s)", "window p", "running p", "verdict", "speech (s)"):
            table.add_column(column)
        for speaker, row in self.rows.items():
            verdict = row.get("verdict", "unknown")
            style = {"spoof": "bold red", "bonafide": "green"}.get(verdict, "")
            table.add_row(speaker, f"{row.get('at', 0):.1f}", f"{row.get('window', 0):.2f}",
                          f"{row.get('spoof_probability', 0):.2f}", f"[{style}]{verdict}[/]"
                          if style else verdict, f"{row.get('speech_seconds', 0):.1f}")
        return table


def _print_summary(summary: dict[str, Any], console: Console) -> None:
    for v in summary["speakers"]:
        console.print(f"speaker {v['speaker']}: {v['verdict']} "
                      f"(spoof probability {v['spoof_probability']:.2f}, "
                      f"{v['speech_seconds']:.1f} s of speech)", highlight=False)


def _stream(args: argparse.Namespace, audio: AudioFile, client: DetectionClient) -> int:
    config = audio.config(split=args.split, call_id=args.call_id,
                          alert_threshold=args.threshold)
    config.platform = args.platform
    chunks: Iterator[bytes] = audio.chunks()
    if args.realtime:
        chunks = paced(chunks, 0.1)
    fmt = EventFormatter(config.call_id)
    console = Console()
    view = LiveView() if (console.is_terminal and not args.json) else None
    summary: dict[str, Any] | None = None
    live = Live(view.render(), console=console, auto_refresh=False) if view else None
    if live:
        live.start()
    try:
        for response in client.stream(config, chunks):
            event = fmt(response)
            if args.json:
                print(json.dumps(event), flush=True)
            if view and live:
                view.update(event)
                live.update(view.render(), refresh=True)
            if event["type"] == "summary":
                summary = event
    finally:
        if live:
            live.stop()
    if summary is None:
        raise RuntimeError("the stream ended without a summary")
    if not args.json:
        _print_summary(summary, console)
    return EXIT_SPOOF if summary["spoof"] else EXIT_OK


def _detect(args: argparse.Namespace, client: DetectionClient) -> int:
    response = client.detect_file(args.file, split=args.split)
    fmt = EventFormatter(response.summary.call_id)
    summary = fmt(pb.StreamDetectResponse(summary=response.summary))
    if args.json:
        for window in response.windows:
            print(json.dumps(fmt(pb.StreamDetectResponse(window=window))))
        print(json.dumps(summary))
    else:
        _print_summary(summary, Console())
    return EXIT_SPOOF if summary["spoof"] else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # exits 2 on a usage error
    try:
        audio = read_audio(args.file)
    except (OSError, soundfile.LibsndfileError, RuntimeError) as exc:
        print(f"client: cannot read {args.file}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.split and audio.channels != 2:
        print(f"client: --split needs a 2-channel file, {args.file} has {audio.channels}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        with DetectionClient(args.server, token=args.token, tls=args.tls,
                             root_certificates=args.ca_cert) as client:
            if args.command == "stream":
                return _stream(args, audio, client)
            return _detect(args, client)
    except grpc.RpcError as exc:
        print(f"client: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return EXIT_ERROR
    except (OSError, RuntimeError) as exc:
        print(f"client: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
