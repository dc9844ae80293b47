"""Configuration from the environment, one way for the server, the Redis worker and the plugins
(``server/config.py: EnvFlags``): every flag has its variable, a flag beats it, the worker's
scoped names beat the server's shared ones, and the names of before still work."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from plugins.__main__ import parser as plugins_parser
from server import worker
from server.config import parse_args as server_args
from server.config import parser as server_parser


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def _plugins_serve() -> argparse.ArgumentParser:
    commands = next(a for a in plugins_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


@pytest.mark.parametrize(("make", "prefix"), [
    (server_parser, "CALLSHIELD_"),
    (worker.parser, "CALLSHIELD_WORKER_"),
    (_plugins_serve, "CALLSHIELD_PLUGINS_"),
])
def test_every_flag_has_its_variable(
    make: Callable[[], argparse.ArgumentParser], prefix: str
) -> None:
    options = _options(make())
    assert len(options) >= 12
    for action in options:
        assert f"(env {prefix}{action.dest.upper()}" in (action.help or ""), action.dest


def test_server_reads_the_environment_and_a_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSHIELD_MAX_STREAMS", "17")
    monkeypatch.setenv("CALLSHIELD_DIARIZATION_STEP", "0.75")
    monkeypatch.setenv("CALLSHIELD_AUTH_TOKEN", "")  # empty: as if unset
    config = server_args([])
    assert (config.max_streams, config.diarization_step, config.auth_token) == (17, 0.75, "")
    assert server_args(["--max-streams", "3"]).max_streams == 3


def test_embedding_precision_is_a_flag_auto_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert server_args([]).diarization_precision == "auto"
    monkeypatch.setenv("CALLSHIELD_DIARIZATION_PRECISION", "fp32")
    assert server_args([]).diarization_precision == "fp32"
    assert server_args(["--diarization-precision", "bf16"]).diarization_precision == "bf16"


def test_a_bad_value_is_a_usage_error_naming_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CALLSHIELD_MAX_BATCH", "many")
    with pytest.raises(SystemExit) as exit_info:
        server_args([])
    assert exit_info.value.code == 2
    assert "--max-batch: invalid int value: 'many'" in capsys.readouterr().err


@pytest.mark.parametrize(("variable", "value"), [("CALLSHIELD_QUEUE", "foo"),
                                                  ("CALLSHIELD_DIARIZATION_PRECISION", "fp8")])
def test_a_value_outside_the_choices_is_a_usage_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str,
    value: str,
) -> None:
    # argparse checks choices on the command line only: unchecked, CALLSHIELD_QUEUE=foo
    # was taken silently.
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_info:
        server_args([])
    assert exit_info.value.code == 2
    assert f"{variable}='{value}': choose from" in capsys.readouterr().err


def test_worker_scoped_names_then_shared_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSHIELD_MAX_BATCH", "8")  # the server's, shared with the workers
    monkeypatch.setenv("CALLSHIELD_REDIS_URL", "redis://shared:6379/0")
    monkeypatch.setenv("CALLSHIELD_DEVICE", "cuda")  # the server's own: not the worker's
    monkeypatch.setenv("CALLSHIELD_METRICS_PORT", "9100")  # idem: no port clash on one host
    config, args = worker.parse_args([])
    assert (config.max_batch, config.redis_url, config.device, args.metrics_port) == (
        8, "redis://shared:6379/0", "auto", 0)
    for name, value in (("MAX_BATCH", "64"), ("DEVICE", "cpu"), ("METRICS_PORT", "9109"),
                        ("BLOCK_MS", "250"), ("MAX_ATTEMPTS", "5"), ("HEARTBEAT_TTL", "2.5"),
                        ("CONSUMER", "gpu-3"), ("THREADS", "2")):
        monkeypatch.setenv(f"CALLSHIELD_WORKER_{name}", value)
    config, args = worker.parse_args([])
    assert (config.max_batch, config.device, args.metrics_port, config.block_ms,
            config.max_attempts, config.heartbeat_ttl, config.consumer, args.threads) == (
        64, "cpu", 9109, 250, 5, 2.5, "gpu-3", 2)
    assert worker.parse_args(["--max-batch", "4"])[0].max_batch == 4


def test_worker_names_of_before_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSHIELD_CLAIM_IDLE_MS", "1500")
    monkeypatch.setenv("CALLSHIELD_REDIS_PREFIX", "tenant-a")
    config, args = worker.parse_args([])
    assert (config.claim_idle_ms, config.prefix) == (1500, "tenant-a")
    assert sorted(args.deprecated_env) == [
        ("CALLSHIELD_CLAIM_IDLE_MS", "CALLSHIELD_WORKER_CLAIM_IDLE_MS"),
        ("CALLSHIELD_REDIS_PREFIX", "CALLSHIELD_WORKER_PREFIX")]
    monkeypatch.setenv("CALLSHIELD_WORKER_PREFIX", "tenant-b")  # the current name wins
    assert worker.parse_args([])[0].prefix == "tenant-b"
