"""Recalibration from the fraud desk's verdicts: the operator's analysts tell the detector
where it was wrong, and the model for their lines moves its alert point accordingly.

Why from the console's database: every call the console watched left its window scores
(spoof probabilities), its speakers' speech ranges and its alerts there, and an analyst's
verdict per call and speaker (``false_alarm``, ``confirmed_fraud``, ``unsure``). That is
enough to replay the service's decision offline, without any audio (the console keeps none by
default): the per-speaker verdict rule (``models.verdicts``, the CUSUM ``evidence`` rule by
default) is fed the stored window probabilities again, shifted by a candidate calibration
offset, and says whether the speaker would still have been alerted.

What moves: the calibration's offset (``bias``), the scale kept. The service alerts on
calibrated log-odds against the stream's ``alert_threshold`` (0.5 unless a client sets its
own), so moving the offset by ``delta`` moves the alert threshold, as a raw score, by
``delta / scale`` for every stream, whatever threshold its client asked for: the threshold
for the operator's lines is carried by the model file, and a client's own threshold keeps
its meaning relative to it. ``delta`` is never negative: false alarms raise the threshold,
confirmed fraud checks that it is not raised past the frauds the model caught.

The choice (:func:`choose_shift`): each labelled speaker has a critical shift, the largest
offset at which the replayed rule still alerts on it (found by bisection; the rule is
monotone in the shift). The smallest shift that brings the labelled false alarms down to
``target_false_alarms`` is taken, plus a margin of half the room left before the first
confirmed fraud caught now would be missed, at most ``MAX_MARGIN`` (the labelled callers
are a sample: a shift that only just clears them clears fewer new callers). When the target
would cost a caught fraud, the shift stops short of that fraud and the report says the
target was not reached.

Which calls count: a call's probabilities are only comparable with the model being
recalibrated when the same scorer made them. A call's ``model`` (``"name version"``, as the
server's feed announced it) must be the input model's, or one of the calibrations it was
recalibrated from (the card's ``recalibrated.lineage``), whose offset is then accounted for.
Calls of other models (another shipped model, the default before a ``models adapt``, which
changes the scores themselves) are skipped and counted in the report. A call open across a
server's model reload is read as the model it opened with.

Floors: at least ``MIN_FALSE_ALARMS`` false-alarm labels and ``MIN_CONFIRMED_FRAUD``
confirmed-fraud labels on usable calls, else :class:`RecalibrateError` naming what is
missing: with fewer, one unusual caller moves the threshold for every line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ModelError
from models.tasks.options import MODEL, command
from models.verdicts import DEFAULT_RULE, RULES, make_rule

FALSE_ALARM, CONFIRMED_FRAUD, UNSURE = "false_alarm", "confirmed_fraud", "unsure"
MIN_FALSE_ALARMS = 20
MIN_CONFIRMED_FRAUD = 5
MAX_SHIFT = 10.0  # log-odds; beyond it the rule's clipped evidence no longer changes
MAX_MARGIN = 1.0  # log-odds past the last false alarm cleared (an odds factor of e)
FRAUD_MARGIN = 0.25  # log-odds kept below a caught fraud's critical shift
_BISECT_STEPS = 30
_VERSION_SUFFIX = re.compile(r"\+op\.[0-9a-f]{6}$")


class RecalibrateError(ModelError, ValueError):
    pass


@dataclass(frozen=True)
class LabeledSpeaker:
    """One analyst verdict with what the console stored about that speaker of that call."""

    call: str
    speaker: str
    label: str
    model: str  # "name version" that scored the call
    threshold: float  # the stream's alert threshold
    windows: np.ndarray  # (n, 3): start, end, spoof probability; in call time order
    speech: tuple[tuple[float, float], ...]  # the speaker's speech ranges (summary)
    alerted: bool  # the server raised an alert on this speaker


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def _speech_totals(windows: np.ndarray, speech: Sequence[tuple[float, float]]) -> np.ndarray:
    """The speaker's speech from the call's start to each window's end, as the windower
    counted it when it scored the window. From the stored speech ranges (merged over pauses
    under 0.3 s, so slightly more than the gate's frames); a call that lost its summary has
    none, and then every window counts its hop as new speech."""
    ends = windows[:, 1]
    if speech:
        starts = np.array([a for a, _ in speech])
        stops = np.array([b for _, b in speech])
        return np.array([float(np.sum(np.clip(np.minimum(stops, e) - starts, 0, None)))
                         for e in ends])
    return ends - ends[0] + (windows[0, 1] - windows[0, 0] if len(ends) else 0.0)


def alerts(speaker: LabeledSpeaker, shift: float, rule: str = DEFAULT_RULE) -> bool:
    """Whether the verdict rule alerts on ``speaker`` when every window's spoof log-odds is
    lowered by ``shift`` (a calibration offset raised by ``shift``)."""
    if not len(speaker.windows):
        return False
    r = make_rule(rule, speaker.speaker, speaker.threshold)
    z = _logit(speaker.windows[:, 2]) - shift
    probabilities = 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))
    totals = _speech_totals(speaker.windows, speaker.speech)
    for (start, end, _), p, total in zip(speaker.windows, probabilities, totals, strict=True):
        r.update(float(p), float(start), float(end), float(total))
        if r.alerted:
            return True
    return False


def critical_shift(speaker: LabeledSpeaker, rule: str = DEFAULT_RULE) -> float:
    """The largest shift at which the rule still alerts on ``speaker``: ``-inf`` when it
    does not alert even at ``-MAX_SHIFT``, ``+inf`` when it still does at ``MAX_SHIFT``."""
    lo, hi = -MAX_SHIFT, MAX_SHIFT
    if not alerts(speaker, lo, rule):
        return -math.inf
    if alerts(speaker, hi, rule):
        return math.inf
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        if alerts(speaker, mid, rule):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Choice:
    shift: float
    target_reached: bool
    shift_for_target: float  # the least shift that meets the false-alarm target
    room: float  # shift before the first caught confirmed fraud is missed (inf: none)


def choose_shift(false_alarms: Sequence[float], frauds: Sequence[float],
                 target_false_alarms: float, max_missed_fraud: int = 0) -> Choice:
    """The offset shift from the labelled speakers' critical shifts (module docstring);
    ``max_missed_fraud`` confirmed frauds caught now may be given up for the target."""
    fa = sorted(false_alarms, reverse=True)
    allowed = int(math.floor(target_false_alarms * len(fa) + 1e-9))
    # the critical shift of the first false alarm past the allowed ones: clear it
    need = min(max(0.0, fa[allowed]), MAX_SHIFT) if allowed < len(fa) else 0.0
    caught = sorted(c for c in frauds if c > 0)
    room = caught[max_missed_fraud] if len(caught) > max_missed_fraud else math.inf
    if need == 0.0:  # the target holds as the model is: nothing to raise
        return Choice(0.0, True, 0.0, room)
    if need < room - FRAUD_MARGIN:
        margin = min(MAX_MARGIN, (room - need) / 2)
        return Choice(min(need + margin, MAX_SHIFT), True, need, room)
    return Choice(max(0.0, room - FRAUD_MARGIN), False, need, room)


def read_labels(url: str, unlabelled: bool = False) -> list[LabeledSpeaker]:
    """Every speaker with an analyst verdict (the latest one counts) and its stored scores;
    with ``unlabelled`` every other speaker too, labelled ``""`` (for a benchmark's replay).
    Read-only: the console's schema is not migrated from here."""
    from sqlalchemy import inspect, select
    from sqlalchemy.orm import Session

    from console.db import AlertRow, Call, Score, Speaker, Verdict, make_engine

    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise RecalibrateError(f"no console database at {path}")
    engine = make_engine(url)
    try:
        missing = {"calls", "speakers", "scores", "alerts", "verdicts"} - set(
            inspect(engine).get_table_names())
        if missing:
            raise RecalibrateError(f"{url}: not a console database (no tables "
                                   f"{', '.join(sorted(missing))})")
        out = []
        with Session(engine) as s:
            latest: dict[tuple[str, str], Any] = {}
            for v in s.scalars(select(Verdict).order_by(Verdict.id)):
                latest[(v.call, v.speaker)] = v.label
            if unlabelled:
                for key in s.execute(select(Speaker.call, Speaker.name)).all():
                    latest.setdefault((key[0], key[1]), "")
            for (call_key, name), label in sorted(latest.items()):
                call = s.get(Call, call_key)
                if call is None:
                    continue
                rows = s.execute(select(Score.start, Score.end, Score.probability).where(
                    Score.call == call_key, Score.speaker == name).order_by(
                    Score.end, Score.id)).all()
                sp = s.scalars(select(Speaker).where(Speaker.call == call_key,
                                                     Speaker.name == name)).first()
                alerted = s.scalars(select(AlertRow.id).where(
                    AlertRow.call == call_key, AlertRow.speaker == name)).first() is not None
                speech = tuple((float(a), float(b)) for a, b in
                               json.loads(sp.speech if sp is not None else "[]"))
                out.append(LabeledSpeaker(
                    call=call_key, speaker=name, label=label, model=call.model,
                    threshold=call.alert_threshold or 0.5,
                    windows=np.array(rows, dtype=np.float64).reshape(-1, 3),
                    speech=speech, alerted=alerted))
        return out
    finally:
        engine.dispose()


def model_string(state: dict[str, Any]) -> str:
    """What the server's feed calls a model (``EventBus``): ``"name version"``."""
    return f"{state['name']} {state['version']}".strip()


def lineage(state: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Calibrations whose scores this checkpoint can read: its own and those it was
    recalibrated from (same scorer, another offset), by model string."""
    own = {model_string(state): dict(state.get("calibration", {"scale": 1.0, "bias": 0.0}))}
    earlier = state.get("card", {}).get("recalibrated", {}).get("lineage", {})
    return {**earlier, **own}


def _rates(fa: Sequence[float], fraud: Sequence[float], shift: float) -> dict[str, Any]:
    return {"false_alarms": int(sum(c > shift for c in fa)),
            "false_alarm_rate": float(np.mean([c > shift for c in fa])) if fa else None,
            "missed_fraud": int(sum(c <= shift for c in fraud)),
            "miss_rate": float(np.mean([c <= shift for c in fraud])) if fraud else None}


def recalibrate(
    state: dict[str, Any], labels: Sequence[LabeledSpeaker],
    target_false_alarms: float = 0.0, min_false_alarms: int = MIN_FALSE_ALARMS,
    min_confirmed_fraud: int = MIN_CONFIRMED_FRAUD, rule: str = DEFAULT_RULE,
    max_missed_fraud: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recalibrated checkpoint (a new dict; ``state`` is left as it was) and its report."""
    if not 0.0 <= target_false_alarms < 1.0:
        raise RecalibrateError("--target-false-alarms must lie in [0, 1)")
    known = lineage(state)
    calibration = known[model_string(state)]
    scale, bias = float(calibration["scale"]), float(calibration["bias"])
    usable: dict[str, list[tuple[LabeledSpeaker, float]]] = {FALSE_ALARM: [],
                                                              CONFIRMED_FRAUD: []}
    skipped: dict[str, int] = {}
    unsure = 0
    agree = 0
    for speaker in labels:
        if not speaker.label:
            continue
        if speaker.label == UNSURE:
            unsure += 1
            continue
        if speaker.label not in usable:
            skipped[f"label {speaker.label!r}"] = skipped.get(f"label {speaker.label!r}", 0) + 1
            continue
        scored_by = known.get(speaker.model)
        if scored_by is None:
            skipped[speaker.model or "unknown model"] = skipped.get(
                speaker.model or "unknown model", 0) + 1
            continue
        if abs(float(scored_by["scale"]) - scale) > 1e-9 * max(1.0, abs(scale)):
            skipped[speaker.model] = skipped.get(speaker.model, 0) + 1
            continue
        # this call's probabilities sit (bias - its bias) log-odds above the input model's
        offset = bias - float(scored_by["bias"])
        critical = critical_shift(speaker, rule) - offset
        agree += int((critical > 0) == speaker.alerted)
        usable[speaker.label].append((speaker, critical))
    fa = [c for _, c in usable[FALSE_ALARM]]
    fraud = [c for _, c in usable[CONFIRMED_FRAUD]]
    counted = len(fa) + len(fraud)
    where = (f" (skipped: {', '.join(f'{n} scored by {m}' for m, n in skipped.items())})"
             if skipped else "")
    if len(fa) < min_false_alarms:
        raise RecalibrateError(
            f"{len(fa)} false-alarm verdicts on calls scored by {model_string(state)!r} or its "
            f"earlier calibrations{where}; recalibration needs at least {min_false_alarms} "
            "(--min-false-alarms): label more calls in the console")
    if len(fraud) < min_confirmed_fraud:
        raise RecalibrateError(
            f"{len(fraud)} confirmed-fraud verdicts on usable calls{where}; recalibration "
            f"needs at least {min_confirmed_fraud} (--min-confirmed-fraud) to check that "
            "raising the threshold does not miss fraud; 0 recalibrates without that check")
    choice = choose_shift(fa, fraud, target_false_alarms, max_missed_fraud)
    new_bias = bias + choice.shift
    new_cal = {"scale": scale, "bias": new_bias}
    out = {**state}
    base_version = _VERSION_SUFFIX.sub("", str(state["version"]))
    tag = hashlib.sha256(json.dumps(new_cal, sort_keys=True).encode()).hexdigest()[:6]
    out["version"] = f"{base_version}+op.{tag}"
    out["calibration"] = new_cal
    report: dict[str, Any] = {
        "base": model_string(state), "model": model_string(out),
        "labels": {"false_alarm": len(fa), "confirmed_fraud": len(fraud), "unsure": unsure,
                   "skipped": skipped},
        "rule": rule, "target_false_alarms": target_false_alarms,
        "max_missed_fraud": max_missed_fraud,
        "replay_agrees_with_server": {"speakers": counted, "agree": agree},
        "shift": choice.shift, "target_reached": choice.target_reached,
        "shift_for_target": choice.shift_for_target,
        "room_before_missing_fraud": choice.room if math.isfinite(choice.room) else None,
        "calibration": {"before": {"scale": scale, "bias": bias}, "after": new_cal},
        # the raw score at which a window's spoof probability is 0.5
        "threshold_score": {"before": -bias / scale, "after": -new_bias / scale},
        "before": _rates(fa, fraud, 0.0), "after": _rates(fa, fraud, choice.shift),
    }
    card = dict(state.get("card", {}))
    card["recalibrated"] = {**report, "lineage": {**known, model_string(out): new_cal}}
    out["card"] = card
    return out, report


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def recalibrate_checkpoint(model: str | Path, out: str | Path, console_db: str,
                           **kwargs: Any) -> dict[str, Any]:
    """Load ``model`` (a named model or a path, e.g. a ``models adapt`` output), recalibrate
    it on the console's verdicts, write ``out``; returns the report. ``out`` may not lie in
    the shipped checkpoints' folder: the result is the operator's model, never a default."""
    from models.checkpoint import is_callshield, read_checkpoint, save_checkpoint
    from models.inference import CHECKPOINT_DIR, NAMED_MODELS

    out_path = Path(out)
    if _inside(out_path, CHECKPOINT_DIR):
        raise RecalibrateError(
            f"--out {out}: inside {CHECKPOINT_DIR}, the shipped models; write the operator's "
            "model elsewhere (e.g. /var/lib/callshield/operator.pt) and serve it with --model")
    path = NAMED_MODELS.get(str(model), Path(model))
    if not Path(path).is_file():
        raise RecalibrateError(f"model {model!r} not found at {path}")
    state = read_checkpoint(path)
    if not is_callshield(state):
        raise RecalibrateError(f"{path}: calibrate takes a callshield checkpoint")
    new, report = recalibrate(state, read_labels(console_db), **kwargs)
    save_checkpoint(out_path, **{k: v for k, v in new.items() if k != "format"})
    return report


def format_report(report: dict[str, Any]) -> str:
    """The before/after lines ``python -m models calibrate`` prints."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f} %"

    b, a, n = report["before"], report["after"], report["labels"]
    lines = [
        f"model {report['base']} -> {report['model']}",
        f"labels: {n['false_alarm']} false alarms, {n['confirmed_fraud']} confirmed fraud, "
        f"{n['unsure']} unsure (not used)"
        + (f", skipped {n['skipped']}" if n["skipped"] else ""),
        f"calibration offset {report['calibration']['before']['bias']:.3f} -> "
        f"{report['calibration']['after']['bias']:.3f} (shift {report['shift']:.3f} log-odds)",
        f"false alarms on the labels: {b['false_alarms']} ({pct(b['false_alarm_rate'])}) -> "
        f"{a['false_alarms']} ({pct(a['false_alarm_rate'])})",
        f"confirmed fraud missed:     {b['missed_fraud']} ({pct(b['miss_rate'])}) -> "
        f"{a['missed_fraud']} ({pct(a['miss_rate'])})",
    ]
    if not report["target_reached"]:
        lines.append(f"target of {pct(report['target_false_alarms'])} false alarms NOT reached: "
                     "it would miss confirmed fraud the model catches now")
    agree = report["replay_agrees_with_server"]
    lines.append(f"replayed alerts agree with the server's on {agree['agree']} of "
                 f"{agree['speakers']} labelled speakers")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    """recalibrate a model from the console's analyst verdicts

    Refit the calibration offset, and with it the alert threshold of the operator's lines,
    from the fraud desk's verdicts: the console database's window scores of every labelled
    call are replayed through the server's verdict rule; false alarms raise the threshold
    until at most --target-false-alarms of them would alert, confirmed fraud caught now stops
    it before it would be missed. Refuses below --min-false-alarms / --min-confirmed-fraud
    labels. Prints the false-alarm and miss rates before and after on the labels and writes
    them into the new checkpoint's card (models/tasks/recalibrate.py). --model is the model
    whose calls were labelled (a name, or a path such as a `models adapt` or earlier
    `calibrate` output). The output is the operator's model: it may not lie in
    models/checkpoints."""
    report = recalibrate_checkpoint(
        args.model, args.out, args.console_db, target_false_alarms=args.target_false_alarms,
        min_false_alarms=args.min_false_alarms, min_confirmed_fraud=args.min_confirmed_fraud,
        rule=args.verdict_rule, max_missed_fraud=args.max_missed_fraud)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    print(f"wrote {args.out}; serve it with --model {args.out}, or load it into a running "
          "server with SIGHUP (same path) or the ReloadModel admin RPC", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    """``python -m models calibrate``, for :func:`models.cli.build_parser`."""
    p = command(sub, "calibrate", _run, parents=[MODEL])
    p.add_argument("--console-db", required=True, metavar="URL",
                   help="the console's database (sqlite:///callshield.db, or a SQLAlchemy URL)")
    p.add_argument("--out", required=True, metavar="MODEL.pt", help="the operator's checkpoint")
    p.add_argument("--target-false-alarms", type=float, default=0.0,
                   help="share of the labelled false alarms that may still alert (default 0: "
                   "none, unless clearing one would miss a confirmed fraud caught now)")
    p.add_argument("--min-false-alarms", type=int, default=MIN_FALSE_ALARMS,
                   help="refuse with fewer false-alarm verdicts than this")
    p.add_argument("--min-confirmed-fraud", type=int, default=MIN_CONFIRMED_FRAUD,
                   help="refuse with fewer confirmed-fraud verdicts (0: no fraud check)")
    p.add_argument("--max-missed-fraud", type=int, default=0,
                   help="confirmed frauds the model catches now that the new threshold may "
                   "miss, to reach the false-alarm target (default 0)")
    p.add_argument("--verdict-rule", choices=list(RULES), default=DEFAULT_RULE,
                   help="the server's --verdict-rule")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
