"""common.py: the JSONL, atomic-write and model-source contracts."""
import io
import json
import os
import sys

import pytest

from common import (CotpruneError, JsonlAppender, atomic_open, model_source, read_jsonl, require_fields,
                    write_jsonl)


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
    a = JsonlAppender(p)
    a.write([{"id": "a"}, {"id": "b"}])
    a.f.write('{"id": "c", "out')  # died mid-write
    a.f.close()
    b = JsonlAppender(p)
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
