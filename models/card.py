"""Render a checkpoint's embedded card as the Markdown model card committed beside it."""

from __future__ import annotations

import json
from typing import Any

from models.inference import Detector


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def render_card(detector: Detector) -> str:
    card: dict[str, Any] = detector.card
    config = card.get("config", {})
    eers: dict[str, float] = card.get("dev_eer", {})
    lines = [
        f"# Model card: {detector.name} (version {detector.version})", "",
        f"- architecture: `{detector.architecture}`, sample rate {detector.sample_rate} Hz, "
        f"scoring window {detector.window_seconds:g} s (first window, repeat-padded)",
        f"- calibration (P(bona fide) = sigmoid(scale * score + bias), fitted on "
        f"{'leave-one-system-out scores' if 'calibration_source' in card else 'dev'}): "
        f"scale {detector.calibration.scale:.4f}, bias {detector.calibration.bias:.4f}",
    ]
    if "fusion" in card:
        fusion = card["fusion"]
        if fusion.get("combine") == "bona-normal":
            lines.append("- parts (score-level bona-normal fusion: each part's score as the "
                         "normal quantile of its rank among the part's own dev bona fide "
                         "scores, weights chosen on leave-one-system-out scores):")
        else:
            lines.append("- parts (score-level fusion, weights fitted on leave-one-system-out "
                         "scores, each part in units of its own dev bona fide scores):")
        lines += [f"  - `{recipe}` (checkpoint name `{name}`): weight {weight:.3f}"
                  for (recipe, name), weight in zip(fusion["parts"].items(), fusion["weight"],
                                                    strict=True)]
        lines.append("- each part's own checkpoint and card: `python -m models unfuse` "
                     "writes them out of this one")
    else:
        lines.append(f"- training data: `{config.get('data', {}).get('root')}` train split "
                     "(ASVspoof 2019 LA layout, 8 kHz telephone band)")
    if "best_epoch" in card:
        planned = config.get("optim", {}).get("epochs", card["epochs_trained"])
        stopped = (f" (stopped early: {planned} planned)"
                   if card["epochs_trained"] < planned else "")
        chosen = ("exported: the last epoch" if config.get("optim", {}).get("select") == "last"
                  else f"best on dev: epoch {card['best_epoch']}")
        lines.append(f"- epochs trained: {card['epochs_trained']}{stopped}, {chosen}")
    if "training_seconds" in card:
        seconds = card["training_seconds"]
        lines.append(f"- training time: {seconds / 60:.1f} min" if seconds >= 120
                     else f"- training time: {seconds:.0f} s")
    if "machine" in card:
        m = card["machine"]
        lines.append(f"- machine: {m['cpu_count']} CPU cores ({m['processor']}), "
                     f"{m['torch_threads']} torch thread(s), torch {m['torch']}, "
                     f"device {m.get('device', 'cpu')}")
    extra = [e.get("protocol") for e in config.get("data", {}).get("extra", [])]
    if extra:
        lines.append(f"- extra training data: {', '.join(f'`{e}`' for e in extra)} "
                     "(vocoded copies of the training bona fide, `make vocode`)")
    if "loso" in card:
        loso = card["loso"]
        lines += ["", "## Leave-one-system-out EER (the estimate for unseen engines)", "",
                  f"Each engine left out of training in turn ({loso['fold_scale']}); dev bona "
                  "fide against the left-out engine's dev spoofs "
                  "(`make bench-generalization`).", "",
                  "| held-out engine | EER | missed at the alert threshold |", "|---|---|---|"]
        lines += [f"| {k} | {_pct(v)} | {_pct(loso['spoof_miss_at_threshold'][k])} |"
                  for k, v in loso["per_engine_eer"].items()]
        lines.append(f"| pooled | {_pct(loso['pooled_eer'])} | |")
    if "bonafide_false_alarm" in card:
        fa = card["bonafide_false_alarm"]
        lines += ["", f"Bona fide false alarms of this model on dev at the service threshold "
                  f"(spoof probability >= {fa['threshold']}): digits (< 1 s, "
                  f"{fa['digits_trials']} trials) {_pct(fa['digits'])}, sentences "
                  f"({fa['sentences_trials']} trials) {_pct(fa['sentences'])}."]
    lines += ["", "## Dev EER (train and dev share spoofing systems T01-T06)", "",
              "| system | EER |", "|---|---|"]
    lines += [f"| {k} | {_pct(v)} |" for k, v in eers.items()]
    if card.get("history"):
        lines += ["", "## Training curve", "",
                  "| epoch | learning rate | train loss | dev EER | seconds |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['epoch'] + 1} | {r.get('lr') or 'n/a'} | {r['train_loss']:.4f} | "
                  f"{_pct(r['dev_eer'])} | {r['seconds']:.0f} |" for r in card["history"]]
    lines += ["", "## Configuration", "", "```json", json.dumps(config, indent=2), "```", ""]
    return "\n".join(lines)
