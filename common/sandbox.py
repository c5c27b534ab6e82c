"""Running model-written code against a task's tests with limits, for HumanEval: extraction, execution, pass@k.

    read_humaneval   HumanEval.jsonl.gz -> [{task_id, prompt, canonical_solution, test, entry_point}]
    extract_code     a model's answer -> a runnable program for its task (rules in its docstring)
    implements       does a program give the entry point a body (more than its docstring, pass or ...)?
    run_tests        one program against one task's tests in a fresh subprocess -> {passed, result, seconds}
    run_many         many jobs on a thread pool (one subprocess each), results in input order
    pass_at_k        the unbiased estimator of Chen et al. (2021), eq. 1

The setting is the paper's (task-specific neuron pruning, App. D): pass@1, greedy, 3 s per task, the answer
sanitised to its code block. Stdlib only, no torch: scoring never needs a GPU.

What run_tests does for each sample (after openai/human-eval's execution.py, hardened):
  - a fresh `python -I` process (isolated: no PYTHON* variables, no user site, no cwd on sys.path; site-packages
    stay importable as in the official harness, so `import numpy` works), in its own session and process group,
    in an empty temporary directory that is deleted afterwards, with an environment of PATH, LANG and three
    thread-count variables only: no HOME, no tokens;
  - limits set by the child on itself (soft = hard, so the sample cannot raise them unless it is root):
    RLIMIT_AS 1 GiB, RLIMIT_CPU timeout + 1 s, RLIMIT_FSIZE 1 MiB, RLIMIT_NOFILE 64, RLIMIT_CORE 0, and
    RLIMIT_NPROC = the user's processes + 8. RLIMIT_NPROC is NOT enforced for root (the kernel exempts uid 0 and
    CAP_SYS_ADMIN; measured here: five forks under RLIMIT_NPROC=1 as root all succeeded), so as root forking is
    stopped only by the guard below, and cleaned up by killing the session;
  - a guard in the child, before the sample runs (human-eval's reliability_guard, extended): the destructive and
    process-spawning functions of os/posix, shutil, subprocess and _posixsubprocess are set to None (not putenv,
    which numpy's import calls); sys.settrace/setprofile are removed; exit/quit/help are None; ctypes, resource,
    psutil, joblib, ipdb and tkinter cannot be imported; open(), io.open and os.open refuse paths outside the
    working directory (reading under the Python install excepted), so /proc/<parent>/environ, ~/.ssh or a file
    elsewhere cannot be opened;
  - a timer in the child (SIGALRM at `timeout`, as human-eval's time_limit) and a wall clock in the parent
    (timeout + 1 s), after which the process group and every process left in the session get SIGKILL;
  - the verdict comes from a pipe the parent made for this run, never from stdout (sent to /dev/null) or the exit
    status: the harness writes `<nonce> <its pid> ok` to it only after `check(entry_point)` returned normally;
    the nonce is random per run and reaches the child on stdin; a line from a forked copy has another pid.
    sys.exit / os._exit / SystemExit / KeyboardInterrupt before or inside the tests never write it, and bytes
    the sample writes to any fd cannot hold the nonce;
  - the tests run in their own namespace, built before the sample runs, with a copy of the real builtins: a
    sample that replaces builtins.AssertionError, abs, len, ..., or defines its own `check`, changes nothing the
    tests use. The task prompt is executed there too, so helpers the tests call (HumanEval/32 `poly`, /38
    `encode_cyclic`, /50 `encode_shift`) are the dataset's, not the sample's;
  - values returned by the entry point must be built from types the sample did not define (C types such as
    int, list, numpy.float64; or classes found in a real module, such as collections.Counter): an object whose
    __eq__ always says True fails instead of passing every `assert candidate(x) == y`.

This is NOT a security boundary against a determined adversary. The sample runs in the same process as the
harness, as the same user: it can walk the frame stack (or gc) to the harness's nonce and forge a pass, reopen a
blocked import (`del sys.modules["ctypes"]`), fork through ctypes and escape the session with setsid, open files
through _io.FileIO and so write anywhere the user may (everywhere, as root) or read /proc/<parent>/environ,
patch modules the tests import (math.fabs), or use the network. It keeps honest mistakes and reward-hacking
tricks of model code from hurting the run or faking a pass. For untrusted code, run the whole scoring stage in
a throwaway container, e.g.
    docker run --rm --network none --read-only --tmpfs /tmp:size=64m --memory 1g --pids-limit 64 \\
        --cap-drop ALL --security-opt no-new-privileges --user 65534:65534 -v "$PWD":/w:ro IMAGE \\
        python score.py ...
(as a non-root user inside it, RLIMIT_NPROC applies too).

`python sandbox.py` is the child harness; it reads its job from stdin and is not a command-line tool.
"""
import ast
import builtins
import gzip
import json
import math
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import types

TIMEOUT_S = 3.0  # per task (paper App. D, Table 8)
GRACE_S = 1.0  # the parent's wall clock allows this much past the child's own timer before SIGKILL
MEMORY_BYTES = 1 << 30  # RLIMIT_AS: address space, not resident memory
FILE_BYTES = 1 << 20  # RLIMIT_FSIZE: the largest file the sample may write
OPEN_FILES = 64  # RLIMIT_NOFILE
EXTRA_PROCS = 8  # RLIMIT_NPROC headroom over the user's current process count (no effect as root)
READ_CAP = 64 << 10  # bytes kept from the verdict pipe and from stderr; the rest is read and dropped
CHILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
             "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: classes made by `class` statements; C types (int, list) lack it

FENCE_RE = re.compile(r"^[ \t]*```+[ \t]*([\w+.-]*)[ \t]*$")
PY_TAGS = {"", "python", "py", "python3", "py3"}
# A non-indented line that starts code (or a comment), so a paragraph after a blank line is not prose.
CODE_START_RE = re.compile(r"(?:(?:async[ \t]+)?def|class|import|from|if|elif|else|try|except|finally|with|for"
                           r"|while|return)\b|[@#]")
KEEP_CALLS = {"sys.setrecursionlimit", "sys.set_int_max_str_digits"}  # top-level calls a solution may need


def read_humaneval(path):
    """HumanEval's gzipped JSONL -> records {task_id, prompt, canonical_solution, test, entry_point}."""
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append({k: rec[k] for k in keys})
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{n}: not a HumanEval record ({e})") from None
    return out


def pass_at_k(n, c, k):
    """P(at least one of k samples drawn from n passes | c of n pass) = 1 - C(n-c, k) / C(n, k), as a product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials (Chen et al. 2021, Fig. 3)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ---------------------------------------------------------------------------------------------- extraction

def _parses(source):
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: NUL bytes in the source
        return False
    return True


def _defines(lines, entry_point):
    """Whether these lines define entry_point at the top level (a repeated signature, parsed or not)."""
    pattern = re.compile(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", re.M)
    return bool(pattern.search("\n".join(lines)))


def _fenced_blocks(lines):
    """The ``` blocks of an answer: [(tag, first line index, body lines, closed)]; a closing fence is bare."""
    blocks, cur = [], None
    for i, line in enumerate(lines):
        m = FENCE_RE.match(line)
        if cur is None:
            if m:
                cur = (m.group(1).lower(), i, [])
        elif m and not m.group(1):
            blocks.append((*cur, True))
            cur = None
        else:
            cur[2].append(line)
    if cur is not None:
        blocks.append((*cur, False))
    return blocks


def _pick_code(lines, entry_point):
    """Rule 1: the python block to use, or the whole answer when it has none."""
    blocks = [b for b in _fenced_blocks(lines) if b[0] in PY_TAGS]
    if not blocks:
        return lines
    defining = [b for b in blocks if _defines(b[2], entry_point)]
    closed = [b for b in blocks if b[3]]
    if defining or closed:
        return (defining or closed)[0][2]
    _, start, body, _ = blocks[0]  # one unclosed fence: truncated at the token cap, or a stray closing fence
    before = lines[:start]
    first = next((ln for ln in before if ln.strip()), "")
    stray = _defines(before, entry_point) or first[:1].isspace()
    return before if stray else body


def _trim_prose(lines):
    """Rule 2: drop prose before the code and from the first prose paragraph after it."""
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is None:
        return []
    if not lines[first][:1].isspace():  # an indented first line is a completion body, never prose
        start = next((i for i, ln in enumerate(lines) if CODE_START_RE.match(ln)), None)
        if start is not None and start > first and not _parses("\n".join(lines[:start])):
            lines = lines[start:]
    for i in range(1, len(lines)):
        line = lines[i]
        if lines[i - 1].strip() or not line.strip() or line[:1].isspace() or CODE_START_RE.match(line):
            continue
        end = next((j for j in range(i, len(lines)) if not lines[j].strip()), len(lines))
        if not _parses("\n".join(lines[i:end])):  # a paragraph that is not Python: prose from here on
            return lines[:i]
    return lines


def _longest_parsing_prefix(lines, head=""):
    """Rule 5: the longest prefix of lines that parses after head (the prompt, for a completion)."""
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    for k in range(len(lines), 0, -1):
        if _parses(head + "\n".join(lines[:k])):
            return lines[:k]
    return []


def _is_test_code(node, entry_point):
    """Rule 3: top-level statements that test or run the solution rather than define it."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)):
        return False
    if isinstance(node, ast.Expr):
        call = node.value
        return not (isinstance(call, ast.Call) and ast.unparse(call.func) in KEEP_CALLS)
    if isinstance(node, ast.Assert):
        return True
    if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
        return True
    names = [n for n in ast.walk(node) if isinstance(n, ast.Name) and n.id == entry_point]
    stores = any(isinstance(n.ctx, ast.Store) for n in names)  # `f = lru_cache(None)(f)` redefines; keep it
    return bool(names) and not stores


def _drop_test_code(source, entry_point, from_line=0):
    """source without the top-level test code that starts after line from_line (1-based)."""
    lines = source.split("\n")
    drop = set()
    for node in ast.parse(source).body:
        if node.lineno > from_line and _is_test_code(node, entry_point):
            drop.update(range(node.lineno - 1, node.end_lineno))
    return "\n".join(ln for i, ln in enumerate(lines) if i not in drop)


def _prompt_context(prompt, entry_point):
    """The prompt without the entry point's stub: its imports and helpers (HumanEval/38's encode_cyclic)."""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return "\n".join(ln for ln in prompt.split("\n") if re.match(r"(?:import|from)\s", ln)) + "\n"
    lines = prompt.split("\n")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines[start - 1:node.end_lineno] = []
            break
    return "\n".join(lines).rstrip() + "\n"


def extract_code(output, prompt, entry_point):
    """A model's answer to a HumanEval prompt -> the program to test (paper App. D: keep only the code).

    1. Fences: the first ```python / ```py / ``` block that defines `entry_point` (else the first closed one) is
       the code; blocks tagged with another language are ignored. A lone unclosed fence is a block truncated at
       the token cap (the code is what follows it), unless the text before it defines `entry_point` or starts
       indented: then it is a stray closing fence and the code is what precedes it. No fence: the whole answer.
    2. Prose: lines before the first code line (def, class, import, from, @, #, ...) are dropped when they do not
       parse as Python; from the first non-indented paragraph after a blank line that neither starts like code
       nor parses as Python, everything is dropped.
    3. Tests: top-level expression statements (print(...), f(3); but sys.setrecursionlimit(...) stays), asserts,
       `if __name__ == "__main__":` blocks, and statements that use `entry_point` without redefining it are
       dropped.
    4. Style: if the code defines `entry_point` at the top level (a repeated signature), the program is the prompt
       without its stub (its imports, e.g. `from typing import List`, and helpers) followed by the code. If not
       (the model continued the body, as base models do), the program is prompt + code (completion style).
    5. Truncation: the code is cut to its longest prefix of lines that parses (with `ast.parse`, after the prompt
       in completion style), so a half line or an unclosed construct at the token cap is dropped, not fatal.
    An answer with no usable code gives the prompt's stub back (a program that fails its tests).
    """
    lines = _trim_prose(_pick_code(output.replace("\r\n", "\n").split("\n"), entry_point))
    if _defines(lines, entry_point):
        code = "\n".join(_longest_parsing_prefix(lines))
        tree = ast.parse(code)
        if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry_point
               for n in tree.body):
            return _prompt_context(prompt, entry_point) + _drop_test_code(code, entry_point) + "\n"
    head = prompt if prompt.endswith("\n") else prompt + "\n"
    body = _longest_parsing_prefix(lines, head)
    program = head + "\n".join(body)
    if not _parses(program):  # a prompt that does not parse itself: nothing to remove tests from
        return program + "\n"
    return _drop_test_code(program, entry_point, from_line=head.count("\n")) + "\n"


def implements(program, entry_point):
    """Does the program define entry_point at the top level with a body beyond its docstring, `pass` or `...`?
    (score.py: a degeneration loop after a complete function is a Type 1 trap, one inside or before it Type 2.)"""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError):
        return False
    fns = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry_point]
    if not fns:
        return False
    body = fns[-1].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    trivial = lambda n: isinstance(n, ast.Pass) or (  # noqa: E731
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and n.value.value is Ellipsis)
    return any(not trivial(n) for n in body)


# ------------------------------------------------------------------------------------ the child (harness)

class _Timeout(BaseException):
    pass


def _set_limits(timeout, memory):
    """Resource limits on this process, soft = hard so that a non-root sample cannot raise them again."""
    import resource
    uid = os.getuid()
    procs = sum(1 for p in os.listdir("/proc") if p.isdigit() and _owner(f"/proc/{p}") == uid)
    cpu = math.ceil(timeout) + 1
    for limit, value in [(resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, FILE_BYTES), (resource.RLIMIT_NOFILE, OPEN_FILES),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, procs + EXTRA_PROCS)]:
        resource.setrlimit(limit, (value, value))


def _owner(path):
    try:
        return os.stat(path).st_uid
    except FileNotFoundError:  # the process ended while we counted
        return None


def _guard():
    """human-eval's reliability_guard, extended: disable what deletes, moves, kills, spawns or traces."""
    import faulthandler
    import posix
    import shutil
    import _posixsubprocess
    faulthandler.disable()
    # putenv/unsetenv stay (human-eval disables putenv): numpy's import calls them, the environment is ours.
    for name in ("kill", "killpg", "system", "remove", "unlink", "rmdir", "removedirs",
                 "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown",
                 "fchown", "lchown", "chflags", "lchflags", "chroot", "chdir", "fchdir", "setuid", "setgid",
                 "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "setsid", "setpgid",
                 "setpgrp", "fork", "forkpty", "vfork", "posix_spawn", "posix_spawnp", "spawnv", "spawnve",
                 "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "execv", "execve",
                 "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "popen",
                 "link", "symlink", "mkfifo", "mknod"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = subprocess.run = subprocess.call = None
    _posixsubprocess.fork_exec = None
    builtins.exit = builtins.quit = builtins.help = None
    del sys.settrace, sys.setprofile  # a trace function could jump over the asserts in check()
    for name in ("ctypes", "_ctypes", "resource", "psutil", "joblib", "ipdb", "tkinter"):
        sys.modules[name] = None  # import now raises ImportError


def _confine_files(cwd, readable):
    """open() / io.open / os.open only inside cwd, plus reading under the Python install (readable)."""
    import io
    real_open, real_os_open, realpath = io.open, os.open, os.path.realpath
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def check(path, write):
        if isinstance(path, int):  # an fd that is already open
            return
        p = realpath(os.fsdecode(path))
        if p == cwd or p.startswith(cwd + os.sep) or (not write and p.startswith(readable)):
            return
        raise PermissionError(f"sandbox: no {'writing' if write else 'reading'} outside the working directory: {p}")

    def open_(file, mode="r", *args, **kwargs):
        check(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        check(path, bool(flags & write_flags))
        return real_os_open(path, flags, *args, **kwargs)
    builtins.open = io.open = open_
    os.open = os_open


def _plain_returns(candidate):
    """candidate, wrapped so that a returned object of a class the sample made (an always-equal __eq__) raises."""
    def type_ok(t):
        if not t.__flags__ & HEAPTYPE:
            return True
        module = sys.modules.get(t.__module__)
        found = module
        for part in t.__qualname__.split("."):
            found = getattr(found, part, None)
        return module is not None and found is t

    def wrapped(*args, **kwargs):
        value = candidate(*args, **kwargs)
        todo, budget = [value], 100_000
        while todo and budget:
            v = todo.pop()
            budget -= 1
            if not type_ok(type(v)):
                raise TypeError(f"the solution returned a {type(v).__qualname__} it defined itself")
            if isinstance(v, dict):
                todo.extend(v.keys())
                todo.extend(v.values())
            elif isinstance(v, (list, tuple, set, frozenset)):
                todo.extend(v)
        return value
    return wrapped


def _one_line(e):
    try:
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except Exception:  # a sample-defined exception whose __str__ raises
        text = type(e).__name__
    return " ".join(text.split())[:300]


def _alarm(signum, frame):
    raise _Timeout


def _child():
    """The harness: read the job, limit and guard this process, run sample then tests, report on the pipe."""
    job = json.loads(sys.stdin.buffer.read())
    fd, token = job.pop("fd"), job.pop("token").encode()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the sample reads EOF, not the job
    write, exit_, getpid = os.write, os._exit, os.getpid  # kept out of the sample's reach
    real = dict(builtins.__dict__)
    # Everything after the sample runs sees the real builtins, whatever the sample does to the builtins module.
    wrap = types.FunctionType(_plain_returns.__code__, {**globals(), "__builtins__": real})
    outcome = b"fail harness: tests did not load"
    try:
        tests = {"__name__": "__test__", "__builtins__": real}
        exec(compile(job["prompt"] + "\n" + job["test"], "<test>", "exec"), tests)
        check = tests["check"]
        _set_limits(job["timeout"], job["memory"])
        _confine_files(os.getcwd(), tuple(sorted({os.path.realpath(p) + os.sep for p in
                                                  (sys.prefix, sys.base_prefix, sys.exec_prefix)})))
        _guard()
        sample = {"__name__": "__sample__", "__builtins__": builtins}
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, job["timeout"])
        try:
            exec(compile(job["program"], "<sample>", "exec"), sample)
            candidate = sample.get(job["entry_point"])
            if not real["callable"](candidate):
                raise NameError(f"the program does not define {job['entry_point']}()")
            if not job["prompt"]:  # without the prompt, the tests see the sample's helpers, as in human-eval
                for k, v in sample.items():
                    tests.setdefault(k, v)
            tests[job["entry_point"]] = candidate = wrap(candidate)  # HumanEval/33's test calls it by name
            check(candidate)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        outcome = b"ok"
    except _Timeout:
        outcome = b"timeout"
    except BaseException as e:
        outcome = b"fail " + _one_line(e).encode("utf-8", "replace")
    write(fd, b"%s %d %s\n" % (token, getpid(), outcome))  # a forked copy of the harness has another pid
    exit_(0)  # no atexit handlers, no threads of the sample left running


# ------------------------------------------------------------------------------------------ the parent

def _session_members(sid):
    """Live (non-zombie) processes whose session is sid."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != b"Z":  # fields: state ppid pgrp session ...
            pids.append(int(p))
    return pids


def _kill_session(sid):
    """SIGKILL the process group and every process still in session sid (the child and what it forked)."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already empty
    for _ in range(100):  # a forking process can add members between rounds
        pids = _session_members(sid)
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass  # exited between the scan and the kill
        time.sleep(0.01)


def _collect(proc, fds, deadline):
    """Read fds (capped) until both close or the child is gone; True if the deadline passed with it alive."""
    data = {fd: bytearray() for fd in fds}
    sel = selectors.DefaultSelector()
    for fd in fds:
        sel.register(fd, selectors.EVENT_READ)
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(min(left, 0.05)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                elif len(data[key.fd]) < READ_CAP:
                    data[key.fd] += chunk[:READ_CAP - len(data[key.fd])]
            if proc.poll() is not None and not sel.select(0):  # exited; only a grandchild holds the pipes
                break
    finally:
        sel.close()
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return [bytes(data[fd]) for fd in fds], True
    return [bytes(data[fd]) for fd in fds], False


def _verdict(channel, stderr, pid, returncode, timed_out, token):
    """(passed, result) from what the harness wrote on its pipe; stdout and the exit status are not trusted."""
    mark = b"%s %d " % (token, pid)
    ours = [ln[len(mark):] for ln in channel.split(b"\n") if ln.startswith(mark)]
    if timed_out or ours[:1] == [b"timeout"]:
        return False, "timed out"
    if ours:
        if ours[0] == b"ok":
            return True, "passed"
        return False, "failed: " + ours[0].decode("utf-8", "replace").removeprefix("fail ")
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return False, f"crashed: killed by {name}" + (" (CPU time limit)" if name == "SIGXCPU" else "")
    tail = stderr.decode("utf-8", "replace").strip().split("\n")[-1][:200]
    return False, f"crashed: exit status {returncode} before the tests finished" + (f" ({tail})" if tail else "")


def _send(proc, data):
    """Write the job to the child's stdin and close it; a child that died first is judged by its exit status."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(proc.stdin.fileno(), view):]
    except BrokenPipeError:
        return  # nothing to do: the verdict will read "crashed"
    finally:
        proc.stdin.close()


def run_tests(program, test, entry_point, timeout=TIMEOUT_S, *, prompt="", memory=MEMORY_BYTES):
    """Run program + test + check(entry_point) in a fresh limited subprocess -> {passed, result, seconds}.

    result is "passed", "failed: <one line>", "timed out" or "crashed: <why>". prompt (the task's) is executed
    with the tests so that they call the dataset's helpers; without it they see the sample's, as in human-eval.
    """
    token = secrets.token_hex(16)
    job = {"program": program, "test": test, "entry_point": entry_point, "prompt": prompt or "",
           "timeout": float(timeout), "memory": int(memory), "token": token}
    start = time.monotonic()
    r, w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="cotprune-sandbox-") as cwd:
        try:
            proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], cwd=cwd, env=CHILD_ENV,
                                    stdin=subprocess.PIPE, bufsize=0, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, pass_fds=(w,), start_new_session=True)
        finally:
            os.close(w)  # from here only the child (and what it forks) holds the write end
        _send(proc, json.dumps({**job, "fd": w}).encode())
        try:
            (channel, err), timed_out = _collect(proc, [r, proc.stderr.fileno()], start + timeout + GRACE_S)
        finally:
            _kill_session(proc.pid)
            proc.wait()
            proc.stderr.close()
            os.close(r)
    passed, result = _verdict(channel, err, proc.pid, proc.returncode, timed_out, token.encode())
    return {"passed": passed, "result": result, "seconds": round(time.monotonic() - start, 3)}


def run_many(jobs, workers=2, timeout=TIMEOUT_S):
    """run_tests for each job (a dict of its arguments: program, test, entry_point, optional prompt), in
    parallel threads, each waiting on its own subprocess; results in input order, a progress bar on stderr."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    from tqdm import tqdm
    jobs = list(jobs)
    results = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(run_tests, timeout=timeout, **job): i for i, job in enumerate(jobs)}
        for fut in tqdm(as_completed(futures), total=len(jobs), desc="tests", file=sys.stderr, disable=None):
            results[futures[fut]] = fut.result()
    return results


if __name__ == "__main__":
    _child()
