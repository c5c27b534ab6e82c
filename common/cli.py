"""What every stage's command line shares: one-line errors, argparse with parse-time number checks, stderr logs.

    CotpruneError   a problem the user can fix: printed as one line, exit status 2, no traceback
    env_choice      an environment switch's value, one of its choices or '' when unset (else CotpruneError)
    run_cli         runs a stage's main(): one-line errors, Ctrl-C and SIGTERM unwind, `| head` stays quiet
    ArgumentParser  argparse whose usage errors are one line; count / positive / non_negative / positive_float /
                    share check numbers (finite, in range) at parse time
"""
import argparse
import math
import os
import sys


class CotpruneError(Exception):
    """A problem the user can fix; printed as one line without a traceback."""


def env_choice(name, choices):
    """The environment variable `name`, stripped: '' when unset or empty, else one of `choices` (a CotpruneError
    naming the variable and what it may be otherwise)."""
    value = os.environ.get(name, "").strip()
    if value and value not in choices:
        raise CotpruneError(f"{name} must be {' or '.join(choices)} (or unset), got {value!r}")
    return value


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def one_line(text, limit=400):
    """A message folded onto one line (whitespace runs become one space), cut at `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ('prog: error: ...; see --help'), not the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, low, high=None, low_open=False, what=""):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range ({what})")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


count = _number(int, 0, what="a whole number >= 0")  # --limit, --tokens ...: 0 usually means 'all'


positive = _number(int, 1, what="a whole number >= 1")  # --batch-size, --max-new-tokens ...


non_negative = _number(float, 0.0, what="a finite number >= 0")  # --temperature ...


positive_float = _number(float, 0.0, low_open=True, what="a finite number > 0")  # --alpha, --lr ...


share = _number(float, 0.0, 1.0, what="a number in [0, 1]")  # --top-p, --dropout ...


def run_cli(main):
    """Run a stage's main(); turn user errors into one line and a non-zero exit, keep `| head` quiet."""
    import signal
    prog = os.path.basename(sys.argv[0])

    def terminated(signum, frame):  # SIGTERM (kill, a scheduler's time limit) unwinds like Ctrl-C: temp files go
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminated)
    try:
        sys.exit(main())
    except CotpruneError as e:
        print(f"{prog}: error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk, a read-only folder, a path under a file: the system's words, on one line
        if isinstance(e, BrokenPipeError):
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (a rerun continues where this stopped)", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`| head`): point stdout at devnull so the interpreter's flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
