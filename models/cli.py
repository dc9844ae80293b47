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
    if args.shard:
        sources = [s for s in sources if shard_of(s.utt_id, args.shard[1]) == args.shard[0]]
    if args.limit is not None:
        sources = sources[: args.limit]
    protocol = vocode(sources, args.out, args.vocoder, args.sample_rate, args.device,
                      progress=not args.quiet)
    print(f"wrote {protocol} ({len(sources) * len(args.vocoder)} items)", file=sys.stderr)
    return 0


def shard_of(utt_id: str, shards: int) -> int:
    """A source's shard: the same on every machine, whatever order the sources come in."""
    import hashlib

    return hashlib.sha256(utt_id.encode()).digest()[0] % shards


def _shard(text: str) -> tuple[int, int]:
    k, sep, n = text.partition("/")
    if not sep or not k.isdigit() or not n.isdigit() or not 0 <= int(k) < int(n):
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, got {text!r}")
    return int(k), int(n)


def _train_vocoder(args: argparse.Namespace) -> int:
    from models.vocoders import default_run_dir
    from models.vocoders.train import VocoderTrainConfig, train_vocoder

    config = VocoderTrainConfig.load(args.config)
    run_dir = Path(args.out or default_run_dir(config.name))
    print(train_vocoder(config, run_dir, stop_at=args.steps, threads=args.threads,
                        output=args.export, export_only=args.export_only))
    return 0


def _adapt(args: argparse.Namespace) -> int:
    import torch

    from models.tasks.adapt import adapt_checkpoint

    torch.set_num_threads(args.threads)
    report = adapt_checkpoint(args.model, args.out, bonafide=args.bonafide, spoof=args.spoof,
                              target_false_alarms=args.target_false_alarms,
                              vocoders=args.vocoder or ["hifigan-universal"],
                              max_vocoded_seconds=args.max_vocoded_seconds)
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from models.tasks.recalibrate import format_report, recalibrate_checkpoint

    report = recalibrate_checkpoint(
        args.model, args.out, args.console_db, target_false_alarms=args.target_false_alarms,
        min_false_alarms=args.min_false_alarms, min_confirmed_fraud=args.min_confirmed_fraud,
        rule=args.verdict_rule, max_missed_fraud=args.max_missed_fraud)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    print(f"wrote {args.out}; serve it with --model {args.out}, or load it into a running "
          "server with SIGHUP (same path) or the ReloadModel admin RPC", file=sys.stderr)
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
                   help="default (= lcnn-fusion), rawnet2-tel, lfcc-gmm or a checkpoint path")
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
    p.add_argument("--out", required=True, help="output folder (flac/, protocol.txt)")
    p.add_argument("--vocoder", action="append", metavar="NAME[:PATH]",
                   help="repeatable (default hifigan-universal). NAME: "
                   f"{', '.join(_vocoder_names())}. vocos-8k is trained here (python -m models "
                   "train-vocoder models/configs/vocoder_vocos8k.yaml) and NAME alone uses its "
                   "shipped checkpoint (models/vocoders/checkpoints/vocos8k.pt, written when "
                   "the run's steps are done); vocos-8k:PATH uses another one, PATH an exported "
                   "generator, a training checkpoint or a run folder (e.g. "
                   "vocos-8k:runs/vocoders/vocos8k, its latest last.pt)")
    p.add_argument("--sample-rate", type=int, default=8000,
                   help="rate of the written files; sources at another rate are resampled to it "
                   "first, and every file is as long as its resampled source")
    p.add_argument("--shard", type=_shard, metavar="K/N",
                   help="only the sources of shard K of N (by a hash of the utterance id), so "
                   "N processes or vocoders can share one list")
    p.add_argument("--limit", type=int, help="only the first N sources")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_vocode, vocoder=None)

    p = sub.add_parser(
        "train-vocoder", help="train an 8 kHz vocoder on the train bona fide (resumable)",
        description="Train (or resume) the vocoder of a models/configs/vocoder_*.yaml config "
        "on the bona fide lines of its train protocols. Every checkpoint_every steps OUT/last.pt "
        "holds the step, weights, optimiser and RNG state: run the same command again to go "
        "on from there (same seed and thread count: the same weights as a run never stopped). "
        "Progress is one JSON line per log_every steps on stderr. When the config's steps are "
        "done, the generator and its card are exported (the config's output, or --export); "
        "then `python -m models vocode --vocoder NAME` uses it.")
    p.add_argument("config")
    p.add_argument("--out", "--run-dir", dest="out", metavar="DIR",
                   help="run folder (default runs/vocoders/<config name>)")
    p.add_argument("--steps", type=int,
                   help="stop after step N (the schedule still spans the config's steps)")
    p.add_argument("--threads", type=int, help="torch threads (default: the config's, 1)")
    p.add_argument("--export", metavar="FILE",
                   help="exported generator (default: the config's output)")
    p.add_argument("--export-only", action="store_true",
                   help="export DIR's latest checkpoint now, without training further")
    p.set_defaults(func=_train_vocoder)

    p = sub.add_parser(
        "adapt", help="fit a model to an operator's own genuine recordings (and fraud calls)",
        description="Vocoded copies of the operator's genuine speech as spoofs, the fusion's "
        "genuine reference widened with it, and a threshold set for a target false-alarm rate "
        "on it; 30 %% of the speakers (first sub-folder, else file) are kept apart to check "
        "the result. Writes a checkpoint the server loads by path, its card saying what it "
        "was fitted on (models/tasks/adapt.py).")
    p.add_argument("--model", default="default", help="the model to adapt (name or path)")
    p.add_argument("--bonafide", required=True,
                   help="folder of genuine WAV/FLAC recordings, one sub-folder per caller")
    p.add_argument("--spoof", help="folder of confirmed fraud recordings (optional)")
    p.add_argument("--out", required=True, help="the adapted checkpoint")
    p.add_argument("--target-false-alarms", type=float, default=0.01,
                   help="share of genuine windows flagged at the service threshold")
    p.add_argument("--vocoder", action="append", choices=sorted(_vocoder_names()),
                   help="vocoder(s) for the genuine speech's copies (default "
                   "hifigan-universal; repeatable)")
    p.add_argument("--max-vocoded-seconds", type=float, default=300.0,
                   help="seconds of genuine audio copied per vocoder")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_adapt)

    p = sub.add_parser(
        "calibrate", help="recalibrate a model from the console's analyst verdicts",
        description="Refit the calibration offset, and with it the alert threshold of the "
        "operator's lines, from the fraud desk's verdicts: the console database's window "
        "scores of every labelled call are replayed through the server's verdict rule; false "
        "alarms raise the threshold until at most --target-false-alarms of them would alert, "
        "confirmed fraud caught now stops it before it would be missed. Refuses below "
        "--min-false-alarms / --min-confirmed-fraud labels. Prints the false-alarm and miss "
        "rates before and after on the labels and writes them into the new checkpoint's card "
        "(models/tasks/recalibrate.py). The output is the operator's model: it may not lie "
        "in models/checkpoints.")
    p.add_argument("--console-db", required=True, metavar="URL",
                   help="the console's database (sqlite:///callshield.db, or a SQLAlchemy URL)")
    p.add_argument("--out", required=True, metavar="MODEL.pt", help="the operator's checkpoint")
    p.add_argument("--model", default="default",
                   help="the model whose calls were labelled (a name, or a path such as a "
                   "`models adapt` or earlier `calibrate` output)")
    p.add_argument("--target-false-alarms", type=float, default=0.0,
                   help="share of the labelled false alarms that may still alert (default 0: "
                   "none, unless clearing one would miss a confirmed fraud caught now)")
    p.add_argument("--min-false-alarms", type=int, default=20,
                   help="refuse with fewer false-alarm verdicts than this")
    p.add_argument("--min-confirmed-fraud", type=int, default=5,
                   help="refuse with fewer confirmed-fraud verdicts (0: no fraud check)")
    p.add_argument("--max-missed-fraud", type=int, default=0,
                   help="confirmed frauds the model catches now that the new threshold may "
                   "miss, to reach the false-alarm target (default 0)")
    p.add_argument("--verdict-rule", choices=["evidence", "ema"], default="evidence",
                   help="the server's --verdict-rule")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("card", help="print a checkpoint's model card as Markdown")
    p.add_argument("--model", default="default")
    p.set_defaults(func=_card)

    from models.tasks.release import add_parsers as add_release_parsers

    add_release_parsers(sub)  # ship, fuse, unfuse: the release steps (make train)
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
