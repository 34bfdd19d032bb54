"""The documentation stays true to the code: links resolve, commands and options exist.

Checks README.md and docs/*.md:

- every relative markdown link ``[text](path)`` / ``[text](path#anchor)`` points to an existing file or folder,
  and an anchor into a markdown file names one of its headings (GitHub's anchor rules);
- every ``autoseg <subcommand>`` written in a fenced code block or an inline code span is a sub-command of
  :func:`autoseg.cli.build_parser`;
- every long option ``--xyz`` on a line (or inline span) that starts with ``autoseg <subcommand>`` is an option
  of that sub-command (exact spelling, no argparse abbreviations). Only those lines are checked, so option
  lists on continuation lines and prose are left alone.

Placeholders in upper case or angle brackets (``autoseg COMMAND --help``) are not sub-commands and are
skipped. Python and JSON code blocks are skipped (``from autoseg import x`` is not a command).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from autoseg.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])

_FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# `autoseg word`, not `autoseg.module`, `autoseg_data`, `-m autoseg` is fine; `from autoseg import` is not
_COMMAND = re.compile(r"(?<![\w./-])autoseg[ \t]+([a-z][a-z0-9-]*)\b")
_LONG_OPTION = re.compile(r"(?<![\w-])(--[a-zA-Z][\w-]*)")
_SKIP_LANGUAGES = {"python", "py", "json", "jsonc", "pycon", "yaml", "toml"}


def _parser_options() -> tuple[set[str], dict[str, set[str]]]:
    """(top-level option strings, {sub-command: its option strings})."""
    parser = build_parser()
    top = {s for action in parser._actions for s in action.option_strings}
    commands: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[name] = {s for a in sub._actions for s in a.option_strings}
    return top, commands


TOP_OPTIONS, COMMANDS = _parser_options()


def _blocks(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(code lines of fenced shell/plain blocks, prose lines), each with its 1-based line number."""
    code, prose = [], []
    fence: str | None = None
    language = ""
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if match and fence is None:
            fence, language = match.group(1), match.group(2).lower()
            continue
        if match and fence is not None and line.strip().startswith(fence):
            fence = None
            continue
        if fence is not None:
            if language not in _SKIP_LANGUAGES:
                code.append((number, line))
        else:
            prose.append((number, line))
    return code, prose


def _starts_command(before: str) -> bool:
    """True when ``autoseg`` after ``before`` starts a command: at the start of the line or span, after a
    shell separator or prompt (``;``, ``&&``, ``|``, ``(``, ``$``) or a launcher (``do``, ``-m``, ...)."""
    before = before.rstrip()
    return not before or bool(re.search(r"(?:[;&|($]|\b(?:do|then|-m|exec|time|srun|sudo|python3?))$", before))


def _strip_comment(line: str) -> str:
    """Drop a shell comment (`` # ...``) and anything after a command separator."""
    line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]
    return re.split(r"\s(?:\||;|&&|\|\||>)\s", line, maxsplit=1)[0]


def _command_snippets(path: Path) -> list[tuple[int, str]]:
    """Every piece of text that may name an autoseg command: fenced code lines and inline code spans."""
    code, prose = _blocks(path.read_text(encoding="utf-8"))
    snippets = list(code)
    for number, line in prose:
        snippets.extend((number, span) for span in _INLINE.findall(line))
    return snippets


def _problems_in_commands(path: Path) -> list[str]:
    problems = []
    rel = path.relative_to(REPO)
    for number, snippet in _command_snippets(path):
        if re.search(r"\b(from|import)\s+autoseg\b", snippet):
            continue
        for match in _COMMAND.finditer(snippet):
            if not _starts_command(snippet[:match.start()]):
                continue  # prose inside a quoted message: "not a valid autoseg plans file"
            name = match.group(1)
            if name not in COMMANDS:
                problems.append(f"{rel}:{number}: `autoseg {name}` is not a sub-command "
                                f"(known: {', '.join(sorted(COMMANDS))})")
        stripped = snippet.strip()
        if stripped.startswith("$ "):
            stripped = stripped[2:].lstrip()
        if not stripped.startswith("autoseg "):
            continue
        command_line = _strip_comment(stripped)
        tokens = command_line.split()
        if len(tokens) < 2:
            continue
        first = tokens[1]
        if first.startswith("-"):
            allowed, owner = TOP_OPTIONS, "autoseg"
        elif first in COMMANDS:
            allowed, owner = COMMANDS[first], f"autoseg {first}"
        else:
            continue  # a placeholder (COMMAND, <command>) or already reported
        for option in _LONG_OPTION.findall(command_line):
            option = option.split("=", 1)[0]
            if option not in allowed:
                problems.append(f"{rel}:{number}: `{owner}` has no option {option} "
                                f"(its options: {', '.join(sorted(o for o in allowed if o.startswith('--')))})")
    return problems


def _problems_in_links(path: Path) -> list[str]:
    problems = []
    rel = path.relative_to(REPO)
    code, prose = _blocks(path.read_text(encoding="utf-8"))
    for number, line in prose:
        without_inline = _INLINE.sub("", line)
        for target in _LINK.findall(without_inline):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#") or target.startswith("//"):
                continue  # http:, https:, mailto:, in-page anchors
            file_part = target.split("#", 1)[0].split("?", 1)[0]
            if not file_part:
                continue
            resolved = (path.parent / file_part).resolve()
            if not resolved.exists():
                problems.append(f"{rel}:{number}: link target {target} does not exist ({resolved})")
                continue
            anchor = target.split("#", 1)[1] if "#" in target else ""
            if anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append(f"{rel}:{number}: link target {target}: {file_part} has no heading with anchor "
                                f"#{anchor}")
    return problems


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces -> '-',
    repeated headings numbered -1, -2, ..."""
    code_lines = {number for number, _ in _blocks(path.read_text(encoding="utf-8"))[0]}
    seen: dict[str, int] = {}
    anchors = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match or number in code_lines:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_doc_files_found():
    assert (REPO / "README.md").is_file()
    assert len(DOC_FILES) > 1, "docs/*.md not found"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path):
    problems = _problems_in_links(path)
    assert not problems, "broken relative links:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_commands_and_options_exist(path: Path):
    problems = _problems_in_commands(path)
    assert not problems, "documented commands/options the CLI does not have:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the checker itself is checked
def test_checker_catches_mistakes(tmp_path: Path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Top `thing` (2D / 3D)\n"
        "See [here](missing.md) and [ok](doc.md#top-thing-2d--3d) and [web](https://example.org).\n"
        "And [bad anchor](doc.md#nowhere).\n"
        "Run `autoseg trian 4` or `autoseg plan 4 --gpu-mem 4`.\n"
        "```bash\n"
        "autoseg train 4 3d_fullres 0 --time-budget 1h --epoch 3   # --not-checked in a comment\n"
        "autoseg predict -i a -o b -d 4 -c 2d | tee --append log\n"
        "for f in 0 1; do autoseg train 4 2d $f; done\n"
        "autoseg COMMAND --help\n"
        "autoseg --version\n"
        "<file>: autoseg checkpoint lacks keys; not a valid autoseg plans file; autoseg trian\n"
        "```\n"
        "```python\n"
        "from autoseg import demo\n"
        "```\n",
        encoding="utf-8",
    )
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        links = _problems_in_links(doc)
        commands = _problems_in_commands(doc)
    finally:
        REPO = saved
    assert len(links) == 2 and "missing.md" in links[0] and "#nowhere" in links[1], links
    flagged = [re.search(r"(`autoseg \S+` is not a sub-command|has no option \S+)", c).group(1) for c in commands]
    assert sorted(flagged) == sorted(["`autoseg trian` is not a sub-command", "`autoseg trian` is not a sub-command",
                                      "has no option --gpu-mem", "has no option --epoch"]), commands
