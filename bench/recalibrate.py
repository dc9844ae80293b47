"""``python -m bench.recalibrate``: what recalibration from analyst verdicts buys an operator.

The acceptance measurement of issue 30, end to end on the real parts:

1. A real server (``server.app.start_server``, in-process queue, the shipped ``default``)
   serves on loopback with an admin token; the console's own feed thread
   (``console.feed.FeedThread``) watches it over ``WatchCalls`` and writes every call, window
   score, speaker and alert into a fresh console SQLite database, as ``python -m console``
   does.
2. Calls are streamed to it over gRPC (as fast as the server takes them, six at a time,
   MIXED, diarization off, so each call is one speaker "A"):
   - the Speech Commands **dev** speakers (47 crowdsourced callers on their own microphones,
     never trained on) as genuine calls: their clips in protocol order with 0.5 s of a
     -65 dBFS noise floor between them, all of a speaker's words in one call (up to 77
     words, a minute or more), or calls of 6 answers (a short IVR-like call: fewer windows
     to outweigh one odd word, the new-caller case of ``bench.newcallers``);
   - simulated calls with a spoof voice (``diarization.simulate``: corpus **dev** voices,
     the simulator's turns, channel and noise), the whole call as one speaker.
3. A scripted analyst labels, in the same database, every call of half of the genuine
   speakers (by a hash of the speaker id) ``false_alarm`` and half of the spoof calls
   ``confirmed_fraud``: the rows the console's verdict form writes (it adds an audit line).
4. ``python -m models calibrate`` (``models.tasks.recalibrate``) writes the operator's model
   to ``runs/recalibrate/operator.pt`` (never under ``models/checkpoints``), and the running
   server loads it with the ``ReloadModel`` admin RPC.
5. Every call is streamed again, now scored by the recalibrated model: false alarms before
   and after on the **other** half of the genuine speakers (callers the labels never saw),
   and spoof calls still flagged, labelled and held out. A call is flagged when the server
   alerted on its speaker.

Without diarization a spoof call's single lane holds the genuine party's turns too, which
dilutes the evidence against the spoof voice; with ``--diarization on`` the spoof voice gets
its own lane (slower; not the committed run). Writes ``bench/results/recalibrate.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import page, prose

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

from models.tasks.config import REPO_ROOT  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
SHARED = REPO_ROOT.parent / "shared"
EXTRA = SHARED / "extra-bonafide" / "speech-commands"
CORPUS = SHARED / "corpus"
RATE = 8000
ADMIN_TOKEN = "bench-recalibrate-admin"
GAP_SECONDS = 0.5
GAP_DBFS = -65.0
CHUNK_SECONDS = 0.1
SEED = 30


@dataclass(frozen=True)
class BenchCall:
    call_id: str
    kind: str  # genuine | spoof
    group: str  # labelled | held-out
    audio: np.ndarray  # float32 at RATE


def _bucket(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") / 2**32


def genuine_calls(clips_per_call: int = 0) -> list[BenchCall]:
    """The Speech Commands dev speakers' calls: each speaker's clips in protocol order, all
    in one call (``clips_per_call`` 0) or cut into calls of that many answers (a short
    IVR-like call; a last piece of fewer than half that many joins the one before); half of
    the speakers (by hash) to be labelled."""
    from models.data.audio import load_audio

    clips: dict[str, list[str]] = defaultdict(list)
    for line in (EXTRA / "bonafide.dev.txt").read_text().splitlines():
        parts = line.split()
        if parts:
            clips[parts[0]].append(parts[1])
    speakers = sorted(clips, key=_bucket)
    labelled = set(speakers[: len(speakers) // 2])
    calls = []
    for speaker in sorted(clips):
        rng = np.random.default_rng(int(_bucket(speaker) * 2**32))
        utts = clips[speaker]
        size = clips_per_call or len(utts)
        groups = [utts[i:i + size] for i in range(0, len(utts), size)]
        if len(groups) > 1 and len(groups[-1]) < (size + 1) // 2:
            last = groups.pop()
            groups[-1] = groups[-1] + last
        for k, group in enumerate(groups):
            pieces = []
            for utt in group:
                pieces.append(load_audio(EXTRA / "flac" / f"{utt}.flac", RATE))
                gap = rng.standard_normal(int(GAP_SECONDS * RATE)) * 10 ** (GAP_DBFS / 20)
                pieces.append(gap.astype(np.float32))
            calls.append(BenchCall(f"sc-{speaker}-{k}", "genuine",
                                   "labelled" if speaker in labelled else "held-out",
                                   np.concatenate(pieces).astype(np.float32)))
    return calls


def spoof_calls(n: int) -> list[BenchCall]:
    """``n`` simulated calls with a spoof voice, from the corpus dev voices; the first half
    to be labelled."""
    from diarization.corpus import load_voices
    from diarization.simulate import SimConfig, Simulator, _rng

    sim = Simulator(load_voices(CORPUS, "dev"), SimConfig())
    calls: list[BenchCall] = []
    i = 0
    while len(calls) < n:
        audio, segments = sim.conversation(_rng(SEED, "recalibrate", i))
        if any(s.label == "spoof" for s in segments):
            calls.append(BenchCall(f"sim-{i:03d}", "spoof",
                                   "labelled" if len(calls) < n // 2 else "held-out", audio))
        i += 1
    return calls


def _chunks(audio: np.ndarray) -> Iterator[bytes]:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    step = int(CHUNK_SECONDS * RATE)
    for start in range(0, pcm.shape[0], step):
        yield pcm[start : start + step].tobytes()


async def stream_all(target: str, calls: list[BenchCall], concurrency: int,
                     tag: str, threshold: float) -> dict[str, dict[str, Any]]:
    """Stream every call; per call id whether the server alerted and its summary."""
    from callshield.v1 import detection_pb2 as pb
    from client import AsyncDetectionClient

    slots = asyncio.Semaphore(concurrency)
    out: dict[str, dict[str, Any]] = {}
    async with AsyncDetectionClient(target) as client:
        async def one(call: BenchCall) -> None:
            async with slots:
                config = pb.StreamConfig(
                    encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=RATE, channels=1,
                    channel_mode=pb.CHANNEL_MODE_MIXED, call_id=f"{tag}-{call.call_id}",
                    platform="bench", interim_results=False, alert_threshold=threshold)
                alerted, windows = False, 0
                async for r in client.stream(config, _chunks(call.audio)):
                    if r.HasField("alert"):
                        alerted = True
                    if r.HasField("summary"):
                        windows = r.summary.windows_scored
                out[call.call_id] = {"alerted": alerted, "windows": windows}

        await asyncio.gather(*(one(c) for c in calls))
    return out


def wait_recorded(store: Any, call_ids: list[str], seconds: float = 300.0) -> None:
    """Until the console's feed has written every call closed (the feed is a thread)."""
    from sqlalchemy import func, select

    from console.db import Call

    deadline = time.monotonic() + seconds
    while True:
        with store.session() as s:
            done = s.scalar(select(func.count()).select_from(Call).where(
                Call.call_id.in_(call_ids), Call.status == "closed"))
        if done == len(call_ids):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the console recorded {done} of {len(call_ids)} calls")
        time.sleep(0.5)


def label(store: Any, calls: list[BenchCall], tag: str) -> dict[str, int]:
    """The scripted analyst: labelled genuine calls false alarms, labelled spoof calls
    confirmed fraud (speaker "A": diarization off)."""
    from sqlalchemy import select

    from console.db import Call, Verdict

    counts = {"false_alarm": 0, "confirmed_fraud": 0}
    with store.session() as s:
        for c in calls:
            if c.group != "labelled":
                continue
            key = s.scalars(select(Call.id).where(Call.call_id == f"{tag}-{c.call_id}")).one()
            kind = "false_alarm" if c.kind == "genuine" else "confirmed_fraud"
            s.add(Verdict(call=key, speaker="A", label=kind, note="scripted analyst",
                          user="bench-analyst", created_at=time.time()))
            store.audit(s, "bench-analyst", "verdict", key, kind)
            counts[kind] += 1
    return counts


def tally(calls: list[BenchCall], flags: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("genuine", "spoof"):
        for group in ("labelled", "held-out"):
            ids = [c.call_id for c in calls if c.kind == kind and c.group == group]
            flagged = sum(flags[i]["alerted"] for i in ids)
            out[f"{kind}/{group}"] = {"calls": len(ids), "flagged": flagged,
                                      "rate": flagged / len(ids) if ids else None}
    return out


SWEEP = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def replay_sweep(db_url: str, calls: list[BenchCall], tag: str,
                 shift: float) -> dict[str, Any]:
    """Calls flagged per group when the offset is raised by each shift of :data:`SWEEP`
    (and the chosen ``shift``), replayed from the console's stored scores as
    ``models calibrate`` replays them: the trade-off an operator chooses from."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from console.db import Call, make_engine
    from models.tasks.recalibrate import critical_shift, read_labels

    engine = make_engine(db_url)
    with Session(engine) as s:
        by_key = dict(s.execute(select(Call.id, Call.call_id)).all())
    engine.dispose()
    group = {f"{tag}-{c.call_id}": f"{c.kind}/{c.group}" for c in calls}
    critical: dict[str, list[float]] = defaultdict(list)
    for speaker in read_labels(db_url, unlabelled=True):
        g = group.get(by_key.get(speaker.call, ""))
        if g is not None:
            critical[g].append(critical_shift(speaker))
    shifts = sorted({*SWEEP, round(shift, 3)})
    return {"shifts": shifts,
            "flagged": {g: [sum(c > d for c in cs) for d in shifts]
                        for g, cs in sorted(critical.items())},
            "calls": {g: len(cs) for g, cs in sorted(critical.items())}}


async def scenario(target: str, calls: list[BenchCall], threshold: float, work: Path,
                   args: argparse.Namespace) -> dict[str, Any]:
    """One pass with the serving model, labels, calibrate, reload, one pass with the
    operator's model; the console database and model under ``work``."""
    from client import AsyncDetectionClient
    from console.db import Store
    from console.feed import Broadcaster, FeedThread
    from models.tasks.recalibrate import format_report, recalibrate_checkpoint

    work.mkdir(parents=True)
    db_url = f"sqlite:///{work / 'console.db'}"
    out_model = work / "operator.pt"
    store = Store(db_url)
    feed = FeedThread(store, Broadcaster(), target, ADMIN_TOKEN)
    feed.start()
    try:
        deadline = time.monotonic() + 60
        while not feed.state.connected:  # else the first calls' early windows go unrecorded
            if time.monotonic() > deadline:
                raise TimeoutError("the console's feed did not connect")
            await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        before = await stream_all(target, calls, args.concurrency, "before", threshold)
        t_before = time.perf_counter() - t0
        await asyncio.to_thread(wait_recorded, store, [f"before-{c.call_id}" for c in calls])
        labels = label(store, calls, "before")
        report = recalibrate_checkpoint(args.model, out_model, db_url,
                                        max_missed_fraud=args.max_missed_fraud)
        print(format_report(report), file=sys.stderr)
        async with AsyncDetectionClient(target) as admin:
            reloaded = await admin.reload_model(str(out_model), admin_token=ADMIN_TOKEN)
        t0 = time.perf_counter()
        after = await stream_all(target, calls, args.concurrency, "after", threshold)
        t_after = time.perf_counter() - t0
        await asyncio.to_thread(wait_recorded, store, [f"after-{c.call_id}" for c in calls])
    finally:
        feed.stop()
        store.engine.dispose()
    return {
        "alert_threshold": threshold,
        "model": {"before": f"{reloaded.previous.name} {reloaded.previous.version}",
                  "after": f"{reloaded.model.name} {reloaded.model.version}",
                  "operator_file": str(out_model.relative_to(REPO_ROOT))},
        "labels": labels,
        "before": tally(calls, before), "after": tally(calls, after),
        "calibrate": report,
        "replay": replay_sweep(db_url, calls, "before", report["shift"]),
        "seconds": {"stream_before": round(t_before, 1), "stream_after": round(t_after, 1)},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from client import AsyncDetectionClient
    from models.inference import NAMED_MODELS, load_detector
    from server.app import set_threads, start_server
    from server.config import ServerConfig

    set_threads(args.threads)
    work = REPO_ROOT / "runs" / "recalibrate"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    spoofs = spoof_calls(args.spoof_calls)
    config = ServerConfig(listen="127.0.0.1:0", model=args.model, admin_token=ADMIN_TOKEN,
                          diarization=args.diarization, max_streams=64,
                          max_streams_per_peer=64)
    running = await start_server(config, load_detector(args.model))
    target = f"127.0.0.1:{running.port}"
    scenarios = {}
    try:
        for spec in args.scenario:
            clips_per_call, threshold = spec
            calls = genuine_calls(clips_per_call) + spoofs
            name = (f"{clips_per_call or 'all'} answers per call, threshold {threshold:g}")
            print(f"{name}: {len(calls)} calls", file=sys.stderr)
            scenarios[name] = await scenario(
                target, calls, threshold, work / f"calls-{clips_per_call}-t{threshold:g}", args)
            scenarios[name]["clips_per_call"] = clips_per_call
            scenarios[name]["calls"] = {
                "genuine": sum(c.kind == "genuine" for c in calls),
                "spoof": sum(c.kind == "spoof" for c in calls),
                "audio_minutes": round(sum(c.audio.shape[0] for c in calls) / RATE / 60, 1)}
            async with AsyncDetectionClient(target) as admin:  # back to the shipped model
                await admin.reload_model(str(NAMED_MODELS.get(args.model, args.model)),
                                         admin_token=ADMIN_TOKEN)
    finally:
        await running.stop()
    return {
        "what": "issue 30 acceptance: recalibration from analyst verdicts",
        "path": "real server over gRPC loopback (in-process queue, diarization "
                f"{args.diarization}), the console's FeedThread writing a SQLite console "
                "database, verdict rows written by a scripted analyst, models calibrate, "
                "ReloadModel into the same running server, every call streamed again",
        "scenarios": scenarios,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - t0, 1),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


GROUPS = (("genuine/held-out", "genuine, speakers never labelled"),
          ("genuine/labelled", "genuine, labelled false alarm"),
          ("spoof/held-out", "spoof, not labelled"),
          ("spoof/labelled", "spoof, labelled confirmed fraud"))


METHOD = """A call is flagged when the server alerted on it. Path: {path}. Genuine calls: the 47
Speech Commands dev speakers' words with 0.5 s pauses, all of a speaker's words in one call, or
calls of a few answers; spoof calls: simulated conversations with a spoof voice (corpus dev
voices). MIXED with diarization off, so a spoof call's one lane also holds its genuine party.
{seconds} s in all on {machine[cores]} shared cores ({machine[cpu]}), {date}."""


def markdown(r: dict[str, Any]) -> str:
    lines = ["### Recalibration from analyst verdicts (issue 30 acceptance)", ""]
    for name, sc in r["scenarios"].items():
        c = sc["calibrate"]
        lines += [
            f"**{name}** ({sc['calls']['genuine']} genuine calls, {sc['calls']['spoof']} "
            f"spoof calls, {sc['calls']['audio_minutes']} min of audio per pass). "
            f"Model `{sc['model']['before']}` -> the "
            f"operator's `{sc['model']['after']}` (`{sc['model']['operator_file']}`, not "
            f"committed): offset {c['calibration']['before']['bias']:.3f} -> "
            f"{c['calibration']['after']['bias']:.3f} (+{c['shift']:.3f} log-odds"
            + ("" if c["target_reached"] else "; the false-alarm target was not reached: "
               "clearing the labelled false alarms would miss a confirmed fraud caught now")
            + f"). Labels: {sc['labels']['false_alarm']} false alarms, "
            f"{sc['labels']['confirmed_fraud']} confirmed fraud. Replayed alerts agree with "
            f"the server's on {c['replay_agrees_with_server']['agree']} of "
            f"{c['replay_agrees_with_server']['speakers']} labelled speakers.",
            "",
            "| calls | n | flagged before | flagged after (recalibrated, reloaded) |",
            "|---|---|---|---|",
        ]
        for key, title in GROUPS:
            b, a = sc["before"][key], sc["after"][key]
            lines.append(f"| {title} | {b['calls']} | {b['flagged']} ({100 * b['rate']:.1f} %) "
                         f"| {a['flagged']} ({100 * a['rate']:.1f} %) |")
        rp = sc["replay"]
        lines += ["", "Replayed from the stored scores, calls flagged per offset raise "
                  "(log-odds), the trade-off an operator chooses from:", "",
                  "| calls | " + " | ".join(f"+{d:g}" for d in rp["shifts"]) + " |",
                  "|---|" + "---|" * len(rp["shifts"])]
        for key, title in GROUPS:
            if key in rp["flagged"]:
                lines.append(f"| {title} ({rp['calls'][key]}) | "
                             + " | ".join(str(n) for n in rp["flagged"][key]) + " |")
        lines.append("")
    lines.append(prose(METHOD, r))
    return page(lines)


def _scenario(text: str) -> tuple[int, float]:
    clips, _, threshold = text.partition(":")
    try:
        return int(clips), float(threshold or 0.5)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CLIPS:THRESHOLD, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.recalibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--spoof-calls", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--diarization", choices=["off", "on"], default="off")
    p.add_argument("--scenario", type=_scenario, action="append", metavar="CLIPS:THRESHOLD",
                   help="answers per genuine call (0: all of a speaker's) and the streams' "
                   "alert_threshold, one run each (default 0:0.5, 6:0.5 and 0:0.2)")
    p.add_argument("--max-missed-fraud", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "recalibrate")
    args = p.parse_args(argv)
    args.scenario = args.scenario or [(0, 0.5), (6, 0.5), (0, 0.2)]
    for needed in (EXTRA / "bonafide.dev.txt", CORPUS / "metadata.dev.tsv"):
        if not needed.is_file():
            print(f"error: {needed} is missing (developer material in ../shared)",
                  file=sys.stderr)
            return 2
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
