"""The architecture registry: checkpoints record their scorer class, old ones load by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.architectures.aasist import AASISTScorer
from models.architectures.fusion import FusionScorer
from models.architectures.lcnn import LCNNScorer
from models.architectures.lfcc_gmm import LFCCGMMScorer
from models.architectures.rawnet2 import RawNet2Scorer
from models.architectures.scorer import ARCHITECTURES, scorer_class
from models.architectures.whisper import WhisperLRScorer
from models.checkpoint import save_checkpoint
from models.inference import CHECKPOINT_DIR, load_detector
from tests.paths import require
from tests.test_training import TINY_RAWNET2

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


# Written out by hand from the modules, not read from the registry: a registry entry, a
# recorded path or a loader that picks the wrong class fails against this.
CLASS_OF = {"rawnet2": RawNet2Scorer, "aasist": AASISTScorer, "lcnn": LCNNScorer,
            "lfcc_gmm": LFCCGMMScorer, "whisper_lr": WhisperLRScorer, "fusion": FusionScorer}


def _path_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def test_each_architecture_name_and_recorded_path_give_its_class() -> None:
    assert set(ARCHITECTURES) == set(CLASS_OF)
    for name, cls in CLASS_OF.items():
        assert scorer_class(name) is cls, name
        assert scorer_class(_path_of(cls)) is cls, name
        assert cls.architecture == name


def test_shipped_checkpoints_load_with_their_recorded_or_named_scorer() -> None:
    recorded = 0
    for path in sorted(CHECKPOINT_DIR.glob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        # a fused checkpoint embeds its parts' whole checkpoints: each records its class too
        parts = state["state_dict"]["parts"] if state["architecture"] == "fusion" else []
        for one in (state, *parts):
            expected = CLASS_OF[one["architecture"]]
            if "scorer" in one:  # written since the registry: the class's own path
                assert one["scorer"] == _path_of(expected), (path.name, one["name"])
                recorded += 1
        assert type(load_detector(path).scorer) is CLASS_OF[state["architecture"]], path.name
    assert recorded >= 2  # lcnn_fusion.pt and its LCNN parts carry the class


def test_the_recorded_class_wins_and_old_checkpoints_load_by_name(tmp_path: Path) -> None:
    """A checkpoint written before the registry has only ``architecture``: loaded by that
    name. One written since records its class, which is what is loaded, whatever the name
    says."""
    model = RawNet2Scorer.build(TINY_RAWNET2)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, architecture="rawnet2", name="t", version="1", sample_rate=8000,
                    window_seconds=1.0, model_config=TINY_RAWNET2,
                    state_dict=model.state_dict())
    state = torch.load(path, map_location="cpu", weights_only=True)
    old = {k: v for k, v in state.items() if k != "scorer"}
    torch.save(old, tmp_path / "old.pt")
    assert type(load_detector(tmp_path / "old.pt").scorer) is RawNet2Scorer
    torch.save(state | {"architecture": "aasist"}, tmp_path / "renamed.pt")
    assert type(load_detector(tmp_path / "renamed.pt").scorer) is RawNet2Scorer


def test_a_new_checkpoint_records_its_scorer_class(tmp_path: Path) -> None:
    model = RawNet2Scorer.build(TINY_RAWNET2)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, architecture="models.architectures.rawnet2:RawNet2Scorer", name="t",
                    version="1", sample_rate=8000, window_seconds=1.0,
                    model_config=TINY_RAWNET2, state_dict=model.state_dict())
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["architecture"] == "rawnet2"
    assert state["scorer"] == "models.architectures.rawnet2:RawNet2Scorer"
    assert isinstance(load_detector(path).scorer, RawNet2Scorer)


@pytest.mark.parametrize("name", ["nope", "os:system", "models.inference:Detector2"])
def test_a_checkpoint_names_only_a_class_under_models_architectures(name: str) -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        scorer_class(name)


def test_official_aasist_l_weights_load_with_the_light_config() -> None:
    """Both official variants open with 32 channels: the light one is told by its graph width
    (it used to be built as the full AASIST and fail on the shapes)."""
    detector = load_detector(require(REFERENCE_DIR / "AASIST-L.pth"))
    assert isinstance(detector.scorer, AASISTScorer) and detector.version == "official"
    assert detector.model.config.gat_dims[0] == 24
