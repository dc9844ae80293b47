"""Augmentation configs: one frozen dataclass per part, built from a training config's
``augment:`` mapping (YAML) by :meth:`AugmentConfig.from_dict`.

The fields' types say how a YAML value is read (a list becomes a tuple, a number the
field's type) and most of what is valid: a ``Range`` is ``[min, max]`` with min <= max, a
tuple of a ``Literal`` takes only those names, a tuple is never empty; bounds are in the
field's metadata (:func:`_bounded`). ``__post_init__`` checks all that, so a config built
in Python is checked the same as one read from YAML, and a part adds only the checks that
relate two fields. Messages name the YAML path (``noise.snr_db``) so a bad training config
points at its own line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

from models.data.augment.channel import NOISE_COLORS

Range = tuple[float, float]
G711Law = Literal["mulaw", "alaw"]
SoxrQuality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]
NoiseColor = Literal["white", "pink", "brown"]
assert set(get_args(NoiseColor)) == set(NOISE_COLORS)


def _bounded(default: Any, ge: float = -math.inf, le: float = math.inf, gt: bool = False) -> Any:
    """A field whose value (or every item, or both ends of a ``Range``) lies in
    ``[ge, le]`` (``(ge, le]`` when ``gt``)."""
    return field(default=default, metadata={"bounds": (ge, le, gt)})


def _items(hint: Any) -> tuple[Any, ...]:
    return tuple(a for a in get_args(hint) if a is not Ellipsis)


@dataclass(frozen=True)
class Part:
    """Base of the per-part configs: ``p`` is the probability of applying the part;
    ``section`` is the part's key in the ``augment:`` mapping."""

    section: ClassVar[str] = ""
    p: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"{self.section}.p must be in [0, 1], got {self.p}")
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            self._check(f"{self.section}.{f.name}", hints[f.name], getattr(self, f.name),
                        f.metadata.get("bounds"))

    @staticmethod
    def _check(name: str, hint: Any, value: Any, bounds: tuple[float, float, bool] | None,
               ) -> None:
        ge, le, gt = bounds or (-math.inf, math.inf, False)
        if hint == Range:
            if len(value) != 2 or not ge <= value[0] <= value[1] <= le:
                within = f"{ge:g} <= min <= max" + (f" <= {le:g}" if le < math.inf else "")
                raise ValueError(f"{name} must be [min, max] with {within}, got {value}")
            return
        values = value if get_origin(hint) is tuple else (value,)
        if get_origin(hint) is tuple:
            if not values:
                raise ValueError(f"{name} must not be empty")
            (item,) = _items(hint)
            if get_origin(item) is Literal:
                bad = [v for v in values if v not in get_args(item)]
                if bad:
                    raise ValueError(f"{name}: unknown {bad}; allowed {list(get_args(item))}")
        if bounds is not None and any((v <= ge if gt else v < ge) or v > le for v in values):
            if le == math.inf:
                raise ValueError(f"{name} must be {'>' if gt else '>='} {ge:g}, got {value}")
            raise ValueError(f"{name} must be in [{ge:g}, {le:g}], got {value}")


@dataclass(frozen=True)
class G711Config(Part):
    """G.711 round trip with a law drawn uniformly from ``laws``."""

    section: ClassVar[str] = "g711"
    p: float = 0.5
    laws: tuple[G711Law, ...] = ("mulaw", "alaw")


@dataclass(frozen=True)
class BandLimitConfig(Part):
    """Telephone band 300-3400 Hz with jittered edges (Butterworth HP + LP of ``order``)."""

    section: ClassVar[str] = "band_limit"
    p: float = 0.5
    low_hz: Range = _bounded((200.0, 400.0), 1.0)
    high_hz: Range = _bounded((3000.0, 3600.0), 1.0)
    order: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low_hz[1] >= self.high_hz[0]:
            raise ValueError("band_limit: low_hz must lie entirely below high_hz")
        if self.order < 2 or self.order % 2:
            raise ValueError(f"band_limit.order must be even and >= 2, got {self.order}")


@dataclass(frozen=True)
class ResampleConfig(Part):
    """Round trip through ``sample_rate * ratio`` (ratio and soxr quality drawn uniformly).

    Defaults at 8 kHz: 6k, 7k, 11.025k, 16k.
    """

    section: ClassVar[str] = "resample"
    p: float = 0.25
    ratios: tuple[float, ...] = _bounded((0.75, 0.875, 1.378125, 2.0), 0.0, gt=True)
    qualities: tuple[SoxrQuality, ...] = ("LQ", "MQ", "HQ")


@dataclass(frozen=True)
class PacketLossConfig(Part):
    """Independent packet losses; zeroed, or repeated with probability ``repeat_prob``."""

    section: ClassVar[str] = "packet_loss"
    p: float = 0.1
    loss_rate: Range = _bounded((0.01, 0.1), 0.0, 1.0)
    frame_ms: tuple[float, ...] = _bounded((10.0, 20.0, 30.0, 40.0), 0.0, gt=True)
    repeat_prob: float = _bounded(0.5, 0.0, 1.0)


@dataclass(frozen=True)
class NoiseConfig(Part):
    """Additive Gaussian noise of a colour drawn from ``colors`` at a uniform SNR in dB."""

    section: ClassVar[str] = "noise"
    p: float = 0.3
    snr_db: Range = (10.0, 40.0)
    colors: tuple[NoiseColor, ...] = ("white", "pink", "brown")


@dataclass(frozen=True)
class GainConfig(Part):
    """Uniform gain in dB, saturating at full scale."""

    section: ClassVar[str] = "gain"
    p: float = 0.5
    gain_db: Range = (-10.0, 6.0)


@dataclass(frozen=True)
class NotchBank(Part):
    """Shared RawBoost filter parameters, in physical units.

    The official 16 kHz defaults are 10-100 taps (0.625-6.25 ms) and centres 20-8000 Hz;
    keeping ms and Hz gives the same filter shapes at 8 kHz, with centres clipped to Nyquist.
    """

    n_bands: int = _bounded(5, 1)
    center_hz: Range = _bounded((20.0, 8000.0), 0.0)
    bandwidth_hz: Range = _bounded((100.0, 1000.0), 0.0)
    taps_ms: Range = _bounded((0.625, 6.25), 0.0)
    gain_db: Range = (0.0, 0.0)


@dataclass(frozen=True)
class LnLConfig(NotchBank):
    """RawBoost 1. ``nonlinear_gain_db`` is the official gain range minus its 5..20 dB bias."""

    section: ClassVar[str] = "rawboost_lnl"
    p: float = 0.25
    nonlinear_gain_db: Range = (-20.0, -5.0)
    n_powers: int = _bounded(5, 1)


@dataclass(frozen=True)
class ISDConfig(Part):
    """RawBoost 2: up to ``max_rate_percent`` % of samples get impulses of ``g_sd * x``."""

    section: ClassVar[str] = "rawboost_isd"
    p: float = 0.1
    max_rate_percent: float = _bounded(10.0, 0.0, 100.0)
    g_sd: float = 2.0


@dataclass(frozen=True)
class SSIConfig(NotchBank):
    """RawBoost 3: filtered white noise at a uniform SNR."""

    section: ClassVar[str] = "rawboost_ssi"
    p: float = 0.25
    snr_db: Range = (10.0, 40.0)


def _read(hint: Any, value: Any, where: str) -> Any:
    """A YAML value as the field's type: a list as a tuple of its item type, a number as
    ``float`` or ``int``, a name as ``str``."""
    if get_origin(hint) is tuple:
        if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
            raise TypeError(f"{where} must be a list, got {value!r}")
        item = _items(hint)[0]
        return tuple(_read(item, v, where) for v in value)
    if get_origin(hint) is Literal:
        return str(value)
    return hint(value)


def _part_from_dict(cls: type[Part], values: dict[str, Any] | None) -> Part:
    """One part's config from its mapping; unknown keys are an error (a typo would
    otherwise silently train with the default)."""
    name = cls.section
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise TypeError(f"augment.{name} must be a mapping, got {type(values).__name__}")
    types = get_type_hints(cls)
    hints = {f.name: types[f.name] for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in augment.{name}; expected some of {sorted(hints)}"
        )
    return cls(**{k: _read(hints[k], v, f"augment.{name}.{k}") for k, v in values.items()})


@dataclass(frozen=True)
class AugmentConfig:
    """All augmentation parts, one sub-config each (see ``models.data.augment`` for YAML)."""

    g711: G711Config = field(default_factory=G711Config)
    band_limit: BandLimitConfig = field(default_factory=BandLimitConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    packet_loss: PacketLossConfig = field(default_factory=PacketLossConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    gain: GainConfig = field(default_factory=GainConfig)
    rawboost_lnl: LnLConfig = field(default_factory=LnLConfig)
    rawboost_isd: ISDConfig = field(default_factory=ISDConfig)
    rawboost_ssi: SSIConfig = field(default_factory=SSIConfig)

    _PARTS: ClassVar[dict[str, type[Part]]]  # section -> config class, set below

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AugmentConfig:
        """Build from a training-config mapping; missing parts/keys keep their defaults."""
        d = d or {}
        if not isinstance(d, dict):
            raise TypeError(f"augment config must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls._PARTS))
        if unknown:
            raise ValueError(
                f"unknown augmentation part(s) {unknown}; expected some of {sorted(cls._PARTS)}"
            )
        return cls(**{name: _part_from_dict(cls._PARTS[name], d[name]) for name in d})

    @classmethod
    def disabled(cls) -> AugmentConfig:
        """Every part off: a base to switch single parts on (evaluation, tests)."""
        return cls.from_dict({name: {"p": 0.0} for name in cls._PARTS})


AugmentConfig._PARTS = {
    f.name: f.default_factory for f in dataclasses.fields(AugmentConfig)  # type: ignore[misc]
}
assert all(part.section == name for name, part in AugmentConfig._PARTS.items())
