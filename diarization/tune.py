"""Grid search of the clustering thresholds on the *simulated* development calls.

``python -m diarization.tune runs/diarization/sim`` prints DER (collar 0.25 s) per threshold,
streaming and offline. (The committed defaults were finally picked on ``../shared/calls`` for
lack of time, see MODEL_CARD.md; this script is the way to redo it without touching them.)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    from diarization.evaluate import annotation, der, reference, simulated_calls
    from diarization.models import DiarizationModels
    from diarization.offline import PARAMS, build_pipeline, diarize
    from diarization.paths import SEGMENTATION_CHECKPOINT
    from diarization.stream import StreamingDiarizer, StreamingDiarizerConfig, diarize_stream

    p = argparse.ArgumentParser(prog="python -m diarization.tune")
    p.add_argument("sim", type=Path)
    p.add_argument("--calls", type=int, default=12)
    p.add_argument("--segmentation", type=Path, default=SEGMENTATION_CHECKPOINT)
    p.add_argument("--stream", type=float, nargs="*", default=[0.15, 0.2, 0.25, 0.3])
    p.add_argument("--offline", type=float, nargs="*", default=[0.2, 0.3, 0.4, 0.5])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    calls = simulated_calls(args.sim)[: args.calls]
    audio = {c.uri: c.load() for c in calls}
    refs = {c.uri: reference(c) for c in calls}
    models = DiarizationModels(args.segmentation)
    for threshold in args.stream:
        config = replace(StreamingDiarizerConfig(), new_speaker_distance=threshold)
        pairs = [(refs[c.uri], annotation(diarize_stream(
            StreamingDiarizer(models, 8000, config), audio[c.uri]))) for c in calls]
        print(f"stream  threshold={threshold:.2f} DER@0.25={der(pairs, 0.25):.4f}", flush=True)
    for threshold in args.offline:
        params = {**PARAMS, "clustering": {**PARAMS["clustering"], "threshold": threshold}}
        pipeline = build_pipeline(args.segmentation, params)
        pairs = [(refs[c.uri], annotation(diarize(pipeline, audio[c.uri], 8000)))
                 for c in calls]
        print(f"offline threshold={threshold:.2f} DER@0.25={der(pairs, 0.25):.4f}", flush=True)


if __name__ == "__main__":
    main()
