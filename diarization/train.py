"""Train the project's segmentation model (PyanNet, powerset) on simulated telephone calls.

``nice -n 19 python -m diarization.train runs/diarization/sim/database.yml --minutes 25``
trains in ``runs/diarization/segmentation`` (resumable: a rerun continues from ``last.ckpt``)
and exports the weights-only checkpoint to ``diarization/checkpoints/segmentation.ckpt``.

Why this size: the model must run every 0.5 s on a 5 s buffer of every live MIXED call on a
CPU that also scores spoofing windows, so it is PyanNet with LSTM/linear widths halved (0.22 M
parameters, a 0.9 MB checkpoint); two-party telephone calls need no more. SincNet only
exists at 16 kHz, so the model takes 16 kHz input and pyannote resamples the 8 kHz calls.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import structlog  # noqa: E402
import torch  # noqa: E402

from diarization.paths import SEGMENTATION_CHECKPOINT  # noqa: E402

PROTOCOL = "CallSim.SpeakerDiarization.Tel"
CHUNK_SECONDS = 5.0  # the streaming buffer: train on what the model will see live
MODEL = {
    "sample_rate": 16000,
    "sincnet": {"stride": 10},
    "lstm": {"hidden_size": 64, "num_layers": 2, "bidirectional": True},
    "linear": {"hidden_size": 64, "num_layers": 2},
}
log = structlog.get_logger("callshield.diarization.train")


def export(ckpt: Path, out: Path) -> None:
    """Keep what ``Model.from_pretrained`` needs; drop optimizer and loop state (3x smaller)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    wanted = ("state_dict", "pyannote.audio", "hyper_parameters", "pytorch-lightning_version",
              "epoch", "global_step")
    keep = {k: v for k, v in state.items() if k in wanted}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(keep, out)
    log.info("exported", checkpoint=str(out), bytes=out.stat().st_size,
             epoch=state.get("epoch"), step=state.get("global_step"))


def train(database: Path, run_dir: Path, minutes: float, batches_per_epoch: int,
          batch_size: int, threads: int) -> Path:
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from pyannote.audio.models.segmentation import PyanNet
    from pyannote.audio.tasks import SpeakerDiarization
    from pyannote.database import FileFinder, registry

    torch.set_num_threads(threads)
    seed_everything(0, workers=True)
    registry.load_database(str(database))
    protocol = registry.get_protocol(PROTOCOL, preprocessors={"audio": FileFinder()})
    task = SpeakerDiarization(
        protocol, duration=CHUNK_SECONDS, max_speakers_per_chunk=3, max_speakers_per_frame=2,
        batch_size=batch_size, num_workers=0, cache=str(run_dir / "task-cache"))
    model = PyanNet(task=task, **MODEL)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = ModelCheckpoint(dirpath=run_dir, save_last=True, every_n_train_steps=50,
                                 save_top_k=0)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=1000, max_time={"minutes": minutes},
        limit_train_batches=batches_per_epoch, limit_val_batches=10,
        callbacks=[checkpoint], default_root_dir=str(run_dir), enable_progress_bar=False,
        log_every_n_steps=10, num_sanity_val_steps=0)
    last = run_dir / "last.ckpt"
    trainer.fit(model, ckpt_path=str(last) if last.exists() else None)
    trainer.save_checkpoint(last)
    return last


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m diarization.train", description=__doc__)
    p.add_argument("database", type=Path, help="database.yml from diarization.simulate")
    p.add_argument("--run-dir", type=Path, default=Path("runs/diarization/segmentation"))
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget")
    p.add_argument("--batches-per-epoch", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=SEGMENTATION_CHECKPOINT)
    args = p.parse_args(argv)
    last = train(args.database.resolve(), args.run_dir, args.minutes, args.batches_per_epoch,
                 args.batch_size, args.threads)
    export(last, args.out)


if __name__ == "__main__":
    main()
