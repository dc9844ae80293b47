"""RawNet2 (Tak et al., ICASSP 2021): fixed sinc front end, residual blocks with filter-wise
feature-map scaling (FMS), and a GRU over the remaining frames.

Parameter names follow the official code (asvspoof-challenge/2021 LA baseline, clovaai/aasist
``RawNet2Spoof.py``, eurecom-asp/rawnet2-antispoofing), so their state_dicts load with
``strict=True``. Two official variants differ in one place each:

* ``baseline2021``: the residual block computes ``bn1`` and then discards it (``conv1`` takes
  the block input); band edges span 0..sr/2; the official output is a log-softmax.
* ``eurecom``: ``bn1`` feeds ``conv1``; band edges from ``n + 3`` mel points; raw logits.

``forward`` always returns raw logits ``(B, 2)`` [spoof, bona fide]; :meth:`RawNet2.score`
returns the score each variant's official scripts write.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.architectures.scorer import LogitsScorer
from models.architectures.sinc import SincFilterBank
from models.config_dict import dataclass_from_dict

Variant = Literal["baseline2021", "eurecom"]


@dataclass
class RawNet2Config:
    """Architecture hyper-parameters. The defaults are the official 2021 LA baseline."""

    variant: Variant = "baseline2021"
    sample_rate: int = 16000
    sinc_filters: int = 20
    sinc_kernel: int = 1024  # forced odd, as upstream: 1025 taps
    # [first-conv channels, [in, out] of blocks 0-1, [in, out] of block 2, [in, out] of 3-5]
    block_channels: list[Any] = field(default_factory=lambda: [20, [20, 20], [20, 128], [128, 128]])
    gru_node: int = 1024
    gru_layers: int = 3
    fc_node: int = 1024
    sinc_method: str = "auto"  # "fft", "direct" or "auto" (FFT above 200 taps)

    @classmethod
    def baseline2021(cls) -> RawNet2Config:
        return cls()

    @classmethod
    def eurecom(cls) -> RawNet2Config:
        """The ICASSP 2021 release as published (129 taps, wider blocks).

        The reference checkpoint in ``shared/reference`` uses the 2021 widths with the
        eurecom forward: build that with ``RawNet2Config(variant="eurecom")``.
        """
        return cls(
            variant="eurecom",
            sinc_filters=128,
            sinc_kernel=128,
            block_channels=[128, [128, 128], [128, 512], [512, 512]],
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RawNet2Config:
        return dataclass_from_dict(cls, d, "RawNet2 config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResidualBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, first: bool, use_bn1: bool) -> None:
        super().__init__()
        self.first = first
        self.use_bn1 = use_bn1 and not first
        if not first:
            # Present in every official checkpoint, even where the forward ignores it.
            self.bn1 = nn.BatchNorm1d(channels_in)
        self.lrelu = nn.LeakyReLU(negative_slope=0.3)
        self.conv1 = nn.Conv1d(channels_in, channels_out, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm1d(channels_out)
        self.conv2 = nn.Conv1d(channels_out, channels_out, kernel_size=3, padding=1)
        self.downsample = channels_in != channels_out
        if self.downsample:
            self.conv_downsample = nn.Conv1d(channels_in, channels_out, kernel_size=1)
        self.mp = nn.MaxPool1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lrelu(self.bn1(x)) if self.use_bn1 else x
        out = self.conv2(self.lrelu(self.bn2(self.conv1(out))))
        identity = self.conv_downsample(x) if self.downsample else x
        return self.mp(out + identity)


class RawNet2(nn.Module):
    """RawNet2 countermeasure; ``forward(x (B, T)) -> logits (B, 2)``, class 1 = bona fide."""

    def __init__(self, config: RawNet2Config | None = None) -> None:
        super().__init__()
        self.config = config = config or RawNet2Config()
        first, b01, b2, b35 = config.block_channels
        layout = "eurecom" if config.variant == "eurecom" else "baseline"
        use_bn1 = config.variant == "eurecom"
        self.Sinc_conv = SincFilterBank(
            first, config.sinc_kernel, config.sample_rate, layout, config.sinc_method
        )
        self.first_bn = nn.BatchNorm1d(first)
        self.selu = nn.SELU(inplace=True)
        specs = [(b01, True), (b01, False), (b2, False), (b35, False), (b35, False), (b35, False)]
        for i, ((c_in, c_out), is_first) in enumerate(specs):
            setattr(self, f"block{i}", nn.Sequential(ResidualBlock(c_in, c_out, is_first, use_bn1)))
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        for i, (_, c_out) in enumerate(c for c, _ in specs):
            setattr(self, f"fc_attention{i}", nn.Sequential(nn.Linear(c_out, c_out)))
        self.sig = nn.Sigmoid()
        self.bn_before_gru = nn.BatchNorm1d(b35[1])
        self.gru = nn.GRU(
            input_size=b35[1],
            hidden_size=config.gru_node,
            num_layers=config.gru_layers,
            batch_first=True,
        )
        self.fc1_gru = nn.Linear(config.gru_node, config.fc_node)
        self.fc2_gru = nn.Linear(config.fc_node, 2)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def frontend(self, x: torch.Tensor) -> torch.Tensor:
        """Waveforms ``(B, T)`` to the GRU input ``(B, frames, channels)``."""
        x = self.Sinc_conv(x.unsqueeze(1))
        x = self.selu(self.first_bn(F.max_pool1d(torch.abs(x), 3)))
        for i in range(6):
            x = getattr(self, f"block{i}")(x)
            scale = self.sig(getattr(self, f"fc_attention{i}")(self.avgpool(x).flatten(1)))
            scale = scale.unsqueeze(-1)
            x = x * scale + scale  # FMS: multiplicative and additive, as in the paper
        x = self.selu(self.bn_before_gru(x))
        return x.permute(0, 2, 1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(fc1_gru output, logits)``: the official clovaai forward's two outputs,
        but with raw logits in place of the log-softmax."""
        self.gru.flatten_parameters()
        hidden, _ = self.gru(self.frontend(x))
        last = self.fc1_gru(hidden[:, -1, :])
        return last, self.fc2_gru(last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """The official score: log-softmax bona fide output (2021 baseline) or raw logit."""
        logits = self(x)
        if self.config.variant == "baseline2021":
            return F.log_softmax(logits, dim=1)[:, 1]
        return logits[:, 1]

    @property
    def min_samples(self) -> int:
        """Shortest input with at least one frame left after the six max-pools."""
        return self.Sinc_conv.kernel_size - 1 + 3 ** 7


class RawNet2Scorer(LogitsScorer):
    """RawNet2 checkpoints; official ones score as their own evaluation code does."""

    architecture = "rawnet2"

    def __init__(self, model: RawNet2, device: torch.device, dtype: torch.dtype = torch.float32,
                 official: bool = False) -> None:
        super().__init__(model, device, dtype)
        self.official = official

    @classmethod
    def build(cls, model_config: dict[str, Any]) -> RawNet2:
        return RawNet2(RawNet2Config.from_dict(model_config))

    @classmethod
    def from_official(cls, state: dict[str, Any], device: torch.device,
                      dtype: torch.dtype) -> RawNet2Scorer | None:
        if "gru.weight_ih_l0" not in state:
            return None
        model = RawNet2(RawNet2Config.baseline2021())
        model.load_state_dict(state, strict=True)
        return cls(model, device, dtype, official=True)

    def raw_scores(self, x: torch.Tensor) -> torch.Tensor:
        if self.official:
            return self.model.score(x)
        return super().raw_scores(x)
