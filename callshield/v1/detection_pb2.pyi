from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_LINEAR16: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_MULAW: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_ALAW: _ClassVar[AudioEncoding]

class ChannelMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANNEL_MODE_UNSPECIFIED: _ClassVar[ChannelMode]
    CHANNEL_MODE_MIXED: _ClassVar[ChannelMode]
    CHANNEL_MODE_SPLIT: _ClassVar[ChannelMode]

class SpeakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPEAKER_STATE_UNSPECIFIED: _ClassVar[SpeakerState]
    SPEAKER_STATE_UNKNOWN: _ClassVar[SpeakerState]
    SPEAKER_STATE_LIKELY_BONAFIDE: _ClassVar[SpeakerState]
    SPEAKER_STATE_SPOOF_SUSPECTED: _ClassVar[SpeakerState]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
AUDIO_ENCODING_LINEAR16: AudioEncoding
AUDIO_ENCODING_MULAW: AudioEncoding
AUDIO_ENCODING_ALAW: AudioEncoding
CHANNEL_MODE_UNSPECIFIED: ChannelMode
CHANNEL_MODE_MIXED: ChannelMode
CHANNEL_MODE_SPLIT: ChannelMode
SPEAKER_STATE_UNSPECIFIED: SpeakerState
SPEAKER_STATE_UNKNOWN: SpeakerState
SPEAKER_STATE_LIKELY_BONAFIDE: SpeakerState
SPEAKER_STATE_SPOOF_SUSPECTED: SpeakerState

class StreamConfig(_message.Message):
    __slots__ = ("encoding", "sample_rate_hz", "channels", "channel_mode", "call_id", "party_labels", "window_seconds", "hop_seconds", "interim_results", "alert_threshold", "platform")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_MODE_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    PARTY_LABELS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HOP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    ALERT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate_hz: int
    channels: int
    channel_mode: ChannelMode
    call_id: str
    party_labels: _containers.RepeatedScalarFieldContainer[str]
    window_seconds: float
    hop_seconds: float
    interim_results: bool
    alert_threshold: float
    platform: str
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ..., channels: _Optional[int] = ..., channel_mode: _Optional[_Union[ChannelMode, str]] = ..., call_id: _Optional[str] = ..., party_labels: _Optional[_Iterable[str]] = ..., window_seconds: _Optional[float] = ..., hop_seconds: _Optional[float] = ..., interim_results: _Optional[bool] = ..., alert_threshold: _Optional[float] = ..., platform: _Optional[str] = ...) -> None: ...

class StreamDetectRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    audio: bytes
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class WindowResult(_message.Message):
    __slots__ = ("start_seconds", "end_seconds", "speaker", "spoof_probability", "model")
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    END_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    SPOOF_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    start_seconds: float
    end_seconds: float
    speaker: str
    spoof_probability: float
    model: str
    def __init__(self, start_seconds: _Optional[float] = ..., end_seconds: _Optional[float] = ..., speaker: _Optional[str] = ..., spoof_probability: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...

class SpeakerVerdict(_message.Message):
    __slots__ = ("speaker", "spoof_probability", "state", "speech_seconds", "speech")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    SPOOF_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEECH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPEECH_FIELD_NUMBER: _ClassVar[int]
    speaker: str
    spoof_probability: float
    state: SpeakerState
    speech_seconds: float
    speech: _containers.RepeatedCompositeFieldContainer[TimeRange]
    def __init__(self, speaker: _Optional[str] = ..., spoof_probability: _Optional[float] = ..., state: _Optional[_Union[SpeakerState, str]] = ..., speech_seconds: _Optional[float] = ..., speech: _Optional[_Iterable[_Union[TimeRange, _Mapping]]] = ...) -> None: ...

class TimeRange(_message.Message):
    __slots__ = ("start_seconds", "end_seconds")
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    END_SECONDS_FIELD_NUMBER: _ClassVar[int]
    start_seconds: float
    end_seconds: float
    def __init__(self, start_seconds: _Optional[float] = ..., end_seconds: _Optional[float] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("speaker", "start_seconds", "end_seconds", "spoof_probability")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    END_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPOOF_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    speaker: str
    start_seconds: float
    end_seconds: float
    spoof_probability: float
    def __init__(self, speaker: _Optional[str] = ..., start_seconds: _Optional[float] = ..., end_seconds: _Optional[float] = ..., spoof_probability: _Optional[float] = ...) -> None: ...

class StreamSummary(_message.Message):
    __slots__ = ("call_id", "speakers", "audio_seconds", "windows_scored", "windows_unscored")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_SCORED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_UNSCORED_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    speakers: _containers.RepeatedCompositeFieldContainer[SpeakerVerdict]
    audio_seconds: float
    windows_scored: int
    windows_unscored: int
    def __init__(self, call_id: _Optional[str] = ..., speakers: _Optional[_Iterable[_Union[SpeakerVerdict, _Mapping]]] = ..., audio_seconds: _Optional[float] = ..., windows_scored: _Optional[int] = ..., windows_unscored: _Optional[int] = ...) -> None: ...

class StreamDetectResponse(_message.Message):
    __slots__ = ("window", "verdict", "alert", "summary")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    window: WindowResult
    verdict: SpeakerVerdict
    alert: Alert
    summary: StreamSummary
    def __init__(self, window: _Optional[_Union[WindowResult, _Mapping]] = ..., verdict: _Optional[_Union[SpeakerVerdict, _Mapping]] = ..., alert: _Optional[_Union[Alert, _Mapping]] = ..., summary: _Optional[_Union[StreamSummary, _Mapping]] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("audio", "config")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    audio: bytes
    config: StreamConfig
    def __init__(self, audio: _Optional[bytes] = ..., config: _Optional[_Union[StreamConfig, _Mapping]] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("windows", "summary")
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    windows: _containers.RepeatedCompositeFieldContainer[WindowResult]
    summary: StreamSummary
    def __init__(self, windows: _Optional[_Iterable[_Union[WindowResult, _Mapping]]] = ..., summary: _Optional[_Union[StreamSummary, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("scale", "bias")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    scale: float
    bias: float
    def __init__(self, scale: _Optional[float] = ..., bias: _Optional[float] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("name", "version", "architecture", "sample_rate_hz", "window_seconds", "calibration")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    architecture: str
    sample_rate_hz: int
    window_seconds: float
    calibration: Calibration
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., architecture: _Optional[str] = ..., sample_rate_hz: _Optional[int] = ..., window_seconds: _Optional[float] = ..., calibration: _Optional[_Union[Calibration, _Mapping]] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("model", "previous", "path", "queue")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    model: GetModelResponse
    previous: GetModelResponse
    path: str
    queue: str
    def __init__(self, model: _Optional[_Union[GetModelResponse, _Mapping]] = ..., previous: _Optional[_Union[GetModelResponse, _Mapping]] = ..., path: _Optional[str] = ..., queue: _Optional[str] = ...) -> None: ...

class WatchCallsRequest(_message.Message):
    __slots__ = ("include_windows", "flagged_audio_seconds")
    INCLUDE_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    include_windows: bool
    flagged_audio_seconds: float
    def __init__(self, include_windows: _Optional[bool] = ..., flagged_audio_seconds: _Optional[float] = ...) -> None: ...

class CallOpened(_message.Message):
    __slots__ = ("platform", "speakers", "channel_mode", "alert_threshold", "model", "rpc", "opened_at")
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_MODE_FIELD_NUMBER: _ClassVar[int]
    ALERT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RPC_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_FIELD_NUMBER: _ClassVar[int]
    platform: str
    speakers: _containers.RepeatedScalarFieldContainer[str]
    channel_mode: ChannelMode
    alert_threshold: float
    model: str
    rpc: str
    opened_at: float
    def __init__(self, platform: _Optional[str] = ..., speakers: _Optional[_Iterable[str]] = ..., channel_mode: _Optional[_Union[ChannelMode, str]] = ..., alert_threshold: _Optional[float] = ..., model: _Optional[str] = ..., rpc: _Optional[str] = ..., opened_at: _Optional[float] = ...) -> None: ...

class CallClosed(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: str
    def __init__(self, status: _Optional[str] = ...) -> None: ...

class WatchCallsResponse(_message.Message):
    __slots__ = ("stream_id", "call_id", "server_time", "snapshot", "opened", "window", "verdict", "alert", "summary", "closed", "ready", "flagged_audio")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_AUDIO_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    call_id: str
    server_time: float
    snapshot: bool
    opened: CallOpened
    window: WindowResult
    verdict: SpeakerVerdict
    alert: Alert
    summary: StreamSummary
    closed: CallClosed
    ready: WatchReady
    flagged_audio: FlaggedAudio
    def __init__(self, stream_id: _Optional[str] = ..., call_id: _Optional[str] = ..., server_time: _Optional[float] = ..., snapshot: _Optional[bool] = ..., opened: _Optional[_Union[CallOpened, _Mapping]] = ..., window: _Optional[_Union[WindowResult, _Mapping]] = ..., verdict: _Optional[_Union[SpeakerVerdict, _Mapping]] = ..., alert: _Optional[_Union[Alert, _Mapping]] = ..., summary: _Optional[_Union[StreamSummary, _Mapping]] = ..., closed: _Optional[_Union[CallClosed, _Mapping]] = ..., ready: _Optional[_Union[WatchReady, _Mapping]] = ..., flagged_audio: _Optional[_Union[FlaggedAudio, _Mapping]] = ...) -> None: ...

class FlaggedAudio(_message.Message):
    __slots__ = ("speaker", "start_seconds", "end_seconds", "alert_start_seconds", "alert_end_seconds", "sample_rate_hz", "audio")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    END_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALERT_START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALERT_END_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    speaker: str
    start_seconds: float
    end_seconds: float
    alert_start_seconds: float
    alert_end_seconds: float
    sample_rate_hz: int
    audio: bytes
    def __init__(self, speaker: _Optional[str] = ..., start_seconds: _Optional[float] = ..., end_seconds: _Optional[float] = ..., alert_start_seconds: _Optional[float] = ..., alert_end_seconds: _Optional[float] = ..., sample_rate_hz: _Optional[int] = ..., audio: _Optional[bytes] = ...) -> None: ...

class WatchReady(_message.Message):
    __slots__ = ("open_calls", "server_started_at", "flagged_audio_seconds")
    OPEN_CALLS_FIELD_NUMBER: _ClassVar[int]
    SERVER_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    open_calls: int
    server_started_at: float
    flagged_audio_seconds: float
    def __init__(self, open_calls: _Optional[int] = ..., server_started_at: _Optional[float] = ..., flagged_audio_seconds: _Optional[float] = ...) -> None: ...
