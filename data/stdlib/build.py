"""Build data/stdlib/functions.jsonl: Python functions with docstrings from the standard library, as code tasks.

    python data/stdlib/build.py                 # rewrites functions.jsonl beside this file (deterministic)
    python data/stdlib/build.py --check         # exit 1 if the file differs from what this Python would build

functions.jsonl is committed (built with Python BUILT_WITH), so every machine trains and measures on the same set.

The code half of the neuron study needs code prompts for selectivity and instruction -> code pairs for LoRA
recovery, and must never see HumanEval (the test set). The paper used CodeFeedback-Filtered-Instruction, which is
on a hub we cannot reach; the standard library is on every machine and under one clear licence (PSF, LICENSE here).

Each public top-level function of the pure-Python modules (module_names: all but tests, IDLE, GUIs, ...) with a docstring of at least
MIN_DOC characters, at most MAX_LINES source lines, no `self`/`cls` first argument and at least one statement
besides the docstring becomes one record:
    id        stdlib-<module>.<name>
    question  a HumanEval-style stub: the signature and the docstring, then a blank line
    solution  the function's source as written in the module (decorators dropped, comments kept)
    module, name
Records whose name is a HumanEval entry point, or whose docstring shares a line of 30+ characters with a HumanEval
prompt, are dropped (tests/test_code.py checks that the two sets are disjoint).
"""
import argparse
import ast
import gzip
import json
import os
import sys
import sysconfig
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "functions.jsonl")
HUMANEVAL = os.path.join(os.path.dirname(HERE), "humaneval", "HumanEval.jsonl.gz")
MIN_DOC, MAX_LINES = 40, 40
BUILT_WITH = "3.11.7"  # the Python whose standard library functions.jsonl was built from (others differ slightly)
SKIP = ("test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages", "pydoc_data",
        "__phello__", "config-", "venv", "distutils", "unittest/test")


def module_names():
    """Every pure-Python module of the standard library outside SKIP (tests, IDLE, GUIs, ...), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    names = []
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel != "." and any(rel == s or rel.startswith(s) for s in SKIP):
            dirs[:] = []
            continue
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("test"):
                parts = ([] if rel == "." else rel.split(os.sep)) + [f[:-3]]
                names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(n for n in names if n)


def module_path(name):
    base = os.path.join(sysconfig.get_paths()["stdlib"], *name.split("."))
    return base + ".py" if os.path.isfile(base + ".py") else os.path.join(base, "__init__.py")


def stub(fn, lines):
    """The signature line(s) and the docstring of a function, dedented to the top level."""
    first = fn.lineno - 1
    doc_end = fn.body[0].end_lineno
    return textwrap.dedent("\n".join(lines[first:doc_end])) + "\n"


def functions(name):
    path = module_path(name)
    try:
        src = open(path, encoding="utf-8").read()
        tree = ast.parse(src)
    except (OSError, SyntaxError, UnicodeDecodeError):  # a template or a Python 2 file: not a module to read
        return
    lines = src.split("\n")
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
            continue
        doc = ast.get_docstring(fn)
        args = [a.arg for a in fn.args.posonlyargs + fn.args.args]
        body = fn.body[1:]
        if not doc or len(doc) < MIN_DOC or fn.end_lineno - fn.lineno + 1 > MAX_LINES or not body \
                or args[:1] in (["self"], ["cls"]):
            continue
        yield {"id": f"stdlib-{name}.{fn.name}", "question": stub(fn, lines),
               "solution": textwrap.dedent("\n".join(lines[fn.lineno - 1: fn.end_lineno])) + "\n",
               "module": name, "name": fn.name}


def humaneval_sets():
    names, doc_lines = set(), set()
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                names.add(rec["entry_point"])
                doc_lines.update(s.strip() for s in rec["prompt"].split("\n") if len(s.strip()) >= 30)
    return names, doc_lines


def build():
    names, doc_lines = humaneval_sets()
    out, seen = [], set()
    for name in module_names():
        for rec in functions(name):
            if rec["name"] in names or rec["id"] in seen \
                    or any(s.strip() in doc_lines for s in rec["question"].split("\n")):
                continue
            seen.add(rec["id"])
            out.append(rec)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = p.parse_args(argv)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build())
    if args.check:
        same = os.path.exists(OUT) and open(OUT, encoding="utf-8").read() == text
        print("same" if same else f"{OUT} differs from what Python {sys.version.split()[0]} builds")
        return 0 if same else 1
    with open(OUT + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(OUT + ".tmp", OUT)
    print(f"{text.count(chr(10))} functions -> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
