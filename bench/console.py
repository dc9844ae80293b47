"""``python -m bench.console``: the fraud-desk console watching live calls through the shipped
``make run`` server: event delay server -> browser, and the server's CPU with and without the
feed. ``python -m bench.console --screenshot PATH``: the call page of the example spoof call,
for the README.

The server is started as ``make run`` starts it (its flags read from the Makefile, as
``bench.service`` does), plus an admin token (the feed's). Each round streams ``--calls``
concurrent real-time calls (``bench.service``'s audio and driver: 100 ms chunks at real-time
pace, one gRPC channel per call, starts staggered over one hop) twice: once with nobody
watching, once with ``python -m console`` (its own process, SQLite database) watching and a
headless Debian chromium (Selenium) showing the calls page. The page itself measures the
delay of every server-sent event it receives that carries the server's time (window scores
and call updates): ``Date.now()`` when its ``EventSource`` hands the message over, minus the
time the server stamped on the event (``WatchCallsResponse.server_time``; same host, one
clock). That spans the whole path: server -> gRPC feed -> the console's database write ->
server-sent events -> the browser's JavaScript.

CPU: the server process's user+system CPU seconds over each trial (``/proc``), divided by the
trial's wall time: cores used. The console's and chromium's own CPU is reported beside it
(they share the machine with the server in this set-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from bench import page
from bench.service.audio import AudioPool
from bench.service.driver import PATTERNS, Run, pct, trial, warm_up
from bench.service.report import machine
from bench.service.stack import make_stack
from devstack import ROOT, ChromiumMissing, Stack, child_env, free_port
from devstack import chromium as headless_chromium

RESULTS = ROOT / "bench" / "results"
EXAMPLES = ROOT / "examples"
PASSWORD = "bench-password-not-secret"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- CPU from /proc --------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) of ``pid``; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and every live descendant (chromium's many processes)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents[int(entry.name)], cpu[int(entry.name)] = st
    total, todo = 0.0, [root]
    seen = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += cpu.get(pid, 0.0)
        todo += [child for child, parent in parents.items() if parent == pid]
    return total


def process_cpu(pid: int) -> float:
    st = _stat(pid)
    return st[1] if st else 0.0


# --- the console and the browser ------------------------------------------------------------


class ConsoleProcess:
    """``python -m console`` in its own process, watching ``target``."""

    def __init__(self, target: str, token: str, workdir: Path, *,
                 keep_flagged_audio: float = 0.0) -> None:
        from console.users import hash_password

        users = workdir / "users.txt"
        users.write_text(f"bench:analyst:{hash_password(PASSWORD)}\n")
        users.chmod(0o600)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "console.log").open("wb")
        cmd = [sys.executable, "-m", "console", "--listen", f"127.0.0.1:{self.port}",
               "--server", target, "--users", str(users),
               "--db", f"sqlite:///{workdir / 'console.db'}", "--log-level", "warning"]
        if keep_flagged_audio:
            cmd += ["--keep-flagged-audio", str(keep_flagged_audio)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=child_env() | {"CALLSHIELD_ADMIN_TOKEN": token})
        deadline = time.monotonic() + 60
        while not self.connected():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the console did not connect; log in {self.log.name}")
            time.sleep(0.2)

    def connected(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as reply:
                return all(f["connected"] for f in json.load(reply)["feeds"])
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@contextmanager
def chromium(width: int = 1280, height: int = 1000) -> Iterator[Any]:
    """The devstack's headless chromium; a missing browser ends the bench with its reason."""
    try:
        with headless_chromium(width, height, hide_scrollbars=True) as driver:
            yield driver
    except ChromiumMissing as e:
        raise SystemExit(str(e)) from None


def log_in(driver: Any, console: ConsoleProcess) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(console.url + "/login")
    driver.find_element(By.ID, "username").send_keys("bench")
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "calls"))
    WebDriverWait(driver, 60).until(
        lambda d: "connected" in d.find_element(By.ID, "feed-status").text
        and "disconnected" not in d.find_element(By.ID, "feed-status").text)


class DelayCollector(threading.Thread):
    """Takes the page's measured delays (``window.callshieldDelays``, console.js) every half
    second, so none is lost to the page's own cap of 1000."""

    def __init__(self, driver: Any) -> None:
        super().__init__(daemon=True)
        self.driver = driver
        self.delays: list[float] = []
        self.stop_event = threading.Event()

    def take(self) -> None:
        got = self.driver.execute_script("return window.callshieldDelays.splice(0)")
        self.delays += [float(x) for x in got or ()]

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.take()

    def finish(self) -> list[float]:
        self.stop_event.set()
        self.join()
        self.take()
        return self.delays


# --- the measurement -------------------------------------------------------------------------


def shipped_stack(token: str, extra: Sequence[str] = ()) -> Stack:
    """The server of ``make run`` (its Makefile flags), with the feed's admin token."""
    stack = make_stack("inprocess")
    stack.server_args = [*stack.server_args, "--admin-token", token, *extra]
    return stack


async def one_trial(stack: Stack, pool: AudioPool, args: argparse.Namespace,
                    watched: bool, console: ConsoleProcess | None,
                    driver: Any) -> dict[str, Any]:
    """One round of ``args.calls`` concurrent calls; CPU and (watched) the page's delays."""
    server_pid = next(p.pid for name, p in stack.procs if name == "server")
    port = int(stack.target.rsplit(":", 1)[1])
    collector = DelayCollector(driver) if watched else None
    if collector is not None:
        collector.take()  # drop what the page measured before
        collector.delays.clear()
        collector.start()
    browser_root = driver.service.process.pid if watched else None
    before = (time.monotonic(), process_cpu(server_pid),
              process_cpu(console.proc.pid) if console else 0.0,
              tree_cpu(browser_root) if browser_root else 0.0)
    load = os.getloadavg()[0]
    run: Run = await trial(stack.target, port, pool, backend="inprocess", mode=args.mode,
                           pattern=PATTERNS["per-call"], streams=args.calls,
                           seconds=args.seconds, lookahead=0.0)
    delays: list[float] = []
    if collector is not None:
        # the calls' last events (summaries, closes) reach the page after the last window
        await asyncio.sleep(2.0)
        delays = await asyncio.to_thread(collector.finish)
    after = (time.monotonic(), process_cpu(server_pid),
             process_cpu(console.proc.pid) if console else 0.0,
             tree_cpu(browser_root) if browser_root else 0.0)
    wall = after[0] - before[0]
    result: dict[str, Any] = {
        "watched": watched, "calls": args.calls, "seconds": args.seconds, "mode": args.mode,
        "wall_s": round(wall, 1), "loadavg_1m_before": round(load, 2),
        "server_cpu_s": round(after[1] - before[1], 2),
        "server_cpu_ms_per_window": round(1000 * (after[1] - before[1]) / max(1, run.windows),
                                          2),
        "server_cores": round((after[1] - before[1]) / wall, 3),
        "console_cores": round((after[2] - before[2]) / wall, 3) if console else None,
        "browser_cores": round((after[3] - before[3]) / wall, 3) if browser_root else None,
        "windows": run.windows, "missing_windows": run.missing_windows, "errors": run.errors,
        "client_window_p50_ms": round(run.p50_ms, 1),
        "client_window_p99_ms": round(run.p99_ms, 1),
        "browser_events": len(delays),
    }
    if delays:
        result |= {"delay_p50_ms": round(pct(delays, 50, 1000), 1),
                   "delay_p99_ms": round(pct(delays, 99, 1000), 1),
                   "delay_max_ms": round(pct(delays, 100, 1000), 1)}
    return result


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    token = secrets.token_hex(16)
    stack = shipped_stack(token)
    meta = machine()
    meta["server_flags"] = ["TOKEN" if f == token else f for f in stack.server_args]
    meta["note"] = args.note
    pool = AudioPool(args.seconds)
    trials: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="callshield-bench-console-"))
    console: ConsoleProcess | None = None
    try:
        say(f"starting the server as make run does: {' '.join(meta['server_flags'])}")
        await asyncio.to_thread(stack.start)
        await warm_up(stack.target, pool)
        with chromium() as driver:
            for r in range(args.rounds):
                say(f"round {r + 1}: {args.calls} calls, nobody watching")
                trials.append(await one_trial(stack, pool, args, False, None, driver))
                say(f"  {trials[-1]}")
                console = await asyncio.to_thread(ConsoleProcess, stack.target, token, work)
                await asyncio.to_thread(log_in, driver, console)
                say(f"round {r + 1}: {args.calls} calls, the console and a browser watching")
                trials.append(await one_trial(stack, pool, args, True, console, driver))
                say(f"  {trials[-1]}")
                await asyncio.to_thread(driver.get, "about:blank")
                console.stop()
                console = None
    finally:
        if console is not None:
            console.stop()
        await asyncio.to_thread(stack.stop)
        shutil.rmtree(work, ignore_errors=True)
    meta["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"meta": meta, "config": {"calls": args.calls, "seconds": args.seconds,
                                     "mode": args.mode, "rounds": args.rounds},
            "trials": trials}


def markdown(result: dict[str, Any]) -> str:
    meta, config, trials = result["meta"], result["config"], result["trials"]

    def avg(key: str, watched: bool) -> float:
        values = [t[key] for t in trials if t["watched"] == watched and t.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")

    watched = [t for t in trials if t["watched"]]
    lines = [
        "# The console watching live calls (event delay, server CPU)",
        "",
        f"Machine: {meta['cpu']}, {meta['cpus']} CPUs, GPU {meta['gpu']}; load average at "
        f"start {meta['loadavg_at_start']}, at end {meta['loadavg_at_end']} (1, 5, 15 min). "
        + " ".join(meta.get("note") or []),
        "",
        f"Server: `python -m server {' '.join(meta['server_flags'])}` (the flags of "
        "`make run`, listen and metrics ports set by the bench, plus the feed's admin token). "
        f"Each round: {config['calls']} concurrent {config['mode'].upper()} calls of "
        f"{config['seconds']:g} s at real-time pace (`bench.service`'s audio and driver, one "
        "gRPC channel per call), once with nobody watching, once with `python -m console` "
        "(its own process, SQLite) and a headless chromium (Selenium) on the calls page.",
        "",
        "*Event delay*: measured in the browser: `Date.now()` when the page's EventSource "
        "delivers a message, minus the server's time on the event "
        "(`WatchCallsResponse.server_time`, same host clock), over every message carrying it "
        "(window scores and call updates): server -> gRPC feed -> console database write -> "
        "server-sent events -> JavaScript. *Cores*: CPU seconds / wall seconds of the trial.",
        "",
        "| round | watched | load before | server cores | server CPU ms / window "
        "| console cores | browser cores | windows | missing | errors "
        "| client window p50 / p99 ms | browser events | delay p50 ms | delay p99 ms "
        "| delay max ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for i, t in enumerate(trials):
        def f(key: str, t: dict[str, Any] = t) -> str:
            value = t.get(key)
            return "-" if value is None else f"{value:g}"

        lines.append(
            f"| {i // 2 + 1} | {'yes' if t['watched'] else 'no'} | {f('loadavg_1m_before')} "
            f"| {f('server_cores')} | {f('server_cpu_ms_per_window')} "
            f"| {f('console_cores')} | {f('browser_cores')} "
            f"| {t['windows']} | {t['missing_windows']} | {t['errors']} "
            f"| {f('client_window_p50_ms')} / {f('client_window_p99_ms')} "
            f"| {t['browser_events']} | {f('delay_p50_ms')} | {f('delay_p99_ms')} "
            f"| {f('delay_max_ms')} |")
    if watched:
        lines += [
            "",
            f"Server CPU per scored window, mean over rounds: "
            f"{avg('server_cpu_ms_per_window', False):.1f} ms without the feed, "
            f"{avg('server_cpu_ms_per_window', True):.1f} ms with the console watching "
            f"({avg('server_cores', False):.2f} and {avg('server_cores', True):.2f} cores); "
            f"event delay server -> browser p50 {avg('delay_p50_ms', True):.0f} ms, p99 "
            f"{avg('delay_p99_ms', True):.0f} ms (means of the rounds' percentiles). "
            "A load average far above the CPU count means every process got less CPU than "
            "it asked for: the cores column is what the server got, not what it needed, and "
            "CPU per window is the comparable figure.",
        ]
    return page(lines)


# --- the README's screenshot -----------------------------------------------------------------


def screenshot(path: Path, keep_audio: float = 10.0) -> None:
    """The shipped server (plus the admin token, and flagged audio allowed), the console,
    ``client stream examples/spoof_call.wav --platform asterisk`` as a real process at real
    pace; the call page once the call has ended, written to ``path``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    token = secrets.token_hex(16)
    stack = shipped_stack(token, ["--feed-flagged-audio", str(keep_audio)])
    work = Path(tempfile.mkdtemp(prefix="callshield-screenshot-"))
    console: ConsoleProcess | None = None
    try:
        say("starting the server and the console")
        stack.start()
        console = ConsoleProcess(stack.target, token, work, keep_flagged_audio=keep_audio)
        with chromium(1280, 1150) as driver:
            log_in(driver, console)
            call_id = "example-spoof-call"
            say("client stream examples/spoof_call.wav (30 s, real time)")
            client = subprocess.Popen(
                [sys.executable, "-m", "client.cli", "stream", str(EXAMPLES / "spoof_call.wav"),
                 "--server", stack.target, "--call-id", call_id, "--platform", "asterisk",
                 "--json"], cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL)
            xpath = f"//table[@id='calls']//tr[td[@class='call-id']/a[text()='{call_id}']]//a"
            link = WebDriverWait(driver, 60, 0.2).until(
                lambda d: d.find_elements(By.XPATH, xpath))[0]
            link.click()
            client.wait(180)
            WebDriverWait(driver, 120, 0.2).until(
                lambda d: d.find_element(By.ID, "call-status").text.startswith("closed")
                and d.find_elements(By.CSS_SELECTOR, "#timeline rect.speech")
                and d.find_elements(By.CSS_SELECTOR, "audio"))
            time.sleep(1.0)  # the last timeline redraw (300 ms debounce)
            height = driver.execute_script("return document.body.scrollHeight")
            driver.set_window_size(1280, min(max(900, height + 140), 1600))
            path.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(path))
            say(f"wrote {path}")
    finally:
        if console is not None:
            console.stop()
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.console",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--calls", type=int, default=50, help="concurrent live calls per trial")
    p.add_argument("--seconds", type=float, default=15.0, help="audio per call")
    p.add_argument("--mode", choices=("split", "mixed"), default="split",
                   help="channel mode of the calls (split: what the shipped server holds at "
                        "50 calls on 2 cores, bench/results/service.md)")
    p.add_argument("--rounds", type=int, default=2,
                   help="pairs of trials (unwatched, watched), interleaved")
    p.add_argument("--out", default=str(RESULTS / "console"),
                   help="results without extension (.json and .md are written)")
    p.add_argument("--note", action="append", default=[],
                   help="a sentence for the report (how the machine was loaded)")
    p.add_argument("--screenshot", metavar="PNG",
                   help="instead of the bench: write the call page of the example spoof call")
    args = p.parse_args(argv)
    if args.calls < 1 or args.seconds <= 0 or args.rounds < 1:
        p.error("--calls, --seconds and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.screenshot:
        screenshot(Path(args.screenshot))
        return 0
    result = asyncio.run(bench(args))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    with suppress(BrokenPipeError):
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
