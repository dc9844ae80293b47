"""AASIST / AASIST-L: checkpoint compatibility and output parity with the official code.

The reference files (official weights and outputs of the official ``clovaai/aasist`` model,
see ``shared/reference/README.md``) live outside the repository; tests that need them skip
when they are absent. The remaining tests use randomly initialised models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from models.architectures.aasist import AASIST, AASISTConfig
from tests.numerics import assert_float32_close
from tests.paths import require

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@dataclass(frozen=True)
class Variant:
    name: str  # prefix of the arrays in reference_vectors.npz
    config: Callable[[], AASISTConfig]
    weights: str
    keys: str


VARIANTS = [
    Variant("aasist", AASISTConfig.aasist, "AASIST.pth", "aasist_keys.txt"),
    Variant("aasist_l", AASISTConfig.aasist_l, "AASIST-L.pth", "aasist_l_keys.txt"),
]


def _reference_file(name: str) -> Path:
    return require(REFERENCE_DIR / name)


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> Iterator[None]:
    # The reference outputs were produced with 2 threads; keep runs comparable and small.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(_reference_file("reference_vectors.npz")) as data:
        return {key: data[key] for key in data.files}


def _official_state_dict(variant: Variant) -> dict[str, torch.Tensor]:
    return torch.load(_reference_file(variant.weights), map_location="cpu", weights_only=True)


def _official_keys(variant: Variant) -> list[tuple[str, list[int]]]:
    rows = []
    for line in _reference_file(variant.keys).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape, _dtype = line.split("\t")
            rows.append((key, [int(n) for n in shape.strip("[]").split(",") if n.strip()]))
    return rows


@pytest.fixture(scope="module", params=VARIANTS, ids=[v.name for v in VARIANTS])
def pretrained(request: pytest.FixtureRequest) -> tuple[Variant, AASIST]:
    variant: Variant = request.param
    model = AASIST(variant.config())
    model.load_state_dict(_official_state_dict(variant), strict=True)
    return variant, model.eval()


@pytest.fixture(scope="module")
def outputs(
    pretrained: tuple[Variant, AASIST], reference: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """One forward of the 3-item reference batch, capturing the encoder output on the way."""
    variant, model = pretrained
    captured: dict[str, torch.Tensor] = {}
    hook = model.encoder.register_forward_hook(
        lambda _module, _args, out: captured.__setitem__("encoder_out", out)
    )
    try:
        with torch.inference_mode():
            last_hidden, logits = model.forward_features(torch.from_numpy(reference["inputs"]))
    finally:
        hook.remove()
    return {
        "logits": logits.numpy(),
        "last_hidden": last_hidden.numpy(),
        "encoder_out": captured["encoder_out"].numpy(),
    }


def test_strict_load_and_key_order(pretrained: tuple[Variant, AASIST]) -> None:
    variant, model = pretrained
    official = _official_keys(variant)
    state = model.state_dict()
    assert list(state) == [key for key, _ in official]
    assert list(state) == list(_official_state_dict(variant))
    for key, shape in official:
        assert list(state[key].shape) == shape, key


def test_sinc_front_end(
    pretrained: tuple[Variant, AASIST], reference: dict[str, np.ndarray]
) -> None:
    variant, model = pretrained
    expected = reference[f"{variant.name}_sinc_filters"]
    np.testing.assert_allclose(model.conv_time.filters.numpy(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("array", ["logits", "last_hidden", "encoder_out"])
def test_parity_with_official(
    pretrained: tuple[Variant, AASIST],
    outputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    array: str,
) -> None:
    variant, _ = pretrained
    assert_float32_close(outputs[array], reference[f"{variant.name}_{array}"])


def test_batch_of_one_matches_reference(
    pretrained: tuple[Variant, AASIST], reference: dict[str, np.ndarray]
) -> None:
    """Batch size 1 through ``forward``: same scores as the batched reference row."""
    variant, model = pretrained
    with torch.inference_mode():
        logits = model(torch.from_numpy(reference["inputs"][:1]))
    assert logits.shape == (1, 2)
    assert_float32_close(logits.numpy(), reference[f"{variant.name}_logits"][:1])


@pytest.mark.parametrize("factory", [AASISTConfig.aasist, AASISTConfig.aasist_l])
def test_one_second_and_batch_of_one(factory: Callable[[], AASISTConfig]) -> None:
    torch.manual_seed(0)
    model = AASIST(factory()).eval()
    x = 0.1 * torch.randn(2, 16000)
    with torch.inference_mode():
        batched = model(x)
        single = model(x[1:])
        encoded = model.encode(x[:1])
    assert batched.shape == (2, 2) and single.shape == (1, 2)
    assert torch.isfinite(batched).all()
    assert encoded.shape[2:] == (23, 7)  # 1 s: 7 temporal nodes instead of 29
    assert_float32_close(single.numpy(), batched[1:].numpy())


def test_too_short_input_is_rejected() -> None:
    model = AASIST(AASISTConfig.aasist_l()).eval()
    with pytest.raises(ValueError, match="shorter"):
        model(torch.zeros(1, model.config.min_samples - 1))
    with torch.inference_mode():
        assert model(torch.zeros(1, model.config.min_samples)).shape == (1, 2)


def test_telephone_band_config() -> None:
    config = AASISTConfig.aasist(sample_rate=8000, nb_samp=32300)
    assert config.sample_rate == 8000 and config.filts == AASISTConfig.aasist().filts
    torch.manual_seed(0)
    narrow, wide = AASIST(config).eval(), AASIST(AASISTConfig.aasist())
    # Same checkpoint layout (16 kHz weights can seed 8 kHz fine-tuning), different bank.
    assert {k: v.shape for k, v in narrow.state_dict().items()} == {
        k: v.shape for k, v in wide.state_dict().items()
    }
    assert not torch.allclose(narrow.conv_time.filters, wide.conv_time.filters)
    with torch.inference_mode():
        logits = narrow(0.1 * torch.randn(1, 8000))
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_freq_aug_only_in_training() -> None:
    torch.manual_seed(0)
    model = AASIST(AASISTConfig.aasist_l(freq_aug=True, freq_aug_max_width=20))
    plain = AASIST(AASISTConfig.aasist_l())
    plain.load_state_dict(model.state_dict(), strict=True)
    x = 0.1 * torch.randn(2, 16000)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))
    model.train()
    logits = model(x)
    logits.sum().backward()
    assert logits.shape == (2, 2)
    assert model.out_layer.weight.grad is not None
