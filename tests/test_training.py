"""One short training epoch on a small subset lowers the loss, checkpoints, and resumes."""

import numpy as np
import torch
import torch.nn.functional as F

from models.architectures.scorer import build_model
from models.data.asvspoof import ASVspoofSplit, TrialDataset
from models.inference import load_detector
from models.tasks.antispoofing import subset, train
from models.tasks.config import TrainConfig
from tests.paths import CORPUS, require

TINY_RAWNET2 = {
    "variant": "eurecom", "sample_rate": 8000, "sinc_filters": 8, "sinc_kernel": 64,
    "block_channels": [8, [8, 8], [8, 16], [16, 16]], "gru_node": 16, "gru_layers": 1,
    "fc_node": 16,
}


def _config(tmp_path, epochs: int) -> TrainConfig:
    return TrainConfig.from_dict({
        "name": "tiny", "architecture": "rawnet2", "model": TINY_RAWNET2,
        "output": str(tmp_path / "tiny.pt"),
        "data": {"root": str(require(CORPUS)), "window_seconds": 1.0, "limit": 96,
                 "dev_limit": 48, "num_workers": 0, "short_crop_probability": 0.0},
        "optim": {"epochs": epochs, "batch_size": 8, "lr": 0.003, "seed": 0, "threads": 2},
        "augment": {"g711": {"p": 0.5}, "rawboost_lnl": {"p": 0.5}},
    })


def _loss(model: torch.nn.Module, config: TrainConfig) -> float:
    split = ASVspoofSplit(config.data.root_path, "train")
    data = TrialDataset(subset(split.trials(), 96, 1), split.audio_dir, 8000, 8000)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y, weight=torch.tensor([1.0, 9.0])).item()


def test_one_epoch_lowers_loss_and_exports_a_loadable_checkpoint(tmp_path):
    config = _config(tmp_path, epochs=1)
    torch.manual_seed(config.optim.seed)
    before = _loss(build_model("rawnet2", TINY_RAWNET2), config)
    result = train(config, tmp_path / "run", progress=False)
    after_model = build_model("rawnet2", TINY_RAWNET2)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    after_model.load_state_dict(last["model"])
    assert _loss(after_model, config) < before
    assert len(result.history) == 1 and 0.0 <= result.best_dev_eer <= 1.0
    detector = load_detector(tmp_path / "tiny.pt")
    assert detector.sample_rate == 8000 and detector.name == "tiny"
    assert detector.card["dev_eer"]["pooled"] == result.best_dev_eer
    probability = detector.spoof_probability(detector.scores([np.zeros(8000, np.float32)]))
    assert 0.0 <= probability[0] <= 1.0


def test_resume_continues_from_the_last_epoch(tmp_path):
    train(_config(tmp_path, epochs=1), tmp_path / "run", progress=False)
    resumed = train(_config(tmp_path, epochs=2), tmp_path / "run", progress=False)
    assert [r.epoch for r in resumed.history] == [0, 1]


def _tiny_lcnn() -> torch.nn.Module:
    from models.architectures.lcnn import LCNN, LCNNConfig

    torch.manual_seed(0)
    return LCNN(LCNNConfig(sample_rate=8000, n_fft=256, channels=(4, 4, 4), embedding=8))


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the tensor's scale (float noise, not a tuned bound)."""
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def test_sharpness_aware_gradient_is_taken_at_the_perturbed_weights_and_restores_them():
    from models.tasks.antispoofing import sharpness_aware_gradient

    model = _tiny_lcnn().train()
    model.dropout.p = 0.0  # the same function at both passes
    x = torch.randn(6, 8000, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0, 1, 1, 0])

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    loss().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    for adaptive, rho in ((False, 0.05), (True, 0.5)):
        model.zero_grad()
        loss().backward()
        stats = [b.clone() for b in model.buffers()]
        sharpness_aware_gradient(model, loss, rho, adaptive)
        sam = [p.grad for p in model.parameters()]
        # weights restored exactly, running statistics counted once per batch
        for p, w in zip(model.parameters(), weights, strict=True):
            assert torch.equal(p.detach(), w)
        for buf, before in zip(model.buffers(), stats, strict=True):
            if buf.is_floating_point():
                assert torch.equal(buf, before)
        # a different gradient: the one at the ascended weights
        assert max(_gap(a, b) for a, b in zip(plain, sam, strict=True)) > 1e-2
        # which, taken by hand at those weights, is the same
        with torch.no_grad():
            grads = [g * p.abs() if adaptive else g for g, p in zip(plain, model.parameters(),
                                                                    strict=True)]
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            for p, g in zip(model.parameters(), grads, strict=True):
                p.add_((g * p.abs() if adaptive else g) * rho / (norm + 1e-12))
        model.zero_grad()
        loss().backward()
        assert max(_gap(a, b.grad) for a, b in zip(sam, model.parameters(), strict=True)) < 1e-3
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights, strict=True):
                p.copy_(w)
