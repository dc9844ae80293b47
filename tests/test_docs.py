"""The documentation stays true to the code and to itself: the command-line reference is the
programs' real ``--help``, every relative link leads to a page and heading that exist, every
page is reachable from the README, every ``CALLSHIELD_*`` variable and repository path a page
names exists, the README stays a page a newcomer reads, the API page names the whole API,
and the figures the README and the benchmark pages show are the committed results, not
remembered ones."""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from server.errors import STATUS
from tests.paths import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 200
RESULTS = REPO / "bench" / "results"
#: variables a page may name that are not a flag's: the scheme's placeholders and the
#: deprecated names the worker still reads (server/worker.py: DEPRECATED_ENV)
NOT_FLAGS = {"CALLSHIELD_SOME_FLAG", "CALLSHIELD_WORKER_SOME_FLAG", "CALLSHIELD_PLUGINS_SOME_FLAG",
             "CALLSHIELD_CONSOLE_SOME_FLAG", "CALLSHIELD_CLAIM_IDLE_MS", "CALLSHIELD_REDIS_PREFIX"}


@functools.cache
def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_cli_docs",
                                                  REPO / "scripts" / "gen_cli_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _fresh_cli_reference() -> str:
    """``docs/reference/cli.md`` as ``make docs`` would write it now (one child process runs
    every program's ``--help``; computed once per test run)."""
    return _generator().render()


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of ``path`` (duplicates get -1, -2, ...)."""
    slug = _generator().anchor
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.MULTILINE):
        base = slug(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading))
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else f"{base}-{count}")
    return anchors


def _links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(path.read_text()))


def test_cli_reference_is_the_programs_help() -> None:
    """A flag added, renamed or re-documented without `make docs` fails here, naming the fix
    and showing what changed."""
    committed = (DOCS / "reference" / "cli.md").read_text()
    generator = _generator()
    made_with = re.search(rf"{generator.PYTHON_MARK} (\d+\.\d+)", committed)
    if made_with and made_with.group(1) != generator.python_version():
        pytest.skip(f"docs/reference/cli.md was generated with Python {made_with.group(1)}, "
                    f"this is {generator.python_version()}: argparse lays help out differently")
    fresh = _fresh_cli_reference()
    if committed != fresh:
        diff = difflib.unified_diff(committed.splitlines(), fresh.splitlines(),
                                    "docs/reference/cli.md (committed)", "--help now",
                                    lineterm="", n=1)
        shown = "\n".join(list(diff)[:60])
        raise AssertionError(
            "docs/reference/cli.md is stale: run `make docs` and commit the result\n" + shown)


def test_cli_reference_covers_every_program() -> None:
    text = (DOCS / "reference" / "cli.md").read_text()
    for command in ("python -m server", "python -m server.worker", "python -m plugins serve",
                    "client stream", "client detect", "python -m models train",
                    "python -m models score", "python -m models evaluate"):
        assert f"## `{command}`" in text, command
    assert "usage: python -m server " in text and "CALLSHIELD_MAX_STREAMS" in text


def test_subcommands_are_found_in_help_text() -> None:
    help_text = ("usage: x [-h] {a,b-c} ...\n\npositional arguments:\n  {a,b-c}\n"
                 "    a    first\n\noptions:\n  --queue {inprocess,redis}\n")
    assert _generator().subcommands(help_text) == ["a", "b-c"]
    assert _generator().subcommands("usage: x [--queue {inprocess,redis}]\n") == []


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/")


def test_relative_links_point_to_existing_files_and_headings() -> None:
    broken = []
    for page in _pages():
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(REPO)}: {target}"
            if not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_checker_sees_links_and_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A title: `code`\n\n## Same\n\n## Same\n\nsee [x](other.md#y) and "
                    "`[not](a-link.md)`\n\n```\n[nor](this.md)\n```\n")
    assert _links(page) == ["other.md#y"]
    assert _anchors(page) == {"a-title-code", "same", "same-1"}


def test_api_reference_names_the_whole_api() -> None:
    proto = (REPO / "protos" / "callshield" / "v1" / "detection.proto").read_text()
    api = (DOCS / "reference" / "api.md").read_text()
    names = re.findall(r"^\s*(?:rpc|message|enum)\s+(\w+)", proto, flags=re.MULTILINE)
    assert len(names) > 10
    missing = [name for name in names if name not in api]
    assert not missing, f"docs/reference/api.md does not name: {missing}"
    codes = {code.name for code, _prefix in STATUS.values()} | {
        grpc.StatusCode.UNAUTHENTICATED.name}
    missing = [code for code in sorted(codes) if f"`{code}`" not in api]
    assert not missing, f"docs/reference/api.md's status table lacks: {missing}"
    for cls in STATUS:
        assert f"`{cls.__name__}`" in api, cls.__name__


def _key_figures() -> list[list[str]]:
    section = README.read_text().split("## Key figures", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == ["figure", "value", "model", "machine", "date"], header
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_key_figures_name_model_machine_and_date() -> None:
    rows = _key_figures()
    assert len(rows) >= 5
    for figure, value, model, machine, date in rows:
        if value == "no committed result":
            continue
        assert re.search(r"\bv\d\b", model), f"{figure}: no model version ({model!r})"
        assert machine, f"{figure}: no machine"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", date), f"{figure}: no date ({date!r})"


def test_key_figures_are_the_committed_results() -> None:
    """The README's figures of the default model are those of bench/results, so a rerun
    that changes them and a README that is not updated disagree here, not in a reader's
    head."""
    results = REPO / "bench" / "results"
    models = json.loads((results / "models.json").read_text())
    figures = {row[0]: row[1] for row in _key_figures()}

    def figure(start: str) -> str:
        return next(value for name, value in figures.items() if name.startswith(start))

    eer = models["dev_eer"]["default"]["eer"]["pooled"]
    assert figure("Dev EER") == f"{100 * eer:.2f} %"
    rate = models["throughput"]["default"]["batch16"]["windows_per_second"]
    rawnet2 = models["throughput"]["rawnet2-tel"]["batch16"]["windows_per_second"]
    assert figure("Scoring throughput") == f"{rate:.0f} windows/s ({rawnet2:.0f})"
    loso = json.loads((results / "generalization.json").read_text())
    recipe = (REPO / "Makefile").read_text().split("DEFAULT_RECIPE := ", 1)[1].split()[0]
    default = next(r for r in loso["recipes"] if r["recipe"] == f"fusion({recipe})")
    assert figure("EER on synthesis engines never seen") == (
        f"{100 * default['pooled_eer']:.1f} % ({100 * default['worst_engine_eer']:.1f} %)")
    diarization = json.loads((results / "diarization.json").read_text())["summary"]
    live = diarization["verdicts"]["stream/evidence"]
    assert figure("10 dev calls, live") == (
        f"{live['spoof_calls_flagged']} of {live['spoof_calls']} / "
        f"{live['calls_with_bonafide_flagged']} of {live['calls']} / "
        f"{live['median_delay_s']:.1f} s")


def test_every_environment_variable_named_in_the_docs_is_a_flags() -> None:
    """A variable a page names (README, docs, code blocks included) is one that some
    program's `--help` prints today: a renamed or removed flag cannot leave an operator
    setting a variable nothing reads."""
    known = set(re.findall(r"CALLSHIELD_[A-Z0-9_]+", _fresh_cli_reference())) | NOT_FLAGS
    unknown = []
    for page in _pages():
        for name in re.findall(r"CALLSHIELD_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_<])",
                               page.read_text()):
            if name not in known:
                unknown.append(f"{page.relative_to(REPO)}: {name}")
    assert not unknown, ("variables no program reads (a flag renamed? run `make docs` if it "
                         "is new):\n" + "\n".join(sorted(set(unknown))))


def test_variable_check_tells_variables_from_placeholders() -> None:
    pattern = r"CALLSHIELD_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_<])"
    text = ("`CALLSHIELD_PLUGINS_<FLAG>`, `CALLSHIELD_MAX_STREAMS`, `CALLSHIELD_<uuid>`, "
            "GLOBAL(CALLSHIELD_${FILTER(0-9a-f,${EXTEN})}), (`CALLSHIELD_WORKER_DEVICE`)")
    assert re.findall(pattern, text) == ["CALLSHIELD_MAX_STREAMS", "CALLSHIELD_WORKER_DEVICE"]


def _table_rows(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.startswith("|")]


def test_benchmark_pages_show_the_committed_results() -> None:
    """Where a benchmark page copies a result table, it is the committed one: a rerun that
    changes `bench/results/` and a page that is not updated disagree here."""
    copies = {"models.md": "models.md", "generalization.md": "generalization.md",
              "plugins.md": "plugins.md"}
    stale = []
    for page, result in copies.items():
        shown = set(_table_rows((DOCS / "benchmarks" / page).read_text()))
        missing = [row for row in _table_rows((RESULTS / result).read_text())
                   if row not in shown]
        if missing:
            stale.append(f"docs/benchmarks/{page} lacks {len(missing)} row(s) of "
                         f"bench/results/{result}, e.g. {missing[0]}")
    assert not stale, "copy the rerun's tables into the page:\n" + "\n".join(stale)


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    """A newcomer finds every page by following links from the README."""
    seen: set[Path] = set()
    pending = [README.resolve()]
    while pending:
        page = pending.pop()
        if page in seen or page.suffix != ".md" or not page.exists():
            continue
        seen.add(page)
        for target in _links(page):
            file_part = target.partition("#")[0]
            if file_part and not re.match(r"^[a-z][a-z0-9+.-]*:", file_part):
                pending.append((page.parent / file_part).resolve())
    orphans = [p.relative_to(REPO).as_posix() for p in sorted(DOCS.rglob("*.md"))
               if p.resolve() not in seen]
    assert not orphans, f"pages no link from README.md leads to: {orphans}"


#: top-level folders of the repository whose paths the pages name in code spans
_ROOTS = ("server", "plugins", "client", "models", "diarization", "bench", "scripts", "tests",
          "protos", "callshield", "examples", "console", "docs")
#: outputs a page names before any run has written them
_NOT_YET_WRITTEN = ("bench/results/gpu.",)


def _expand_braces(path: str) -> list[str]:
    """``a.{json,md}`` -> ``a.json``, ``a.md`` (shell brace expansion, as the pages write)."""
    match = re.search(r"\{([^{}]*)\}", path)
    if match is None:
        return [path]
    return [expanded for choice in match.group(1).split(",")
            for expanded in _expand_braces(path[:match.start()] + choice + path[match.end():])]


def test_repository_paths_named_in_the_docs_exist() -> None:
    """A file or folder a page names (`models/verdicts.py`, `bench/results/loso/lcnn-voc/`,
    `callshield/v1/*_pb2*.py`) exists: moving code or results without the docs fails here."""
    pattern = re.compile(rf"`((?:{'|'.join(_ROOTS)})/[^`\s:]*)")
    missing = []
    for page in _pages():
        for named in pattern.findall(page.read_text()):
            for path in _expand_braces(named.rstrip(".,)")):
                if path.startswith(_NOT_YET_WRITTEN) or list(REPO.glob(path.rstrip("/"))):
                    continue
                missing.append(f"{page.relative_to(REPO)}: {named}")
    assert not missing, "paths the docs name that do not exist:\n" + "\n".join(missing)


def test_docs_named_in_code_exist() -> None:
    """Docstrings and comments that send a reader to a page (``see docs/telephony.md``)
    send them to one that exists."""
    missing = []
    for root in _ROOTS[:-1]:
        for source in sorted((REPO / root).rglob("*.py")) if (REPO / root).is_dir() else []:
            for named in re.findall(r"(?:docs/[\w./-]+\.md|README\.md)", source.read_text()):
                if not (REPO / named).exists() and not (source.parent / named).exists():
                    missing.append(f"{source.relative_to(REPO)}: {named}")
    assert not missing, "pages named in code that do not exist:\n" + "\n".join(missing)


def test_getting_started_lists_every_make_target() -> None:
    """Every target `make help` shows (a `##` description in the Makefile) has its row."""
    targets = re.findall(r"^([a-z][a-z0-9-]*):[^\n]*##", (REPO / "Makefile").read_text(),
                         flags=re.MULTILINE)
    page = (DOCS / "getting-started.md").read_text()
    missing = [t for t in targets if f"| `make {t}` |" not in page]
    assert targets and not missing, f"docs/getting-started.md lacks make targets: {missing}"
