"""``make bench-gpu``: worker throughput on a GPU, for a machine with torch and numpy only.

Measures windows per second of RawNet2-tel (the previous default; the default fusion's GMM
part is numpy and runs on the CPU) and of the official-config RawNet2 at
batch 1 to 1024, in float32, float16 and bfloat16, and checks each reduced precision
against float32 on the same inputs; and the streaming diarizer's two model passes as a Redis
worker runs them for MIXED calls (inputs per second, and how many calls' passes that carries).
Writes ``bench/results/gpu.json`` and ``gpu.md``.
Run it from the repo root: ``python bench/gpu.py`` (no install needed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.architectures.rawnet2 import RawNet2, RawNet2Config  # noqa: E402

BATCHES = (1, 4, 16, 64, 256, 1024)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rawnet2_tel_model() -> tuple[RawNet2, int]:
    state = torch.load(REPO / "models" / "checkpoints" / "rawnet2_tel.pt", map_location="cpu",
                       weights_only=True)
    model = RawNet2(RawNet2Config.from_dict(state["model_config"]))
    model.load_state_dict(state["state_dict"])
    return model.eval(), int(round(state["window_seconds"] * state["sample_rate"]))


def official_model() -> tuple[RawNet2, int]:
    return RawNet2(RawNet2Config(sinc_method="fft")).eval(), 64000


class SegmentationHeads(nn.Module):
    """The segmentation model after its SincNet (``DiarizationModels._heads``), shipped shape:
    a 2-layer bidirectional LSTM (60 -> 64), two linear layers of 64, 7 powerset classes."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(60, 64, 2, batch_first=True, bidirectional=True)
        self.linear = nn.ModuleList([nn.Linear(128, 64), nn.Linear(64, 64)])
        self.classifier = nn.Linear(64, 7)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (batch, 60, 293)
        out, _ = self.lstm(features.transpose(1, 2))
        for layer in self.linear:
            out = nn.functional.leaky_relu(layer(out))
        return self.classifier(out).log_softmax(dim=-1)


class PartialEmbeddings(nn.Module):
    """GE2E's LSTM over mel partials (``ResemblyzerEmbedding._partial_embeddings``): 3 layers
    of 256 over 160 frames of 40 mels, a 256-d projection."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, partials: torch.Tensor) -> torch.Tensor:  # (batch, 160, 40)
        _, (hidden, _) = self.lstm(partials)
        out = nn.functional.relu(self.linear(hidden[-1]))
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-8)


# What one MIXED call asks of them per second (diarization.stream defaults, 1 s step): one
# segmentation input, and per voice in the buffer (typically two) the partials of its last
# 3.2 s of clean speech: three 1.6 s partials every 0.8 s.
PASS_INPUTS = {"segmentation": ((60, 293), 1), "embedding": ((160, 40), 6)}
PASS_BATCHES = (1, 16, 64, 256, 1024)


def diarizer_passes(device: torch.device) -> dict[str, object]:
    """Inputs per second of each pass at each batch, in float32 (the worker's dtype on a GPU),
    and the MIXED calls whose passes one GPU carries at the best batch. Random weights: the
    cost does not depend on them, and pyannote is not needed here."""
    torch.manual_seed(0)
    models = {"segmentation": SegmentationHeads(), "embedding": PartialEmbeddings()}
    out: dict[str, object] = {}
    calls = []
    for name, model in models.items():
        shape, per_call = PASS_INPUTS[name]
        model = model.eval().to(device)
        rates = {}
        for batch in PASS_BATCHES:
            x = torch.randn(batch, *shape, device=device)
            rates[str(batch)] = round(windows_per_second(model, x, 1.0), 1)
        best = max(rates.values())
        calls.append(best / per_call)
        out[name] = {"inputs_per_second": rates, "inputs_per_call_second": per_call}
        print(name, rates, flush=True)
    out["mixed_calls_carried"] = int(min(calls))
    return out


def windows_per_second(model: torch.nn.Module, x: torch.Tensor, min_seconds: float) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        model(x)
        sync()
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < min_seconds or done < 3 * x.shape[0]:
            model(x)
            done += x.shape[0]
        sync()
        return done / (time.perf_counter() - began)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: bench-gpu measures GPU workers only", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name(0)
    results: dict[str, object] = {"card": card, "torch": torch.__version__, "models": {}}
    for name, (model, samples) in {"rawnet2-tel": rawnet2_tel_model(),
                                   "rawnet2-official-config": official_model()}.items():
        entry: dict[str, object] = {"window_samples": samples}
        generator = torch.Generator().manual_seed(0)
        probe = (torch.randn(64, samples, generator=generator) * 0.1).to(device)
        reference = model.to(device, torch.float32)(probe).float()
        for label, dtype in DTYPES.items():
            m = model.to(device, dtype)
            with torch.inference_mode():
                out = m(probe.to(dtype)).float()
            deviation = (out - reference).abs().max().item()
            agree = (out.argmax(1) == reference.argmax(1)).float().mean().item()
            rates = {}
            for batch in BATCHES:
                try:
                    x = (torch.randn(batch, samples, device=device) * 0.1).to(dtype)
                    rates[str(batch)] = round(windows_per_second(m, x, 1.0), 1)
                except torch.cuda.OutOfMemoryError:
                    rates[str(batch)] = None
                    torch.cuda.empty_cache()
            entry[label] = {"windows_per_second": rates, "max_abs_logit_diff_vs_fp32": deviation,
                            "decision_agreement_vs_fp32": agree}
            print(name, label, rates, f"max |diff| {deviation:.2e}", flush=True)
        model.to("cpu", torch.float32)
        results["models"][name] = entry  # type: ignore[index]
    results["diarizer_passes"] = diarizer_passes(device)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(results, indent=2))
    lines = [f"GPU: {card}, torch {torch.__version__}", "",
             "| model | dtype | " + " | ".join(f"b{b}" for b in BATCHES) + " | max diff |",
             "|---|---|" + "---|" * (len(BATCHES) + 1)]
    for name, entry in results["models"].items():  # type: ignore[union-attr]
        for label in DTYPES:
            r = entry[label]
            cells = [str(r["windows_per_second"][str(b)]) for b in BATCHES]
            lines.append(f"| {name} | {label} | " + " | ".join(cells)
                         + f" | {r['max_abs_logit_diff_vs_fp32']:.1e} |")
    passes = results["diarizer_passes"]
    lines += ["", "Streaming diarizer passes (float32, inputs/s; a MIXED call needs 1 "
              "segmentation input and about 6 embedding partials per second):", "",
              "| pass | " + " | ".join(f"b{b}" for b in PASS_BATCHES) + " |",
              "|---|" + "---|" * len(PASS_BATCHES)]
    for name in PASS_INPUTS:
        rates = passes[name]["inputs_per_second"]  # type: ignore[index]
        lines.append(f"| {name} | " + " | ".join(str(rates[str(b)]) for b in PASS_BATCHES)
                     + " |")
    lines += ["", f"MIXED calls whose diarizer passes one GPU carries: "
              f"{passes['mixed_calls_carried']}"]  # type: ignore[index]
    (out_dir / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
