"""Vocoder held out: the stand-in for a modern neural engine the detector never saw.

The engines that still pass as human on the hidden set are modern neural ones, and none of
the corpus' engines is. Copy-synthesis gives spoofs whose only difference from their bona
fide sources is a neural vocoder, and vocoders come in families (HiFi-GAN's GAN generators,
Vocos-style iSTFT heads trained here, ...). For each family F: fit the recipe on the corpus
and the Speech Commands train bona fide, with the corpus' spoofs and the copies of every
*other* family as spoofs; then score F's copies against the bona fide recordings they were
made from. Reported per held-out family: the EER (copies vs their sources) and the share of
copies missed at the service threshold, the fold calibrated as a shipped model (the
recipe's LOSO calibration anchored on the fold's dev bona fide scores).

Copies are read from ``runs/vocoded/*/flac`` (``make vocode``, ``make vocode-extra``, and
``python -m models vocode --vocoder vocos-8k`` for a trained family); each file name ends
in its vocoder's system id, which says its family. A family with no copies is skipped and
named. Reduced mode fits the fine LFCC+GMM; the neural recipes' folds are left to full
mode. Writes ``bench/results/vocoder-held-out.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench import command, page, prose, start, write_results
from bench.newcallers import DEFAULT_PRIOR, bonafide_clips
from models.tasks.config import REPO_ROOT

VOCODED = REPO_ROOT / "runs" / "vocoded"
#: system id -> family
FAMILIES = {"V01": "hifigan", "V02": "hifigan", "V03": "vocos", "V04": "nsf"}


def copies_by_family(root: Path = VOCODED) -> dict[str, list[tuple[str, Path]]]:
    """(source utt_id, path) of every copy written under ``root``, by vocoder family."""
    out: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(root.glob("*/flac/*.flac")):
        if path.name.endswith(".tmp.flac"):
            continue
        source, _, system = path.name.removesuffix(".flac").rpartition("_")
        if system in FAMILIES:
            out.setdefault(FAMILIES[system], []).append((source, path))
    return out


def run(args: argparse.Namespace) -> int:
    from bench.newcallers import _fit_gmm
    from models.data.asvspoof import ASVspoofSplit, audio_path
    from models.data.audio import load_audio, repeat_pad
    from models.metrics import compute_eer
    from models.tasks.loso import loso_calibration, spoof_systems
    from models.tasks.recipes import GMM_RECIPES, corpus_root, recipe_folds

    clock = start(args.threads)
    root = corpus_root()
    clips = {c.utt_id: c for c in bonafide_clips(root)}
    families = copies_by_family()
    train = ASVspoofSplit(root, "train")
    spoofs = [load_audio(audio_path(train.audio_dir, t.utt_id), 8000)
              for t in train.trials() if not t.is_bonafide]
    bona_train = [c for c in clips.values() if c.split == "train"]
    waves = {c.utt_id: load_audio(c.path, 8000) for c in clips.values()
             if c.split == "train" or c.group != "speech-commands"}
    dev_bona = [c for c in clips.values() if c.split == "dev" and c.group != "speech-commands"]
    systems = spoof_systems(train.trials())
    rows: dict[str, Any] = {}
    skipped = [f for f in sorted(set(FAMILIES.values())) if f not in families]
    for recipe in args.recipe:
        options, _ = GMM_RECIPES[recipe]
        unit = recipe_folds(recipe, systems, Path(args.loso_dir), "reduced")
        for family in sorted(families):
            if len(families) < 2:
                break  # nothing to train on but the family held out
            others = [load_audio(p, 8000) for f, items in families.items() if f != family
                      for _, p in items]
            model = _fit_gmm([waves[c.utt_id] for c in bona_train], spoofs + others, options)
            held = [(s, p) for s, p in families[family] if s in waves]
            copy_scores = model.score([repeat_pad(load_audio(p, 8000), 32000) for _, p in held])
            source_scores = model.score([repeat_pad(waves[s], 32000) for s, _ in held])
            anchor = model.score([repeat_pad(waves[c.utt_id], 32000) for c in dev_bona])
            calibration = loso_calibration(unit, anchor, args.prior)
            missed = calibration.spoof_probability(copy_scores) < 0.5
            rows[f"{recipe} / {family}"] = {
                "copies": len(held), "eer": float(compute_eer(source_scores, copy_scores)[0]),
                "missed": float(missed.mean()),
                "trained_on_other_copies": len(others)}
            print(f"vocoder held out {recipe} {family}: {rows[f'{recipe} / {family}']}",
                  flush=True)
    payload = {"threshold": 0.5, "prior": args.prior, "rows": rows, "skipped": skipped,
               "families": {f: len(v) for f, v in families.items()},
               "seconds": clock.seconds()}
    write_results("vocoder-held-out", payload, markdown(payload))
    return 0


CALIBRATION = """Copies per family: {families}; families without copies: {skipped}. Calibration:
the recipe's LOSO calibration at bona fide prior {prior}, anchored on the fold's corpus dev bona
fide. {seconds:.0f} s."""


def markdown(payload: dict[str, Any]) -> str:
    lines = ["### Vocoder family held out: its copies against the recordings they were made "
             "from", "", "| recipe / family held out | copies | EER % | missed at the service "
             "threshold % | other families' copies trained on |", "|---|---|---|---|---|"]
    for key, r in payload["rows"].items():
        lines.append(f"| {key} | {r['copies']} | {100 * r['eer']:.1f} | "
                     f"{100 * r['missed']:.1f} | {r['trained_on_other_copies']} |")
    if not payload["rows"]:
        lines.append("| (fewer than two vocoder families have copies here) | | | | |")
    return page(lines, prose(CALIBRATION, {**payload,
                                           "skipped": ", ".join(payload["skipped"]) or "none"}))


def main(argv: list[str] | None = None) -> int:
    parser = command("python -m bench.vocoder_held_out", __doc__)
    parser.add_argument("--recipe", action="append", default=None)
    parser.add_argument("--prior", type=float, default=DEFAULT_PRIOR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loso-dir", default=str(REPO_ROOT / "runs" / "loso"))
    args = parser.parse_args(argv)
    args.recipe = args.recipe or ["lfcc-gmm-fine"]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
