"""The wheel built from the repo carries what serves and nothing of the lab (issue 31).

Built offline (``pip wheel --no-deps --no-build-isolation --no-index``) from a copy of the
checkout's files (tracked and untracked, not ignored), so a stale ``build/`` folder or a
local egg-info cannot hide or add a file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from models.inference import NAMED_MODELS, WITHDRAWN_MODELS
from models.tasks.recipes import EXPERIMENT_CONFIGS, SHIPPED_FOLDS
from tests.paths import REPO


def _checkout_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
        check=True, capture_output=True).stdout.decode().split("\0")
    return [Path(p) for p in listed if p and (REPO / p).is_file()]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's files")
    src = tmp_path_factory.mktemp("src")
    for rel in _checkout_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "-q", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    wheels = list(dist.glob("callshield-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        return set(z.namelist())


def test_wheel_carries_the_default_and_the_named_models_with_their_cards(
        wheel_names: set[str]) -> None:
    for path in {*NAMED_MODELS.values()}:
        assert f"models/checkpoints/{path.name}" in wheel_names, path.name
    cards = {n for n in wheel_names if n.startswith("models/checkpoints/")
             and n.endswith("_CARD.md")}
    assert cards == {"models/checkpoints/LCNN_FUSION_CARD.md",
                     "models/checkpoints/RAWNET2_TEL_CARD.md",
                     "models/checkpoints/LFCC_GMM_CARD.md"}
    # the code that serves them is there too (a wheel of data only would pass the above)
    assert {"models/inference.py", "server/app.py", "client/cli.py"} <= wheel_names


def test_wheel_has_no_duplicated_or_withdrawn_checkpoint(wheel_names: set[str]) -> None:
    shipped = {f"models/checkpoints/{p.name}" for p in NAMED_MODELS.values()}
    checkpoints = {n for n in wheel_names
                   if n.startswith("models/checkpoints/") and n.endswith(".pt")}
    # The default embeds its parts (lcnn.pt, lcnn_s1.pt, lcnn_sc_voc3.pt, lfcc_gmm_fine.pt):
    # only the named models' files ship, and no withdrawn name's
    assert checkpoints == shipped
    for name in WITHDRAWN_MODELS:
        assert f"models/checkpoints/{name.replace('-', '_')}.pt" not in wheel_names


def test_wheel_has_no_experiments_fold_scores_or_dev_harness(wheel_names: set[str]) -> None:
    configs = {Path(n).name for n in wheel_names if n.startswith("models/configs/")}
    candidates = {p.name for p in EXPERIMENT_CONFIGS.glob("*.yaml")}
    assert candidates, "experiments/configs/ is empty: the check below would prove nothing"
    assert not configs & candidates
    assert not [n for n in wheel_names if n.split("/")[0] in ("experiments", "bench", "tests",
                                                              "devstack", "scripts")]
    assert not [n for n in wheel_names if "loso" in n and n.endswith(".json")]
    assert SHIPPED_FOLDS.is_dir()  # the folds exist in the checkout, only not in the wheel
    assert not [n for n in wheel_names if n.endswith("devstack.py")]
