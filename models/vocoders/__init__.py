"""Vocoders trained here, on the corpus' train bona fide at 8 kHz, for copy-synthesis data.

The registry below is the one place that says which trained vocoder a name means, where
its shipped checkpoint lives, which config trains it and where that training runs;
``models.data.vocode`` lists these names beside the packaged HiFi-GAN generators.
``ARCHITECTURES`` is the other half: which generator class a config's ``architecture`` (and
an exported file's ``kind``) means, so that training and loading dispatch on it alike.

Naming scheme of ``python -m models vocode --vocoder``: ``NAME`` uses the shipped
checkpoint (``checkpoint`` below, written when a run's steps are all done);
``NAME:PATH`` uses another one, PATH being an exported generator, a training checkpoint
(``RUN_DIR/last.pt``) or a run folder (``runs/vocoders/<config name>``, its ``last.pt``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainedVocoder:
    name: str
    system: str  # protocol SYSTEM_ID of its copy-synthesis items
    checkpoint: str  # repo-relative: the exported generator
    config: str  # the config that trains it
    run_dir: str  # repo-relative: where `train-vocoder CONFIG` trains it by default
    description: str

    @property
    def train_command(self) -> str:
        return f"python -m models train-vocoder {self.config}"


# The families: a config's ``architecture`` (and an exported file's ``kind``) -> the
# generator class, as "module:Class" so that listing names does not import torch.
ARCHITECTURES: dict[str, str] = {
    "vocos": "models.vocoders.vocos:VocosGenerator",
    "nsf": "models.vocoders.nsf:NsfGenerator",
}


def default_run_dir(config_name: str) -> str:
    """Where ``train-vocoder`` checkpoints a config named ``config_name`` (repo-relative)."""
    return f"runs/vocoders/{config_name}"


TRAINED_VOCODERS: dict[str, TrainedVocoder] = {
    v.name: v
    for v in (
        TrainedVocoder("vocos-8k", "V03", "models/vocoders/checkpoints/vocos8k.pt",
                       "models/configs/vocoder_vocos8k.yaml", default_run_dir("vocos8k"),
                       "Vocos-style iSTFT vocoder (ConvNeXt, STFT magnitude+phase), 8 kHz, "
                       "trained here on the train bona fide"),
        TrainedVocoder("nsf-8k", "V04", "models/vocoders/checkpoints/nsf8k.pt",
                       "models/configs/vocoder_nsf8k.yaml", default_run_dir("nsf8k"),
                       "neural source-filter vocoder (F0-driven sine source, dilated-conv "
                       "filter), 8 kHz, trained here on the train bona fide"),
    )
}
