"""``make bench-diarization``: per-speaker verdicts on calls, with the error sources apart.

A missed cloned voice or a flagged genuine one comes from the spoof model or from diarization.
To tell them apart, every call is run three ways, each cut into speaker lanes by the server's
own code (``server.lanes``: the windows, speech gate and call times a live stream gets):

* ``oracle``: the reference turns (the call's RTTM): what the verdicts would be with perfect
  diarization, so a miss here is the model's (or the rule's);
* ``stream``: the streaming diarizer as the server runs it live (0.1 s chunks, 1 s steps);
* ``offline``: the offline pipeline as ``Detect`` runs it.

Every scored window gets its spoof probability from the model once; the verdict rules of
``models.verdicts`` (the default ``evidence`` rule and the earlier ``ema`` rule) are then
replayed over the same scores, so the rules are compared on identical evidence. Per call and
pooled: spoofed voice flagged, a bona fide voice flagged, and the alert delay (the alert's
call time minus the call time the spoofed voice first speaks). Labels of the diarized runs are
mapped to the reference voices by the optimal DER mapping; a flagged label that maps to no
voice counts as a bona fide voice flagged. DER (collar 0 and 0.25 s) and the real-time factor
of both diarizers come from the same runs.

``--calls DIR``: any folder in the ``../shared/calls`` format (``calls.tsv``, and per call
FLAC, RTTM and JSON with per-turn spoof labels). Writes ``bench/results/diarization.{json,md}``
(or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import page

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.service.report import machine  # noqa: E402
from diarization.evaluate import (  # noqa: E402
    CALLS,
    Call,
    annotation,
    der,
    label_to_voice,
    reference,
    shared_calls,
)
from models.verdicts import DEFAULT_THRESHOLD, RULES, make_rule  # noqa: E402
from server.lanes import Lanes  # noqa: E402
from server.settings import DEFAULT_HOP_SECONDS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODES = ("oracle", "stream", "offline")
CHUNK_SECONDS = 0.1  # as a live call arrives
RATE = 8000

Turns = list[tuple[float, float, str]]


def rttm_turns(call: Call) -> Turns:
    turns = []
    for line in call.rttm.read_text().splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == "SPEAKER" and f[1] == call.uri:
            start, dur = float(f[3]), float(f[4])
            turns.append((start, start + dur, f[7]))
    return sorted(turns)


def lane_windows(attributor: Any, audio: np.ndarray, window_seconds: float) -> list[dict[str, Any]]:
    """The scoring windows (with speech) the server would cut from ``audio`` under
    ``attributor``, in the order it would submit them."""
    lanes = Lanes(RATE, window_seconds, DEFAULT_HOP_SECONDS, speakers=attributor.speakers)
    step = int(CHUNK_SECONDS * RATE)
    cut = []
    for i in range(0, audio.shape[0], step):
        cut += lanes.push(attributor.attribute([audio[i : i + step]]))
    cut += lanes.push(attributor.flush()) + lanes.flush()
    return [{"speaker": lane.speaker, "start": w.start, "end": w.end,
             "speech_total": w.speech_total, "audio": w.audio}
            for lane, w in cut if w.has_speech]


def score(detector: Any, windows: list[dict[str, Any]]) -> None:
    if not windows:
        return
    audio = [w.pop("audio") for w in windows]
    probs = detector.spoof_probability(detector.scores(audio, batch_size=16))
    for w, p in zip(windows, probs, strict=True):
        w["p"] = float(p)


def replay(windows: Sequence[dict[str, Any]], rule: str,
           threshold: float = DEFAULT_THRESHOLD, **params: float) -> dict[str, float]:
    """Label -> call time of its alert, for the labels the rule flags."""
    rules: dict[str, Any] = {}
    alerts: dict[str, float] = {}
    for w in windows:
        r = rules.get(w["speaker"])
        if r is None:
            r = rules[w["speaker"]] = make_rule(rule, w["speaker"], threshold)
            for k, v in params.items():
                setattr(r, k, v)
        update = r.update(w["p"], w["start"], w["end"], w["speech_total"])
        if update.alert is not None:
            alerts[w["speaker"]] = update.alert.end
    return alerts


def run_call(call: Call, detector: Any, models: Any, pipeline: Any) -> dict[str, Any]:
    from diarization.labels import turns_from_labels
    from diarization.offline import diarize
    from diarization.stream import StreamingDiarizer, StreamingDiarizerConfig
    from server.speakers import DiarizingAttributor, TurnsAttributor

    audio = call.load(RATE)
    seconds = audio.shape[0] / RATE
    out: dict[str, Any] = {"seconds": seconds}
    oracle = rttm_turns(call)
    out["oracle"] = {"turns": oracle,
                     "windows": lane_windows(TurnsAttributor(oracle, RATE), audio,
                                             detector.window_seconds)}
    diarizer = StreamingDiarizer(models, RATE, StreamingDiarizerConfig())
    live = DiarizingAttributor(diarizer, record=True)
    windows = lane_windows(live, audio, detector.window_seconds)
    labels = np.concatenate(live.labels) if live.labels else np.zeros(0, int)
    out["stream"] = {"turns": turns_from_labels(labels, RATE, diarizer.speakers),
                     "windows": windows, "rtf": diarizer.step_seconds_spent / seconds}
    t0 = time.perf_counter()
    turns = diarize(pipeline, audio, RATE)
    rtf = (time.perf_counter() - t0) / seconds
    out["offline"] = {"turns": turns, "rtf": rtf,
                      "windows": lane_windows(TurnsAttributor(turns, RATE), audio,
                                              detector.window_seconds)}
    for mode in MODES:
        score(detector, out[mode]["windows"])
    return out


def outcome(call: Call, run: dict[str, Any], mode: str, rule: str,
            **params: float) -> dict[str, Any]:
    """Which voices the rule flags in one run, and how fast."""
    ref = reference(call)
    turns = run[mode]["turns"]
    voices = ({lab: lab for _, _, lab in turns} if mode == "oracle"
              else label_to_voice(ref, annotation(turns, call.uri)))
    alerts = replay(run[mode]["windows"], rule, **params)
    spoof = call.spoof_voices
    flagged = {lab: (voices.get(lab), at) for lab, at in alerts.items()}
    hits = [at for voice, at in flagged.values() if voice in spoof]
    first = call.first_spoof_seconds
    return {
        "flagged": {lab: {"voice": v, "alert_at": round(at, 2)} for lab, (v, at) in
                    flagged.items()},
        "spoof_flagged": bool(hits) if spoof else None,
        "bonafide_flagged": any(v not in spoof for v, _ in flagged.values()),
        "delay_s": round(min(hits) - first, 2) if hits and first is not None else None,
    }


def pooled(rows: list[dict[str, Any]]) -> dict[str, Any]:
    spoof = [r for r in rows if r["spoof_flagged"] is not None]
    delays = [r["delay_s"] for r in rows if r["delay_s"] is not None]
    return {
        "spoof_calls_flagged": sum(bool(r["spoof_flagged"]) for r in spoof),
        "spoof_calls": len(spoof),
        "calls_with_bonafide_flagged": sum(r["bonafide_flagged"] for r in rows),
        "calls": len(rows),
        "delays_s": sorted(delays),
        "median_delay_s": statistics.median(delays) if delays else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.diarization",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=Path, default=CALLS, help="folder in ../shared/calls format")
    p.add_argument("--model", default="default", help="spoof model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="speaker embedding dtype (the server's --diarization-precision)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-diarization.json",
                   help="window scores of the last run (reused with --reuse)")
    p.add_argument("--reuse", action="store_true",
                   help="replay the rules over the cached window scores (no diarization)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    calls = shared_calls(args.calls)
    if args.reuse:
        runs = json.loads(args.cache.read_text())
        precision = runs.pop("_precision", "unknown")
    else:
        from diarization.models import DiarizationModels
        from diarization.offline import build_pipeline
        from models.inference import load_detector

        detector, models, pipeline = load_detector(args.model), \
            DiarizationModels(precision=args.precision), build_pipeline()
        precision = models.precision
        runs = {}
        for call in calls:
            runs[call.uri] = run_call(call, detector, models, pipeline)
            print(f"{call.uri}: stream rtf {runs[call.uri]['stream']['rtf']:.3f}, "
                  f"offline rtf {runs[call.uri]['offline']['rtf']:.3f}", flush=True)
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        args.cache.write_text(json.dumps(runs | {"_precision": precision}))
    rows = []
    pairs: dict[str, list[Any]] = {m: [] for m in ("stream", "offline")}
    for call in calls:
        run = runs[call.uri]
        ref = reference(call)
        row: dict[str, Any] = {"call": call.uri, "type": call.meta.get("call_type"),
                               "seconds": run["seconds"], "spoof_voices": sorted(
                                   call.spoof_voices), "first_spoof_s": call.first_spoof_seconds}
        for m in pairs:
            hyp = annotation(run[m]["turns"], call.uri)
            pairs[m].append((ref, hyp))
            row[f"{m}_der_0.25"] = der([(ref, hyp)], 0.25)
            row[f"{m}_speakers"] = len({lab for _, _, lab in run[m]["turns"]})
            row[f"{m}_rtf"] = run[m]["rtf"]
        row["reference_speakers"] = len(ref.labels())
        for mode in MODES:
            for rule in RULES:
                row[f"{mode}/{rule}"] = outcome(call, run, mode, rule)
        rows.append(row)
    summary: dict[str, Any] = {
        "der": {m: {"collar_0": der(pairs[m], 0.0), "collar_0.25": der(pairs[m], 0.25)}
                for m in pairs},
        "rtf_mean": {m: statistics.mean(r[f"{m}_rtf"] for r in rows) for m in pairs},
        "speaker_count_right": {m: sum(r[f"{m}_speakers"] == r["reference_speakers"]
                                       for r in rows) for m in pairs},
        "verdicts": {f"{mode}/{rule}": pooled([r[f"{mode}/{rule}"] for r in rows])
                     for mode in MODES for rule in RULES},
        "calls": str(args.calls), "spoof_model": args.model,
        "cpu": machine()["cpu"], "threads": args.threads, "embedding_precision": precision,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diarization.json").write_text(json.dumps(
        {"summary": summary, "calls": rows}, indent=1))
    (args.out / "diarization.md").write_text(markdown(summary, rows))
    print((args.out / "diarization.md").read_text())


def _flag(o: dict[str, Any]) -> str:
    if o["spoof_flagged"] is None:
        hit = "-"
    else:
        hit = f"yes {o['delay_s']:.1f} s" if o["spoof_flagged"] else "NO"
    return hit + (" +FA" if o["bonafide_flagged"] else "")


def markdown(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    from diarization.stream import StreamingDiarizerConfig

    d, rtf = summary["der"], summary["rtf_mean"]
    n = len(rows)
    lines = [
        "# Diarization and verdicts benchmark (`make bench-diarization`)", "",
        f"Calls: `{summary['calls']}` ({n}). CPU: {summary['cpu']}, threads: "
        f"{summary['threads']}. Spoof model: `{summary['spoof_model']}`. Speaker embeddings in "
        f"{summary['embedding_precision']} (`--precision`).", "",
        "| diarization | DER collar 0 | DER collar 0.25 s | speaker count right | mean RTF |",
        "|---|---|---|---|---|",
        f"| offline (Detect) | {d['offline']['collar_0']:.1%} | "
        f"{d['offline']['collar_0.25']:.1%} | {summary['speaker_count_right']['offline']}/{n} "
        f"| {rtf['offline']:.3f} |",
        f"| streaming ({StreamingDiarizerConfig().step_seconds:g} s step, 5 s buffer) | "
        f"{d['stream']['collar_0']:.1%} | "
        f"{d['stream']['collar_0.25']:.1%} | {summary['speaker_count_right']['stream']}/{n} | "
        f"{rtf['stream']:.3f} |", "",
        "Verdicts per run (turns from the reference, the streaming diarizer or the offline "
        "pipeline) and rule (`evidence`: the default; `ema`: the earlier rule):", "",
        "| turns / rule | spoof calls flagged | calls with a bona fide voice flagged | "
        "median delay (s) | delays (s) |", "|---|---|---|---|---|",
    ]
    for key, v in summary["verdicts"].items():
        med = f"{v['median_delay_s']:.1f}" if v["median_delay_s"] is not None else "-"
        lines.append(
            f"| {key} | {v['spoof_calls_flagged']}/{v['spoof_calls']} | "
            f"{v['calls_with_bonafide_flagged']}/{v['calls']} | {med} | "
            f"{', '.join(f'{x:.1f}' for x in v['delays_s']) or '-'} |")
    keys = [f"{m}/{r}" for m in MODES for r in RULES]
    lines += ["", "Per call: spoofed voice flagged (delay), `+FA`: a bona fide voice flagged.",
              "", "| call | type | stream DER@0.25 | offline DER@0.25 | speakers ref/stream/"
              "offline | " + " | ".join(keys) + " |",
              "|---|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(
            f"| {r['call']} | {r['type']} | {r['stream_der_0.25']:.1%} | "
            f"{r['offline_der_0.25']:.1%} | {r['reference_speakers']}/{r['stream_speakers']}/"
            f"{r['offline_speakers']} | " + " | ".join(_flag(r[k]) for k in keys) + " |")
    return page(lines)


if __name__ == "__main__":
    main()
