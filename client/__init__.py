"""callshield client SDK: stream call audio to the detection service, read verdicts.

* :class:`DetectionClient`: blocking API (threads, scripts);
* :class:`AsyncDetectionClient`: asyncio API (services, many concurrent calls);
* ``client`` command line: :mod:`client.cli`.
"""

from client.aio import AsyncDetectionClient
from client.audio import AudioFile, read_audio
from client.events import event_to_dict, verdict_name
from client.sync import DetectionClient

__all__ = [
    "AsyncDetectionClient", "AudioFile", "DetectionClient", "event_to_dict", "read_audio",
    "verdict_name",
]
