"""Files and JSONL: atomic writes, strict JSON, readers that name file and line, resumable output.

    read_jsonl / write_jsonl / require_fields   '-' is stdin/stdout; a malformed line names its file and line
    atomic_open / write_json / read_json        write a hidden temporary file beside X, then os.replace
    JsonlAppender                               OUT.part with its settings line: resume, or refuse other settings
    check_output_file                           refuse an -o that cannot become a file, before any work
"""
import contextlib
import json
import os
import sys

from common.cli import CotpruneError


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Open `path` for writing so that readers see the old file or the whole new one, never a half.

    '-' is stdout. On any exception the temporary file is removed and nothing is left behind.
    """
    if path == "-":
        out = sys.stdout.buffer if "b" in mode else sys.stdout
        yield out
        out.flush()
        return
    import tempfile
    if os.path.isdir(path):
        raise CotpruneError(f"{path} is a folder: name a file")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # A fresh hidden name beside `path`, never X.tmp: a file of the user's with that name stays untouched, and two
    # runs writing the same output do not write into one temporary file.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(
        os.path.abspath(path)))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the output gets the permissions open() would give it
    f = os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_file(path):
    """Refuse, before any work, an output path that cannot become a file ('-' is stdout and always fine)."""
    if path == "-":
        return
    if os.path.isdir(path):
        raise CotpruneError(f"-o {path} is a folder: name a file")
    check_parent_writable(path)


def check_parent_writable(path):
    """Refuse a path whose nearest existing ancestor is a file or not writable (its folders would be made later)."""
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CotpruneError(f"-o {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise CotpruneError(f"-o {path}: {existing} is not writable")


def dumps(obj, **kw):
    """Strict JSON (no NaN or Infinity, which other readers reject); a non-finite number is a CotpruneError."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, **kw)
    except ValueError:
        rid = obj.get("id", "?") if isinstance(obj, dict) else "?"
        raise CotpruneError(f"record {rid!r} holds a NaN or infinite number, which strict JSON cannot hold") from None


def write_json(path, obj):
    text = dumps(obj, indent=2)
    with atomic_open(path) as f:
        f.write(text + "\n")


def read_json(path, what="JSON file"):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CotpruneError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise CotpruneError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise CotpruneError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CotpruneError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def _parse_jsonl_line(line, name, lineno):
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise CotpruneError(f"{name}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise CotpruneError(f"{name}:{lineno}: expected a JSON object, got {type(rec).__name__}")
    return rec


def read_jsonl(path, limit=0):
    """All records of a JSONL file as a list ('-' = stdin); blank lines are skipped; limit 0 = all.

    Reading everything up front means a malformed line stops a stage before it writes anything.
    """
    if path == "-":
        if sys.stdin.isatty():
            raise CotpruneError("reading JSONL from stdin, but stdin is a terminal: pipe a file in or name one")
        f, name = sys.stdin, "<stdin>"
    else:
        if os.path.isdir(path):
            raise CotpruneError(f"input {path} is a folder, not a JSONL file")
        try:
            f, name = open(path, "rb"), path
        except FileNotFoundError:
            raise CotpruneError(f"input file not found: {path}") from None
    records = []
    with contextlib.ExitStack() as stack:
        if f is not sys.stdin:
            stack.enter_context(f)
        lines = getattr(f, "buffer", f) if f is sys.stdin else f
        for lineno, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError as e:
                raise CotpruneError(f"{name}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None
            if line.strip():
                records.append(_parse_jsonl_line(line, name, lineno))
                if limit and len(records) >= limit:
                    break
    return records


def require_fields(records, fields, name, strings=()):
    """Every record has `fields`, the ones in `strings` as strings, an `id` (if any) that is a string or an integer,
    and no id twice."""
    for i, rec in enumerate(records, 1):
        missing = [k for k in fields if k not in rec]
        if missing:
            raise CotpruneError(f"{name}: record {i} (id {rec.get('id', '?')!r}) lacks field(s) {', '.join(missing)}")
        if "id" in rec and (isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int))):
            raise CotpruneError(f"{name}: record {i} has an id of type {type(rec['id']).__name__}: ids are strings "
                                f"or integers")
        wrong = [k for k in strings if k in rec and not isinstance(rec[k], str)]
        if wrong:
            raise CotpruneError(f"{name}: record {i} (id {rec.get('id', '?')!r}): field {wrong[0]} is "
                                f"{type(rec[wrong[0]]).__name__}, not a string")
    ids = [r["id"] for r in records if "id" in r]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise CotpruneError(f"{name}: duplicate id {dup!r}; every record needs a unique id")


def write_jsonl(path, records):
    lines = [dumps(rec) + "\n" for rec in records]  # all serialised first: a bad record leaves no partial file
    with atomic_open(path) as f:
        f.writelines(lines)


class JsonlAppender:
    """Resumable JSONL output: records go to `path.part` as they are made, and `finish()` publishes `path`.

    The first line of `path.part` holds `settings` (whatever decides the records: model, flags, dtype); a rerun with
    other settings is refused rather than merged. A rerun with the same ones reads the ids already there (`done`),
    so no work is lost or repeated. A torn last line (the process died mid-write) is dropped; damage anywhere else is
    an error. The part file is created at the first write, so a run that fails before producing anything leaves
    nothing. With path '-' records are kept in memory and written to stdout by finish(), in the same order a file
    would get.
    """

    HEADER = "cotprune_part"

    def __init__(self, path, settings):
        self.path, self.done, self.records, self.f = path, set(), [], None
        self.settings = json.loads(dumps(settings))  # as it will read back
        if path == "-":
            return
        self.part = path + ".part"
        if os.path.lexists(self.part):
            self._resume()

    def _lock(self, f):
        """Hold an exclusive advisory lock on the part file for as long as this run has it open: a second run of
        the same command would otherwise append to it too, and records would be duplicated."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            self.f = None
            raise CotpruneError(f"another run is writing {self.part}: wait for it to finish or stop it") from None

    def _resume(self):
        if not os.path.isfile(self.part):
            raise CotpruneError(f"{self.part} exists and is not a file: move it away")
        self.f = open(self.part, "a", encoding="utf-8")
        self._lock(self.f)
        good, lines = 0, open(self.part, "rb").read().split(b"\n")
        for lineno, line in enumerate(lines[:-1], 1):  # the last piece has no newline: torn or empty, dropped
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.close()
                raise CotpruneError(f"{self.part}:{lineno}: damaged partial output; delete it to start over") from None
            if lineno == 1:
                try:
                    self._check_header(rec)
                except CotpruneError:
                    self.close()
                    raise
            elif not isinstance(rec, dict) or "id" not in rec:
                self.close()
                raise CotpruneError(f"{self.part}:{lineno}: damaged partial output; delete it to start over")
            else:
                self.records.append(rec)
                self.done.add(rec["id"])
            good += len(line) + 1
        if good == 0:  # not even a header: nothing was kept
            self.f.close()
            self.f = None
            os.unlink(self.part)
            return
        os.truncate(self.part, good)

    def _check_header(self, rec):
        saved = rec.get(self.HEADER) if isinstance(rec, dict) else None
        if not isinstance(saved, dict):
            raise CotpruneError(f"{self.part} is not a partial output of this stage (no settings line); move it away")
        diff = [k for k in sorted(set(saved) | set(self.settings)) if saved.get(k) != self.settings.get(k)]
        if diff:
            k = diff[0]
            raise CotpruneError(f"{self.part} was made with other settings ({k}: {saved.get(k)!r} there, "
                                f"{self.settings.get(k)!r} now); rerun with the same flags or delete it")

    def write(self, records):
        lines = "".join(dumps(r) + "\n" for r in records)
        self.records.extend(records)
        self.done.update(r["id"] for r in records)
        if self.path == "-":
            return
        if self.f is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            try:
                self.f = open(self.part, "x", encoding="utf-8")  # "x": never into a file another run just made
            except FileExistsError:
                raise CotpruneError(f"another run created {self.part} while this one worked: run one at a time")
            self._lock(self.f)
            self.f.write(dumps({self.HEADER: self.settings}) + "\n")
        self.f.write(lines)
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        """Close the part file (releasing its lock) without publishing; a rerun continues from it."""
        if self.f is not None and not self.f.closed:
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def finish(self, records=None):
        """Publish the output: `records` (e.g. put back in input order) if given, else what was appended."""
        records = self.records if records is None else records
        if self.f is not None:
            self.f.close()
        write_jsonl(self.path, records)
        if self.path != "-" and os.path.exists(self.part):
            os.unlink(self.part)
