"""``make bench-diarization``: diarization quality, speed, and per-speaker spoof alerts.

Writes ``bench/results/diarization.json`` and ``bench/results/diarization.md``:

* DER (pyannote.metrics, collar 0 and 0.25 s, overlap scored) on ``../shared/calls``, for the
  offline pipeline (``Detect``) and the streaming diarizer (``StreamDetect``);
* streaming real-time factor per call on this CPU (one thread, 0.1 s chunks as a live call);
* per call, the alerts of a real server (in-process queue, diarization on, the default spoof
  model) fed through the same client code as ``client stream --json``: which label was
  flagged, the reference voice that label maps to (optimal DER mapping of the streaming
  diarization), whether that voice is spoofed in the call's JSON, and the delay from the
  spoofed voice's first speech to the alert (the alert's ``end``, i.e. the call time at which
  it was raised).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diarization.evaluate import (  # noqa: E402
    Call,
    annotation,
    der,
    label_to_voice,
    reference,
    shared_calls,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def diarize_all(calls: list[Call]) -> dict[str, Any]:
    from diarization.offline import build_pipeline, diarize
    from diarization.stream import DiarizationModels, StreamingDiarizer, diarize_stream

    models = DiarizationModels()
    pipeline = build_pipeline()
    out: dict[str, Any] = {}
    for call in calls:
        audio = call.load()
        seconds = audio.shape[0] / 8000
        t0 = time.perf_counter()
        diarizer = StreamingDiarizer(models, 8000)
        stream = diarize_stream(diarizer, audio)
        stream_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        offline = diarize(pipeline, audio, 8000)
        offline_wall = time.perf_counter() - t0
        out[call.uri] = {"seconds": seconds, "stream": stream, "offline": offline,
                         "stream_rtf": stream_wall / seconds,
                         "offline_rtf": offline_wall / seconds,
                         "stream_speakers": list(diarizer.speakers)}
        print(f"{call.uri}: stream rtf {stream_wall / seconds:.3f}, "
              f"offline rtf {offline_wall / seconds:.3f}", flush=True)
    return out


def alerts_all(calls: list[Call], model: str) -> dict[str, list[dict[str, Any]]]:
    """Stream every call through a real server with diarization on; alerts per call."""
    from client.audio import read_audio
    from client.events import EventFormatter
    from client.sync import DetectionClient
    from models.inference import load_detector
    from server.app import start_server
    from server.config import ServerConfig

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        config = ServerConfig(listen="127.0.0.1:0", model=model, diarization="on")
        box["server"] = await start_server(config, detector=load_detector(model))
        ready.set()
        await asyncio.Event().wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    ready.wait(300)
    out: dict[str, list[dict[str, Any]]] = {}
    with DetectionClient(f"127.0.0.1:{box['server'].port}") as client:
        for call in calls:
            audio = read_audio(call.audio)
            config = audio.config(call_id=call.uri, interim_results=False)
            fmt = EventFormatter(call.uri)
            events = [fmt(r) for r in client.stream(config, audio.chunks())]
            out[call.uri] = [e for e in events if e["type"] == "alert"]
            print(f"{call.uri}: alerts {[(e['speaker'], e['end']) for e in out[call.uri]]}",
                  flush=True)
    loop.call_soon_threadsafe(loop.stop)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.diarization", description=__doc__)
    p.add_argument("--model", default="default", help="spoof model for the alert part")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    calls = shared_calls()
    diar = diarize_all(calls)
    alerts = alerts_all(calls, args.model)
    rows, pairs = [], {"stream": [], "offline": []}
    for call in calls:
        d = diar[call.uri]
        ref = reference(call)
        hyp = {m: annotation(d[m], call.uri) for m in ("stream", "offline")}
        for m in pairs:
            pairs[m].append((ref, hyp[m]))
        voices = label_to_voice(ref, hyp["stream"])
        flagged = [{"label": a["speaker"], "voice": voices.get(a["speaker"]),
                    "alert_at": a["end"]} for a in alerts[call.uri]]
        spoof = call.spoof_voices
        first = call.first_spoof_seconds
        hits = [f for f in flagged if f["voice"] in spoof]
        rows.append({
            "call": call.uri, "type": call.meta.get("call_type"), "seconds": d["seconds"],
            "spoof_voices": sorted(spoof), "first_spoof_s": first,
            "stream_der_0.25": der([(ref, hyp["stream"])], 0.25),
            "offline_der_0.25": der([(ref, hyp["offline"])], 0.25),
            "stream_speakers": d["stream_speakers"], "stream_rtf": d["stream_rtf"],
            "offline_rtf": d["offline_rtf"], "flagged": flagged,
            "spoof_flagged": bool(hits) if spoof else None,
            "bonafide_flagged": any(f["voice"] not in spoof for f in flagged),
            "alert_delay_s": (min(f["alert_at"] for f in hits) - first) if hits and first
            is not None else None,
        })
    spoof_rows = [r for r in rows if r["spoof_voices"]]
    summary = {
        "der": {m: {"collar_0": der(pairs[m], 0.0), "collar_0.25": der(pairs[m], 0.25)}
                for m in pairs},
        "stream_rtf_mean": sum(r["stream_rtf"] for r in rows) / len(rows),
        "offline_rtf_mean": sum(r["offline_rtf"] for r in rows) / len(rows),
        "spoof_calls_flagged": f"{sum(bool(r['spoof_flagged']) for r in spoof_rows)}"
                               f"/{len(spoof_rows)}",
        "calls_with_bonafide_flagged": f"{sum(r['bonafide_flagged'] for r in rows)}/{len(rows)}",
        "spoof_model": args.model,
        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "diarization.json").write_text(json.dumps(
        {"summary": summary, "calls": rows}, indent=1))
    (RESULTS / "diarization.md").write_text(markdown(summary, rows))
    print((RESULTS / "diarization.md").read_text())


def markdown(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    d = summary["der"]
    lines = [
        "# Diarization benchmark (`make bench-diarization`)", "",
        f"Calls: `../shared/calls` ({len(rows)}). CPU threads: {summary['threads']}. "
        f"Spoof model: `{summary['spoof_model']}`.", "",
        "| mode | DER collar 0 | DER collar 0.25 s | mean RTF |", "|---|---|---|---|",
        f"| offline (Detect) | {d['offline']['collar_0']:.1%} | "
        f"{d['offline']['collar_0.25']:.1%} | {summary['offline_rtf_mean']:.3f} |",
        f"| streaming (0.5 s step, 5 s buffer) | {d['stream']['collar_0']:.1%} | "
        f"{d['stream']['collar_0.25']:.1%} | {summary['stream_rtf_mean']:.3f} |", "",
        f"Spoof calls with the spoofed voice flagged: {summary['spoof_calls_flagged']}; "
        f"calls with a bona fide voice flagged: {summary['calls_with_bonafide_flagged']}.", "",
        "| call | type | stream DER@0.25 | offline DER@0.25 | speakers | stream RTF | "
        "flagged (label -> voice @ s) | spoof voice flagged | delay (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flagged = ", ".join(f"{f['label']}->{f['voice']} @{f['alert_at']:.1f}"
                            for f in r["flagged"]) or "-"
        delay = f"{r['alert_delay_s']:.1f}" if r["alert_delay_s"] is not None else "-"
        hit = "-" if r["spoof_flagged"] is None else ("yes" if r["spoof_flagged"] else "NO")
        lines.append(
            f"| {r['call']} | {r['type']} | {r['stream_der_0.25']:.1%} | "
            f"{r['offline_der_0.25']:.1%} | {len(r['stream_speakers'])} | "
            f"{r['stream_rtf']:.3f} | {flagged} | {hit} | {delay} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
