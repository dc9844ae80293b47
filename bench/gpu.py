"""``make bench-gpu``: worker throughput on a GPU, for a machine with torch and numpy only.

Measures windows per second of RawNet2-tel (the previous default; the default fusion's GMM
part is numpy and runs on the CPU) and of the official-config RawNet2 at
batch 1 to 1024, in float32, float16 and bfloat16, and checks each reduced precision
against float32 on the same inputs. Writes ``bench/results/gpu.json`` and ``gpu.md``.
Run it from the repo root: ``python bench/gpu.py`` (no install needed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

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


def windows_per_second(model: torch.nn.Module, x: torch.Tensor, min_seconds: float) -> float:
    with torch.inference_mode():
        model(x)
        torch.cuda.synchronize()
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < min_seconds or done < 3 * x.shape[0]:
            model(x)
            done += x.shape[0]
        torch.cuda.synchronize()
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
    (out_dir / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
