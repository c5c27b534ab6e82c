"""common: the JSONL, atomic-write, argparse and model-source contracts."""
import io
import json
import os
import sys

import pytest

from common.cli import CotpruneError
from common.files import JsonlAppender, atomic_open, read_jsonl, require_fields, write_jsonl
from common.models import model_source


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": 1}\n\n{"id": 2,}\n')
    with pytest.raises(CotpruneError, match=rf"^{p}:3: malformed JSON line"):
        read_jsonl(str(p))
    assert read_jsonl(str(p), limit=1) == [{"id": 1}]


def test_read_jsonl_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"id": "a"}\n{"id": "b"}\n'))
    assert [r["id"] for r in read_jsonl("-")] == ["a", "b"]


def test_duplicate_ids_and_missing_fields_are_errors():
    with pytest.raises(CotpruneError, match="duplicate id 'a'"):
        require_fields([{"id": "a"}, {"id": "a"}], ["id"], "f")
    with pytest.raises(CotpruneError, match="record 2 .* lacks field"):
        require_fields([{"id": "a", "q": 1}, {"id": "b"}], ["id", "q"], "f")


def test_atomic_open_leaves_nothing_on_failure(tmp_path):
    p = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_open(str(p)) as f:
            f.write("half")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    write_jsonl(str(p), [{"id": 1}])
    assert p.read_text() == '{"id": 1}\n'


def test_appender_drops_a_torn_line(tmp_path):
    p = str(tmp_path / "g.jsonl")
    a = JsonlAppender(p, {"k": 1})
    a.write([{"id": "a"}, {"id": "b"}])
    a.f.write('{"id": "c", "out')  # died mid-write
    a.f.close()
    b = JsonlAppender(p, {"k": 1})
    assert b.done == {"a", "b"}
    b.write([{"id": "c"}])
    b.finish()
    assert [json.loads(x)["id"] for x in open(p)] == ["a", "b", "c"] and not os.path.exists(p + ".part")


def test_model_source(tmp_path):
    with pytest.raises(CotpruneError, match="model not found"):
        model_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(CotpruneError, match="no config.json"):
        model_source(str(tmp_path))
    assert model_source("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)


def test_appender_refuses_a_part_made_with_other_settings(tmp_path):
    p = str(tmp_path / "g.jsonl")
    a = JsonlAppender(p, {"max_new_tokens": 96, "model": "m"})
    a.write([{"id": "a"}])
    a.f.close()
    with pytest.raises(CotpruneError, match=r"other settings \(max_new_tokens: 96 there, 8 now\)"):
        JsonlAppender(p, {"max_new_tokens": 8, "model": "m"})
    assert open(p + ".part").read().count("\n") == 2  # left as it was


@pytest.mark.parametrize("content", ['{"id": "a"}\n', '{"cotprune_part": {"k": 1}}\n{"id": 1}\nnot json\n{"id": 2}\n',
                                     '{"cotprune_part": {"k": 1}}\n[1]\n'])
def test_appender_refuses_a_damaged_or_foreign_part(tmp_path, content):
    p = tmp_path / "g.jsonl"
    (tmp_path / "g.jsonl.part").write_text(content)
    with pytest.raises(CotpruneError, match="g.jsonl.part"):
        JsonlAppender(str(p), {"k": 1})
    assert (tmp_path / "g.jsonl.part").read_text() == content


def test_appender_creates_nothing_until_the_first_record(tmp_path):
    JsonlAppender(str(tmp_path / "g.jsonl"), {})
    assert list(tmp_path.iterdir()) == []


def test_appender_to_stdout_writes_the_finished_order(capsys):
    a = JsonlAppender("-", {})
    a.write([{"id": 2}])
    a.write([{"id": 1}])
    a.finish([{"id": 1}, {"id": 2}])
    assert capsys.readouterr().out == '{"id": 1}\n{"id": 2}\n'


def test_strict_json_only(tmp_path):
    with pytest.raises(CotpruneError, match="'x' holds a NaN or infinite"):
        write_jsonl(str(tmp_path / "a.jsonl"), [{"id": "x", "v": float("inf")}])
    assert list(tmp_path.iterdir()) == []


def test_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"id": 1}\n{"id": "\xff"}\n')
    with pytest.raises(CotpruneError, match=rf"^{p}:2: not UTF-8"):
        read_jsonl(str(p))


def test_ids_must_be_strings_or_integers():
    for bad in ([1], 1.5, None, True):
        with pytest.raises(CotpruneError, match="ids are strings or integers"):
            require_fields([{"id": bad}], ["id"], "f")
    with pytest.raises(CotpruneError, match="field output is int, not a string"):
        require_fields([{"id": 1, "output": 3}], ["id", "output"], "f", strings=["output"])


def test_atomic_open_leaves_a_users_tmp_file_alone(tmp_path):
    (tmp_path / "out.jsonl.tmp").write_text("mine")
    write_jsonl(str(tmp_path / "out.jsonl"), [{"id": 1}])
    assert (tmp_path / "out.jsonl.tmp").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.jsonl.tmp"]
    assert oct(os.stat(tmp_path / "out.jsonl").st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_safetensors_are_byte_reproducible(tmp_path):
    import torch
    from common.checkpoints import write_safetensors
    meta = {f"key{i}": str(i) for i in range(20)}
    blobs = set()
    for i in range(3):
        write_safetensors(str(tmp_path / f"{i}.safetensors"), {"b": torch.ones(3), "a": torch.zeros(2)},
                          dict(reversed(meta.items())) if i % 2 else meta)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "0.safetensors"))["b"], torch.ones(3))


def test_argparse_errors_are_one_line():
    from common.cli import ArgumentParser, count
    p = ArgumentParser(prog="x.py")
    p.add_argument("--limit", type=count, default=0)
    with pytest.raises(SystemExit) as e:
        import contextlib
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            p.parse_args(["--limit", "-1"])
    assert e.value.code == 2
    assert buf.getvalue().count("\n") == 1 and buf.getvalue().startswith("x.py: error: argument --limit")


def test_a_second_run_cannot_write_the_same_part_file(tmp_path):
    """Two runs of one command at once: the second is refused instead of appending duplicates to OUT.part."""
    p = str(tmp_path / "g.jsonl")
    a = JsonlAppender(p, {"k": 1})
    a.write([{"id": 1}])
    with pytest.raises(CotpruneError, match="another run is writing"):
        JsonlAppender(p, {"k": 1})
    a.close()  # as when the first run stops: now a rerun continues its work
    b = JsonlAppender(p, {"k": 1})
    assert b.done == {1}
    b.close()
