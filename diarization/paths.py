"""Where the committed diarization models live (small files, versioned with the code)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
SEGMENTATION_CHECKPOINT = CHECKPOINTS / "segmentation.ckpt"
PLDA_DIR = CHECKPOINTS / "plda"
