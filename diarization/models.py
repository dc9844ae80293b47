"""The diarizer's two networks, wrapped for streaming: pyannote's segmentation model
(PyanNet) and the GE2E voice embedding, loaded once per process and shared by all calls.

Why PyanNet's forward is re-implemented here (:meth:`DiarizationModels._sincnet` and
:meth:`DiarizationModels._heads`) instead of calling ``model(x)``: a streaming step re-reads a
5 s buffer of which four fifths were read the step before, and many calls step at once.
Calling the model whole would filter the whole buffer through the SincNet every step and run
each call's LSTM alone. Split in two, the SincNet keeps its filter outputs per call
(:class:`SincCache`: only the new samples are filtered), and the rest (LSTM, linear layers,
classifier) becomes one *pass* over many calls' features, batched across calls in this
process (:mod:`diarization.batching`) or sent to the Redis workers (:meth:`passes`). The
re-implementation reads pyannote.audio's PyanNet attributes (``sincnet.conv1d``,
``wav_norm1d``, ``pool1d``, ``norm1d``, ``lstm``, ``linear``, ``classifier``,
``activation``) as of the pinned pyannote.audio (requirements.txt): on an upgrade,
tests/test_diarization.py checks that the labels are still the model's own pass's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diarization.batching import ConcurrentBatcher
from diarization.embedding import ResemblyzerEmbedding
from diarization.paths import SEGMENTATION_CHECKPOINT

ModelPass = Callable[[list[torch.Tensor]], torch.Tensor]
"""Inputs of one shape -> a tensor with one leading row per input."""


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX): there the
    diarizer's LSTMs run about 3x faster in bfloat16; elsewhere bfloat16 is emulated and slower."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


PRECISIONS = ("auto", "fp32", "bf16")


class DiarizationModels:
    """The segmentation model and the embedding model, loaded once and shared by all calls.

    ``precision``: the dtype of the embedding network, GE2E's LSTM (two thirds of the
    diarizer's CPU in float32; its mel features stay float32). ``auto`` is bfloat16 where the
    CPU has it in hardware (:func:`native_bf16`): the embeddings of the dev calls' speakers
    then agree with float32 to a cosine of at least 0.998 (median 0.9999) at about a third of
    the LSTM's CPU. The segmentation model stays float32: in bfloat16 it labelled 8.6 % of
    the frames differently, for a sixth of its time.
    """

    def __init__(self, segmentation: Path = SEGMENTATION_CHECKPOINT,
                 precision: str = "auto") -> None:
        from pyannote.audio import Model
        from pyannote.audio.utils.powerset import Powerset

        seg = Model.from_pretrained(str(segmentation), map_location="cpu")
        if seg is None:
            raise FileNotFoundError(f"no segmentation checkpoint at {segmentation}")
        seg.eval()
        self.segmentation = seg
        spec = seg.specifications
        self.powerset = Powerset(len(spec.classes), spec.powerset_max_classes)
        self.chunk_seconds = float(spec.duration)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.bf16 = precision == "bf16" or (precision == "auto" and native_bf16())
        self.precision = "bf16" if self.bf16 else "fp32"
        self.embedding = ResemblyzerEmbedding(bf16=self.bf16)
        self.segmentation_path = segmentation
        self.head_batcher: ModelPass = ConcurrentBatcher(self._heads)
        self.remote = False

    def passes(self) -> tuple[ModelPass, ModelPass]:
        """The model passes of a streaming step that can run elsewhere (a Redis worker,
        ``python -m server.worker``): the segmentation model after its SincNet, over a
        buffer's features, and GE2E's LSTM over mel partials. Each maps a list of inputs of
        one shape to one output row per input. What stays with the call: the SincNet (its
        per-call cache, :class:`SincCache`), the mel features and every decision."""
        return self._heads, self.embedding._partial_embeddings

    def use(self, segmentation: ModelPass, embedding: ModelPass) -> None:
        """Run the two :meth:`passes` through these functions (the server's Redis queue:
        ``server.queue.redis_queue.RedisPass``) instead of in this process."""
        self.head_batcher = segmentation
        self.embedding.batcher = embedding
        self.remote = True

    def to(self, device: torch.device | str) -> DiarizationModels:
        """The networks of the :meth:`passes` on ``device`` (a worker's GPU)."""
        self.segmentation.to(device)
        self.embedding.to(device)
        return self

    @torch.inference_mode()
    def segment(self, audio16k: np.ndarray, cache: SincCache | None = None,
                shift: int = 0) -> np.ndarray:
        """(samples,) at 16 kHz -> (frames, local speakers) hard activations (0/1).

        ``cache``: the call's :class:`SincCache`, and ``shift`` the samples the buffer moved
        since the cached pass: only what is new goes through the sinc filters."""
        x = torch.from_numpy(audio16k)[None, None]
        if cache is None:
            probs = self.segmentation(x)
        else:  # concurrent calls' steps share the head's LSTM pass
            probs = self.head_batcher([self._sincnet(x, cache, shift)[0]])
        return self.powerset.to_multilabel(probs)[0].numpy()

    @cached_property
    def _sinc(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The sinc filters (fixed once trained), their tap sums, stride and padding."""
        encoder = self.segmentation.sincnet.conv1d[0]
        with torch.inference_mode():
            filters = encoder.get_filters().detach().clone()
        if getattr(encoder, "padding", 0) or filters.shape[1] != 1:
            raise ValueError("incremental sinc filtering expects one input channel, no padding")
        return filters, filters.sum(dim=(1, 2)), int(encoder.stride), filters.shape[-1]

    def _sincnet(self, x: torch.Tensor, cache: SincCache, shift: int) -> torch.Tensor:
        """``PyanNet.sincnet(x)`` with the first layer's filtering kept in ``cache``."""
        filters, tap_sums, stride, taps = self._sinc
        frames = (x.shape[-1] - taps) // stride + 1
        old = cache.raw
        if old is not None and shift % stride == 0 and old.shape[-1] == frames \
                and 0 < shift // stride < frames:
            kept = old[..., shift // stride :]
            start = kept.shape[-1] * stride
            raw = torch.cat((kept, F.conv1d(x[..., start:], filters, stride=stride)), dim=-1)
        else:
            raw = F.conv1d(x, filters, stride=stride)
        cache.raw = raw
        sincnet = self.segmentation.sincnet
        norm = sincnet.wav_norm1d  # InstanceNorm1d(1): (x - mean) / sqrt(var + eps) * w + b
        mean, var = x.mean(), x.var(unbiased=False)
        scale = norm.weight[0] / torch.sqrt(var + norm.eps) if norm.affine else \
            1 / torch.sqrt(var + norm.eps)
        offset = (norm.bias[0] if norm.affine else 0) - scale * mean
        out = (raw * scale).add_((offset * tap_sums)[None, :, None]).abs_()
        for c, (pool1d, norm1d) in enumerate(zip(sincnet.pool1d, sincnet.norm1d, strict=True)):
            if c:
                out = sincnet.conv1d[c](out)
            out = F.leaky_relu(norm1d(pool1d(out)))
        return out

    @torch.inference_mode()
    def _heads(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``PyanNet.forward`` after its SincNet (eval mode: dropout is identity) for several
        buffers' features (feature, frame), all of one length (5 s buffers)."""
        seg = self.segmentation
        out = torch.stack(features).transpose(1, 2)  # (batch, frame, feature)
        if seg.hparams.lstm["monolithic"]:
            out, _ = seg.lstm(out)
        else:
            for lstm in seg.lstm:
                out, _ = lstm(out)
        if seg.hparams.linear["num_layers"] > 0:
            for linear in seg.linear:
                out = F.leaky_relu(linear(out))
        return seg.activation(seg.classifier(out))

    @torch.inference_mode()
    def embed(self, audio16k: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """One embedding per mask column (frames, k) -> (k, 256); NaN rows: too little speech."""
        x = torch.from_numpy(audio16k)[None, None]
        return self.embedding(x, weights=torch.from_numpy(masks.T.copy())).numpy()


@dataclass
class SincCache:
    """One call's SincNet filterbank output over its buffer, kept between steps.

    Why: the segmentation model's first layer, 80 sinc filters of 251 taps at stride 10, was
    half of a segmentation pass (3.3 of 7.5 ms for a 5 s buffer) although four fifths of the
    buffer were filtered the step before. The filters are linear and the waveform
    normalisation before them is affine (an instance norm: one scale and one offset per
    buffer), so the filters run on the raw samples, only the new ones are filtered each step,
    and the normalisation is applied to the filter outputs: ``conv(a x + b) = a conv(x) +
    b sum(taps)``. Equal to the model's own pass up to float rounding (labels identical on
    99.9 % of the frames of the dev calls, tests/test_diarization.py).
    """

    raw: torch.Tensor | None = None  # (1, filters, frames) of the unnormalised buffer
