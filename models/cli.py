"""``python -m models {train,score,evaluate}``: the contract models are judged by.

Exit codes: 0 success, 2 bad input (missing file, protocol line without audio, unreadable
audio), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from models.data.asvspoof import ProtocolError, Trial, audio_path, read_protocol
from models.data.audio import AudioError, load_audio, repeat_pad
from models.errors import ModelError
from models.inference import ModelNotFoundError


class UsageError(ModelError):
    pass


def _train(args: argparse.Namespace) -> int:
    from models.architectures.scorer import scorer_class
    from models.tasks.config import TrainConfig

    config = TrainConfig.load(args.config)
    if args.epochs is not None:
        config.optim.epochs = args.epochs
    if args.limit is not None:
        config.data.limit = args.limit
    if args.output is not None:
        config.output = args.output
    if args.device is not None:
        config.optim.device = args.device
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    scorer = scorer_class(config.architecture)
    print(scorer.train(config, run_dir, progress=not args.quiet, export_only=args.export_only))
    return 0


def _score(args: argparse.Namespace) -> int:
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


def _vocode(args: argparse.Namespace) -> int:
    import torch

    from models.data.vocode import sources_from_folder, sources_from_protocol, vocode

    torch.set_num_threads(args.threads)
    if args.protocol:
        if not args.audio_dir:
            raise UsageError("--protocol needs --audio-dir")
        sources = sources_from_protocol(args.protocol, args.audio_dir)
    elif args.input_dir:
        sources = sources_from_folder(args.input_dir, args.speaker)
    else:
        raise UsageError("give --protocol with --audio-dir, or --input-dir")
    if args.limit is not None:
        sources = sources[: args.limit]
    protocol = vocode(sources, args.out, args.vocoder, args.sample_rate, args.device,
                      progress=not args.quiet)
    print(f"wrote {protocol} ({len(sources) * len(args.vocoder)} items)", file=sys.stderr)
    return 0


def _card(args: argparse.Namespace) -> int:
    from models.card import render_card
    from models.inference import load_detector

    print(render_card(load_detector(args.model)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config (resumable)")
    p.add_argument("config")
    p.add_argument("--run-dir", help="where epochs are checkpointed (default runs/NAME)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--limit", type=int, help="use only the first N training trials")
    p.add_argument("--output", help="final checkpoint path (overrides the config)")
    p.add_argument("--device", help="cpu, cuda or auto (overrides the config)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--export-only", action="store_true",
                   help="export the best epoch of RUN_DIR without training further")
    p.set_defaults(func=_train)

    p = sub.add_parser("score", help="write 'UTT_ID SCORE' per protocol line")
    p.add_argument("--model", default="default",
                   help="default, fusion, rawnet2-voc, lfcc-gmm, aasist-l or a path")
    p.add_argument("--protocol", required=True)
    p.add_argument("--audio-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_score)

    p = sub.add_parser("evaluate", help="pooled and per-system EER, min t-DCF")
    p.add_argument("--scores", required=True)
    p.add_argument("--protocol", required=True)
    p.add_argument("--asv-scores", help="ASVspoof 2019 ASV score file, for min t-DCF")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "vocode", help="copy-synthesise bona fide audio through neural vocoders (spoof data)",
        description="Re-synthesise every bona fide recording through each vocoder and write "
        "OUT/flac/<UTT>_<SYSTEM>.flac plus OUT/protocol.txt (spoof lines), ready for a "
        "training config's data.extra. Resumable: existing files are kept.")
    p.add_argument("--protocol", help="ASVspoof-style protocol (its bona fide lines are used)")
    p.add_argument("--audio-dir", help="audio folder of --protocol")
    p.add_argument("--input-dir", help="or: every .wav/.flac under this folder")
    p.add_argument("--speaker", default="-", help="speaker id for --input-dir items")
    p.add_argument("--out", required=True)
    p.add_argument("--vocoder", action="append", choices=sorted(_vocoder_names()),
                   help="repeatable (default hifigan-universal)")
    p.add_argument("--sample-rate", type=int, default=8000, help="rate of the written files")
    p.add_argument("--limit", type=int, help="only the first N sources")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_vocode, vocoder=None)

    p = sub.add_parser("card", help="print a checkpoint's model card as Markdown")
    p.add_argument("--model", default="default")
    p.set_defaults(func=_card)
    return parser


def _vocoder_names() -> list[str]:
    from models.data.vocode import VOCODERS

    return list(VOCODERS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "func", None) is _vocode and not args.vocoder:
        args.vocoder = ["hifigan-universal"]
    try:
        return int(args.func(args))
    except (UsageError, ProtocolError, AudioError, ModelNotFoundError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
