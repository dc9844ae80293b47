"""``python -m models vocode`` and ``train-vocoder``: copy-synthesis spoof data, and the
vocoders trained here to make it.

Why a module of its own: the work is :mod:`models.data.vocode` (synthesis) and
:mod:`models.vocoders.train` (training); this is only their command line, kept beside the
other tasks' parsers so that :func:`models.cli.build_parser` just assembles them.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from models.errors import ModelError
from models.tasks.options import DEVICE, QUIET, THREADS, command
from models.vocoders import TRAINED_VOCODERS

DEFAULT_VOCODER = "hifigan-universal"


class VocodeUsageError(ModelError, ValueError):
    """The sources were not given in a usable way (exit code 2, like any bad input)."""


def _vocode(args: argparse.Namespace) -> int:
    """copy-synthesise bona fide audio through neural vocoders (spoof data)

    Re-synthesise every bona fide recording through each vocoder and write
    OUT/flac/<UTT>_<SYSTEM>.flac plus OUT/protocol.txt (spoof lines), ready for a training
    config's data.extra. Resumable: existing files are kept."""
    import torch

    from models.data.vocode import sources_from_folder, sources_from_protocol, vocode

    torch.set_num_threads(args.threads)
    if args.protocol:
        if not args.audio_dir:
            raise VocodeUsageError("--protocol needs --audio-dir")
        sources = sources_from_protocol(args.protocol, args.audio_dir)
    elif args.input_dir:
        sources = sources_from_folder(args.input_dir, args.speaker)
    else:
        raise VocodeUsageError("give --protocol with --audio-dir, or --input-dir")
    if args.shard:
        sources = [s for s in sources if shard_of(s.utt_id, args.shard[1]) == args.shard[0]]
    if args.limit is not None:
        sources = sources[: args.limit]
    vocoders = args.vocoder or [DEFAULT_VOCODER]
    protocol = vocode(sources, args.out, vocoders, args.sample_rate, args.device,
                      progress=not args.quiet)
    print(f"wrote {protocol} ({len(sources) * len(vocoders)} items)", file=sys.stderr)
    return 0


def shard_of(utt_id: str, shards: int) -> int:
    """A source's shard: the same on every machine, whatever order the sources come in."""
    return hashlib.sha256(utt_id.encode()).digest()[0] % shards


def _shard(text: str) -> tuple[int, int]:
    k, sep, n = text.partition("/")
    if not sep or not k.isdigit() or not n.isdigit() or not 0 <= int(k) < int(n):
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, got {text!r}")
    return int(k), int(n)


def _train_vocoder(args: argparse.Namespace) -> int:
    """train an 8 kHz vocoder on the train bona fide (resumable)

    Train (or resume) the vocoder of a models/configs/vocoder_*.yaml config on the bona fide
    lines of its train protocols. Every checkpoint_every steps OUT/last.pt holds the step,
    weights, optimiser and RNG state: run the same command again to go on from there (same
    seed and thread count: the same weights as a run never stopped). Progress is one JSON
    line per log_every steps on stderr. When the config's steps are done, the generator and
    its card are exported (the config's output, or --export); then
    `python -m models vocode --vocoder NAME` uses it."""
    from models.vocoders import default_run_dir
    from models.vocoders.train import VocoderTrainConfig, train_vocoder

    config = VocoderTrainConfig.load(args.config)
    run_dir = Path(args.out or default_run_dir(config.name))
    print(train_vocoder(config, run_dir, stop_at=args.steps, threads=args.threads,
                        output=args.export, export_only=args.export_only))
    return 0


def vocoder_names() -> list[str]:
    """Every name ``--vocoder`` takes: the packaged generators, then the trained ones."""
    from models.data.vocode import VOCODERS

    return list(VOCODERS)


def vocoder_help() -> str:
    """``--vocoder``'s help, written from :data:`models.vocoders.TRAINED_VOCODERS` so that a
    vocoder trained here is documented by its registry entry alone."""
    trained = list(TRAINED_VOCODERS.values())
    text = (f"repeatable (default {DEFAULT_VOCODER}). NAME: {', '.join(vocoder_names())}.")
    if not trained:
        return text
    each = "; ".join(f"{v.name} ({v.train_command}, shipped as {v.checkpoint})" for v in trained)
    return (f"{text} Trained here: {each}. For these, NAME alone uses the shipped checkpoint "
            "(written when a run's steps are done) and NAME:PATH another one, PATH an "
            "exported generator, a training checkpoint or a run folder (e.g. "
            f"{trained[0].name}:{trained[0].run_dir}, its latest last.pt)")


def add_parsers(sub: Any) -> None:
    """``vocode`` and ``train-vocoder``, for :func:`models.cli.build_parser`."""
    p = command(sub, "vocode", _vocode, parents=[DEVICE, THREADS, QUIET])
    p.add_argument("--protocol", help="ASVspoof-style protocol (its bona fide lines are used)")
    p.add_argument("--audio-dir", help="audio folder of --protocol")
    p.add_argument("--input-dir", help="or: every .wav/.flac under this folder")
    p.add_argument("--speaker", default="-", help="speaker id for --input-dir items")
    p.add_argument("--out", required=True, help="output folder (flac/, protocol.txt)")
    p.add_argument("--vocoder", action="append", metavar="NAME[:PATH]", help=vocoder_help())
    p.add_argument("--sample-rate", type=int, default=8000,
                   help="rate of the written files; sources at another rate are resampled to it "
                   "first, and every file is as long as its resampled source")
    p.add_argument("--shard", type=_shard, metavar="K/N",
                   help="only the sources of shard K of N (by a hash of the utterance id), so "
                   "N processes or vocoders can share one list")
    p.add_argument("--limit", type=int, help="only the first N sources")

    p = command(sub, "train-vocoder", _train_vocoder)
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
