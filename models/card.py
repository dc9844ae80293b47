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
        f"- calibration (P(bona fide) = sigmoid(scale * score + bias), fitted on dev): "
        f"scale {detector.calibration.scale:.4f}, bias {detector.calibration.bias:.4f}",
        f"- training data: `{config.get('data', {}).get('root')}` train split "
        f"(ASVspoof 2019 LA layout, 8 kHz telephone band); selection on the dev split",
    ]
    if "best_epoch" in card:
        planned = config.get("optim", {}).get("epochs", card["epochs_trained"])
        stopped = (f" (stopped early: {planned} planned)"
                   if card["epochs_trained"] < planned else "")
        lines.append(f"- epochs trained: {card['epochs_trained']}{stopped}, best on dev: "
                     f"epoch {card['best_epoch']}")
    lines.append(f"- training time: {card.get('training_seconds', 0) / 60:.1f} min")
    if "machine" in card:
        m = card["machine"]
        lines.append(f"- machine: {m['cpu_count']} CPU cores ({m['processor']}), "
                     f"{m['torch_threads']} torch thread(s), torch {m['torch']}, no GPU")
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
