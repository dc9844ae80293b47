"""``python -m bench.calls``: per-call verdicts on engines and callers never trained on.

Engine LOSO scores utterances; the service decides on calls: per speaker, on overlapping
windows of a diarized or split stream, with an evidence rule. The hidden set showed the gap
(with reference turns, 3 of 7 and then 7 of 28 of its spoof calls flagged): this estimate runs
whole simulated
calls through the server's own code so that the rule, the operating point and the scores are
judged together, on voices the detector never trained on.

- **Spoof calls, engine held out.** For each engine T of the corpus, two-party calls from
  :class:`diarization.simulate.Simulator` whose synthetic party speaks only T's *dev* spoofs
  (a whole call, or a takeover; at least :data:`MIN_SYNTHETIC_SECONDS` of its speech), the
  genuine parties corpus dev bona fide speakers and Speech
  Commands dev speakers; scored by **fold T's detector**, trained without T.
- **Bona fide calls, new callers.** Calls of three genuine voices from the Speech Commands dev
  speakers (47 crowdsourced speakers on their own microphones, never trained on, short words),
  and from the corpus dev bona fide speakers (speakers never trained on, from trained sources);
  each call scored by one fold's detector in turn.
- **Two ways to cut a call into speakers**, both the server's code: *reference turns*
  (``server.speakers.TurnsAttributor`` over the simulation's truth: each voice its own lane,
  overlaps to nobody, as SPLIT lanes per party) and *streaming turns* (the MIXED call through
  the server's streaming diarizer, ``DiarizingAttributor``, 0.1 s chunks, as live). Lanes,
  windows and speech gate are ``server.lanes.Lanes``; verdicts are ``models.verdicts`` rules
  replayed over the windows' scores in order, exactly as ``server.session`` feeds them.
- Reported: spoof calls flagged (the synthetic voice's lane alerted), bona fide calls flagged
  (any lane alerted), genuine voices flagged in spoof calls, and the delay from the first
  synthetic word (call time) to the alert (the alerting window's end, call time; live, the
  streaming diarizer adds its step and latency, about 2 s). Then the same calls under other
  verdict-rule settings (threshold, evidence level, the EMA rule), replayed on the same
  scores: the estimate the default rule is to be chosen on. Server defaults are not changed.

**The fold detector.** The default (``lcnn-fusion``) is a bona-normal fusion of three LFCC-LCNNs
and two LFCC+GMMs. A fold detector is built the same way from the same recipes trained
without engine T: each GMM part refitted here (its shipped ``model_config``, seconds each),
each LCNN part read from ``runs/loso/<recipe>/<T>/model.pt``, the fold run that
``python -m bench.generalization train-folds`` writes (about 10 minutes per fold on this CPU,
so not part of this benchmark). Parts ranked against their own dev bona fide scores with
the default's weights, calibrated as the default was (the fused recipe's LOSO calibration at
the default's bona fide prior, anchored on the fold detector's own dev bona fide scores),
except that fold T's calibration is fitted on the *other* folds only, so nothing about T
reaches its detector. ``--mode reduced`` uses every part whose six fold checkpoints exist
(on a fresh checkout: the two GMM parts only, a weaker stand-in than the default whose LOSO
EER the report prints beside the default's) and fewer, shorter calls; ``--mode full``
requires every part's folds and simulates more and longer calls.

**The shipped default** scores the same calls too (``--shipped``, on by default): on the bona
fide calls that is an estimate for the default itself (new callers); on the spoof calls it
is not one (it trained on T01-T06) and is printed as the seen-engine ceiling.

Writes ``bench/results/calls.{json,md}``. The fold detectors and each call's window scores
are cached in ``runs/features/calls/`` (a re-run, a larger plan or an interrupted run goes on
from there; delete it to start over).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import page, prose, start

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench.newcallers import DEFAULT_PRIOR  # noqa: E402
from diarization.corpus import MIN_UTTERANCE_SECONDS, Utterance, load_voices  # noqa: E402
from diarization.simulate import VERSION as SIM_VERSION  # noqa: E402
from diarization.simulate import Segment, SimConfig, Simulator  # noqa: E402
from models.architectures.lfcc_gmm import LFCCGMM  # noqa: E402
from models.tasks.config import REPO_ROOT  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
CACHE = REPO_ROOT / "runs" / "features" / "calls"
LOSO_RUNS = REPO_ROOT / "runs" / "loso"
EXTRA = REPO_ROOT.parent / "shared" / "extra-bonafide" / "speech-commands"
RATE = 8000
CUT_MODES = ("reference", "stream")
BONAFIDE_GROUPS = ("speech-commands", "corpus")
#: speech of the synthetic voice a spoof call must have: a few sentences, or a few answers
MIN_SYNTHETIC_SECONDS = 4.0


@dataclass(frozen=True)
class Plan:
    """How many calls of which length one mode simulates."""

    spoof_calls_per_engine: int
    bonafide_calls_per_group: int
    seconds: tuple[float, float]
    neural_folds: str  # "optional": parts whose folds exist; "required": every part


PLANS = {
    # 48 calls, about 25 call-minutes
    "reduced": Plan(4, 12, (20.0, 40.0), "optional"),
    "full": Plan(30, 90, (25.0, 75.0), "required"),
}


@dataclass(frozen=True)
class Setting:
    """One verdict-rule setting: ``models.verdicts`` rule, alert threshold, rule fields."""

    rule: str
    threshold: float = 0.5
    params: tuple[tuple[str, float], ...] = ()

    @property
    def name(self) -> str:
        extra = "".join(f", {k} {v:g}" for k, v in self.params)
        return f"{self.rule}, threshold {self.threshold:g}{extra}"


DEFAULT_SETTING = Setting("evidence")
#: replayed on the same scores: the default, a more and a less sensitive evidence rule (the
#: alert level; the threshold, which is also the CUSUM's drift), and the earlier EMA rule
SETTINGS = (
    DEFAULT_SETTING,
    Setting("evidence", 0.5, (("level", 2.0),)),
    Setting("evidence", 0.5, (("level", 6.0),)),
    Setting("evidence", 0.4),
    Setting("evidence", 0.3),
    Setting("evidence", 0.3, (("level", 6.0),)),
    Setting("evidence", 0.7),
    Setting("ema", 0.5),
    Setting("ema", 0.3),
)


# --------------------------------------------------------------------------- calls


@dataclass
class SimCall:
    """One simulated call and its truth."""

    uri: str
    kind: str  # spoof | bonafide
    group: str  # the held-out engine (spoof) or the bona fide speakers' group
    fold: str  # the engine whose fold detector scores it
    audio: np.ndarray
    segments: list[Segment]
    synthetic: frozenset[str]  # voices that are machine-made

    @property
    def seconds(self) -> float:
        return self.audio.shape[0] / RATE

    @property
    def first_synthetic(self) -> float | None:
        """Call time of the first synthetic word: where the alert delay is counted from.
        By voice, not by the segment's label (the simulator labels back-channel bona fide
        whoever says it)."""
        starts = [s.start for s in self.segments if s.voice in self.synthetic]
        return min(starts) if starts else None

    def turns(self) -> list[tuple[float, float, str]]:
        """The reference turns: ``(start, end, voice)`` of every utterance placed."""
        return [(s.start, s.end, s.voice) for s in self.segments]


def _voices_with_speech(voices: dict[str, list[Utterance]]) -> dict[str, list[Utterance]]:
    """The voices the simulator keeps (two utterances or more)."""
    return {v: u for v, u in sorted(voices.items()) if len(u) >= 2}


def corpus_voices(root: Path) -> tuple[dict[str, dict[str, list[Utterance]]],
                                       dict[str, list[Utterance]]]:
    """Dev spoof voices per engine (keyed ``T04:FS_theo``: a copy-synthesis voice keeps its
    speaker's name, which its bona fide twin also has) and dev bona fide voices."""
    spoof: dict[str, dict[str, list[Utterance]]] = {}
    bona: dict[str, list[Utterance]] = {}
    for voice, utts in load_voices(root, "dev").items():
        for u in utts:
            if u.label == "spoof":
                spoof.setdefault(u.system, {}).setdefault(f"{u.system}:{voice}", []).append(u)
            else:
                bona.setdefault(voice, []).append(u)
    return ({t: _voices_with_speech(v) for t, v in sorted(spoof.items())},
            _voices_with_speech(bona))


def speech_commands_voices(extra: Path = EXTRA, split: str = "dev") -> dict[str, list[Utterance]]:
    """Speech Commands speakers of ``split`` as voices (clips of at least the corpus' shortest
    utterance, as the simulator's voices)."""
    voices: dict[str, list[Utterance]] = {}
    with (extra / "metadata.tsv").open(newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            duration = float(row["duration_s"])
            if row["split"] != split or duration < MIN_UTTERANCE_SECONDS:
                continue
            voices.setdefault(row["speaker"], []).append(Utterance(
                utt_id=row["utt_id"], path=extra / "flac" / f"{row['utt_id']}.flac",
                voice=row["speaker"], label="bonafide", system="-", duration=duration))
    return _voices_with_speech(voices)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def spoof_call(engine: str, index: int, spoof: dict[str, list[Utterance]],
               bona: dict[str, list[Utterance]], config: SimConfig, seed: int = 0) -> SimCall:
    """Call ``index`` of engine ``engine``: one of its voices and two genuine ones; the
    simulator draws who calls, who answers and whether the synthetic voice takes over the
    line. A draw in which the synthetic voice says less than :data:`MIN_SYNTHETIC_SECONDS`
    (a back-channel word, a takeover in the last seconds) is drawn again, deterministically:
    a call whose fraudster barely speaks measures nothing about detecting one."""
    number = int(engine.lstrip("T") or 0)
    pick = _rng(seed, 1, number, index)
    names = sorted(spoof)
    synthetic = names[int(pick.integers(len(names)))]
    source = synthetic.split(":", 1)[1]  # a copy-synthesis voice's genuine twin
    genuine = sorted(v for v in bona if v != source)
    x, y = (str(v) for v in pick.choice(genuine, size=2, replace=False))
    sim = Simulator({synthetic: spoof[synthetic], x: bona[x], y: bona[y]}, config)
    for attempt in range(100):
        audio, segments = sim.conversation(_rng(seed, 1, number, index, attempt))
        said = sum(s.end - s.start for s in segments if s.voice == synthetic)
        if said >= MIN_SYNTHETIC_SECONDS:
            return SimCall(f"spoof_{engine}_{index:03d}", "spoof", engine, engine, audio,
                           segments, frozenset({synthetic}))
    raise RuntimeError(f"{engine} call {index}: the synthetic voice spoke less than "
                       f"{MIN_SYNTHETIC_SECONDS} s in 100 draws")


def bonafide_call(group: str, index: int, voices: dict[str, list[Utterance]], fold: str,
                  config: SimConfig, seed: int = 0) -> SimCall:
    """Call ``index`` of ``group``: three genuine voices of that group."""
    number = BONAFIDE_GROUPS.index(group) if group in BONAFIDE_GROUPS else 9
    pick = _rng(seed, 2, number, index)
    trio = [str(v) for v in pick.choice(sorted(voices), size=3, replace=False)]
    sim = Simulator({v: voices[v] for v in trio}, config)
    audio, segments = sim.conversation(_rng(seed, 2, number, index, 0))
    return SimCall(f"bonafide_{group}_{index:03d}", "bonafide", group, fold, audio, segments,
                   frozenset())


def simulate_calls(plan: Plan, systems: Sequence[str], root: Path, extra: Path,
                   seed: int = 0) -> list[SimCall]:
    """Every call of a plan: the spoof calls of each engine, then the bona fide calls of
    each group (call ``i`` scored by the fold ``i mod`` the number of engines)."""
    config = SimConfig(min_seconds=plan.seconds[0], max_seconds=plan.seconds[1])
    spoof, corpus_bona = corpus_voices(root)
    sc = speech_commands_voices(extra)
    genuine = {**corpus_bona, **sc}
    calls = [spoof_call(t, i, spoof[t], genuine, config, seed)
             for t in systems for i in range(plan.spoof_calls_per_engine)]
    groups = {"speech-commands": sc, "corpus": corpus_bona}
    calls += [bonafide_call(g, i, groups[g], systems[i % len(systems)], config, seed)
              for g in BONAFIDE_GROUPS for i in range(plan.bonafide_calls_per_group)]
    return calls


# --------------------------------------------------------------------------- lanes and scores


def cut_call(call: SimCall, window_seconds: float, models: Any | None) -> dict[str, Any]:
    """The windows the server would score for ``call``: with reference turns, and (when
    ``models``, the diarizer's networks, are given) through the streaming diarizer."""
    from bench.diarization import lane_windows
    from server.speakers import DiarizingAttributor, TurnsAttributor

    out: dict[str, Any] = {"reference": {
        "turns": call.turns(),
        "windows": lane_windows(TurnsAttributor(call.turns(), RATE), call.audio,
                                window_seconds)}}
    if models is not None:
        from diarization.labels import turns_from_labels
        from diarization.stream import StreamingDiarizer, StreamingDiarizerConfig

        diarizer = StreamingDiarizer(models, RATE, StreamingDiarizerConfig())
        live = DiarizingAttributor(diarizer, record=True)
        windows = lane_windows(live, call.audio, window_seconds)
        labels = np.concatenate(live.labels) if live.labels else np.zeros(0, int)
        out["stream"] = {"turns": turns_from_labels(labels, RATE, diarizer.speakers),
                         "windows": windows, "rtf": diarizer.step_seconds_spent / call.seconds}
    return out


def score_windows(detectors: dict[str, Any], windows: list[dict[str, Any]]) -> None:
    """Each window's spoof probability under every detector (``p_<key>``), then its audio
    is dropped: the rules need the scores only."""
    if not windows:
        return
    audio = [w.pop("audio") for w in windows]
    for key, detector in detectors.items():
        probs = detector.spoof_probability(detector.scores(audio, batch_size=16))
        for w, p in zip(windows, probs, strict=True):
            w[f"p_{key}"] = round(float(p), 6)


def label_voices(call: dict[str, Any], mode: str) -> dict[str, str | None]:
    """Each lane label of a run -> the voice it is (reference turns: itself; streaming
    turns: the reference voice of the optimal DER mapping, ``None`` for none)."""
    turns = call[mode]["turns"]
    labels = {lab for _, _, lab in turns} | {w["speaker"] for w in call[mode]["windows"]}
    if mode == "reference":
        return {lab: lab for lab in labels}
    from diarization.evaluate import annotation, label_to_voice

    mapping = label_to_voice(annotation(call["reference"]["turns"], call["uri"]),
                             annotation(turns, call["uri"]))
    return {lab: mapping.get(lab) for lab in labels}


def call_outcome(synthetic: Sequence[str], first_synthetic: float | None,
                 alerts: dict[str, float], voices: dict[str, str | None]) -> dict[str, Any]:
    """One call's verdicts: ``alerts`` (lane label -> call time of its alert) read through
    ``voices`` (lane label -> the voice it is). A flagged lane that is no voice (a
    diarizer's stray label) counts as a genuine voice flagged, as a fraud desk would see it."""
    hits = sorted(at for lab, at in alerts.items() if voices.get(lab) in synthetic)
    genuine = [lab for lab in alerts if voices.get(lab) not in synthetic]
    delay = (hits[0] - first_synthetic) if hits and first_synthetic is not None else None
    return {"spoof_flagged": bool(hits) if synthetic else None,
            "genuine_flagged": bool(genuine),
            "delay_s": round(delay, 2) if delay is not None else None}


def replay_call(call: dict[str, Any], mode: str, key: str, setting: Setting) -> dict[str, Any]:
    """The verdicts of ``setting`` on one call's windows as scored by detector ``key``."""
    from bench.diarization import replay

    windows = [{**w, "p": w[f"p_{key}"]} for w in call[mode]["windows"]]
    alerts = replay(windows, setting.rule, setting.threshold, **dict(setting.params))
    return call_outcome(call["synthetic"], call["first_synthetic"], alerts,
                        label_voices(call, mode))


# --------------------------------------------------------------------------- fold detectors


class _FoldGMM(LFCCGMM):
    """An LFCC+GMM whose training features come from a cache shared by the six folds' fits:
    every fold fits on the same utterances but one engine's, so the front end (most of a
    fit's time) runs once per utterance instead of six times. Same features, same fit."""

    def __init__(self, config: Any, cache: dict[int, np.ndarray]) -> None:
        super().__init__(config)
        self._cache = cache  # id(wave) -> float32 features; the waves outlive the cache

    def features(self, wave: np.ndarray) -> np.ndarray:
        key = id(wave)
        if key not in self._cache:
            self._cache[key] = super().features(wave).astype(np.float32)
        return self._cache[key]


def _file_tag(model: str | None) -> str:
    """A short digest of a model's checkpoint file ('' for none)."""
    if not model:
        return ""
    from models.inference import NAMED_MODELS

    path = Path(NAMED_MODELS.get(model, model))
    return "-" + hashlib.sha1(path.read_bytes()).hexdigest()[:8] if path.is_file() else ""


def _config_tag(config: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def fold_detectors(systems: Sequence[str], plan: Plan, root: Path, cache: Path,
                   prior: float, loso_runs: Path = LOSO_RUNS) -> tuple[dict[str, Any],
                                                                        dict[str, Any]]:
    """Per engine T, the default's recipe trained without T (module docstring), and what
    was built: parts used and missing, the fused folds' LOSO EER."""
    from models.architectures.fusion import fusion_state
    from models.architectures.lfcc_gmm import LFCCGMMConfig
    from models.checkpoint import read_checkpoint, save_checkpoint
    from models.data.asvspoof import ASVspoofSplit, audio_path
    from models.data.audio import load_audio
    from models.inference import NAMED_MODELS, detector_from_state, load_detector
    from models.metrics import compute_eer
    from models.tasks.loso import (
        FoldScores,
        fold_eval_trials,
        loso_calibration,
        robust_scale,
        score_trials,
    )
    from models.tasks.recipes import fuse_bona_normal

    default = read_checkpoint(NAMED_MODELS["default"])
    fused = default["state_dict"]
    recipes = list(default["model_config"]["parts"])
    weights = dict(zip(recipes, fused["weight"], strict=True))
    shipped = dict(zip(recipes, fused["parts"], strict=True))
    gmm = [r for r in recipes if shipped[r]["architecture"] == "lfcc_gmm"]
    neural = [r for r in recipes if r not in gmm]
    found = {r: all((loso_runs / r / t / "model.pt").is_file() for t in systems) for r in neural}
    missing = [r for r in neural if not found[r]]
    if missing and plan.neural_folds == "required":
        raise SystemExit(
            f"full mode needs every part's LOSO fold checkpoints; missing: {missing} under "
            f"{loso_runs} (python -m bench.generalization train-folds "
            + " ".join(f"--recipe {r}" for r in missing) + "; the -voc recipes need make vocode)")
    used = [r for r in recipes if r in gmm or found.get(r)]
    tag = "+".join(used)
    train = ASVspoofSplit(root, "train")
    dev = ASVspoofSplit(root, "dev")
    waves: dict[str, np.ndarray] = {}
    part_folds: dict[str, list[FoldScores]] = {r: [] for r in used}
    states: dict[tuple[str, str], dict[str, Any]] = {}
    for r in used:
        features: dict[int, np.ndarray] = {}  # one front end's training features, all folds
        for t in systems:
            if r in gmm:
                config = dict(shipped[r]["model_config"])
                path = cache / "folds" / f"{r}-{_config_tag(config)}" / f"{t}.pt"
                if not path.is_file():
                    if not waves:
                        waves = {x.utt_id: load_audio(audio_path(train.audio_dir, x.utt_id),
                                                      RATE) for x in train.trials()}
                    fit = [x for x in train.trials() if x.system != t]
                    began = time.time()
                    model = _FoldGMM(LFCCGMMConfig(**config), features).fit(
                        [waves[x.utt_id] for x in fit if x.is_bonafide],
                        [waves[x.utt_id] for x in fit if not x.is_bonafide])
                    save_checkpoint(path, architecture="lfcc_gmm", name=f"{r}-without-{t}",
                                    version="fold", sample_rate=shipped[r]["sample_rate"],
                                    window_seconds=shipped[r]["window_seconds"],
                                    model_config=config, state_dict=model.state_dict(),
                                    card={"trained_without": t})
                    print(f"calls: {r} without {t} fitted ({time.time() - began:.0f} s)",
                          flush=True)
                scores_path = path.with_suffix(".scores.json")
            else:
                path = loso_runs / r / t / "model.pt"
                scores_path = path.parent / "scores.json"
            states[r, t] = read_checkpoint(path)
            if scores_path.is_file():
                fold = FoldScores.from_json(json.loads(scores_path.read_text()))
            else:  # the fold's test trials as LOSO scores them (first window, repeat-padded)
                trials = fold_eval_trials(dev.trials(), t)
                fold = FoldScores(t, [x.utt_id for x in trials], [x.label for x in trials],
                                  score_trials(detector_from_state(states[r, t]), trials,
                                               dev.audio_dir))
                fold.save(scores_path)
            part_folds[r].append(fold)
    folds = {f.held_out: f for f in fuse_bona_normal(part_folds, {r: weights[r] for r in used})}
    detectors = {}
    for i, t in enumerate(systems):
        labels = np.asarray(folds[t].labels)
        bona = np.asarray(folds[t].scores)[labels == 1]
        calibration = loso_calibration([folds[o] for o in systems if o != t], bona, prior)
        references, med, iqr = [], [], []
        for r in used:
            s = np.asarray(part_folds[r][i].scores)
            ref = s[np.asarray(part_folds[r][i].labels) == 1]
            references.append(np.sort(ref).tolist())
            m, q = robust_scale(ref)
            med.append(m)
            iqr.append(q)
        state = fusion_state([states[r, t] for r in used], {
            "mean": med, "scale": iqr, "weight": [weights[r] for r in used], "bias": 0.0,
            "combine": "bona-normal", "reference": references})
        path = cache / "folds" / f"fusion-{tag}" / f"{t}.pt"
        save_checkpoint(path, architecture="fusion", name=f"{default['name']}-without-{t}",
                        version="fold", sample_rate=default["sample_rate"],
                        window_seconds=default["window_seconds"],
                        model_config={"parts": used}, state_dict=state,
                        calibration=vars(calibration), card={"trained_without": t})
        detectors[t] = load_detector(path)
    scores = np.concatenate([np.asarray(folds[t].scores) for t in systems])
    labels = np.concatenate([np.asarray(folds[t].labels) for t in systems])
    info = {"parts": used, "parts_missing": missing,
            "weights": {r: weights[r] for r in used}, "prior": prior,
            "loso_eer": {t: folds[t].eer() for t in systems},
            "loso_pooled_eer": float(compute_eer(scores[labels == 1], scores[labels == 0])[0]),
            "default_loso_pooled_eer": default.get("card", {}).get("loso", {}).get("pooled_eer")}
    return detectors, info


# --------------------------------------------------------------------------- report


def pooled(outcomes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    spoof = [o for o in outcomes if o["spoof_flagged"] is not None]
    bona = [o for o in outcomes if o["spoof_flagged"] is None]
    delays = sorted(o["delay_s"] for o in spoof if o["delay_s"] is not None)
    return {
        "spoof_calls": len(spoof),
        "spoof_calls_flagged": sum(bool(o["spoof_flagged"]) for o in spoof),
        "bonafide_calls": len(bona),
        "bonafide_calls_flagged": sum(o["genuine_flagged"] for o in bona),
        "genuine_voice_flagged_in_spoof_calls": sum(o["genuine_flagged"] for o in spoof),
        "median_delay_s": statistics.median(delays) if delays else None,
        "delays_s": delays,
    }


def summarize(calls: list[dict[str, Any]], key: str, setting: Setting,
              modes: Sequence[str]) -> dict[str, Any]:
    """Pooled outcomes of one detector and setting: per mode, overall and per group."""
    out: dict[str, Any] = {}
    for mode in modes:
        outcomes = [(c, replay_call(c, mode, key, setting)) for c in calls]
        groups = sorted({c["group"] for c, _ in outcomes})
        out[mode] = {"all": pooled([o for _, o in outcomes]),
                     "groups": {g: pooled([o for c, o in outcomes if c["group"] == g])
                                for g in groups}}
    return out


def favoured(table: dict[str, dict[str, Any]], modes: Sequence[str],
             max_bonafide: float = 0.01) -> str:
    """The setting the estimate favours: most spoof calls flagged (modes summed) among those
    whose bona fide calls flagged stay at or under ``max_bonafide`` in every mode; when none
    does, the fewest bona fide calls flagged first. Ties: the shorter median delay."""
    def rates(name: str) -> tuple[float, int, float]:
        row = table[name]
        bona = max(row[m]["all"]["bonafide_calls_flagged"] / max(row[m]["all"]["bonafide_calls"],
                                                                 1) for m in modes)
        spoof = sum(row[m]["all"]["spoof_calls_flagged"] for m in modes)
        delay = statistics.mean(row[m]["all"]["median_delay_s"] or 99.0 for m in modes)
        return bona, spoof, delay

    ok = [n for n in table if rates(n)[0] <= max_bonafide]
    if ok:
        return max(ok, key=lambda n: (rates(n)[1], -rates(n)[2]))
    return min(table, key=lambda n: (rates(n)[0], -rates(n)[1], rates(n)[2]))


def _frac(a: int, b: int) -> str:
    return f"{a}/{b} ({100 * a / b:.0f} %)" if b else "-"


def _bona(p: dict[str, Any]) -> str:
    return _frac(p["bonafide_calls_flagged"], p["bonafide_calls"])


def _spoof(p: dict[str, Any]) -> str:
    return _frac(p["spoof_calls_flagged"], p["spoof_calls"])


def _delay(p: dict[str, Any]) -> str:
    return f"{p['median_delay_s']:.1f}" if p["median_delay_s"] is not None else "-"


FAVOURED = """Favoured by this estimate: **{favoured}** (the most spoof calls flagged among the
settings that flag at most 1 % of bona fide calls in every turn mode, else the fewest bona fide
calls flagged). With {n_bona} bona fide calls, 0 flagged bounds the true rate below {bound:.0f} %
(95 %, rule of three): a reduced-mode recommendation, not a measurement of the 1 % target.
Server defaults unchanged."""
TARGETS = """Targets (issue 28): >= 95 % of spoof calls flagged with reference turns, >= 90 % with
streaming turns, <= 1 % of bona fide calls flagged, median alert <= 5 s after the first synthetic
word. Mode `{mode}`: {calls} calls, {call_seconds:.0f} s of audio, {windows_scored} windows
scored; diarizing and scoring the calls {calls_compute_seconds:.0f} s, this run {seconds:.0f} s
({cpu}, {threads} threads) with {calls_from_cache} calls' scores from `runs/features/calls`."""


def markdown(payload: dict[str, Any]) -> str:
    modes = payload["modes"]
    info = payload["fold_detector"]
    loso = info["loso_pooled_eer"]
    default_loso = info.get("default_loso_pooled_eer")
    lines = [
        "### Calls: simulated two-party calls, the synthetic party from an engine held out of "
        "training, the genuine callers never trained on", "",
        f"Fold detector: the default's recipe trained without the engine, parts "
        f"{', '.join(f'`{p}`' for p in info['parts'])}"
        + (f" (missing fold checkpoints, left out: {', '.join(info['parts_missing'])})"
           if info["parts_missing"] else "")
        + f"; its LOSO pooled EER {100 * loso:.1f} %"
        + (f" (the default's, all five parts: {100 * default_loso:.1f} %)" if default_loso
           else "") + f". Verdicts: `{DEFAULT_SETTING.name}` (the server's default rule), "
        "windows cut by the server's lanes with reference turns and with the streaming "
        "diarizer's turns.", "",
        "| engine held out / genuine callers | calls | " + " | ".join(
            f"flagged ({m} turns) | median delay s ({m})" for m in modes) + " |",
        "|---|---|" + "---|---|" * len(modes),
    ]
    main = payload["estimate"]
    groups = list(main[modes[0]]["groups"])
    for g in [*[g for g in groups if g.startswith("T")], *[g for g in groups
                                                           if not g.startswith("T")]]:
        first = main[modes[0]]["groups"][g]
        spoof = first["spoof_calls"] > 0
        n = first["spoof_calls"] if spoof else first["bonafide_calls"]
        cells = []
        for m in modes:
            p = main[m]["groups"][g]
            hit = p["spoof_calls_flagged"] if spoof else p["bonafide_calls_flagged"]
            cells += [_frac(hit, n), _delay(p) if spoof else "-"]
        label = f"{g} (spoof calls)" if spoof else f"{g} (bona fide calls)"
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    cells = []
    for m in modes:
        p = main[m]["all"]
        cells += [f"spoof {_frac(p['spoof_calls_flagged'], p['spoof_calls'])}, bona fide "
                  f"{_frac(p['bonafide_calls_flagged'], p['bonafide_calls'])}", _delay(p)]
    lines.append("| **all** | "
                 f"{main[modes[0]]['all']['spoof_calls'] + main[modes[0]]['all']['bonafide_calls']}"
                 " | " + " | ".join(cells) + " |")
    lines += ["", "Genuine voices flagged inside spoof calls: " + ", ".join(
        f"{m} turns {main[m]['all']['genuine_voice_flagged_in_spoof_calls']}/"
        f"{main[m]['all']['spoof_calls']}" for m in modes) + ". Delay: from the first "
        "synthetic word to the alerting window's end, call time (streaming adds the "
        "diarizer's step and latency live).", ""]
    if "shipped" in payload:
        s = payload["shipped"]
        lines += [f"**The shipped default** (`{payload['shipped_model']}`) on the same calls: "
                  "the bona fide calls are an estimate for it (new callers); on the spoof calls "
                  "it trained on every engine, so that row is the seen-engine ceiling, not an "
                  "estimate.", "", "| calls | " + " | ".join(f"flagged ({m} turns) | median "
                                                              f"delay s ({m})" for m in modes)
                  + " |", "|---|" + "---|---|" * len(modes)]
        for kind in ("speech-commands", "corpus"):
            cells = []
            for m in modes:
                p = s[m]["groups"][kind]
                cells += [_frac(p["bonafide_calls_flagged"], p["bonafide_calls"]), "-"]
            lines.append(f"| {kind} bona fide | " + " | ".join(cells) + " |")
        cells = []
        for m in modes:
            p = s[m]["all"]
            cells += [_frac(p["spoof_calls_flagged"], p["spoof_calls"]), _delay(p)]
        lines += ["| spoof calls (engines seen in training) | " + " | ".join(cells) + " |", ""]
        if "shipped_under_favoured" in payload:
            f = payload["shipped_under_favoured"]
            lines += [f"Under the favoured setting below (`{payload['favoured']}`), the shipped "
                      "default flags " + ", ".join(
                          f"{m} turns: bona fide calls {_bona(f[m]['all'])}, seen-engine "
                          f"spoof calls {_spoof(f[m]['all'])} (median delay "
                          f"{_delay(f[m]['all'])} s)" for m in modes) + ".", ""]
    lines += ["**Verdict-rule settings** replayed on the fold detectors' scores of the same "
              "calls (`models.verdicts`; the threshold is the stream's alert threshold and the "
              "evidence rule's drift, the level its alert level):", "",
              "| setting | " + " | ".join(f"spoof calls ({m}) | bona fide calls ({m}) | "
                                          f"median delay s ({m})" for m in modes) + " |",
              "|---|" + "---|---|---|" * len(modes)]
    for name, row in payload["settings"].items():
        cells = []
        for m in modes:
            p = row[m]["all"]
            cells += [_frac(p["spoof_calls_flagged"], p["spoof_calls"]),
                      _frac(p["bonafide_calls_flagged"], p["bonafide_calls"]), _delay(p)]
        mark = " (server default)" if name == DEFAULT_SETTING.name else ""
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + " |")
    n_bona = main[modes[0]]["all"]["bonafide_calls"]
    # the rule of three: 0 of n flagged bounds the rate below 3/n at 95 %
    favoured = {**payload, "n_bona": n_bona, "bound": 100 * 3 / max(n_bona, 1)}
    return page(lines, prose(FAVOURED, favoured), prose(TARGETS, payload))


def run(args: argparse.Namespace) -> int:
    from bench.service.report import machine
    from models.data.asvspoof import ASVspoofSplit
    from models.inference import load_detector
    from models.tasks.loso import spoof_systems
    from models.tasks.recipes import corpus_root

    clock = start(args.threads)
    plan = PLANS[args.mode]
    if args.spoof_calls is not None or args.bonafide_calls is not None:
        plan = Plan(plan.spoof_calls_per_engine if args.spoof_calls is None else args.spoof_calls,
                    plan.bonafide_calls_per_group if args.bonafide_calls is None
                    else args.bonafide_calls, plan.seconds, plan.neural_folds)
    root = corpus_root()
    systems = spoof_systems(ASVspoofSplit(root, "train").trials())
    modes = list(CUT_MODES if args.stream else CUT_MODES[:1])
    detectors, info = fold_detectors(systems, plan, root, args.cache, args.prior,
                                     args.loso_runs)
    # One file per call: a call is the same bytes in every plan that has it (its draw is
    # keyed by engine or group and index), so a larger plan or an interrupted run goes on
    # from the calls already scored. The key names everything a call's scores depend on,
    # the simulator's version included (a fix to its draws changes the calls), and the
    # calibrations the stored probabilities came from: the fold detectors' prior and the
    # shipped model's file (a re-shipped `default` keeps its name, not its scores).
    key = (f"sim{SIM_VERSION}-{plan.seconds[0]:g}-{plan.seconds[1]:g}s-min"
           f"{MIN_SYNTHETIC_SECONDS:g}-seed{args.seed}-{'+'.join(info['parts'])}-"
           f"p{args.prior:g}-{args.shipped or 'none'}{_file_tag(args.shipped)}")
    folder = args.cache / "scored" / key
    folder.mkdir(parents=True, exist_ok=True)
    shipped = diarizer = None
    calls = []
    cached = 0
    for call in simulate_calls(plan, systems, root, args.extra, args.seed):
        path = folder / f"{call.uri}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if all(m in record for m in modes):
                calls.append(record)
                cached += 1
                continue
        if args.shipped and shipped is None:
            shipped = load_detector(args.shipped)
        if args.stream and diarizer is None:
            from diarization.models import DiarizationModels

            diarizer = DiarizationModels()
        began = time.time()
        cut = cut_call(call, detectors[call.fold].window_seconds, diarizer)
        use = {"fold": detectors[call.fold]} | ({"shipped": shipped} if shipped else {})
        for mode in cut:
            score_windows(use, cut[mode]["windows"])
        record = {"uri": call.uri, "kind": call.kind, "group": call.group,
                  "fold": call.fold, "seconds": call.seconds,
                  "synthetic": sorted(call.synthetic),
                  "first_synthetic": call.first_synthetic, **cut,
                  "compute_seconds": round(time.time() - began, 2)}
        path.write_text(json.dumps(record))
        calls.append(record)
        print(f"calls: {call.uri} {call.seconds:.0f} s"
              + (f", stream rtf {cut['stream']['rtf']:.3f}" if "stream" in cut else ""),
              flush=True)
    payload: dict[str, Any] = {
        "mode": args.mode, "modes": modes, "seed": args.seed, "fold_detector": info,
        "plan": vars(plan) | {"seconds": list(plan.seconds)},
        "calls": len(calls), "calls_from_cache": cached,
        "call_seconds": sum(c["seconds"] for c in calls),
        # diarizing and scoring every call, whenever it was done (cached calls included)
        "calls_compute_seconds": round(sum(c.get("compute_seconds", 0.0) for c in calls), 1),
        "windows_scored": sum(len(c[m]["windows"]) for c in calls for m in modes),
        "estimate": summarize(calls, "fold", DEFAULT_SETTING, modes),
        "settings": {s.name: summarize(calls, "fold", s, modes) for s in SETTINGS},
    }
    if all("p_shipped" in w for c in calls for w in c["reference"]["windows"]):
        payload["shipped_model"] = args.shipped
        payload["shipped"] = summarize(calls, "shipped", DEFAULT_SETTING, modes)
    payload["favoured"] = favoured(payload["settings"], modes)
    if "shipped" in payload and payload["favoured"] != DEFAULT_SETTING.name:
        chosen = next(s for s in SETTINGS if s.name == payload["favoured"])
        payload["shipped_under_favoured"] = summarize(calls, "shipped", chosen, modes)
    payload["per_call"] = [
        {"uri": c["uri"], "group": c["group"], "fold": c["fold"], "seconds": round(c["seconds"], 1),
         "first_synthetic_s": c["first_synthetic"],
         **{m: replay_call(c, m, "fold", DEFAULT_SETTING) for m in modes},
         **({"stream_rtf": round(c["stream"]["rtf"], 4)} if "stream" in c else {})}
        for c in calls]
    payload["seconds"] = clock.seconds()
    payload["cpu"] = machine()["cpu"]
    payload["threads"] = clock.threads
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calls.json").write_text(json.dumps(payload, indent=1))
    (args.out / "calls.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(PLANS), default="reduced")
    parser.add_argument("--no-stream", dest="stream", action="store_false",
                        help="reference turns only (no streaming diarizer)")
    parser.add_argument("--shipped", default="default",
                        help="shipped model also scored on the same calls ('' to skip)")
    parser.add_argument("--prior", type=float, default=DEFAULT_PRIOR,
                        help="bona fide prior of the fold detectors' calibration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spoof-calls", type=int, default=None,
                        help="spoof calls per engine (default: the mode's)")
    parser.add_argument("--bonafide-calls", type=int, default=None,
                        help="bona fide calls per group of callers (default: the mode's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", type=Path, default=EXTRA, help="Speech Commands folder")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--loso-runs", type=Path, default=LOSO_RUNS,
                        help="fold runs of the LCNN parts (<recipe>/<T>/model.pt), as "
                        "`python -m bench.generalization train-folds --runs DIR` writes them")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
