"""asyncio client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import Unpack

import grpc

from callshield.v1 import detection_pb2 as pb
from client.audio import StreamFileOptions, file_stream
from client.connection import BaseClient


class AsyncDetectionClient(BaseClient):
    """asyncio access to a callshield server; one client serves many concurrent calls.

    Example::

        import asyncio
        from client import AsyncDetectionClient

        async def main() -> None:
            async with AsyncDetectionClient("127.0.0.1:50051") as client:
                async for response in client.stream_file("examples/bonafide_call.wav"):
                    if response.HasField("alert"):
                        print("spoof suspected:", response.alert.speaker)

        asyncio.run(main())

    A status the server sends while the client is still writing (say INVALID_ARGUMENT for a
    bad config) can surface here as INTERNAL "Internal error from Core": a known grpcio
    asyncio bug (grpc/grpc#36066); :class:`client.DetectionClient` reports it faithfully.
    """

    def _open_channel(self) -> grpc.aio.Channel:
        return self.connection.aio_channel()

    async def __aenter__(self) -> AsyncDetectionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, seconds: float) -> bool:
        """Whether the channel connects within ``seconds``: a long-lived client (a
        telephony plugin) waits out a detector restart this long instead of failing."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), seconds)
        except TimeoutError:
            return False
        return True

    async def stream(
        self, config: pb.StreamConfig, audio: AsyncIterable[bytes] | Iterable[bytes],
        *, wait_for_ready: bool = False,
    ) -> AsyncIterator[pb.StreamDetectResponse]:
        """Send ``config`` then each audio chunk; yield responses as they come.

        Raises :class:`grpc.aio.AioRpcError` with the server's status on failure; leaving
        the loop early cancels the call, which frees the stream on the server at once.
        Bound it with ``asyncio.timeout`` where needed. With ``wait_for_ready`` a server
        that is restarting is waited for instead of failing the call at once with
        UNAVAILABLE.
        """

        async def requests() -> AsyncIterator[pb.StreamDetectRequest]:
            yield pb.StreamDetectRequest(config=config)
            if isinstance(audio, AsyncIterable):
                async for chunk in audio:
                    yield pb.StreamDetectRequest(audio=chunk)
            else:
                for chunk in audio:
                    yield pb.StreamDetectRequest(audio=chunk)

        call = self._stub.StreamDetect(requests(), metadata=self.connection.metadata(),
                                       wait_for_ready=wait_for_ready)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def stream_file(
        self, path: str | Path, **options: Unpack[StreamFileOptions],
    ) -> AsyncIterator[pb.StreamDetectResponse]:
        """Stream a WAV/FLAC file in chunks, paced like a live call when ``realtime``
        (keywords: :class:`client.audio.StreamFileOptions`)."""
        sent = file_stream(path, **options)
        source: Iterable[bytes] | AsyncIterable[bytes] = sent.chunks
        if sent.pace_seconds is not None:
            source = _paced(sent.chunks, sent.pace_seconds)
        async for response in self.stream(sent.config, source):
            yield response

    async def detect(
        self, audio: bytes, config: pb.StreamConfig | None = None
    ) -> pb.DetectResponse:
        """Score a whole recording: WAV/FLAC bytes, or raw samples described by ``config``."""
        return await self._stub.Detect(pb.DetectRequest(audio=audio, config=config),
                                       metadata=self.connection.metadata())

    async def detect_file(self, path: str | Path, *, split: bool = False) -> pb.DetectResponse:
        mode = pb.CHANNEL_MODE_SPLIT if split else pb.CHANNEL_MODE_MIXED
        return await self.detect(Path(path).read_bytes(), pb.StreamConfig(channel_mode=mode))

    async def get_model(self) -> pb.GetModelResponse:
        return await self._stub.GetModel(pb.GetModelRequest(),
                                         metadata=self.connection.metadata())

    async def reload_model(self, path: str = "", *, admin_token: str | None = None,
                           ) -> pb.ReloadModelResponse:
        """Admin: the server loads its model again (see
        :meth:`client.DetectionClient.reload_model`)."""
        return await self._stub.ReloadModel(
            pb.ReloadModelRequest(path=path),
            metadata=self.connection.admin_metadata(admin_token))

    async def watch_calls(
        self, *, admin_token: str | None = None, include_windows: bool = False,
        flagged_audio_seconds: float = 0.0,
    ) -> AsyncIterator[pb.WatchCallsResponse]:
        """The server's admin feed (see :meth:`client.DetectionClient.watch_calls`);
        leaving the loop cancels the watch. Raises :class:`grpc.aio.AioRpcError` when the
        server refuses it (UNAUTHENTICATED, PERMISSION_DENIED) or goes away (UNAVAILABLE)."""
        call = self._stub.WatchCalls(
            pb.WatchCallsRequest(include_windows=include_windows,
                                 flagged_audio_seconds=flagged_audio_seconds),
            metadata=self.connection.admin_metadata(admin_token))
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()


async def _paced(chunks: Iterable[bytes], seconds: float) -> AsyncIterator[bytes]:
    t0 = time.monotonic()
    for i, chunk in enumerate(chunks):
        delay = t0 + i * seconds - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield chunk
