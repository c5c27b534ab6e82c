"""common/sandbox.py: HumanEval's own solutions pass, wrong ones fail, hostile samples are contained, extraction
follows its rules, pass@k matches brute force. Every test runs real subprocesses; about 20 s on two cores."""
import itertools
import math
import os
import secrets

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from common import sandbox

HUMANEVAL = os.path.join(ROOT, "data", "humaneval", "HumanEval.jsonl.gz")
SQUARE_TEST = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
RIGHT = "def square(x):\n    return x * x\n"
WRONG = "def square(x):\n    return x + 2\n"  # right for 2, wrong for 3


def run(program, timeout=1.0, test=SQUARE_TEST, entry_point="square", **kw):
    return sandbox.run_tests(program, test, entry_point, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def humaneval():
    return {r["task_id"]: r for r in sandbox.read_humaneval(HUMANEVAL)}


# ------------------------------------------------------------------------------------------- HumanEval

def test_read_humaneval(humaneval):
    assert len(humaneval) == 164
    r = humaneval["HumanEval/0"]
    assert set(r) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    assert r["entry_point"] == "has_close_elements" and "def check(candidate)" in r["test"]


def test_canonical_solutions_pass_and_wrong_ones_fail(humaneval):
    tasks = list(humaneval.values())
    variants = {
        "completion": lambda t, i: t["canonical_solution"],  # the body only, as a base model continues
        "repeated": lambda t, i: t["prompt"] + t["canonical_solution"],  # the whole function again
        "pass body": lambda t, i: "    pass\n",
        "other task": lambda t, i: tasks[(i + 1) % len(tasks)]["canonical_solution"],
    }
    jobs, labels = [], []
    for name, output in variants.items():
        for i, t in enumerate(tasks):
            program = sandbox.extract_code(output(t, i), t["prompt"], t["entry_point"])
            jobs.append({"program": program, "test": t["test"], "entry_point": t["entry_point"],
                         "prompt": t["prompt"]})
            labels.append((name, t["task_id"]))
    results = sandbox.run_many(jobs, workers=2, timeout=3.0)
    by = {}
    for (name, task_id), res in zip(labels, results):
        by.setdefault(name, {})[task_id] = res
    for name in ("completion", "repeated"):
        failed = {k: v["result"] for k, v in by[name].items() if not v["passed"]}
        assert not failed, f"{name}: canonical solutions failed: {failed}"
    for name in ("pass body", "other task"):
        passed = [k for k, v in by[name].items() if v["passed"]]
        assert not passed, f"{name}: wrong solutions passed: {passed}"
    assert all(v["result"].startswith(("failed", "timed out")) for v in by["pass body"].values())


def test_tests_see_the_prompt_helpers_not_the_samples(humaneval):
    t = humaneval["HumanEval/32"]  # the test calls poly(); a sample redefining it must not fool it
    cheat = ("def poly(xs, x):\n    return 0\n\n"
             "def find_zero(xs):\n    return 12345.0\n")
    program = sandbox.extract_code(cheat, t["prompt"], t["entry_point"])
    assert not run(program, 3.0, t["test"], t["entry_point"], prompt=t["prompt"])["passed"]
    good = sandbox.extract_code(t["canonical_solution"], t["prompt"], t["entry_point"])
    assert run(good, 3.0, t["test"], t["entry_point"], prompt=t["prompt"])["passed"]


# ------------------------------------------------------------------------------------------ hostile code

def test_right_and_wrong():
    ok, bad = run(RIGHT), run(WRONG)
    assert ok["passed"] and ok["result"] == "passed" and ok["seconds"] < 1.0
    assert not bad["passed"] and bad["result"].startswith("failed: AssertionError")


@pytest.mark.parametrize("program, slack", [
    ("def square(x):\n    while True:\n        pass\n", 0.5),  # the child's SIGALRM stops it
    ("while True:\n    pass\n", 0.5),
    ("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\ndef square(x):\n    while True:\n"
     "        pass\n", sandbox.GRACE_S + 0.8),  # the parent's wall clock kills it
    ("def square(x):\n    while True:\n        try:\n            while True:\n                pass\n"
     "        except BaseException:\n            pass\n", sandbox.GRACE_S + 0.8),
    ("def square(x):\n    while True:\n        print('x' * 1000)\n", 0.5),
])
def test_infinite_loops_time_out(program, slack):
    res = run(program, timeout=1.0)
    assert res == {**res, "passed": False, "result": "timed out"}
    assert res["seconds"] < 1.0 + slack


def _marked(marker):
    """pids of live processes named marker (a killed one stays a zombie until pid 1 reaps it: not counted)."""
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                name, rest = f.read().split(" (", 1)[1].rsplit(") ", 1)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if name == marker and rest[0] not in "ZX":
            found.append(p)
    return found


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()\n",
    "import posix\nwhile True:\n    posix.fork()\n",
    "import subprocess\nsubprocess.Popen(['sleep', '30'])\n" + RIGHT,
    "import subprocess\nsubprocess.run('sleep 30 &', shell=True)\n" + RIGHT,
    "import os\nos.system('sleep 30 &')\n" + RIGHT,
    "import os\nos.posix_spawn('/bin/sleep', ['sleep', '30'], {})\n" + RIGHT,
    "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\n" + RIGHT,
    "import ctypes\nctypes.CDLL(None).fork()\n" + RIGHT,
])
def test_spawning_is_refused(program):
    res = run(program)
    assert not res["passed"] and res["result"].startswith("failed"), res


@pytest.mark.parametrize("then", [RIGHT, "while True:\n    pass\n"])
def test_forked_processes_do_not_survive(then):
    # Through the guard (ctypes re-imported, fork from libc): the session kill must still reap the children.
    marker = "sbx" + secrets.token_hex(4)
    program = ("import _io, sys, time\nsys.modules.pop('ctypes', None); sys.modules.pop('_ctypes', None)\n"
               "import ctypes\nlibc = ctypes.CDLL(None)\n"
               "for _ in range(3):\n"
               "    if libc.fork() == 0:\n"
               f"        _io.open('/proc/self/comm', 'w').write('{marker}')\n"
               "        while True:\n            time.sleep(0.05)\n"
               "time.sleep(0.2)\n" + then)
    res = run(program)
    assert res["passed"] == (then == RIGHT), res  # a right answer may fork; it is still judged on its tests
    assert _marked(marker) == []


@pytest.mark.parametrize("program", [
    "def square(x):\n    a = bytearray(4 << 30)\n    return x * x\n",
    "a = [0] * 10 ** 9\n" + RIGHT,
    "def square(x):\n    return len('x' * (2 << 30)) * 0 + x * x\n",
])
def test_huge_allocations_fail(program):
    res = run(program)
    assert res == {**res, "passed": False, "result": "failed: MemoryError"}


def test_files_outside_the_working_directory_are_safe(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    new = tmp_path / "new.txt"
    attacks = [
        f"open({str(new)!r}, 'w').write('x')\n",
        f"import pathlib\npathlib.Path({str(new)!r}).write_text('x')\n",
        f"import os\nos.close(os.open({str(new)!r}, os.O_CREAT | os.O_WRONLY))\n",
        f"open({str(keep)!r}, 'w').write('')\n",
        f"import os\nos.remove({str(keep)!r})\n",
        f"import os\nos.unlink({str(keep)!r})\n",
        f"import pathlib\npathlib.Path({str(keep)!r}).unlink()\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
        f"import os\nos.rename({str(keep)!r}, {str(new)!r})\n",
        f"import os\nos.symlink({str(keep)!r}, 'link')\nopen('link', 'w').write('')\n",
    ]
    results = sandbox.run_many([{"program": a + RIGHT, "test": SQUARE_TEST, "entry_point": "square"}
                                for a in attacks], workers=2, timeout=1.0)
    for attack, res in zip(attacks, results):
        assert not res["passed"], (attack, res)
    assert not new.exists() and keep.read_text() == "precious"
    inside = run("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n" + RIGHT)
    assert inside["passed"], inside  # the working directory itself is writable


def test_the_parents_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("COTPRUNE_TEST_SECRET", "xyz")
    # Each sample is right only if it can read what it looks for: reading must fail, and a control that looks
    # for something the child is given (LANG) shows the trick would work.
    peek = "import os\ndef square(x):\n    return x * x if {} else 0\n"
    assert run(peek.format("os.environ.get('LANG') == 'C.UTF-8'"))["passed"]
    assert not run(peek.format("os.environ.get('COTPRUNE_TEST_SECRET') == 'xyz'"))["passed"]
    assert not run(peek.format("'HOME' in os.environ"))["passed"]
    assert "HOME" in os.environ or "PATH" in os.environ
    proc = ("import os\ndef square(x):\n    env = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
            "    return x * x if b'PATH=' in env else 0\n")
    res = run(proc)
    assert not res["passed"] and "PermissionError" in res["result"], res


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n" + RIGHT,
    "import os\nos._exit(0)\n" + RIGHT,
    "raise SystemExit(0)\n" + RIGHT,
    "raise KeyboardInterrupt\n" + RIGHT,
    "import sys\ndef square(x):\n    sys.exit(0)\n",
    "import os\ndef square(x):\n    os._exit(0)\n",
    "def square(x):\n    raise KeyboardInterrupt\n",
    "def square(x):\n    raise GeneratorExit\n",
    "import atexit, os\natexit.register(lambda: os.write(3, b'ok'))\nraise SystemExit\n",
    "import threading, os\nthreading.Thread(target=lambda: os._exit(0)).start()\n" + WRONG,
])
def test_exits_and_base_exceptions_are_not_passes(program):
    res = run(program)
    assert not res["passed"] and res["result"] != "passed", res


@pytest.mark.parametrize("program", [
    "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n" + WRONG,
    "def check(candidate):\n    pass\n" + WRONG,
    "import builtins\nbuiltins.check = lambda c: None\n" + WRONG,
    "__builtins__['AssertionError'] = KeyboardInterrupt\n" + WRONG,
    "class Yes:\n    def __eq__(self, other):\n        return True\n"
    "def square(x):\n    return Yes()\n",
    "class Int(int):\n    def __eq__(self, other):\n        return True\n"
    "def square(x):\n    return Int(0)\n",
    "class Yes:\n    __module__ = 'builtins'\n    def __eq__(self, other):\n        return True\n"
    "def square(x):\n    return [Yes()][0]\n",
    "print('passed')\nprint('0' * 32 + ' ok')\nimport sys\nsys.stderr.write('passed\\n')\n" + WRONG,
    "import os\nfor fd in range(3, 21):\n    for line in (b'ok\\n', b'0' * 32 + b' ok\\n', b'passed\\n'):\n"
    "        try:\n            os.write(fd, line)\n        except OSError:\n            pass\n" + WRONG,
    "import os\nfor fd in range(3, 21):\n    try:\n        os.close(fd)\n    except OSError:\n"
    "        pass\n" + RIGHT,
])
def test_forgeries_do_not_pass(program):
    res = run(program)
    assert not res["passed"], res


def test_a_forked_copy_cannot_report_for_the_harness():
    # The fork runs the right function through its own copy of the harness; the original runs the wrong one.
    program = ("import sys\nsys.modules.pop('ctypes', None); sys.modules.pop('_ctypes', None)\nimport ctypes\n"
               "if ctypes.CDLL(None).fork() == 0:\n    exec(" + repr(RIGHT) + ")\nelse:\n    import time\n"
               "    time.sleep(0.3)\n    exec(" + repr(WRONG) + ")\n")
    res = run(program)
    assert not res["passed"] and res["result"].startswith("failed: AssertionError"), res


def test_honest_return_types_are_not_rejected():
    test = "def check(candidate):\n    assert candidate('aab') == {'a': 2, 'b': 1}\n"
    counter = "import collections\ndef hist(s):\n    return collections.Counter(s)\n"
    assert run(counter, test=test, entry_point="hist")["passed"]
    assert run("import numpy as np\ndef square(x):\n    return np.int64(x) ** 2\n", timeout=3.0)["passed"]
    assert run("def square(x):\n    return float(x * x)\n")["passed"]
    assert run("def square(x):\n    return True and x * x\n")["passed"]


@pytest.mark.parametrize("program", [
    "import sys\ndef square(x):\n    sys.stdout.write('x' * 10 ** 8)\n    return x * x\n",
    "import sys\ndef square(x):\n    sys.stderr.write('y' * 10 ** 8)\n    return x * x\n",
    "import os\ndef square(x):\n    os.write(1, b'z' * 10 ** 7)\n    os.write(2, b'z' * 10 ** 7)\n    return x * x\n",
])
def test_huge_output_does_not_hang(program):
    res = run(program, timeout=3.0)
    assert res["passed"] and res["seconds"] < 3.0, res


def test_run_many_keeps_input_order():
    programs = [RIGHT, WRONG, "while True:\n    pass\n", RIGHT]
    res = sandbox.run_many([{"program": p, "test": SQUARE_TEST, "entry_point": "square"} for p in programs],
                           workers=2, timeout=0.5)
    assert [r["result"] for r in res] == ["passed", "failed: AssertionError", "timed out", "passed"]


def test_missing_entry_point_and_syntax_error_fail():
    assert run("def cube(x):\n    return x ** 3\n")["result"].startswith("failed: NameError")
    assert run("def square(x)\n    return x * x\n")["result"].startswith("failed: SyntaxError")


# ------------------------------------------------------------------------------------------- extraction

PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
TOTAL_TEST = "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"
SIG = "def total(xs: List[int]) -> int:\n"


def passes(output, prompt=PROMPT):
    program = sandbox.extract_code(output, prompt, "total")
    return program, sandbox.run_tests(program, TOTAL_TEST, "total", timeout=2.0, prompt=prompt)["passed"]


@pytest.mark.parametrize("output", [
    # fenced, prose before and after
    "Here is the solution:\n```python\n" + SIG + "    return sum(xs)\n```\nThis sums the list in O(n).\n",
    # two fences: the one that defines the entry point wins
    "Usage:\n```python\nprint(total([1, 2]))\n```\nCode:\n```py\n" + SIG + "    return sum(xs)\n```\n",
    # another language's block is ignored
    "```text\ntotal([1]) -> 1\n```\n```\n" + SIG + "    return sum(xs)\n```\n",
    # unfenced, prose after a blank line
    SIG + "    s = 0\n    for x in xs:\n        s += x\n    return s\n\nThis function adds the numbers.\n"
    "It is O(n).\n",
    # prose before unfenced code
    "Sure! Here's the code:\n" + SIG + "    return sum(xs)\n",
    # repeated signature that needs the prompt's `from typing import List`
    SIG + "    return sum(xs)\n",
    # completion style: the body only
    "    return sum(xs)\n",
    "    return sum(xs)\n```\n\nExplanation: it sums.\n",  # a stray closing fence after a body
    # truncated at the token cap mid-line, unfenced
    SIG + "    return sum(xs)\n\n\nprint(total([1, 2, 3]))\nprint(total([4, 5",
    # truncated inside an unclosed fence
    "```python\n" + SIG + "    return sum(xs)\n\n\n# Example usage\nassert total([1]) == 1\nprint(tot",
    # a truncated completion body
    "    s = 0\n    for x in xs:\n        s += x\n    return s\n\n\ndef helper(a, b):\n    return (a +",
    # a helper after the function, tests and a main block that must go
    SIG + "    return add_all(xs)\n\n\ndef add_all(xs):\n    return sum(xs)\n\n\nassert total([1]) == 1\n"
    "print(total([2]))\nfor case in [[1], [2]]:\n    print(total(case))\n\nif __name__ == \"__main__\":\n"
    "    import sys\n    sys.exit(1)\n",
])
def test_extraction_gives_a_passing_program(output):
    program, ok = passes(output)
    assert ok, program


def test_extraction_drops_test_code_and_keeps_definitions():
    output = ("import sys\nsys.setrecursionlimit(10000)\nLIMIT = 10\n\n" + SIG + "    return sum(xs)\n\n"
              "total = total\nprint(total([1]))\nassert total([1]) == 1\nresult = total([2])\n"
              "if __name__ == '__main__':\n    print(result)\n")
    program = sandbox.extract_code(output, PROMPT, "total")
    assert "sys.setrecursionlimit(10000)" in program and "LIMIT = 10" in program
    assert "total = total" in program  # rebinding the entry point is a definition, not a test
    assert "print" not in program and "assert" not in program and "result" not in program
    assert program.startswith("from typing import List")
    assert program.count('"""Sum of xs."""') == 0  # the prompt's stub is replaced by the answer's function


def test_extraction_picks_the_first_defining_block():
    output = ("```python\n" + SIG + "    return 1\n```\n```python\n" + SIG + "    return sum(xs)\n```\n")
    program = sandbox.extract_code(output, PROMPT, "total")
    assert "return 1" in program and "sum(xs)" not in program
    nodef = "```python\nx = 1\n```\n```python\ny = 2\n```\n"
    assert sandbox.extract_code(nodef, PROMPT, "total") == PROMPT + "x = 1\n"


def test_extraction_of_nothing_fails_its_tests():
    for output in ["", "I cannot help with that.", "```python\n", "def total(xs"]:
        program, ok = passes(output)
        assert not ok, program


def test_extraction_keeps_the_prompt_helpers(humaneval):
    t = humaneval["HumanEval/38"]  # decode_cyclic calls the prompt's encode_cyclic
    output = "```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```\n"
    program = sandbox.extract_code(output, t["prompt"], t["entry_point"])
    assert "def encode_cyclic" in program
    assert run(program, 3.0, t["test"], t["entry_point"], prompt=t["prompt"])["passed"]


# ------------------------------------------------------------------------------------------------ pass@k

def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations(range(n), k))  # items 0..c-1 are the correct ones
                brute = sum(any(i < c for i in d) for d in draws) / len(draws)
                assert math.isclose(sandbox.pass_at_k(n, c, k), brute, abs_tol=1e-12), (n, c, k)
    assert sandbox.pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    assert 0.0 <= sandbox.pass_at_k(10 ** 6, 3, 1000) <= 1.0
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)]:
        with pytest.raises(ValueError):
            sandbox.pass_at_k(*bad)
