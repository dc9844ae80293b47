"""The spoof-detection training task for neural countermeasures (RawNet2, AASIST, LCNN).

Weighted cross-entropy (bona fide weighted 9x spoof, as the official recipes) or the
one-class softmax (``optim.loss: oc-softmax``), Adam,
telephone-channel augmentation, random short crops. Resumable: ``RUN_DIR/last.pt`` holds
model, optimiser and epoch after every epoch; ``RUN_DIR/best.pt`` the best on dev EER.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.architectures.scorer import build_model
from models.checkpoint import save_checkpoint
from models.data.asvspoof import ASVspoofSplit, Trial, TrialDataset, leave_out, read_protocol
from models.inference import fit_calibration, resolve_device
from models.metrics import compute_eer
from models.tasks.config import TrainConfig, repo_path


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    dev_eer: float
    dev_eer_per_system: dict[str, float]
    seconds: float
    lr: float | None = None


@dataclass
class TrainResult:
    run_dir: Path
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    best_dev_eer: float = float("inf")
    checkpoint: Path | None = None


def subset(trials: list[Trial], limit: int | None, seed: int) -> list[Trial]:
    """A seeded random ``limit`` trials in protocol order (protocols are grouped by speaker,
    so the first N would be a few speakers only); all of them when ``limit`` is None."""
    if limit is None or limit >= len(trials):
        return trials
    keep = np.sort(np.random.default_rng(seed).choice(len(trials), limit, replace=False))
    return [trials[i] for i in keep]


def training_items(config: TrainConfig) -> tuple[list[Trial], list[Path]]:
    """The training trials and each one's audio folder: the corpus train split (a seeded
    ``data.limit`` subset), then ``data.extra`` protocols, less ``data.exclude_systems``."""
    split = ASVspoofSplit(config.data.root_path, "train")
    trials = subset(split.trials(), config.data.limit, 1)
    dirs = [split.audio_dir] * len(trials)
    for extra in config.data.extra:
        more = read_protocol(repo_path(extra["protocol"]))
        if config.data.limit is not None:  # keep the corpus/extra proportion of a full run
            share = config.data.limit / len(split.trials())
            more = subset(more, max(1, int(round(share * len(more)))), 3)
        trials += more
        dirs += [repo_path(extra["audio_dir"])] * len(more)
    keep = {id(t) for t in leave_out(trials, config.data.exclude_systems)}
    pairs = [(t, d) for t, d in zip(trials, dirs, strict=True) if id(t) in keep]
    return [t for t, _ in pairs], [d for _, d in pairs]


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Constant, or cosine-annealed to zero over ``optim.epochs``: the annealed end settles
    the small model, whose dev EER otherwise swings from epoch to epoch. Set per epoch from
    the epoch index, so a resumed run follows the same schedule."""
    if config.optim.lr_schedule == "cosine":
        return config.optim.lr * 0.5 * (1 + math.cos(math.pi * epoch / config.optim.epochs))
    return config.optim.lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _augmenter(config: TrainConfig, sample_rate: int) -> Any:
    if not config.augment:
        return None
    from models.data.augment import AugmentConfig, TelephoneAugment

    return TelephoneAugment(AugmentConfig.from_dict(config.augment), sample_rate)


def _loss(config: TrainConfig, class_weight: torch.Tensor) -> Any:
    if config.optim.loss == "oc-softmax":
        from models.architectures.lcnn import oc_softmax_loss

        alpha = float(config.model.get("alpha", 20.0))
        return lambda logits, y: oc_softmax_loss(logits, y, alpha, config.optim.margins,
                                                 class_weight)
    return lambda logits, y: F.cross_entropy(logits, y, weight=class_weight)


def eer_by_system(scores: np.ndarray, labels: np.ndarray, systems: list[str]) -> dict[str, float]:
    """Pooled EER and the EER of each spoof system against all bona fide trials."""
    bona = scores[labels == 1]
    out = {"pooled": compute_eer(bona, scores[labels == 0])[0]}
    for system in sorted({s for s, y in zip(systems, labels, strict=True) if y == 0}):
        mask = np.array([s == system for s in systems]) & (labels == 0)
        out[system] = compute_eer(bona, scores[mask])[0]
    return out


@torch.no_grad()
def score_dataset(model: torch.nn.Module, dataset: TrialDataset, batch_size: int) -> np.ndarray:
    """Bona fide log-odds (``logit[1] - logit[0]``) of every trial, in order."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    for x, _ in loader:
        logits = model(x.to(device)).float().cpu()
        out.append((logits[:, 1] - logits[:, 0]).numpy())
    return np.concatenate(out).astype(np.float64)


def sharpness_aware_gradient(
    model: torch.nn.Module, closure: Any, rho: float, adaptive: bool
) -> None:
    """Replace the gradients in ``model`` (those of the batch's loss) with SAM's: the
    gradient at the weights moved by ``rho`` along the normalised ascent direction, then
    move the weights back. Batch-norm statistics are not updated by the second pass, so
    they still count each batch once."""
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        originals = [p.detach().clone() for p in params]  # add-then-subtract is not exact
        scaled = [p.grad * p.abs() if adaptive else p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in scaled]))
        steps = [(g * p.abs() if adaptive else g) * (rho / (norm + 1e-12))
                 for g, p in zip(scaled, params, strict=True)]
        for p, e in zip(params, steps, strict=True):
            p.add_(e)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        for p in params:
            p.grad = None
        closure().backward()
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        with torch.no_grad():
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)


def train(
    config: TrainConfig, run_dir: str | Path, progress: bool = True, export_only: bool = False
) -> TrainResult:
    """Train (or resume) and export the best-on-dev model, calibrated on dev.

    ``export_only`` exports the best epoch so far without training further: a run stopped
    early (time budget) still yields its checkpoint and card, which then say so."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    torch.set_num_threads(config.optim.threads)
    seed_everything(config.optim.seed)

    device = resolve_device(config.optim.device)
    model = build_model(config.architecture, config.model).to(device)
    sample_rate = int(config.model.get("sample_rate", 16000))
    window = int(round(config.data.window_seconds * sample_rate))
    root = config.data.root_path
    train_trials, train_dirs = training_items(config)
    dev_trials = subset(ASVspoofSplit(root, "dev").trials(), config.data.dev_limit, 2)
    train_set = TrialDataset(
        train_trials, train_dirs, sample_rate, window,
        train=True, augment=_augmenter(config, sample_rate), seed=config.optim.seed,
    ).preload()
    dev_set = TrialDataset(
        dev_trials, ASVspoofSplit(root, "dev").audio_dir, sample_rate, window
    ).preload()
    dev_labels = np.array([t.label for t in dev_trials])
    dev_systems = [t.system for t in dev_trials]

    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    class_weight = torch.tensor([1.0, config.optim.bonafide_weight], device=device)
    loss_fn = _loss(config, class_weight)
    result = TrainResult(run_dir)
    start_epoch = 0
    last_path = run_dir / "last.pt"
    if last_path.is_file():
        state = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        result.history = [EpochRecord(**r) for r in state["history"]]
        result.best_epoch, result.best_dev_eer = state["best_epoch"], state["best_dev_eer"]

    crop_rng = np.random.default_rng(config.optim.seed + 7919)
    min_crop = int(config.data.min_crop_seconds * sample_rate)
    for epoch in range(start_epoch, start_epoch if export_only else config.optim.epochs):
        began = time.time()
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_set.epoch = epoch
        generator = torch.Generator().manual_seed(config.optim.seed * 1000 + epoch)
        loader = DataLoader(
            train_set, batch_size=config.optim.batch_size, shuffle=True, drop_last=True,
            num_workers=config.data.num_workers, generator=generator,
            persistent_workers=False,
        )
        model.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.optim.epochs}", disable=not progress)
        for x, y in bar:
            if crop_rng.random() < config.data.short_crop_probability and window > min_crop:
                length = int(crop_rng.integers(min_crop, window + 1))
                offset = int(crop_rng.integers(0, window - length + 1))
                x = x[:, offset : offset + length]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.sam_rho > 0:
                sharpness_aware_gradient(model, lambda x=x, y=y: loss_fn(model(x), y),
                                         config.optim.sam_rho, config.optim.sam_adaptive)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        scores = score_dataset(model, dev_set, config.optim.batch_size)
        eers = eer_by_system(scores, dev_labels, dev_systems)
        record = EpochRecord(
            epoch, float(np.mean(losses)) if losses else float("nan"), eers["pooled"],
            {k: v for k, v in eers.items() if k != "pooled"}, time.time() - began, lr,
        )
        result.history.append(record)
        if progress:
            print(f"epoch {epoch + 1}: loss {record.train_loss:.4f} "
                  f"dev EER {100 * record.dev_eer:.2f}% ({record.seconds:.0f} s)", flush=True)
        if config.optim.select == "last" or record.dev_eer < result.best_dev_eer:
            result.best_epoch, result.best_dev_eer = epoch, record.dev_eer
            # The dev scores travel with the weights: export calibrates on them unchanged.
            torch.save({"model": model.state_dict(), "epoch": epoch,
                        "dev_scores": torch.from_numpy(scores)}, run_dir / "best.pt")
        torch.save(
            {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "history": [asdict(r) for r in result.history],
                "best_epoch": result.best_epoch, "best_dev_eer": result.best_dev_eer,
            },
            run_dir / "last.tmp",
        )
        (run_dir / "last.tmp").replace(last_path)

    result.checkpoint = export(config, model, run_dir, result, dev_set, dev_labels, dev_systems)
    return result


def machine_description(threads: int) -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or "unknown",
            "cpu_count": os.cpu_count(), "torch_threads": threads,
            "torch": str(torch.__version__),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def export(
    config: TrainConfig,
    model: torch.nn.Module,
    run_dir: Path,
    result: TrainResult,
    dev_set: TrialDataset,
    dev_labels: np.ndarray,
    dev_systems: list[str],
) -> Path:
    """Write the best epoch's weights as a callshield checkpoint, calibrated on dev."""
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model = model.cpu()
    model.load_state_dict(best["model"])
    if "dev_scores" in best and len(best["dev_scores"]) == len(dev_set):
        scores = best["dev_scores"].numpy()
    else:  # a run dir from before the scores were kept
        scores = score_dataset(model, dev_set, config.optim.batch_size)
    calibration = fit_calibration(scores, dev_labels)
    eers = eer_by_system(scores, dev_labels, dev_systems)
    out = Path(config.output) if config.output else run_dir / "model.pt"
    if not out.is_absolute():
        out = Path(__file__).resolve().parents[2] / out
    card = {
        "config": asdict(config),
        "best_epoch": result.best_epoch + 1,
        "epochs_trained": len(result.history),
        "training_seconds": sum(r.seconds for r in result.history),
        "dev_eer": eers,
        "history": [asdict(r) for r in result.history],
        "machine": machine_description(config.optim.threads),
    }
    save_checkpoint(
        out, architecture=config.architecture, name=config.name, version=config.version,
        sample_rate=int(config.model.get("sample_rate", 16000)),
        window_seconds=config.data.window_seconds, model_config=config.model,
        state_dict=model.state_dict(), calibration=vars(calibration), card=card,
    )
    (run_dir / "card.json").write_text(json.dumps(card, indent=2))
    return out
