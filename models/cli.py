"""``python -m models {train,score,evaluate}``: the contract models are judged by.

Exit codes: 0 success, 2 bad input (missing file, protocol line without audio, unreadable
audio), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from models.data.asvspoof import ProtocolError, Trial, audio_path, read_protocol
from models.data.audio import AudioError, load_audio, repeat_pad
from models.errors import ModelError
from models.inference import ModelNotFoundError
from models.tasks.options import DEVICE, MODEL, QUIET, THREADS, command


class UsageError(ModelError):
    pass


def _train(args: argparse.Namespace) -> int:
    """train a model from a YAML config (resumable)"""
    from models.tasks.config import TrainConfig
    from models.tasks.trainers import train

    config = TrainConfig.load(args.config)
    if args.epochs is not None:
        config.optim.epochs = args.epochs
    if args.limit is not None:
        config.data.limit = args.limit
    if args.output is not None:
        config.output = args.output
    if args.device is not None:
        config.optim.device = args.device
    if config.output:  # a candidate recipe cannot write into the shipped checkpoints
        from models.tasks.config import repo_path
        from models.tasks.release import check_output

        check_output(args.config, repo_path(config.output))
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    print(train(config, run_dir, progress=not args.quiet, export_only=args.export_only))
    return 0


def _score(args: argparse.Namespace) -> int:
    """write 'UTT_ID SCORE' per protocol line"""
    import torch

    from models.inference import load_detector

    torch.set_num_threads(args.threads)
    trials = read_protocol(args.protocol)
    detector = load_detector(args.model, device=args.device)
    # Resolve every path first: a missing file fails before minutes of scoring.
    paths = [audio_path(args.audio_dir, t.utt_id) for t in trials]
    window = detector.window_samples
    out_lines: list[str] = []
    batch: list[np.ndarray] = []
    names: list[str] = []

    def flush() -> None:
        scores = detector.scores(batch, batch_size=args.batch_size)
        out_lines.extend(f"{n} {s:.6f}" for n, s in zip(names, scores, strict=True))
        batch.clear()
        names.clear()

    for trial, path in zip(trials, paths, strict=True):
        wave = load_audio(path, detector.sample_rate)
        # Official eval input: the first window, repeat-padded when shorter.
        batch.append(repeat_pad(wave, window))
        names.append(trial.utt_id)
        if len(batch) >= args.batch_size:
            flush()
    if batch:
        flush()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(out_lines) + "\n")
    print(f"wrote {len(out_lines)} scores to {args.out}", file=sys.stderr)
    return 0


def read_scores(path: str | Path) -> dict[str, float]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"score file not found: {path}")
    scores: dict[str, float] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            scores[parts[0]] = float(parts[-1])
        except (ValueError, IndexError) as exc:
            raise UsageError(f"{path}:{number}: expected 'UTT_ID SCORE'") from exc
    return scores


def evaluate(scores: dict[str, float], trials: list[Trial]) -> dict[str, float]:
    from models.tasks.antispoofing import eer_by_system

    missing = [t.utt_id for t in trials if t.utt_id not in scores]
    if missing:
        raise UsageError(f"no score for {len(missing)} protocol trials, e.g. {missing[0]}")
    values = np.array([scores[t.utt_id] for t in trials])
    labels = np.array([t.label for t in trials])
    return eer_by_system(values, labels, [t.system for t in trials])


def _evaluate(args: argparse.Namespace) -> int:
    """pooled and per-system EER, min t-DCF"""
    trials = read_protocol(args.protocol)
    scores = read_scores(args.scores)
    eers = evaluate(scores, trials)
    result: dict[str, object] = {
        "trials": len(trials),
        "eer": eers["pooled"],
        "eer_per_system": {k: v for k, v in eers.items() if k != "pooled"},
    }
    if args.asv_scores:
        from models.metrics import min_tdcf, read_asv_scores

        asv = read_asv_scores(args.asv_scores)
        bona = np.array([scores[t.utt_id] for t in trials if t.is_bonafide])
        spoof = np.array([scores[t.utt_id] for t in trials if not t.is_bonafide])
        result["min_tdcf"] = min_tdcf(bona, spoof, asv.target, asv.nontarget, asv.spoof)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"trials: {len(trials)}")
    print(f"pooled EER: {100 * eers['pooled']:.2f}%")
    for system, eer in result["eer_per_system"].items():  # type: ignore[union-attr]
        print(f"  {system}: {100 * eer:.2f}%")
    if "min_tdcf" in result:
        print(f"min t-DCF: {result['min_tdcf']:.4f}")
    return 0


def _card(args: argparse.Namespace) -> int:
    """print a checkpoint's model card as Markdown"""
    from models.card import render_card
    from models.inference import load_detector

    print(render_card(load_detector(args.model)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, in the order of the help: this module's own (the contract and
    ``card``), then each task's, declared beside it."""
    from models.tasks import adapt, recalibrate, release, vocoding

    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_contract, vocoding.add_parsers, adapt.add_parser, recalibrate.add_parser,
                _add_card, release.add_parsers):  # release: ship, fuse, unfuse (make train)
        add(sub)
    return parser


def _add_contract(sub: Any) -> None:
    p = command(sub, "train", _train, parents=[QUIET])
    p.add_argument("config")
    p.add_argument("--run-dir", help="where epochs are checkpointed (default runs/NAME)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--limit", type=int, help="use only the first N training trials")
    p.add_argument("--output", help="final checkpoint path (overrides the config)")
    p.add_argument("--device", help="cpu, cuda or auto (overrides the config)")
    p.add_argument("--export-only", action="store_true",
                   help="export the best epoch of RUN_DIR without training further")

    p = command(sub, "score", _score, parents=[MODEL, DEVICE, THREADS])
    p.add_argument("--protocol", required=True)
    p.add_argument("--audio-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)

    p = command(sub, "evaluate", _evaluate)
    p.add_argument("--scores", required=True)
    p.add_argument("--protocol", required=True)
    p.add_argument("--asv-scores", help="ASVspoof 2019 ASV score file, for min t-DCF")
    p.add_argument("--json", action="store_true")


def _add_card(sub: Any) -> None:
    command(sub, "card", _card, parents=[MODEL])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (UsageError, ProtocolError, AudioError, ModelNotFoundError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
