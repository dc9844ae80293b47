"""LFCC-LCNN: its torch front end is the LFCC+GMM front end, the one-class loss pulls bona
fide towards the centre and pushes spoofs away, and a short training exports a checkpoint
that loads and scores through the same path as every other model."""

import numpy as np
import pytest
import torch

from models.architectures.lcnn import LCNN, LCNNConfig, oc_softmax_loss
from models.architectures.lfcc_gmm import LFCCGMMConfig, lfcc
from models.inference import load_detector
from models.tasks.antispoofing import train
from models.tasks.config import TrainConfig
from tests.paths import CORPUS, require


@pytest.mark.parametrize("static", [True, False])
def test_front_end_matches_the_lfcc_gmm_features(static: bool) -> None:
    wave = np.random.default_rng(0).standard_normal(12_345) * 0.1
    model = LCNN(LCNNConfig(static=static)).eval()
    ours = model.frontend(torch.from_numpy(wave).float()[None])[0].double().numpy()
    reference = lfcc(wave, LFCCGMMConfig(static=static))
    assert ours.shape == reference.shape
    # float32 against float64: an error far below the features' own scale
    assert np.abs(ours - reference).max() < 1e-4 * np.abs(reference).max()


def test_cepstral_mean_normalisation_cancels_a_fixed_gain() -> None:
    wave = torch.randn(1, 16_000) * 0.1
    model = LCNN(LCNNConfig(cmn=True)).eval()
    a, b = model.frontend(wave), model.frontend(wave * 4.0)
    assert torch.allclose(a, b, atol=1e-3)
    assert not torch.allclose(LCNN(LCNNConfig(static=True)).frontend(wave * 4.0),
                              LCNN(LCNNConfig(static=True)).frontend(wave), atol=1e-3)


def test_one_class_loss_margins() -> None:
    alpha, weight = 20.0, torch.ones(2)
    cosines = torch.tensor([0.95, 0.5, 0.1])

    def loss(label: int) -> torch.Tensor:
        logits = torch.stack((-alpha * cosines / 2, alpha * cosines / 2), dim=1)
        labels = torch.full((3,), label)
        return torch.stack([oc_softmax_loss(logits[i:i + 1], labels[i:i + 1], alpha,
                                            (0.9, 0.2), weight) for i in range(3)])

    bona, spoof = loss(1), loss(0)
    assert bona[0] < bona[1] < bona[2]  # bona fide: the closer to the centre the better
    assert spoof[2] < spoof[1] < spoof[0]  # spoof: the farther the better
    assert bona[0] < 0.4 and spoof[2] < 0.4  # beyond the margins little is left to learn


def test_short_inputs_still_score() -> None:
    model = LCNN(LCNNConfig()).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 400))  # 50 ms: fewer frames than the three pools need
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_training_exports_a_loadable_one_class_checkpoint(tmp_path) -> None:
    config = TrainConfig.from_dict({
        "name": "tiny-lcnn", "architecture": "lcnn",
        "model": {"channels": [4, 8, 8], "embedding": 16, "freq_mask": 4},
        "output": str(tmp_path / "lcnn.pt"),
        "data": {"root": str(require(CORPUS)), "window_seconds": 1.0, "limit": 64,
                 "dev_limit": 48, "num_workers": 0, "min_crop_seconds": 0.5},
        "optim": {"epochs": 1, "batch_size": 8, "lr": 0.003, "seed": 0, "threads": 2,
                  "loss": "oc-softmax", "bonafide_weight": 2.7},
    })
    result = train(config, tmp_path / "run", progress=False)
    assert len(result.history) == 1 and np.isfinite(result.history[0].train_loss)
    detector = load_detector(tmp_path / "lcnn.pt")
    assert detector.name == "tiny-lcnn" and detector.card["config"]["optim"]["loss"] == "oc-softmax"
    scores = detector.scores([np.zeros(8000, np.float32), np.ones(4000, np.float32) * 0.1])
    # the one-class head bounds the log-odds by alpha (cosine in [-1, 1])
    assert np.all(np.abs(scores) <= 20.0 + 1e-4)


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="optim.loss"):
        TrainConfig.from_dict({"name": "x", "architecture": "lcnn", "model": {},
                               "optim": {"loss": "focal"}})


@pytest.mark.parametrize("shape", [(3, 5, 17, 9), (8, 8, 200, 40), (2, 1, 2, 2), (1, 3, 5, 3)])
def test_strided_max_pool_is_pytorchs_bit_for_bit(shape: tuple[int, ...]) -> None:
    """The LCNN's pooling (maxima of strided slices, no argmax) gives exactly PyTorch's
    MaxPool2d values, odd sizes (remainder dropped) included: a maximum rounds nothing."""
    import torch.nn.functional as F

    from models.architectures.pooling import StridedMaxPool2d

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(StridedMaxPool2d(2)(x), F.max_pool2d(x, 2))
    with pytest.raises(ValueError, match="needs at least 2 values"):
        StridedMaxPool2d(2)(torch.zeros(1, 1, 1, 4))


def test_lcnn_checkpoint_still_loads_and_pools_as_before() -> None:
    """Swapping MaxPool2d (no parameters) for the strided pooling keeps the state dict's keys,
    so shipped checkpoints load strictly, and the body's output is MaxPool2d's."""
    from torch import nn

    from models.architectures.lcnn import LCNN, LCNNConfig
    from models.architectures.pooling import StridedMaxPool2d

    model = LCNN(LCNNConfig()).eval()
    reference = LCNN(LCNNConfig()).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    for i, layer in enumerate(reference.body):
        if isinstance(layer, StridedMaxPool2d):
            reference.body[i] = nn.MaxPool2d(2)
    x = torch.randn(2, 16000, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.inference_mode():
        assert torch.equal(model(x), reference(x))
