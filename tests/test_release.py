"""The release steps of the shipped default, ``python -m models unfuse / fuse / ship``, on
the real default, the real corpus and the committed fold scores: rebuilt from its own parts,
the default must come out as it shipped; re-shipped, a part must get back the calibration it
shipped with. And what the package no longer offers says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.cli import main
from models.data.asvspoof import ASVspoofSplit
from models.data.audio import load_audio
from models.inference import NAMED_MODELS, WITHDRAWN_MODELS, ModelNotFoundError, load_detector
from models.tasks.recipes import EXPERIMENT_CONFIGS, SHIPPED_CONFIGS
from models.tasks.release import ReleaseError, check_output
from tests.paths import CORPUS, REPO, require

PART_FILES = {"lcnn": "lcnn.pt", "lcnn-s1": "lcnn_s1.pt", "lcnn-sc-voc3": "lcnn_sc_voc3.pt",
              "lfcc-gmm-fine": "lfcc_gmm_fine.pt", "lfcc-gmm-dd": "lfcc_gmm_dd.pt"}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default's parts, written out of the shipped checkpoint by ``unfuse``."""
    out = tmp_path_factory.mktemp("parts")
    assert main(["unfuse", "default", "--out", str(out)]) == 0
    return out


def test_unfuse_writes_each_embedded_part_with_its_card(parts: Path) -> None:
    default = _load(NAMED_MODELS["default"])
    embedded = dict(zip(default["model_config"]["parts"], default["state_dict"]["parts"],
                        strict=True))
    assert sorted(p.name for p in parts.glob("*.pt")) == sorted(PART_FILES.values())
    for recipe, name in PART_FILES.items():
        part = _load(parts / name)
        assert part["name"] == embedded[recipe]["name"]
        assert part["calibration"] == embedded[recipe]["calibration"]
        for key, tensor in embedded[recipe]["state_dict"].items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(part["state_dict"][key], tensor), (recipe, key)
        card = (parts / f"{Path(name).stem.upper()}_CARD.md").read_text()
        assert card.startswith(f"# Model card: {part['name']} ")
    # the LFCC+GMM v2 part is the shipped lfcc-gmm model itself
    assert load_detector(parts / "lfcc_gmm_dd.pt").card == load_detector("lfcc-gmm").card


@pytest.mark.slow
def test_fuse_rebuilds_the_default_from_its_parts(parts: Path, tmp_path: Path) -> None:
    """``make train``'s fuse step on the default's own parts: the same order, weights and
    genuine reference (each part's dev bona fide scores) as the shipped default, so the same
    fused scores before calibration."""
    out = tmp_path / "fused.pt"
    args = ["fuse", "--out", str(out), "--name", "lcnn-gmm-fusion", "--version", "6",
            "--threads", "2"]
    for recipe, name in PART_FILES.items():
        args += ["--part", f"{parts / name}={recipe}", "--weight", "0.2"]
    assert main(args) == 0
    shipped, rebuilt = _load(NAMED_MODELS["default"]), _load(out)
    assert rebuilt["model_config"]["parts"] == list(PART_FILES)
    assert rebuilt["card"]["fusion"] == shipped["card"]["fusion"]
    for key in ("weight", "bias", "combine"):
        assert rebuilt["state_dict"][key] == shipped["state_dict"][key], key
    for key in ("mean", "scale"):
        np.testing.assert_allclose(rebuilt["state_dict"][key], shipped["state_dict"][key],
                                   rtol=1e-4)
    for mine, theirs in zip(rebuilt["state_dict"]["reference"],
                            shipped["state_dict"]["reference"], strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
    split = ASVspoofSplit(require(CORPUS), "dev")
    waves = [np.resize(load_audio(split.audio_dir / f"{t.utt_id}.flac", 8000), 32000)
             for t in split.trials()[:6]]
    np.testing.assert_allclose(load_detector(out).scores(waves),
                               load_detector("default").scores(waves), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_ship_gives_a_part_back_the_calibration_it_shipped_with(parts: Path,
                                                                tmp_path: Path) -> None:
    """The seed-0 LCNN shipped calibrated on the committed ``lcnn`` folds at the default
    prior: ``ship`` on the same inputs must reproduce its calibration, dev EER and LOSO
    estimate (a wrong prior, fold set or anchoring moves them)."""
    source = parts / "lcnn.pt"
    before = _load(source)
    out = tmp_path / "shipped.pt"
    assert main(["ship", str(source), "--recipe", "lcnn", "--out", str(out),
                 "--loso-dir", str(tmp_path / "no-runs"), "--fold-scale", "committed folds",
                 "--threads", "2"]) == 0
    after = _load(out)
    for key in ("scale", "bias"):
        assert after["calibration"][key] == pytest.approx(before["calibration"][key], rel=1e-3)
    assert after["card"]["loso"]["pooled_eer"] == pytest.approx(
        before["card"]["loso"]["pooled_eer"], abs=1e-9)
    assert after["card"]["loso"]["fold_scale"] == "committed folds"
    assert after["card"]["dev_eer"]["pooled"] == pytest.approx(
        before["card"]["dev_eer"]["pooled"], abs=0.005)
    assert _load(source)["calibration"] == before["calibration"]  # --out: source untouched


def test_release_steps_refuse_bad_input(parts: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    require(CORPUS)
    lcnn = str(parts / "lcnn.pt")
    # lcnn-sam (an experiment) has 2 of its 6 folds committed
    assert main(["ship", lcnn, "--recipe", "lcnn-sam", "--out", str(tmp_path / "x.pt"),
                 "--loso-dir", str(tmp_path / "no-runs")]) == 2
    assert "2 of 6 LOSO folds" in capsys.readouterr().err
    assert main(["ship", lcnn, "--recipe", "no-such-recipe", "--out", str(tmp_path / "x.pt")]) == 2
    assert "unknown recipe 'no-such-recipe'" in capsys.readouterr().err
    assert main(["fuse", "--out", str(tmp_path / "f.pt"), "--part", f"{lcnn}=lcnn",
                 "--part", f"{parts / 'lcnn_s1.pt'}=lcnn-s1", "--weight", "1"]) == 2
    assert "one weight per part" in capsys.readouterr().err
    assert main(["fuse", "--out", str(tmp_path / "f.pt"), "--part", lcnn]) == 2
    assert "CHECKPOINT=RECIPE" in capsys.readouterr().err
    assert main(["unfuse", "lfcc-gmm", "--out", str(tmp_path / "u")]) == 2
    assert "not a fused checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "f.pt").exists()


def test_a_candidate_recipe_cannot_write_into_the_shipped_checkpoints(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    shipped_dir = NAMED_MODELS["default"].parent
    before = sorted(p.name for p in shipped_dir.iterdir())
    candidate = EXPERIMENT_CONFIGS / "lcnn_s2_tel.yaml"
    # a new file there, or a shipped model's file, from an experiment's config: refused
    # (--export-only from an empty run folder: were it let through, nothing would be written)
    for target in (shipped_dir / "lcnn_s2.pt", NAMED_MODELS["lfcc-gmm"]):
        assert main(["train", str(candidate), "--output", str(target), "--export-only",
                     "--run-dir", str(tmp_path / "empty")]) == 2
        assert "only a shipped model's file" in capsys.readouterr().err
    # a shipped config may write only its own named model's file
    with pytest.raises(ReleaseError):
        check_output(SHIPPED_CONFIGS / "lfcc_gmm_dd.yaml", shipped_dir / "lcnn_s2.pt")
    with pytest.raises(ReleaseError):
        check_output(SHIPPED_CONFIGS / "lfcc_gmm_dd.yaml", NAMED_MODELS["rawnet2-tel"])
    check_output(SHIPPED_CONFIGS / "lfcc_gmm_dd.yaml", NAMED_MODELS["lfcc-gmm"])
    check_output(candidate, REPO / "runs" / "experiments" / "lcnn_s2.pt")
    assert sorted(p.name for p in shipped_dir.iterdir()) == before


def test_withdrawn_models_say_why_and_name_the_shipped_ones(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for name in WITHDRAWN_MODELS:
        assert name not in NAMED_MODELS
        with pytest.raises(ModelNotFoundError, match="no longer shipped") as caught:
            load_detector(name)
        assert all(shipped in str(caught.value) for shipped in NAMED_MODELS)
    protocol = tmp_path / "p.txt"
    protocol.write_text("LA_0079 LA_D_1000265 - - bonafide\n")
    assert main(["score", "--model", "aasist-l", "--protocol", str(protocol),
                 "--audio-dir", str(tmp_path), "--out", str(tmp_path / "s.txt")]) == 2
    err = capsys.readouterr().err
    assert "aasist-l" in err and "placeholder" in err and "rawnet2-tel" in err
