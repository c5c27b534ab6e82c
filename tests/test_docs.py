"""The docs stay true to the code: flags they name exist, links resolve, and the README stays a front door.

Which script a `--flag` belongs to (kept simple on purpose, so a doc writer can predict it):

1. Command lines. In fenced code blocks (continuation lines joined) and in backtick spans, a stage script name
   (`calibrate.py`, `prune.py`, `recover.py`, `generate.py`, `score.py`, `correlate.py`, not preceded by a letter,
   `_` or `/`) starts a command; every `--flag` after it, up to the next `|`, `&&`, `;`, `>` or stage script,
   belongs to that script. So `generate.py ... | python score.py - > x` checks generate's flags, then score's.
2. Sections. A markdown heading that names exactly one stage script makes a section about it, down to the next
   heading of the same or a higher level (subheadings that name no script stay in it). A backtick span that starts
   with `--` and names no script, inside such a section, belongs to that script.

Everything else is not checked: flags of bench scripts (`bench/*.py`), make variables (`N=100`), flags in prose
outside backticks. `--help` and `-h` always exist. To name another script's flag inside a section, write the
script into the span: `prune.py --calib`. `--no-x` counts when the parser has it (BooleanOptionalAction adds it).
"""
import importlib
import os
import re

import pytest

from conftest import ROOT

STAGES = ("calibrate", "prune", "recover", "generate", "score", "correlate")
README_LIMIT = 12_288  # bytes: a front door someone reads in five minutes
SCRIPT = re.compile(r"(?<![\w/.-])(" + "|".join(STAGES) + r")\.py\b")
FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")
BREAK = re.compile(r"\|\||\||&&|;|>")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")
HEADING = re.compile(r"^(#{1,6})\s+(.*)$")


def doc_paths():
    docs = os.path.join(ROOT, "docs")
    names = sorted(f for f in os.listdir(docs) if f.endswith(".md")) if os.path.isdir(docs) else []
    return ["README.md", "bench/README.md"] + [f"docs/{f}" for f in names]


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


_OPTIONS = {}


def stage_options(stage):
    """Every option string of the stage's argparse parser (build_parser(), no side effects)."""
    if stage not in _OPTIONS:
        parser = importlib.import_module(stage).build_parser()
        _OPTIONS[stage] = {o for a in parser._actions for o in a.option_strings} | {"--help", "-h"}
    return _OPTIONS[stage]


def command_flags(text):
    """[(stage, flag)] from one command line or backtick span (rule 1)."""
    found, stage = [], None
    for token in re.split(r"(\s+|\|\||\||&&|;|>)", text):
        m = SCRIPT.search(token)
        if BREAK.fullmatch(token.strip() or " "):
            stage = None
        elif m:
            stage = m.group(1)
        elif stage:
            found += [(stage, f) for f in FLAG.findall(token)]
    return found


def section_stage(line, stack):
    """Update the heading stack with a heading line; returns the stage the current section is about, or None."""
    m = HEADING.match(line)
    level, title = len(m.group(1)), m.group(2)
    while stack and stack[-1][0] >= level:
        stack.pop()
    named = set(SCRIPT.findall(title))
    parent = stack[-1][1] if stack else None
    stack.append((level, (named.pop() if len(named) == 1 else None) if named else parent))
    return stack[-1][1]


def attributed_flags(text):
    """[(stage, flag, line number)] that `text` (markdown) names, by the rules of the module docstring."""
    out, in_fence, joined = [], False, ""
    for no, line in enumerate(text.split("\n"), 1):  # fenced code blocks: command lines
        if line.startswith("```"):
            in_fence, joined = not in_fence, ""
        elif in_fence:
            joined += line.rstrip("\\")
            if not line.endswith("\\"):
                out += [(s, f, no) for s, f in command_flags(joined)]
                joined = ""
    # backtick spans may cross a line break, so they are read from the text without its fenced blocks
    body = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    stack, stage, pos_stage = [], None, []
    for line in body.split("\n"):
        if HEADING.match(line):
            stage = section_stage(line, stack)
        pos_stage.append(stage)
    for m in SPAN.finditer(body):
        no = body.count("\n", 0, m.start()) + 1
        span = m.group(1)
        if SCRIPT.search(span):
            out += [(s, f, no) for s, f in command_flags(span)]
        elif span.startswith("--") and pos_stage[no - 1] and "bench/" not in span:
            out += [(pos_stage[no - 1], f, no) for f in FLAG.findall(span)]
    return out


def unknown_flags(text):
    return [f"{stage}.py {flag} (line {no})" for stage, flag, no in attributed_flags(text)
            if flag not in stage_options(stage)]


def slug(title):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    title = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", title.strip()).lower()
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def broken_links(rel, text):
    """Relative links of a markdown file whose target file (or heading anchor in a .md target) does not exist."""
    bad = []
    body = FENCE.sub("", text)
    for target in re.findall(r"\]\(([^)\s]+)\)", body):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), path)) if path else os.path.join(ROOT, rel)
        if not os.path.exists(full):
            bad.append(f"{target} (no file {os.path.relpath(full, ROOT)})")
        elif anchor and full.endswith(".md"):
            with open(full, encoding="utf-8") as f:
                slugs = {slug(m.group(2)) for m in map(HEADING.match, FENCE.sub("", f.read()).split("\n")) if m}
            if anchor not in slugs:
                bad.append(f"{target} (no heading #{anchor})")
    return bad


# ---------------------------------------------------------------------------------------------- the real docs

@pytest.mark.parametrize("rel", doc_paths())
def test_every_flag_named_next_to_a_stage_exists(rel):
    assert unknown_flags(read(rel)) == [], f"{rel} names flags the stage scripts do not have"


@pytest.mark.parametrize("rel", doc_paths())
def test_every_relative_link_resolves(rel):
    assert broken_links(rel, read(rel)) == [], f"{rel} has broken links"


def test_readme_is_a_front_door():
    size = os.path.getsize(os.path.join(ROOT, "README.md"))
    assert size <= README_LIMIT, f"README.md is {size} bytes; move reference material to docs/ (limit {README_LIMIT})"
    text = read("README.md")
    for command in ("make all", "make test"):  # how users and CI start: keep them verbatim
        assert f"\n{command} " in text, f"README.md lost the command `{command}`"


# ------------------------------------------------------------------------------- the checks themselves can fail

def test_a_bogus_flag_is_caught_in_a_command_a_pipe_and_a_section():
    text = ("```\npython prune.py --model m --sparsity 0.5 --bogus -o x\n"
            "python generate.py --model m x.jsonl | python score.py - --style cot\n```\n"
            "## recover.py\n\nThe `--rank` is fine, `--no-such-flag` is not, and `prune.py --calib` is prune's.\n"
            "### A subsection\n\n`--still-recover`\n## Other\n\n`--unchecked` and `bench/x.py --anything`\n")
    assert unknown_flags(text) == ["prune.py --bogus (line 2)", "score.py --style (line 3)",
                                   "recover.py --no-such-flag (line 7)", "recover.py --still-recover (line 10)"]


def test_continuation_lines_and_spans_across_lines_are_read():
    text = "```\npython correlate.py --base a \\\n    --wrong b\n```\nsee `generate.py\n--nope`\n"
    assert sorted(unknown_flags(text)) == ["correlate.py --wrong (line 3)", "generate.py --nope (line 5)"]


def test_a_broken_link_and_a_missing_anchor_are_caught():
    text = ("[ok](docs/formats.md) [web](https://example.org) [gone](docs/nope.md) "
            "[anchor](docs/methods.md#no-such-heading) [self](#what-is-here)")
    assert broken_links("README.md", text) == ["docs/nope.md (no file docs/nope.md)",
                                               "docs/methods.md#no-such-heading (no heading #no-such-heading)"]


def test_slugs_follow_github():
    assert slug("OUT.part: resumable output") == "outpart-resumable-output"
    assert slug("The selectivity file (`calibrate.py --source selectivity`)") == \
        "the-selectivity-file-calibratepy---source-selectivity"
