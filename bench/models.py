"""``make bench-models``: detection quality and CPU throughput of every model, one run.

Writes ``bench/results/models.json`` and ``bench/results/models.md``. Throughput runs on 2
threads; the official-config RawNet2 is timed both the way the official code computes it
(filter bank rebuilt in numpy on every forward, 1025-tap time-domain convolution) and the
way callshield does (bank built once, FFT convolution), in the same process, and the ratio
is reported; speed claims in the README come from here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.architectures.rawnet2 import RawNet2, RawNet2Config
from models.architectures.sinc import SincFilterBank, mel_sinc_bank
from models.data.asvspoof import ASVspoofSplit
from models.data.audio import load_audio, repeat_pad
from models.inference import NAMED_MODELS, Detector, load_detector
from models.tasks.antispoofing import eer_by_system, subset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "bench" / "results"


class OfficialSinc(SincFilterBank):
    """The official RawNet2 front end's cost: rebuild the bank in numpy, convolve directly."""

    def __init__(self, n_filters: int, kernel_size: int, sample_rate: int) -> None:
        super().__init__(n_filters, kernel_size, sample_rate, "baseline", "direct")
        self._args = (n_filters, kernel_size, sample_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = mel_sinc_bank(*self._args)
        return F.conv1d(x, bank.unsqueeze(1))


def official_rawnet2(official_way: bool) -> RawNet2:
    model = RawNet2(RawNet2Config(sinc_method="fft"))
    reference = SHARED / "reference" / "rawnet2_state_dict.pth.xz"
    if reference.is_file():
        model.load_state_dict(load_detector(reference).model.state_dict(), strict=True)
    if official_way:
        model.Sinc_conv = OfficialSinc(20, 1024, 16000)
    return model.eval()


def throughput(model: Any, samples: int, batch: int, seconds: float) -> float:
    """Windows per second for ``batch`` windows of ``samples``, after one warm-up call."""
    x = torch.randn(batch, samples) * 0.1
    with torch.inference_mode():
        model(x)
        done, began = 0, time.perf_counter()
        while True:
            model(x)
            done += batch
            elapsed = time.perf_counter() - began
            if elapsed >= seconds and done >= 2 * batch:
                return done / elapsed


def unique_models() -> dict[str, Path]:
    """Each shipped checkpoint once, under its first name (``default`` is an alias)."""
    seen: set[Path] = set()
    out = {}
    for name, path in NAMED_MODELS.items():
        if path.resolve() not in seen:
            seen.add(path.resolve())
            out[name] = path
    return out


def _scorer(detector: Detector) -> Any:
    return lambda x: detector.score_batch(x.numpy())


def dev_quality(detector: Detector, limit: int | None) -> dict[str, float]:
    split = ASVspoofSplit(SHARED / "corpus", "dev")
    trials = subset(split.trials(), limit, 2)
    window = detector.window_samples
    waves = [
        repeat_pad(load_audio(split.audio_dir / f"{t.utt_id}.flac", detector.sample_rate), window)
        for t in trials
    ]
    scores = detector.scores(waves, batch_size=16)
    return eer_by_system(
        scores, np.array([t.label for t in trials]), [t.system for t in trials]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument(
        "--slow-dev-limit", type=int, default=400,
        help="AASIST models (~50x the default's CPU cost) are scored on this seeded dev subset",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    RESULTS.mkdir(parents=True, exist_ok=True)

    quality: dict[str, Any] = {}
    candidates = {name: str(path) for name, path in unique_models().items()}
    candidates["aasist-official (zero-shot)"] = str(SHARED / "reference" / "AASIST.pth")
    for name, path in candidates.items():
        if not Path(path).is_file():
            quality[name] = {"error": f"missing {path}"}
            continue
        detector = load_detector(path)
        began = time.perf_counter()
        limit = args.slow_dev_limit if detector.architecture == "aasist" else None
        quality[name] = {
            "eer": dev_quality(detector, limit),
            "dev_trials": "all" if limit is None else f"seeded subset of {limit}",
            "sample_rate": detector.sample_rate,
            "seconds": round(time.perf_counter() - began, 1),
        }
        print(f"{name}: dev EER {100 * quality[name]['eer']['pooled']:.2f}%", flush=True)

    speed: dict[str, Any] = {}
    models: dict[str, tuple[Any, int, int]] = {}
    for name, path in unique_models().items():  # as the service runs them: score_batch
        if path.is_file():
            detector = load_detector(path)
            models[name] = (_scorer(detector), detector.window_samples, detector.sample_rate)
    models |= {
        "rawnet2-official-config (callshield)": (official_rawnet2(False), 64000, 16000),
        "rawnet2-official-config (official way)": (official_rawnet2(True), 64000, 16000),
    }
    aasist_path = SHARED / "reference" / "AASIST.pth"
    if aasist_path.is_file():
        models["aasist-official"] = (load_detector(aasist_path).model, 64000, 16000)
    for name, (model, samples, rate) in models.items():
        speed[name] = {}
        for batch in (1, 16):
            wps = throughput(model, samples, batch, args.seconds)
            speed[name][f"batch{batch}"] = {
                "windows_per_second": round(wps, 2),
                "real_time_factor": round(1.0 / (wps * samples / rate), 5),
            }
            print(f"{name} batch {batch}: {wps:.1f} windows/s", flush=True)
    fast = speed["rawnet2-official-config (callshield)"]
    slow = speed["rawnet2-official-config (official way)"]
    ratio = {b: fast[b]["windows_per_second"] / slow[b]["windows_per_second"] for b in fast}

    result = {
        "machine": {"cpu_threads": 2, "cores": os.cpu_count(), "platform": platform.platform(),
                    "torch": str(torch.__version__)},
        "window_seconds": 4.0,
        "dev_eer": quality,
        "throughput": speed,
        "rawnet2_speedup_vs_official": ratio,
    }
    (RESULTS / "models.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "models.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    systems = sorted({s for q in result["dev_eer"].values() for s in q.get("eer", {})} - {"pooled"})
    lines = ["### Dev EER (%), pooled and per spoof system", "",
             "| model | dev trials | pooled | " + " | ".join(systems) + " |",
             "|---|---|---|" + "---|" * len(systems)]
    for name, q in result["dev_eer"].items():
        if "eer" not in q:
            lines.append(f"| {name} | {q['error']} |")
            continue
        cells = [f"{100 * q['eer'][s]:.2f}" for s in systems]
        lines.append(f"| {name} | {q['dev_trials']} | {100 * q['eer']['pooled']:.2f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "### CPU throughput, 2 threads, 4 s windows", "",
              "| model | batch 1 win/s | batch 16 win/s | RTF at 16 |", "|---|---|---|---|"]
    for name, s in result["throughput"].items():
        lines.append(f"| {name} | {s['batch1']['windows_per_second']} | "
                     f"{s['batch16']['windows_per_second']} | "
                     f"{s['batch16']['real_time_factor']} |")
    ratio = result["rawnet2_speedup_vs_official"]
    lines += ["", f"Official-config RawNet2 speed-up over the official computation: "
              f"{ratio['batch1']:.1f}x at batch 1, {ratio['batch16']:.1f}x at batch 16.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
