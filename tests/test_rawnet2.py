"""RawNet2 loads the official checkpoint strictly and reproduces the official outputs."""

import io
import lzma

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.architectures.rawnet2 import RawNet2, RawNet2Config
from models.architectures.sinc import conv1d_valid, mel_sinc_bank
from tests.numerics import assert_float32_close, scale_tolerance
from tests.paths import REFERENCE, require


@pytest.fixture(autouse=True)
def _two_threads():
    """Every test runs on 2 threads and gives the count back: a count left by another test
    would change reduction order, and so results, with test order or ``-k``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(require(REFERENCE / "reference_vectors.npz")))


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    path = require(REFERENCE / "rawnet2_state_dict.pth.xz")
    return torch.load(io.BytesIO(lzma.open(path).read()), map_location="cpu", weights_only=True)


def _model(config: RawNet2Config, state: dict[str, torch.Tensor]) -> RawNet2:
    model = RawNet2(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_baseline_parity(reference, state_dict):
    """The official computation (time-domain sinc convolution) against the official outputs."""
    model = _model(RawNet2Config(sinc_method="direct"), state_dict)
    x = torch.from_numpy(reference["inputs"])
    with torch.inference_mode():
        last, logits = model.forward_features(x)
        gru_in = model.frontend(x)
        score = model.score(x)
    assert_float32_close(F.log_softmax(logits, 1).numpy(), reference["rawnet2_logsoftmax"])
    assert_float32_close(score.numpy(), reference["rawnet2_score"])
    assert_float32_close(last.numpy(), reference["rawnet2_last_hidden"])
    assert_float32_close(gru_in.numpy(), reference["rawnet2_gru_input"])


def test_fft_path_matches_direct_path(reference, state_dict):
    """The FFT convolution (callshield's speed path) against the exact one, same weights:
    the bound is the float32 error of a 1025-tap FFT convolution relative to the output
    scale, not the official tolerance."""
    x = torch.from_numpy(reference["inputs"])
    with torch.inference_mode():
        direct = _model(RawNet2Config(sinc_method="direct"), state_dict)(x).numpy()
        fft = _model(RawNet2Config(sinc_method="fft"), state_dict)(x).numpy()
    assert_float32_close(fft, direct, rel=1e-3)
    assert np.abs(direct).max() > 0.1  # the comparison is not between two near-zero outputs


def test_eurecom_forward_parity(reference, state_dict):
    model = _model(RawNet2Config(variant="eurecom", sinc_method="direct"), state_dict)
    with torch.inference_mode():
        logits = model(torch.from_numpy(reference["inputs"]))
    assert_float32_close(logits.numpy(), reference["rawnet2_eurecom_forward_logits"])
    assert_float32_close(F.softmax(logits, 1).numpy(),
                         reference["rawnet2_eurecom_forward_softmax"])


def test_quirk_bn1_is_ignored_only_by_the_baseline(reference, state_dict):
    """The 2021 baseline discards bn1; changing it must not move its output, but must move
    the eurecom forward's."""
    x = torch.from_numpy(reference["inputs"][:1])
    changed = dict(state_dict)
    changed["block3.0.bn1.bias"] = state_dict["block3.0.bn1.bias"] + 1.0
    with torch.inference_mode():
        base = _model(RawNet2Config(), state_dict)(x)
        base_changed = _model(RawNet2Config(), changed)(x)
        eu = _model(RawNet2Config(variant="eurecom"), state_dict)(x)
        eu_changed = _model(RawNet2Config(variant="eurecom"), changed)(x)
    assert torch.equal(base, base_changed)
    assert (eu - eu_changed).abs().max() > 1e-3


def test_filter_banks_exact(reference):
    np.testing.assert_allclose(
        mel_sinc_bank(20, 1024, 16000).numpy(), reference["rawnet2_sinc_filters"], atol=1e-7
    )
    np.testing.assert_allclose(
        mel_sinc_bank(20, 1024, 16000, "eurecom").numpy(),
        reference["rawnet2_eurecom_sinc_filters"],
        atol=1e-7,
    )


def test_filter_bank_not_in_state_dict():
    model = RawNet2(RawNet2Config(sample_rate=8000, sinc_kernel=128))
    assert not any(k.startswith("Sinc_conv") for k in model.state_dict())
    assert model.Sinc_conv.filters.shape == (20, 129)


def test_fft_convolution_matches_direct():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 5000)
    bank = mel_sinc_bank(20, 1024, 16000)
    direct = F.conv1d(x, bank.unsqueeze(1))
    fft = conv1d_valid(x, bank, "fft")
    assert fft.shape == direct.shape == (2, 20, 5000 - 1024)
    # Each output sums 1025 products: float32 error grows with the output scale.
    assert (fft - direct).abs().max() < scale_tolerance(direct.numpy())


def test_official_state_dict_keys_in_order(state_dict):
    assert list(RawNet2(RawNet2Config()).state_dict()) == list(state_dict)


def test_variable_length_and_small_config():
    model = RawNet2(
        RawNet2Config(
            sample_rate=8000, sinc_kernel=128, block_channels=[20, [20, 20], [20, 64], [64, 64]],
            gru_node=128, gru_layers=1, fc_node=128,
        )
    ).eval()
    with torch.inference_mode():
        for samples in (model.min_samples, 8000, 32000):
            assert model(torch.zeros(1, samples)).shape == (1, 2)
