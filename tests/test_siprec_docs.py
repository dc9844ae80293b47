"""docs/siprec.md tells operators which log line each misconfiguration produces: every event,
field and refusal reason its table quotes must be one the plugin's code writes, so a renamed
log line or reason cannot leave the guide pointing at a line nobody will ever see."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "siprec.md"
CODE = "\n".join(p.read_text() for p in sorted((REPO / "plugins" / "siprec").glob("*.py")))
SERVER = (REPO / "plugins" / "siprec" / "server.py").read_text()
METRICS = (REPO / "plugins" / "metrics.py").read_text()


def table_rows() -> list[tuple[str, str]]:
    """(symptom, log column) of each row of the misconfiguration table."""
    section = GUIDE.read_text().split("## What each misconfiguration logs", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 3 and not set(cells[0]) <= {"-"} and cells[0] != "symptom":
            rows.append((cells[0], cells[1]))
    return rows


def literal_prefix(reason: str) -> str:
    """What of a quoted reason the code holds as written: the part before a placeholder
    (``...``), a runtime list (``(offered: ...``) or a closing quote."""
    return re.split(r"\.\.\.|\(offered: ", reason, maxsplit=1)[0]


def test_the_table_is_read() -> None:
    rows = table_rows()
    assert len(rows) >= 15
    assert any("TLS" in symptom for symptom, _ in rows)


def test_every_event_quoted_in_the_guide_is_logged_by_the_code() -> None:
    for symptom, column in table_rows():
        if column.startswith("none"):
            continue
        ticks = re.findall(r"`([^`]+)`", column)
        events = [ticks[0]] + [b for a, b in zip(ticks, ticks[1:], strict=False)
                               if f"`{a}` / `{b}`" in column and " " in b]  # not fields
        for event in events:
            assert f'"{event}"' in CODE, f"{symptom!r}: no log line {event!r} in the code"


def test_every_reason_and_field_quoted_in_the_guide_is_in_the_code() -> None:
    checked = 0
    for symptom, column in table_rows():
        for reason in re.findall(r'(?:reason=|or |, )`?"([^"]+)"`?', column):
            prefix = literal_prefix(reason)
            assert len(prefix) >= 8 and prefix in CODE, f"{symptom!r}: reason {reason!r}"
            checked += 1
        if column.startswith("`recording closed`"):
            for name in re.findall(r"`([a-z_]+)`", column):
                if name.startswith("callshield_"):  # a metric: plugins/metrics.py names it
                    assert f'"{name}"' in METRICS, f"{symptom!r}: no metric {name!r}"
                else:
                    assert f"{name}=" in SERVER, f"{symptom!r}: field {name!r} is not logged"
                checked += 1
    assert checked >= 10
