"""AASIST and AASIST-L: spectro-temporal graph attention on a raw-waveform encoder.

Jung et al., "AASIST: Audio Anti-Spoofing using Integrated Spectro-Temporal Graph Attention
Networks", ICASSP 2022. Re-implemented here so that the official pretrained checkpoints
(``clovaai/aasist`` ``models/weights/AASIST.pth`` / ``AASIST-L.pth``) load with
``strict=True`` and give the official scores. That constrains the module tree: every
attribute that owns parameters keeps its upstream name and registration order (the
state_dict key list is checked against the official one, in order, by the tests).

Inference behaviour follows the official code, including its quirks, each marked ``Upstream:``
below; training-only details (dropout, freq masking) are kept compatible but not bit-exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.architectures.scorer import LogitsScorer
from models.architectures.sinc import SincFilterBank

__all__ = [
    "AASIST",
    "AASISTConfig",
    "GraphAttentionLayer",
    "GraphPool",
    "HtrgGraphAttentionLayer",
    "ResidualBlock",
]

#: Time pooling of the front end (3) times six residual blocks (3 each): one encoder frame
#: covers 3**7 = 2187 sinc-filter outputs, so shorter inputs leave no temporal node.
_TIME_REDUCTION = 3**7


@dataclass(frozen=True)
class AASISTConfig:
    """The official ``model_config`` fields, plus the sample rate of the sinc front end.

    Only ``sample_rate`` is ours: upstream hard-codes 16 kHz. Changing it moves the mel band
    edges to 0..sample_rate/2 (e.g. 8 kHz for telephone audio) but leaves every tensor shape,
    and hence the checkpoint layout, unchanged; the pretrained 16 kHz weights are of course
    not calibrated for it.
    """

    #: Training / scoring window in samples (64600 = ~4 s at 16 kHz). Used by data pipelines;
    #: the network itself accepts any length >= ``min_samples``.
    nb_samp: int = 64600
    #: Sinc filter length; an even value is forced odd (128 -> 129 taps), as upstream.
    first_conv: int = 128
    #: ``[n_sinc_filters, [in, out] of residual block 0, block 1, block 2, blocks 3-5]``.
    filts: tuple[int, tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] = (
        70,
        (1, 32),
        (32, 32),
        (32, 64),
        (64, 64),
    )
    #: ``[dim of the spectral/temporal GATs, dim of the heterogeneous GATs]``.
    gat_dims: tuple[int, int] = (64, 32)
    #: Upstream uses ``[0]`` for pool_S, ``[1]`` for pool_T, ``[2]`` for all four pools after the
    #: heterogeneous layers; ``[3]`` is read by nothing but kept so configs round-trip.
    pool_ratios: tuple[float, float, float, float] = (0.5, 0.7, 0.5, 0.5)
    #: Softmax temperatures: ``[0]`` GAT-S, ``[1]`` GAT-T, ``[2]`` every HS-GAL; ``[3]`` unused.
    temperatures: tuple[float, float, float, float] = (2.0, 2.0, 100.0, 100.0)
    sample_rate: int = 16000
    #: Random sinc-channel masking (upstream ``Freq_aug``); applied only in ``train()`` mode.
    freq_aug: bool = False
    #: Masked band width is drawn uniformly from ``0 .. freq_aug_max_width - 1`` channels.
    freq_aug_max_width: int = 20

    def __post_init__(self) -> None:
        # Accept lists (e.g. straight from the upstream JSON configs) but store tuples so the
        # frozen config is hashable and cannot be mutated behind a built model's back.
        filts = self.filts
        object.__setattr__(
            self, "filts", (int(filts[0]), *(tuple(int(c) for c in f) for f in filts[1:]))
        )
        for name in ("gat_dims", "pool_ratios", "temperatures"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.filts) != 5 or self.filts[1][0] != 1:
            raise ValueError(f"filts must be [n_filters, [1, c], [c, c'], ...]; got {self.filts}")
        for prev, nxt in zip(self.filts[1:-1], self.filts[2:], strict=True):
            if prev[1] != nxt[0]:
                raise ValueError(f"residual block channels do not chain: {self.filts}")
        if self.filts[4][0] != self.filts[4][1]:
            raise ValueError("blocks 3-5 repeat filts[4], so its in and out channels must match")
        if len(self.gat_dims) != 2 or len(self.pool_ratios) != 4 or len(self.temperatures) != 4:
            raise ValueError("gat_dims needs 2 entries, pool_ratios and temperatures 4 each")
        if self.filts[0] < 3:
            raise ValueError("need at least 3 sinc filters (the front end max-pools them by 3)")

    @classmethod
    def aasist(cls, **overrides: Any) -> AASISTConfig:
        """Official ``config/AASIST.conf`` (297k parameters). ``overrides`` replace fields,
        e.g. ``AASISTConfig.aasist(sample_rate=8000, nb_samp=32300)`` for telephone audio."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def aasist_l(cls, **overrides: Any) -> AASISTConfig:
        """Official ``config/AASIST-L.conf``: the 85k-parameter light variant."""
        light = cls(
            filts=(70, (1, 32), (32, 32), (32, 24), (24, 24)),
            gat_dims=(24, 32),
            pool_ratios=(0.4, 0.5, 0.7, 0.5),
        )
        return dataclasses.replace(light, **overrides)

    @property
    def min_samples(self) -> int:
        """Shortest input the network accepts (~0.15 s at 16 kHz): one encoder frame."""
        return _TIME_REDUCTION + self.sinc_taps - 1

    @property
    def sinc_taps(self) -> int:
        return self.first_conv + 1 if self.first_conv % 2 == 0 else self.first_conv

    @property
    def n_spectral_nodes(self) -> int:
        """Frequency rows left after the front end's 3x3 max-pool (23 for 70 filters).
        Upstream hard-codes 23 in ``pos_S``; deriving it keeps other filter counts usable."""
        return self.filts[0] // 3


def _xavier_parameter(*size: int) -> nn.Parameter:
    weight = nn.Parameter(torch.empty(*size))
    nn.init.xavier_normal_(weight)
    return weight


def _node_batch_norm(bn: nn.BatchNorm1d, x: Tensor) -> Tensor:
    """BatchNorm over the feature axis of ``(B, N, D)`` with batch and node axes pooled, which
    is what upstream's ``view(-1, D)`` does (one statistic per feature, not per node)."""
    return bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _pairwise_products(x: Tensor) -> Tensor:
    """``(B, N, D) -> (B, N, N, D)`` with entry ``[b, i, j] = x[b, i] * x[b, j]``: the edge
    features of the fully connected graph from which attention logits are scored."""
    return x.unsqueeze(2) * x.unsqueeze(1)


def _add_output_norm(layer: nn.Module, out_dim: int, temperature: float) -> None:
    """The tail both graph attention layers register last (official state_dict order): the
    BatchNorm of their output, the dropout of their input, and the attention temperature."""
    layer.bn = nn.BatchNorm1d(out_dim)
    layer.input_drop = nn.Dropout(p=0.2)
    layer.temperature = temperature


class GraphAttentionLayer(nn.Module):
    """Homogeneous graph attention (the GAT-S / GAT-T layers of the paper).

    Attention logits come from the element-wise product of every node pair, so the score
    matrix is symmetric; nodes are then updated with an attention-weighted sum plus a
    residual projection of themselves, followed by BatchNorm and SELU.
    """

    def __init__(self, in_dim: int, out_dim: int, temperature: float = 1.0) -> None:
        super().__init__()
        # Registration order = official state_dict order (own parameter first).
        self.att_weight = _xavier_parameter(out_dim, 1)
        self.att_proj = nn.Linear(in_dim, out_dim)
        self.proj_with_att = nn.Linear(in_dim, out_dim)
        self.proj_without_att = nn.Linear(in_dim, out_dim)
        _add_output_norm(self, out_dim, temperature)

    def attention(self, x: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, N)`` row-stochastic attention matrix: row ``i`` holds the
        weights node ``i`` gives its neighbours (upstream's softmax over ``dim=-2`` of the
        unsqueezed ``(B, N, N, 1)`` scores, i.e. over the neighbour axis)."""
        scores = torch.tanh(self.att_proj(_pairwise_products(x))) @ self.att_weight
        return F.softmax(scores.squeeze(-1) / self.temperature, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, N, in_dim) -> (B, N, out_dim)``."""
        x = self.input_drop(x)
        att = self.attention(x)
        x = self.proj_with_att(att @ x) + self.proj_without_att(x)
        return F.selu(_node_batch_norm(self.bn, x), inplace=True)


class HtrgGraphAttentionLayer(nn.Module):
    """Heterogeneous stacking graph attention layer (HS-GAL) with a master node.

    The temporal and spectral node sets are projected into a shared space and joined into one
    graph; edges inside each set and across the sets get their own attention vectors. A
    master node attends to all nodes and is updated alongside them (it skips BN/SELU).
    """

    def __init__(self, in_dim: int, out_dim: int, temperature: float = 1.0) -> None:
        super().__init__()
        # Registration order = official state_dict order.
        self.att_weight11 = _xavier_parameter(out_dim, 1)  # edges within set 1 (temporal)
        self.att_weight22 = _xavier_parameter(out_dim, 1)  # edges within set 2 (spectral)
        self.att_weight12 = _xavier_parameter(out_dim, 1)  # edges across sets, both directions
        self.att_weightM = _xavier_parameter(out_dim, 1)  # node -> master edges
        self.proj_type1 = nn.Linear(in_dim, in_dim)
        self.proj_type2 = nn.Linear(in_dim, in_dim)
        self.att_proj = nn.Linear(in_dim, out_dim)
        self.att_projM = nn.Linear(in_dim, out_dim)
        self.proj_with_att = nn.Linear(in_dim, out_dim)
        self.proj_without_att = nn.Linear(in_dim, out_dim)
        self.proj_with_attM = nn.Linear(in_dim, out_dim)
        self.proj_without_attM = nn.Linear(in_dim, out_dim)
        _add_output_norm(self, out_dim, temperature)

    def attention(self, x: Tensor, n1: int) -> Tensor:
        """``(B, N1 + N2, D) -> (B, N, N)`` attention with per-block attention vectors.

        Built by concatenating the four blocks (rather than writing into a zero board, as
        upstream does) so the graph stays free of in-place writes; values are the same.
        Row-stochastic, as in :meth:`GraphAttentionLayer.attention`.
        """
        h = torch.tanh(self.att_proj(_pairwise_products(x)))
        top = torch.cat([h[:, :n1, :n1] @ self.att_weight11, h[:, :n1, n1:] @ self.att_weight12], 2)
        bottom = torch.cat(
            [h[:, n1:, :n1] @ self.att_weight12, h[:, n1:, n1:] @ self.att_weight22], 2
        )
        scores = torch.cat([top, bottom], dim=1).squeeze(-1)
        return F.softmax(scores / self.temperature, dim=-1)

    def update_master(self, x: Tensor, master: Tensor) -> Tensor:
        """``x (B, N, D)``, ``master (B or 1, 1, D) -> (B, 1, out_dim)``."""
        scores = torch.tanh(self.att_projM(x * master)) @ self.att_weightM  # (B, N, 1)
        att = F.softmax(scores / self.temperature, dim=1)
        return self.proj_with_attM(att.transpose(1, 2) @ x) + self.proj_without_attM(master)

    def forward(self, x1: Tensor, x2: Tensor, master: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x1 (B, N1, in)``, ``x2 (B, N2, in)``, ``master (B or 1, 1, in)`` ->
        updated ``(x1 (B, N1, out), x2 (B, N2, out), master (B, 1, out))``.

        A master of batch size 1 (the learned initial node) broadcasts over the batch.
        """
        n1 = x1.shape[1]
        x = torch.cat([self.proj_type1(x1), self.proj_type2(x2)], dim=1)
        x = self.input_drop(x)
        att = self.attention(x, n1)
        master = self.update_master(x, master)
        x = self.proj_with_att(att @ x) + self.proj_without_att(x)
        x = F.selu(_node_batch_norm(self.bn, x), inplace=True)
        return x[:, :n1], x[:, n1:], master


class GraphPool(nn.Module):
    """Keep the top ``ratio`` of nodes by a learned sigmoid score (graph U-Net style pooling).

    Kept nodes are scaled by their score, which is what lets the scorer receive gradients.
    """

    def __init__(self, ratio: float, in_dim: int, p: float) -> None:
        super().__init__()
        self.ratio = ratio
        self.proj = nn.Linear(in_dim, 1)
        self.drop = nn.Dropout(p=p) if p > 0 else nn.Identity()

    def n_kept(self, n_nodes: int) -> int:
        # Same float product and truncation as upstream: e.g. 29 * 0.7 -> 20, never 0.
        return max(int(n_nodes * self.ratio), 1)

    def forward(self, h: Tensor) -> Tensor:
        """``(B, N, D) -> (B, n_kept(N), D)``, nodes ordered by descending score."""
        scores = torch.sigmoid(self.proj(self.drop(h)))  # (B, N, 1)
        _, idx = torch.topk(scores, self.n_kept(h.shape[1]), dim=1)
        return torch.gather(h * scores, 1, idx.expand(-1, -1, h.shape[-1]))


class ResidualBlock(nn.Module):
    """2-D residual block of the encoder: keeps the frequency axis, pools time by 3.

    Upstream: the official block computes ``selu(bn1(x))`` and then applies ``conv1`` to ``x``
    anyway, so ``bn1`` never affects the output. It is kept (its parameters are in the
    checkpoints) but not evaluated; skipping it only means its running statistics are not
    updated in training, and those are never read.
    """

    def __init__(self, channels: tuple[int, int], first: bool = False) -> None:
        super().__init__()
        c_in, c_out = channels
        self.first = first
        if not first:
            self.bn1 = nn.BatchNorm2d(c_in)
        # The (2, 3) kernels with padding (1, 1) then (0, 1) grow then restore the frequency
        # axis, so the block preserves it (23 spectral rows throughout).
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=(2, 3), padding=(1, 1))
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=(2, 3), padding=(0, 1))
        self.downsample = c_in != c_out
        if self.downsample:
            self.conv_downsample = nn.Conv2d(c_in, c_out, kernel_size=(1, 3), padding=(0, 1))
        self.mp = nn.MaxPool2d((1, 3))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, F, T) -> (B, C_out, F, T // 3)``."""
        out = F.selu(self.bn2(self.conv1(x)), inplace=True)
        out = self.conv2(out)
        identity = self.conv_downsample(x) if self.downsample else x
        return self.mp(out + identity)


class AASIST(nn.Module):
    """AASIST / AASIST-L anti-spoofing classifier on raw waveforms.

    ``forward(x (B, T)) -> logits (B, 2)`` ordered ``[spoof, bona fide]``; the official score
    is ``logits[:, 1]`` (raw logit, higher = more bona fide). The network is length-agnostic:
    the temporal graph simply gets more or fewer nodes (29 for the 4 s training window, 7 for
    1 s), so streaming code can score any window of at least ``config.min_samples`` samples.
    Input is float audio at ``config.sample_rate`` with no normalisation or pre-emphasis.
    """

    def __init__(self, config: AASISTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else AASISTConfig.aasist()
        filts, gat_dims = config.filts, config.gat_dims
        pool_ratios, temps = config.pool_ratios, config.temperatures
        enc_dim = filts[-1][-1]

        # Bare parameters are saved before any submodule, whatever the order of assignment.
        self.pos_S = nn.Parameter(torch.randn(1, config.n_spectral_nodes, enc_dim))
        self.master1 = nn.Parameter(torch.randn(1, 1, gat_dims[0]))
        self.master2 = nn.Parameter(torch.randn(1, 1, gat_dims[0]))

        # Fixed mel sinc bank, a non-persistent buffer (absent from the checkpoints). 129 taps
        # are cheaper as a direct convolution than through the FFT.
        self.conv_time = SincFilterBank(
            n_filters=filts[0],
            kernel_size=config.first_conv,
            sample_rate=config.sample_rate,
            method="direct",
        )
        self.first_bn = nn.BatchNorm2d(1)
        # Sequential-in-Sequential only to reproduce the official ``encoder.<i>.0.*`` keys.
        blocks = [ResidualBlock(filts[1], first=True), ResidualBlock(filts[2])]
        blocks += [ResidualBlock(filts[3])] + [ResidualBlock(filts[4]) for _ in range(3)]
        self.encoder = nn.Sequential(*(nn.Sequential(block) for block in blocks))

        self.GAT_layer_S = GraphAttentionLayer(enc_dim, gat_dims[0], temperature=temps[0])
        self.GAT_layer_T = GraphAttentionLayer(enc_dim, gat_dims[0], temperature=temps[1])
        self.HtrgGAT_layer_ST11 = HtrgGraphAttentionLayer(gat_dims[0], gat_dims[1], temps[2])
        self.HtrgGAT_layer_ST12 = HtrgGraphAttentionLayer(gat_dims[1], gat_dims[1], temps[2])
        self.HtrgGAT_layer_ST21 = HtrgGraphAttentionLayer(gat_dims[0], gat_dims[1], temps[2])
        self.HtrgGAT_layer_ST22 = HtrgGraphAttentionLayer(gat_dims[1], gat_dims[1], temps[2])

        self.pool_S = GraphPool(pool_ratios[0], gat_dims[0], 0.3)
        self.pool_T = GraphPool(pool_ratios[1], gat_dims[0], 0.3)
        self.pool_hS1 = GraphPool(pool_ratios[2], gat_dims[1], 0.3)
        self.pool_hT1 = GraphPool(pool_ratios[2], gat_dims[1], 0.3)
        self.pool_hS2 = GraphPool(pool_ratios[2], gat_dims[1], 0.3)
        self.pool_hT2 = GraphPool(pool_ratios[2], gat_dims[1], 0.3)

        self.drop_way = nn.Dropout(0.2)
        self.drop = nn.Dropout(0.5)
        self.out_layer = nn.Linear(5 * gat_dims[1], 2)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 2:
            raise ValueError(f"expected a waveform batch of shape (B, T), got {tuple(x.shape)}")
        if x.shape[-1] < self.config.min_samples:
            raise ValueError(
                f"input of {x.shape[-1]} samples is shorter than the {self.config.min_samples} "
                "the encoder needs for a single temporal node"
            )

    def _freq_mask(self, sinc_out: Tensor) -> Tensor:
        """Zero a random band of sinc channels (upstream ``Freq_aug``), one band per batch.

        Zeroing output channels equals zeroing those filters, without rebuilding the bank.
        """
        n_filters = sinc_out.shape[1]
        width = min(int(torch.randint(0, self.config.freq_aug_max_width, ())), n_filters)
        start = int(torch.randint(0, n_filters - width + 1, ()))
        keep = torch.ones(n_filters, 1, device=sinc_out.device, dtype=sinc_out.dtype)
        keep[start : start + width] = 0
        return sinc_out * keep

    def encode(self, x: Tensor) -> Tensor:
        """Waveform ``(B, T)`` -> encoder feature map ``(B, C, n_spectral_nodes, T')``,
        ``T' = ((T - taps + 1) // 3) // 3**6`` (29 for the 64600-sample window)."""
        self._check_input(x)
        h = self.conv_time(x.unsqueeze(1))  # (B, n_filters, T - taps + 1)
        if self.training and self.config.freq_aug:
            h = self._freq_mask(h)
        # |sinc output| max-pooled over 3 filters x 3 samples: a crude log-free spectrogram.
        h = F.max_pool2d(h.abs().unsqueeze(1), (3, 3))
        h = F.selu(self.first_bn(h), inplace=True)
        return self.encoder(h)

    def _branch(
        self,
        nodes_t: Tensor,
        nodes_s: Tensor,
        master: Tensor,
        first: HtrgGraphAttentionLayer,
        second: HtrgGraphAttentionLayer,
        pool_t: GraphPool,
        pool_s: GraphPool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """HS-GAL -> pool both node sets -> second HS-GAL added residually. The learned
        initial master has batch size 1 and simply broadcasts over the batch."""
        nodes_t, nodes_s, master = first(nodes_t, nodes_s, master)
        nodes_t, nodes_s = pool_t(nodes_t), pool_s(nodes_s)
        aug_t, aug_s, aug_m = second(nodes_t, nodes_s, master)
        return (
            self.drop_way(nodes_t + aug_t),
            self.drop_way(nodes_s + aug_s),
            self.drop_way(master + aug_m),
        )

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Waveform ``(B, T)`` -> ``(last_hidden (B, 5 * gat_dims[1]), logits (B, 2))``.

        ``last_hidden`` is the readout vector before dropout and ``out_layer`` (identical to
        upstream's first return value in eval mode), usable as an utterance embedding.
        """
        e = self.encode(x).abs()

        # Spectral graph: one node per frequency row (max over time) + learned position codes.
        e_s = e.amax(dim=3).transpose(1, 2) + self.pos_S
        out_s = self.pool_S(self.GAT_layer_S(e_s))
        # Temporal graph: one node per encoder frame (max over frequency).
        e_t = e.amax(dim=2).transpose(1, 2)
        out_t = self.pool_T(self.GAT_layer_T(e_t))

        # Two parallel branches of two stacked HS-GALs, each with its own learned master node,
        # combined by an element-wise max.
        t1, s1, m1 = self._branch(
            out_t,
            out_s,
            self.master1,
            self.HtrgGAT_layer_ST11,
            self.HtrgGAT_layer_ST12,
            self.pool_hT1,
            self.pool_hS1,
        )
        t2, s2, m2 = self._branch(
            out_t,
            out_s,
            self.master2,
            self.HtrgGAT_layer_ST21,
            self.HtrgGAT_layer_ST22,
            self.pool_hT2,
            self.pool_hS2,
        )
        nodes_t, nodes_s = torch.maximum(t1, t2), torch.maximum(s1, s2)
        master = torch.maximum(m1, m2)

        last_hidden = torch.cat(
            [
                nodes_t.abs().amax(dim=1),
                nodes_t.mean(dim=1),
                nodes_s.abs().amax(dim=1),
                nodes_s.mean(dim=1),
                master.squeeze(1),
            ],
            dim=1,
        )
        return last_hidden, self.out_layer(self.drop(last_hidden))

    def forward(self, x: Tensor) -> Tensor:
        """Waveform ``(B, T)`` -> logits ``(B, 2)``, ``[spoof, bona fide]``."""
        return self.forward_features(x)[1]


class AASISTScorer(LogitsScorer):
    """AASIST and AASIST-L checkpoints, official ones included (scored by their logits)."""

    architecture = "aasist"

    @classmethod
    def build(cls, model_config: dict[str, Any]) -> AASIST:
        return AASIST(AASISTConfig(**model_config))

    @classmethod
    def from_official(cls, state: dict[str, Any], device: torch.device,
                      dtype: torch.dtype) -> AASISTScorer | None:
        if "pos_S" not in state:
            return None
        # both variants open with 32 channels; their graph widths differ (64 and 24)
        width = state["pool_S.proj.weight"].shape[1]
        full = AASISTConfig.aasist()
        model = AASIST(full if width == full.gat_dims[0] else AASISTConfig.aasist_l())
        model.load_state_dict(state, strict=True)
        return cls(model, device, dtype)
