"""``python -m bench.adapt``: what ``python -m models adapt`` buys an operator.

The Speech Commands train speakers (192 crowdsourced callers on their own microphones,
never seen by the shipped model) play the operator's genuine callers: the default model is
adapted on them (one folder per caller, as an operator would lay them out), then both the
shipped and the adapted model score, as the service does (first window, repeat-padded;
flagged at spoof probability >= 0.5):

- the Speech Commands **dev** speakers (47 other callers, never used by either): the
  false alarms a new caller of this operator would meet;
- the corpus dev bona fide: the false alarms on the voices the shipped model was built on;
- the corpus dev spoofs per engine: what adaptation costs in misses.

Engine LOSO before and after (the adapted fusion's reference and offset applied to each
fold's models) is not measured yet. Writes ``bench/results/adapt.{json,md}``.
"""

from __future__ import annotations

import csv
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench import command, page, prose, start, write_results
from models.tasks.config import REPO_ROOT

EXTRA = REPO_ROOT.parent / "shared" / "extra-bonafide" / "speech-commands"


def operator_folder(root: Path, split: str = "train") -> Path:
    """The Speech Commands ``split`` clips as an operator's folder: a sub-folder per caller."""
    with (EXTRA / "metadata.tsv").open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["split"] == split:
                folder = root / row["speaker"]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{row['utt_id']}.flac").symlink_to(
                    EXTRA / "flac" / f"{row['utt_id']}.flac")
    return root


def evaluate(model: str | Path, threads: int) -> dict[str, Any]:
    """False alarms and misses of ``model`` at the service threshold, as the service scores."""
    import torch

    from models.data.asvspoof import ASVspoofSplit, audio_path
    from models.data.audio import load_audio, repeat_pad
    from models.inference import load_detector
    from models.tasks.recipes import corpus_root

    torch.set_num_threads(threads)
    detector = load_detector(model)

    def flagged(paths: list[Path]) -> np.ndarray:
        waves = [repeat_pad(load_audio(p, detector.sample_rate), detector.window_samples)
                 for p in paths]
        return detector.spoof_probability(np.asarray(detector.scores(waves))) >= 0.5

    with (EXTRA / "metadata.tsv").open() as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["split"] == "dev"]
    sc = flagged([EXTRA / "flac" / f"{r['utt_id']}.flac" for r in rows])
    speakers: dict[str, bool] = defaultdict(bool)
    for r, hit in zip(rows, sc, strict=True):
        speakers[r["speaker"]] |= bool(hit)
    dev = ASVspoofSplit(corpus_root(), "dev")
    trials = dev.trials()
    hits = flagged([audio_path(dev.audio_dir, t.utt_id) for t in trials])
    bona = np.array([t.is_bonafide for t in trials])
    systems = sorted({t.system for t in trials if not t.is_bonafide})
    return {
        "model": str(model), "name": detector.name,
        "speech_commands_dev_flagged": float(sc.mean()),
        "speech_commands_dev_speakers_flagged": float(np.mean(list(speakers.values()))),
        "corpus_dev_bonafide_flagged": float(hits[bona].mean()),
        "corpus_dev_spoof_missed": {s: float(1 - hits[[t.system == s for t in trials]].mean())
                                    for s in systems},
    }


ADAPTED = """Adapted on the Speech Commands train speakers as the operator's callers
({fit_speakers} fitted, {check_speakers} kept apart), target {target} % false alarms, copies
through {vocoders} ({max_vocoded_seconds:.0f} s each); on the kept-apart callers:
{false_alarms_before} % -> {false_alarms_after} % of windows flagged, copies missed
{missed_before} % -> {missed_after} %. {seconds:.0f} s."""


def markdown(payload: dict[str, Any]) -> str:
    before, after = payload["before"], payload["after"]
    systems = list(before["corpus_dev_spoof_missed"])

    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    lines = ["### Operator adaptation (`python -m models adapt`): the default before and after",
             "", "| | shipped | adapted |", "|---|---|---|"]
    for key, label in (("speech_commands_dev_flagged", "new callers' words flagged (SC dev)"),
                       ("speech_commands_dev_speakers_flagged",
                        "new callers with a flagged word (SC dev speakers)"),
                       ("corpus_dev_bonafide_flagged", "corpus dev bona fide flagged")):
        lines.append(f"| {label} | {pct(before[key])} % | {pct(after[key])} % |")
    for s in systems:
        lines.append(f"| corpus dev spoofs of {s} missed | "
                     f"{pct(before['corpus_dev_spoof_missed'][s])} % | "
                     f"{pct(after['corpus_dev_spoof_missed'][s])} % |")
    fit = payload["adapt"]
    return page(lines, prose(ADAPTED, {
        **fit["recordings"], "seconds": payload["seconds"],
        "target": pct(fit["target_false_alarms"]), "vocoders": ", ".join(fit["vocoders"]),
        "max_vocoded_seconds": fit["max_vocoded_seconds"],
        **{f"{k}_{when}": pct(fit[when][key]) for when in ("before", "after")
           for k, key in (("false_alarms", "false_alarms_check"), ("missed", "miss_copies"))}}))


def main(argv: list[str] | None = None) -> int:
    parser = command("python -m bench.adapt", __doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--target-false-alarms", type=float, default=0.01)
    parser.add_argument("--max-vocoded-seconds", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "adapt" / "operator.pt"))
    args = parser.parse_args(argv)
    from models.tasks.adapt import adapt_checkpoint

    clock = start(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        report = adapt_checkpoint(args.model, args.out,
                                  bonafide=operator_folder(Path(tmp) / "callers"),
                                  target_false_alarms=args.target_false_alarms,
                                  max_vocoded_seconds=args.max_vocoded_seconds)
    payload = {"adapt": report, "before": evaluate(args.model, args.threads),
               "after": evaluate(args.out, args.threads)}
    payload["seconds"] = clock.seconds()
    write_results("adapt", payload, markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
