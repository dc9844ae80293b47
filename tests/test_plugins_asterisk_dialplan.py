"""The documented Asterisk dialplan, run through a model of what a real Asterisk did with it.

A real Asterisk (built from source, the guide's dialplan verbatim) showed two things no
plugin-side test could: ``Queue(agents,,,,,,callshield-start^${CS_UUID})`` never started the
fork (``Gosub attempted to reach non-existent destination 'callshield-start^<uuid>,s,1'``:
``Queue`` does not turn ``^`` into ``,`` as ``Dial``'s ``U()`` does), and every call left an
empty ``CALLSHIELD_<uuid>`` global behind (``Set(GLOBAL(x)=)`` sets an empty value, only
``GLOBAL_DELETE()`` removes one). The model below does what those applications do in the
Asterisk source (argument separation with ``\\`` escapes and parentheses, ``Dial``'s ``U()``
delimiter swap, the ``context,s,1(args)`` gosub both applications build, ``Set`` on
``GLOBAL``/``GLOBAL_DELETE``/``CHANNEL(hangup_handler_push)``, hangup handlers run at
hangup), checked first against those two observed failures, then run on the dialplan the
guide documents: the ``Dial`` path, the ``Queue`` line and the inline variant each start
the fork (or stream) for the call's UUID, the spy half finds the caller's channel through
the global, and no global is left once the call hangs up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
CALL_UUID = "d3b07384-d113-4ec6-a2a4-2b8c0f5e7a91"
CALLER = "PJSIP/customer-00000001"


def _guide() -> str:
    """The guide that documents the dialplan (whichever page of docs/ holds it)."""
    pages = [p for p in sorted(DOCS.rglob("*.md")) if "[callshield-start]" in p.read_text()]
    assert pages, "no page of docs/ documents the Asterisk dialplan ([callshield-start])"
    return pages[0].read_text()


def _code_lines(text: str) -> list[str]:
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    return [line for block in blocks for line in block.splitlines()]


def _dialplan(lines: list[str]) -> dict[str, dict[str, list[str]]]:
    """context -> extension -> applications in priority order (``same => n`` appends)."""
    plan: dict[str, dict[str, list[str]]] = {}
    context, exten = "", ""
    for raw in lines:
        line = raw.split(";", 1)[0].strip()
        if m := re.fullmatch(r"\[([\w-]+)\]", line):
            context = m.group(1)
            plan.setdefault(context, {})
        elif m := re.fullmatch(r"exten\s*=>\s*([^,]+),1,(.+)", line):
            exten = m.group(1)
            plan.setdefault(context, {})[exten] = [m.group(2)]
        elif (m := re.fullmatch(r"same\s*=>\s*n,(.+)", line)) and context:
            plan[context][exten].append(m.group(1))
    return plan


def separate_args(data: str) -> list[str]:
    """``__ast_app_separate_args`` with ``remove_chars``: commas split at parenthesis depth 0
    outside quotes; ``\\`` makes the next character literal and is removed."""
    args, current, depth, quoted, escaped = [], "", 0, False, False
    for ch in data:
        if escaped:
            current, escaped = current + ch, False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "(" and not quoted:
            depth, current = depth + 1, current + ch
        elif ch == ")" and not quoted and depth:
            depth, current = depth - 1, current + ch
        elif ch == "," and not depth and not quoted:
            args.append(current)
            current = ""
        else:
            current += ch
    return [*args, current]


def _options(flags: str) -> dict[str, str]:
    """``ast_app_parse_options``: letters, each with an optional ``(argument)``."""
    return {m.group(1): m.group(2) or "" for m in re.finditer(r"(\w)(?:\(([^)]*)\))?", flags)}


def gosub_destination(routine: str) -> str:
    """What ``Dial`` (``U()``) and ``Queue`` (7th argument) hand ``Gosub``: the routine up
    to its first comma is the context, the rest its arguments, at ``s,1``."""
    context, comma, arguments = routine.partition(",")
    return f"{context},s,1({arguments})" if comma else f"{routine},s,1"


@dataclass
class Channel:
    """One caller's channel through the dialplan, and the globals of the whole system."""

    plan: dict[str, dict[str, list[str]]]
    globals: dict[str, str] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=lambda: {"CHANNEL": CALLER})
    hangup_handlers: list[str] = field(default_factory=list)
    forks: list[str] = field(default_factory=list)  # AudioSocket UUIDs streamed
    spied: list[str] = field(default_factory=list)  # channels ChanSpy was given
    errors: list[str] = field(default_factory=list)

    def substitute(self, text: str, local: dict[str, str]) -> str:
        """``pbx_substitute_variables``: the innermost ``${...}`` first."""
        while m := re.search(r"\$\{([^${}]*)\}", text):
            inner = m.group(1)
            if f := re.fullmatch(r"(\w+)\((.*)\)", inner):
                name, arg = f.groups()
                if name == "UUID":
                    value = CALL_UUID
                elif name == "GLOBAL":
                    value = self.globals.get(arg, "")
                elif name == "FILTER":
                    allowed, _, subject = arg.partition(",")
                    value = "".join(re.findall(f"[{allowed}]", subject))
                else:
                    raise AssertionError(f"the model knows no function {name}()")
            else:
                value = local.get(inner, self.variables.get(inner, ""))
            text = text[:m.start()] + value + text[m.end():]
        return text

    def run(self, applications: list[str], local: dict[str, str] | None = None) -> None:
        for application in applications:
            if not self.execute(application, local or {}):
                return

    def execute(self, application: str, local: dict[str, str]) -> bool:
        """One application; False when it ends this run (``Return``, ``Hangup``)."""
        name, _, rest = application.partition("(")
        data = self.substitute(rest.rsplit(")", 1)[0], local)
        if name == "Set":
            target, _, value = data.partition("=")
            if m := re.fullmatch(r"GLOBAL\((\w+)\)", target):
                self.globals[m.group(1)] = value  # an empty value is still a value
            elif m := re.fullmatch(r"GLOBAL_DELETE\((\w+)\)", target):
                self.globals.pop(m.group(1), None)
            elif target == "CHANNEL(hangup_handler_push)":
                self.hangup_handlers.append(value)
            else:
                self.variables[target] = value
        elif name == "Dial":
            options = _options(separate_args(data)[2]) if len(separate_args(data)) > 2 else {}
            if "U" in options:  # app_dial: ast_replace_subargument_delimiter, ^ -> ,
                self.gosub(gosub_destination(options["U"].replace("^", ",")))
        elif name == "Queue":
            args = separate_args(data)
            if len(args) > 6 and args[6]:  # app_queue passes the gosub argument as it is
                self.gosub(gosub_destination(args[6]))
        elif name == "Originate":  # the fork's Local channel: both halves run
            local_channel, _, context, exten, *_ = separate_args(data)
            extension = local_channel.removeprefix("Local/").split("@")[0]
            self.run(self.plan[context][exten_match(self.plan[context], exten)],
                     {"EXTEN": extension})
            fork_context = local_channel.split("@")[1].split("/")[0]
            self.run(self.plan[fork_context][exten_match(self.plan[fork_context], extension)],
                     {"EXTEN": extension})
        elif name == "ChanSpy":
            self.spied.append(separate_args(data)[0])
        elif name == "AudioSocket":
            self.forks.append(separate_args(data)[0])
        elif name in ("Return", "Hangup"):
            return False
        return True

    def gosub(self, destination: str) -> None:
        """app_stack's ``Gosub``: ``context,exten,priority(args)``, or its error."""
        context, exten, rest = destination.split(",", 2)
        priority, _, arguments = rest.partition("(")
        if exten not in self.plan.get(context, {}) or priority != "1":
            self.errors.append("Gosub attempted to reach non-existent destination "
                               f"'{context},{exten},{priority}'")
            return
        arguments = arguments.removesuffix(")")
        self.run(self.plan[context][exten], {f"ARG{i + 1}": a for i, a in
                                             enumerate(separate_args(arguments))})

    def hang_up(self) -> None:
        for handler in self.hangup_handlers:
            context, exten, _ = handler.split(",")
            self.run(self.plan[context][exten])


def exten_match(extensions: dict[str, list[str]], exten: str) -> str:
    """The extension pattern of ``extensions`` that ``exten`` matches (``_[0-9a-f].``)."""
    for pattern in extensions:
        if pattern == exten:
            return pattern
        if pattern.startswith("_"):
            regex = pattern[1:].replace("X", "[0-9]").replace(".", ".+")
            if re.fullmatch(regex, exten):
                return pattern
    raise AssertionError(f"no extension matches {exten!r}: {list(extensions)}")


def _call(plan: dict[str, dict[str, list[str]]], applications: list[str]) -> Channel:
    channel = Channel(plan)
    channel.run(applications)
    channel.hang_up()
    return channel


def _documented() -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    lines = _code_lines(_guide())
    return _dialplan(lines), lines


def test_model_reproduces_what_a_real_asterisk_did() -> None:
    """The two failures seen on a real Asterisk, reproduced by the model: a ``^`` in the
    queue's gosub names a context that does not exist, and an empty ``Set(GLOBAL(...)=)``
    leaves the global behind. (Otherwise the checks below could pass a broken dialplan.)"""
    plan, _ = _documented()
    entry = plan["from-customers"]["_X."]
    queued = [a if not a.startswith("Dial(") else
              "Queue(agents,,,,,,callshield-start^${CS_UUID})" for a in entry]
    channel = _call(plan, queued)
    assert channel.errors == ["Gosub attempted to reach non-existent destination "
                              f"'callshield-start^{CALL_UUID},s,1'"]
    assert channel.forks == []
    old_cleanup = dict(plan, **{"callshield-cleanup": {"s": [
        "Set(GLOBAL(CALLSHIELD_${FILTER(0-9a-f,${CS_UUID})})=)", "Return()"]}})
    channel = _call(old_cleanup, entry)
    assert channel.globals == {"CALLSHIELD_" + CALL_UUID.replace("-", ""): ""}


@pytest.mark.parametrize("path", ["dial", "queue"])
def test_documented_dialplan_forks_the_call_and_leaves_no_global(path: str) -> None:
    plan, lines = _documented()
    entry = plan["from-customers"]["_X."]
    if path == "queue":  # the guide's Queue line, in place of the Dial line
        (queue,) = [m.group(1) for line in lines
                    if (m := re.fullmatch(r"\s*same\s*=>\s*n,(Queue\(.*\))\s*", line))]
        entry = [queue if a.startswith("Dial(") else a for a in entry]
    channel = _call(plan, entry)
    assert channel.errors == []
    assert channel.forks == [CALL_UUID]  # AudioSocket carries the call's UUID
    assert channel.spied == [CALLER]  # the spy half found the caller through the global
    assert channel.globals == {}  # gone with the call (15 calls left 15 on a real one)


def test_documented_inline_variant_leaves_no_global() -> None:
    plan, lines = _documented()
    start = next(i for i, line in enumerate(lines) if line.startswith("exten => ivr,1,"))
    inline = _dialplan(["[ivr]", *lines[start:start + 8]])["ivr"]["ivr"]
    channel = _call(plan, inline)
    assert channel.forks == [CALL_UUID] and channel.globals == {}
