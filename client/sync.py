"""Blocking client."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Unpack

import grpc

from callshield.v1 import detection_pb2 as pb
from client.audio import StreamFileOptions, file_stream
from client.connection import BaseClient


class DetectionClient(BaseClient):
    """Blocking access to a callshield server.

    Example::

        from client import DetectionClient, verdict_name

        with DetectionClient("127.0.0.1:50051") as client:
            for response in client.stream_file("examples/spoof_call.wav", realtime=False):
                if response.HasField("summary"):
                    for v in response.summary.speakers:
                        print(v.speaker, verdict_name(v.state), v.spoof_probability)
    """

    def _open_channel(self) -> grpc.Channel:
        return self.connection.channel()

    def __enter__(self) -> DetectionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(
        self, config: pb.StreamConfig, audio: Iterable[bytes], timeout: float | None = None,
        *, wait_for_ready: bool = False,
    ) -> Iterator[pb.StreamDetectResponse]:
        """Send ``config`` then each audio chunk; yield responses as they come.

        Raises :class:`grpc.RpcError` with the server's status on failure. With
        ``wait_for_ready`` a server that is restarting is waited for (bound it with
        ``timeout``) instead of failing the call at once with UNAVAILABLE.
        """

        def requests() -> Iterator[pb.StreamDetectRequest]:
            yield pb.StreamDetectRequest(config=config)
            for chunk in audio:
                yield pb.StreamDetectRequest(audio=chunk)

        yield from self._stub.StreamDetect(
            requests(), metadata=self.connection.metadata(), timeout=timeout,
            wait_for_ready=wait_for_ready)

    def stream_file(
        self, path: str | Path, **options: Unpack[StreamFileOptions],
    ) -> Iterator[pb.StreamDetectResponse]:
        """Stream a WAV/FLAC file in chunks, paced like a live call when ``realtime``
        (keywords: :class:`client.audio.StreamFileOptions`)."""
        sent = file_stream(path, **options)
        if sent.pace_seconds is None:
            return self.stream(sent.config, sent.chunks)
        return self.stream(sent.config, paced(sent.chunks, sent.pace_seconds))

    def detect(self, audio: bytes, config: pb.StreamConfig | None = None,
               timeout: float | None = None) -> pb.DetectResponse:
        """Score a whole recording: WAV/FLAC bytes, or raw samples described by ``config``."""
        return self._stub.Detect(pb.DetectRequest(audio=audio, config=config),
                                 metadata=self.connection.metadata(), timeout=timeout)

    def detect_file(self, path: str | Path, *, split: bool = False) -> pb.DetectResponse:
        mode = pb.CHANNEL_MODE_SPLIT if split else pb.CHANNEL_MODE_MIXED
        return self.detect(Path(path).read_bytes(), pb.StreamConfig(channel_mode=mode))

    def get_model(self) -> pb.GetModelResponse:
        return self._stub.GetModel(pb.GetModelRequest(), metadata=self.connection.metadata())

    def reload_model(self, path: str = "", *, admin_token: str | None = None,
                     timeout: float | None = None) -> pb.ReloadModelResponse:
        """Admin: the server loads its model again, from ``path`` on the server's machine
        or, empty, from the path it serves, without dropping calls (windows being scored
        finish on the old model). Needs the server's admin token (``admin_token``, or the
        client's own token when None). Raises :class:`grpc.RpcError` FAILED_PRECONDITION,
        the old model still serving, when the file does not load or does not fit."""
        return self._stub.ReloadModel(  # type: ignore[no-any-return]
            pb.ReloadModelRequest(path=path),
            metadata=self.connection.admin_metadata(admin_token), timeout=timeout)

    def watch_calls(
        self, *, admin_token: str | None = None, include_windows: bool = False,
        timeout: float | None = None, flagged_audio_seconds: float = 0.0,
    ) -> Iterator[pb.WatchCallsResponse]:
        """The server's admin feed: the calls open now (``snapshot``), a ``ready`` marker,
        then every call's open, verdicts, alerts, [windows,] summary and close as they
        happen. Needs the server's admin token (``admin_token``, or the client's own token
        when None). Runs until cancelled (``.cancel()`` on the returned iterator), ``timeout``
        or a server restart (:class:`grpc.RpcError` UNAVAILABLE: reconnect).
        ``flagged_audio_seconds`` asks for each alert's audio (``flagged_audio`` events), sent
        only by a server started with ``--feed-flagged-audio``."""
        return self._stub.WatchCalls(  # type: ignore[no-any-return]
            pb.WatchCallsRequest(include_windows=include_windows,
                                 flagged_audio_seconds=flagged_audio_seconds),
            metadata=self.connection.admin_metadata(admin_token), timeout=timeout)


def paced(chunks: Iterable[bytes], seconds: float) -> Iterator[bytes]:
    """Release chunk ``i`` at ``i * seconds`` after the first, as a live call would."""
    t0 = time.monotonic()
    for i, chunk in enumerate(chunks):
        delay = t0 + i * seconds - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield chunk
