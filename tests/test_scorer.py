"""The architecture registry: checkpoints record their scorer class, old ones load by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.architectures.aasist import AASISTScorer
from models.architectures.rawnet2 import RawNet2Scorer
from models.architectures.scorer import ARCHITECTURES, scorer_class
from models.inference import CHECKPOINT_DIR, load_detector, save_checkpoint
from tests.paths import require
from tests.test_training import TINY_RAWNET2

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def test_shipped_checkpoints_load_with_their_recorded_or_named_scorer() -> None:
    recorded = 0
    for path in sorted(CHECKPOINT_DIR.glob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        # written before the registry: mapped by architecture name; after: the class recorded
        expected = scorer_class(state.get("scorer") or state["architecture"])
        recorded += "scorer" in state
        detector = load_detector(path)
        assert type(detector.scorer) is expected
        assert expected is scorer_class(state["architecture"])  # the two records agree
    assert recorded >= 2  # lcnn.pt and lcnn_fusion.pt carry the class


def test_a_new_checkpoint_records_its_scorer_class(tmp_path: Path) -> None:
    model = RawNet2Scorer.build(TINY_RAWNET2)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, architecture="models.architectures.rawnet2:RawNet2Scorer", name="t",
                    version="1", sample_rate=8000, window_seconds=1.0,
                    model_config=TINY_RAWNET2, state_dict=model.state_dict())
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["architecture"] == "rawnet2"
    assert state["scorer"] == ARCHITECTURES["rawnet2"]
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
