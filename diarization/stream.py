"""Streaming diarization: a rolling buffer, local segmentation and incremental clustering.

The design follows diart (Coria et al., 2021), written here because diart pins an older
pyannote.audio. Every ``step`` seconds the segmentation model reads the last ``buffer``
seconds and says which of up to three *local* speakers is active in each ~17 ms frame. Local
speakers are mapped to *global* ones (the labels the service reports) in two ways:

* a local speaker with at least ``min_embed_seconds`` of clean (non-overlapped) speech in the
  buffer gets a GE2E embedding and is matched to the global centroids (Hungarian assignment, so
  two local speakers never share a label); when it is farther than ``new_speaker_distance``
  from every centroid and has ``min_new_seconds`` of clean speech, it becomes a new speaker;
* otherwise it inherits the label of the local speaker it overlaps most in the previous
  buffer (the buffers share ``buffer - step`` seconds), which carries short turns and
  back-channel that are too short to embed.

Global labels are ``A``, ``B``, ... in order of creation, that is, of first confirmed speech,
and never change afterwards. Each step decides the audio up to ``latency`` seconds before
the buffer's end (frames at the very edge of a buffer have no right context and are the least
reliable), so audio reaches the spoof scorer one step plus ``latency`` after it arrives.
Memory per call is bounded: the buffer, one previous activation matrix and at most
``max_speakers`` centroids. CPU per step: one segmentation pass over the buffer (one 5 s
chunk) plus at most three embeddings over it.
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from diarization import MODEL_RATE
from diarization.batching import ConcurrentBatcher
from diarization.embedding import ResemblyzerEmbedding
from diarization.paths import SEGMENTATION_CHECKPOINT
from models.data.audio import StreamResampler

log = structlog.get_logger("callshield.diarization.stream")


@dataclass(frozen=True)
class StreamConfig:
    """Defaults chosen on ../shared/calls (dev): see diarization/MODEL_CARD.md."""

    buffer_seconds: float = 5.0
    # 1 s rather than 0.5 s: on the dev calls DER 19.5 % vs 20.3 %, speaker count right 9/10 vs
    # 8/10, all 7 spoof calls flagged vs 5 with no genuine voice flagged, at half the CPU (see
    # diarization/MODEL_CARD.md); audio reaches the scorer 0.5 s later
    step_seconds: float = 1.0
    latency_seconds: float = 1.0  # right context the decided frames get (model edges are weak)
    min_embed_seconds: float = 0.8  # clean speech for a trustworthy GE2E embedding
    # A local speaker is embedded from its most recent clean speech only (0: all of it in
    # the buffer). 3.2 s against all: DER 19.5 -> 13.9 % on the dev calls and 23.1 -> 20.7 %
    # on 24 simulated calls, spoof calls flagged 6/7 -> 7/7, no genuine voice flagged
    # (diarization/MODEL_CARD.md); the older frames sit near the buffer's left edge, where
    # the segmentation has the least context.
    embed_seconds: float = 3.2
    min_new_seconds: float = 2.0  # clean speech before a voice can become a new speaker
    new_speaker_distance: float = 0.25  # cosine distance to every centroid
    min_stitch_seconds: float = 0.2  # co-activity with the previous buffer to inherit a label
    max_speakers: int = 8
    centroid_update_seconds: float = 1.5  # only long clean stretches move a centroid


ModelPass = Callable[[list[torch.Tensor]], torch.Tensor]
"""Inputs of one shape -> a tensor with one leading row per input."""

_RESAMPLER_SLACK = 320  # 20 ms at 16 kHz: more than soxr's HQ filter ever releases at once


def most_recent(masks: np.ndarray, frames: int) -> np.ndarray:
    """(frames, k) 0/1 masks -> the same with only each column's last ``frames`` active
    frames kept."""
    from_end = np.cumsum(masks[::-1] > 0, axis=0)[::-1]
    return masks * (from_end <= frames)


def speaker_label(index: int) -> str:
    """A, B, ..., Z, AA, AB, ...: stable, short, and ordered by first speech."""
    letters = string.ascii_uppercase
    label = ""
    index += 1
    while index:
        index, r = divmod(index - 1, 26)
        label = letters[r] + label
    return label


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


@dataclass
class _Centroid:
    total: np.ndarray
    count: int = 1

    @property
    def unit(self) -> np.ndarray:
        return self.total / (np.linalg.norm(self.total) + 1e-9)


@dataclass
class StreamingDiarizer:
    """Diarization of one call; see the module docstring.

    It listens to audio at ``input_rate`` (resampled here, once, to the models' 16 kHz) and
    hands back audio and labels at ``output_rate`` (0: ``input_rate``). The two differ in the
    server: the diarizer hears the client's own rate, so a 16 or 48 kHz client keeps its
    4-8 kHz band for the voice embeddings, while the lanes get the spoof model's rate.
    """

    models: DiarizationModels
    input_rate: int
    config: StreamConfig = field(default_factory=StreamConfig)
    output_rate: int = 0

    def __post_init__(self) -> None:
        c = self.config
        self.output_rate = self.output_rate or self.input_rate
        self._resampler = StreamResampler(self.input_rate, MODEL_RATE)
        self._buffer = np.zeros(int(c.buffer_seconds * MODEL_RATE), np.float32)
        self._step = int(round(c.step_seconds * MODEL_RATE))
        self._pending16 = np.zeros(0, np.float32)  # 16 kHz audio not yet in the buffer
        self._pending_out = np.zeros(0, np.float32)  # output-rate audio not yet emitted
        self._received_out = 0  # output samples received
        self._emitted_out = 0  # output samples emitted (labelled) so far
        self._buffer_end = 0.0  # call time of the buffer's last sample
        self._last_labels: np.ndarray | None = None
        self._centroids: list[_Centroid] = []
        self._previous: tuple[np.ndarray, list[int | None]] | None = None
        self._sinc = SincCache()
        self.speakers: list[str] = []
        self.step_seconds_spent = 0.0

    # -- public -------------------------------------------------------------------------------

    def push(self, heard: np.ndarray,
             audio: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Feed the next stretch of the call: ``heard`` at ``input_rate`` (what is diarized)
        and the same stretch at ``output_rate`` (what is handed back; ``None``: ``heard``,
        when the two rates are one). Returns ``(audio, labels)`` per finished step, ``labels``
        a per-sample int array over the output-rate ``audio`` (-1: nobody or overlap, k:
        ``self.speakers[k]``), for the call time up to ``latency`` behind the newest step.

        The two streams are matched by call time, not by count: a resampler upstream may hold
        back a few samples of ``audio`` (its filter delay) and hand them over later."""
        heard = np.ascontiguousarray(heard, dtype=np.float32)
        if audio is None:
            if self.input_rate != self.output_rate:
                raise ValueError(f"audio at {self.output_rate} Hz is needed besides the "
                                 f"{self.input_rate} Hz heard")
            audio = heard
        self._pending_out = np.concatenate([self._pending_out, np.asarray(audio, np.float32)])
        self._received_out += audio.shape[0]
        up = self._resampler.push(heard[:, None])[0]
        self._pending16 = np.concatenate([self._pending16, up])
        out = []
        while self._pending16.shape[0] >= self._step:
            new, self._pending16 = self._pending16[: self._step], self._pending16[self._step :]
            self._buffer = np.concatenate([self._buffer[self._step :], new])
            self._buffer_end += self._step / MODEL_RATE
            labels = self._process(self._step)
            decided = self._buffer_end - self.config.latency_seconds
            out += self._emit(labels, decided)
        return out

    def step_due(self, samples: int) -> bool:
        """Whether hearing ``samples`` more input samples may complete a step (model
        inference); if not, :meth:`push` only resamples and copies. Errs towards yes: the
        resampler may release up to ``_RESAMPLER_SLACK`` more samples than the rate ratio
        says (its filter delay), and a step run where none was expected costs only time."""
        expected = self._pending16.shape[0] + samples * MODEL_RATE / self.input_rate
        return expected + _RESAMPLER_SLACK >= self._step

    def flush(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Everything not yet emitted, labelled by a last pass (the end of the call)."""
        n = self._pending16.shape[0]
        labels = self._last_labels
        if n:
            self._buffer = np.concatenate([self._buffer[n:], self._pending16])
            self._pending16 = np.zeros(0, np.float32)
            self._buffer_end += n / MODEL_RATE
            labels = self._process(n)
        if labels is None:
            labels = np.full(1, -1)
        return self._emit(labels, None)

    def _emit(self, frame_labels: np.ndarray,
              until: float | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Output-rate audio from the last emitted sample up to call time ``until`` (``None``:
        all received), each sample labelled by the buffer frame that covers it."""
        rate = self.output_rate
        target = self._received_out if until is None else min(int(until * rate),
                                                               self._received_out)
        n = target - self._emitted_out
        if n <= 0:
            return []
        chunk, self._pending_out = self._pending_out[:n], self._pending_out[n:]
        times = (self._emitted_out + np.arange(n)) / rate
        buffer_start = self._buffer_end - self.config.buffer_seconds
        frames = frame_labels.shape[0]
        idx = ((times - buffer_start) / self.config.buffer_seconds * frames).astype(int)
        self._emitted_out = target
        return [(chunk, frame_labels[np.clip(idx, 0, frames - 1)])]

    def _process(self, new_samples: int) -> np.ndarray:
        """Segment the buffer, map local to global speakers: a global label per frame (-1:
        silence, overlap or an unmapped local speaker)."""
        t0 = time.perf_counter()
        c = self.config
        active = self.models.segment(self._buffer, self._sinc, new_samples)  # (frames, k)
        frames, k = active.shape
        frame_seconds = c.buffer_seconds / frames
        before_call = c.buffer_seconds - self._buffer_end  # the zero padding of the first steps
        if before_call > 0:
            # the model can call digital silence speech; an embedding of it made a spurious
            # first label ("A" with ~1 s) on 9 of the 10 dev calls
            active[: int(np.ceil(before_call / frame_seconds))] = 0
        clean = active * (active.sum(axis=1) == 1)[:, None]
        clean_seconds = clean.sum(axis=0) * frame_seconds
        mapping: list[int | None] = [None] * k
        embeddable = [i for i in range(k) if clean_seconds[i] >= c.min_embed_seconds]
        if embeddable:
            masks = clean[:, embeddable]
            if c.embed_seconds > 0:
                masks = most_recent(masks, int(round(c.embed_seconds / frame_seconds)))
            emb = self.models.embed(self._buffer, masks.astype(np.float32))
            found = {i: e for i, e in zip(embeddable, emb, strict=True) if np.isfinite(e).all()}
            if found:
                mapping = self._assign(found, clean_seconds, mapping)
        stitched = self._stitch(active, new_samples, frame_seconds)
        taken = {m for m in mapping if m is not None}
        for i in range(k):  # too short to embed: carry the label of the previous buffer
            if mapping[i] is None and stitched[i] is not None and stitched[i] not in taken:
                mapping[i] = stitched[i]
                taken.add(stitched[i])
        self._previous = (active, mapping)
        labels = np.full(frames, -1)
        alone = active.sum(axis=1) == 1
        for i in range(k):
            if mapping[i] is not None:
                labels[(active[:, i] > 0) & alone] = mapping[i]
        self._last_labels = labels
        self.step_seconds_spent += time.perf_counter() - t0
        return labels

    def _stitch(self, active: np.ndarray, new_samples: int,
                frame_seconds: float) -> list[int | None]:
        """Labels inherited from the previous buffer: local speaker -> the global label of the
        previous local speaker it was active with longest in the shared stretch."""
        k = active.shape[1]
        mapping: list[int | None] = [None] * k
        if self._previous is None:
            return mapping
        prev_active, prev_map = self._previous
        shift = int(round(new_samples / MODEL_RATE / frame_seconds))
        n = min(active.shape[0] - shift, prev_active.shape[0] - shift)
        co = (active[:n].T @ prev_active[shift : shift + n]) * frame_seconds  # (k, k) seconds
        rows, cols = linear_sum_assignment(-co)
        for i, j in zip(rows, cols, strict=True):
            if co[i, j] >= self.config.min_stitch_seconds and prev_map[j] is not None:
                mapping[i] = prev_map[j]
        return mapping

    def _assign(self, found: dict[int, np.ndarray], clean_seconds: np.ndarray,
                mapping: list[int | None]) -> list[int | None]:
        """Embedding decisions: Hungarian matching of the embedded local speakers to the
        centroids; the unmatched ones far from every centroid and long enough become new
        speakers. Only long clean stretches that match well move a centroid."""
        c = self.config
        if self._centroids:
            cents = np.stack([x.unit for x in self._centroids])
            items = list(found.items())
            dist = 1 - np.stack([e for _, e in items]) @ cents.T
            for r, col in zip(*linear_sum_assignment(dist), strict=True):
                if dist[r, col] < c.new_speaker_distance:
                    i, e = items[r]
                    mapping[i] = int(col)
                    if clean_seconds[i] >= c.centroid_update_seconds:
                        self._centroids[col].total += e
                        self._centroids[col].count += 1
        for i, e in found.items():
            if mapping[i] is not None or clean_seconds[i] < c.min_new_seconds:
                continue
            if len(self._centroids) >= c.max_speakers:
                d = 1 - np.stack([x.unit for x in self._centroids]) @ e
                nearest = int(np.argmin(d))
                mapping[i] = None if nearest in mapping else nearest
                continue
            self._centroids.append(_Centroid(e.copy()))
            self.speakers.append(speaker_label(len(self.speakers)))
            mapping[i] = len(self._centroids) - 1
            log.debug("new speaker", speaker=self.speakers[-1], at=round(self._buffer_end, 2))
        return mapping


def diarize_stream(diarizer: StreamingDiarizer, audio: np.ndarray,
                   chunk_seconds: float = 0.1) -> list[tuple[float, float, str]]:
    """Run a whole recording through ``diarizer`` in ``chunk_seconds`` pieces (as a live call
    arrives) -> speech turns ``(start, end, label)``; for the benchmark and tests. ``audio``
    at the diarizer's ``input_rate``, which must be its ``output_rate``."""
    rate = diarizer.input_rate
    step = max(1, int(chunk_seconds * rate))
    labels = []
    for start in range(0, audio.shape[0], step):
        labels += [lab for _, lab in diarizer.push(audio[start : start + step])]
    labels += [lab for _, lab in diarizer.flush()]
    per_sample = np.concatenate(labels) if labels else np.zeros(0, int)
    return turns_from_labels(per_sample, rate, diarizer.speakers)


def turns_from_labels(labels: np.ndarray, rate: int,
                      speakers: Sequence[str]) -> list[tuple[float, float, str]]:
    turns = []
    change = np.flatnonzero(np.diff(labels)) + 1
    bounds = np.concatenate([[0], change, [labels.shape[0]]])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a and labels[a] >= 0:
            turns.append((a / rate, b / rate, speakers[labels[a]]))
    return turns
