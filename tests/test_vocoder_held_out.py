"""The vocoder-held-out bench (``bench.vocoder_held_out``): which training entries a neural
fold leaves out with a family (no training here)."""

from __future__ import annotations

from pathlib import Path

from bench.vocoder_held_out import entry_families, without_family
from models.tasks.config import TrainConfig
from models.tasks.recipes import NEURAL_RECIPES


def _entry(tmp_path: Path, name: str, lines: list[str]) -> dict[str, str]:
    protocol = tmp_path / f"{name}.txt"
    protocol.write_text("\n".join(lines) + "\n")
    return {"protocol": str(protocol), "audio_dir": str(tmp_path / name)}


def _config(tmp_path: Path) -> TrainConfig:
    """The lcnn-sc-voc3 recipe with its extras stood in by small protocols of the same
    shapes: Speech Commands bona fide, then copies through HiFi-GAN, vocos and NSF."""
    config = TrainConfig.load(NEURAL_RECIPES["lcnn-sc-voc3"])
    config.data.extra = [
        _entry(tmp_path, "sc", ["SC_a SC_00000 - - bonafide", "SC_b SC_00001 - - bonafide"]),
        _entry(tmp_path, "hifigan", ["SC_a SC_00000_V01 - V01 spoof",
                                     "SC_b SC_00001_V02 - V02 spoof"]),
        _entry(tmp_path, "vocos", ["SC_a SC_00000_V03 - V03 spoof"]),
        _entry(tmp_path, "nsf", ["SC_a SC_00000_V04 - V04 spoof"]),
    ]
    return config


def test_an_entry_is_known_by_its_protocols_system_ids(tmp_path: Path) -> None:
    sc, hifigan, vocos, nsf = _config(tmp_path).data.extra
    assert entry_families(sc) == set()  # bona fide only
    assert entry_families(hifigan) == {"hifigan"}  # V01 and V02
    assert entry_families(vocos) == {"vocos"} and entry_families(nsf) == {"nsf"}


def test_a_family_fold_drops_exactly_that_familys_copies(tmp_path: Path) -> None:
    config = _config(tmp_path)
    sc, hifigan, vocos, nsf = config.data.extra
    for family, kept in [("hifigan", [sc, vocos, nsf]), ("vocos", [sc, hifigan, nsf]),
                         ("nsf", [sc, hifigan, vocos])]:
        fold = without_family(config, family)
        assert fold.data.extra == kept, family
        assert fold.optim.select == "last"
    assert without_family(config, "hifigan").data.exclude_systems == ["V01", "V02"]
    assert len(config.data.extra) == 4 and not config.data.exclude_systems  # untouched


def test_an_entry_mixing_families_keeps_the_others_copies(tmp_path: Path) -> None:
    config = _config(tmp_path)
    mixed = _entry(tmp_path, "mixed", ["SC_a SC_00000_V01 - V01 spoof",
                                       "SC_a SC_00000_V03 - V03 spoof"])
    config.data.extra.append(mixed)
    fold = without_family(config, "hifigan")
    assert mixed in fold.data.extra  # kept, its V01 copies excluded by system id
    assert {"V01", "V02"} <= set(fold.data.exclude_systems)
