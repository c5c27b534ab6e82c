"""calibrate.py: traces, prompt-only and generic text; budget, determinism, resumption."""
import json
import random
import re

import pytest

import calibrate
from common.chat import CHAT_INSTRUCTION
from common.cli import CotpruneError
from conftest import ROOT


def lines(path):
    return [json.loads(x) for x in open(path)]


def traces(tmp_path, tiny_llama, name, *extra):
    out = tmp_path / name
    calibrate.main(["--model", tiny_llama, "--source", "traces", "--tokens", "600", "--max-new-tokens", "12",
                    "--batch-size", "3", *extra, "-o", str(out)])
    return lines(out)


def test_traces_budget_fields_and_determinism(tmp_path, tiny_llama):
    a = traces(tmp_path, tiny_llama, "a.jsonl")
    total = sum(r["tokens"] for r in a)
    assert total >= 600 and total - a[-1]["tokens"] < 600  # stops at the first record that meets the budget
    assert [r["id"] for r in a] == [f"gsm8k-train-{i}" for i in range(len(a))]  # train, in file order
    for r in a:
        assert r["text"] == r["prompt"] + r["trace"] and r["tokens"] == r["prompt_tokens"] + r["trace_tokens"]
        assert CHAT_INSTRUCTION in r["prompt"] and 1 <= r["trace_tokens"] <= 12
    assert traces(tmp_path, tiny_llama, "b.jsonl") == a  # same seed, same traces
    assert traces(tmp_path, tiny_llama, "c.jsonl", "--seed", "1") != a


def test_traces_resume(tmp_path, tiny_llama, monkeypatch):
    whole = traces(tmp_path, tiny_llama, "whole.jsonl", "--dtype", "float32")  # float32: batch-invariant
    from common.engine import Engine
    from test_generate import dies_on_call
    real = Engine._step
    monkeypatch.setattr(Engine, "_step", dies_on_call(15, real))
    with pytest.raises(KeyboardInterrupt):
        traces(tmp_path, tiny_llama, "r.jsonl", "--dtype", "float32")
    assert len((tmp_path / "r.jsonl.part").read_text().splitlines()) > 1  # some traces were kept
    monkeypatch.setattr(Engine, "_step", real)
    assert traces(tmp_path, tiny_llama, "r.jsonl", "--dtype", "float32") == whole


def test_traces_auto_slots_same_as_fixed(tmp_path, tiny_llama, capsys):
    # --batch-size 0 sizes the slots from memory and the budget; in float32 a row's tokens do not depend on its
    # batch-mates, so the traces are those of 3 fixed slots
    fixed = traces(tmp_path, tiny_llama, "fixed.jsonl", "--dtype", "float32")
    capsys.readouterr()
    out = tmp_path / "auto.jsonl"
    calibrate.main(["--model", tiny_llama, "--source", "traces", "--tokens", "600", "--max-new-tokens", "12",
                    "--batch-size", "0", "--dtype", "float32", "-o", str(out)])
    assert lines(out) == fixed
    m = re.search(r"(\d+) slots decoded ([\d,]+) new tokens in all", capsys.readouterr().err)
    assert m and int(m.group(1)) == calibrate.trace_slots(600, [r["prompt_tokens"] for r in fixed], 12) > 1
    assert int(m.group(2).replace(",", "")) >= sum(r["trace_tokens"] for r in fixed)  # kept ones, and any cut off


def test_traces_without_a_budget_resume_on_a_slot_per_problem_left(tmp_path, tiny_llama, monkeypatch, capsys):
    # --tokens 0 (every problem) once gave a resumed run a negative budget, and so a single slot
    src = tmp_path / "six.jsonl"
    src.write_text("".join(open(f"{ROOT}/data/gsm8k/train.jsonl").readlines()[:6]))
    out = tmp_path / "t.jsonl"
    argv = ["--model", tiny_llama, "--source", "traces", str(src), "--tokens", "0", "--max-new-tokens", "12",
            "--batch-size", "0", "--dtype", "float32", "-o", str(out)]
    from common.files import JsonlAppender
    from test_generate import dies_on_call
    real = JsonlAppender.write
    monkeypatch.setattr(JsonlAppender, "write", dies_on_call(3, real))  # interrupted after two traces
    with pytest.raises(KeyboardInterrupt):
        calibrate.main(argv)
    kept = len((tmp_path / "t.jsonl.part").read_text().splitlines()) - 1  # the settings line, then the traces
    assert kept == 2
    monkeypatch.setattr(JsonlAppender, "write", real)
    capsys.readouterr()
    calibrate.main(argv)
    assert "4 slots decoded" in capsys.readouterr().err and len(lines(out)) == 6
    calibrate.main(argv)  # nothing left to do: it returns, as with a budget met


def test_trace_slots_are_the_fewest_traces_that_can_hold_the_budget():
    assert calibrate.trace_slots(100, [10, 20, 30, 40], 15) == 3  # 25 + 35 = 60, + 45 = 105 >= 100
    assert calibrate.trace_slots(105, [10, 20, 30, 40], 15) == 3 and calibrate.trace_slots(106, [10, 20, 30], 15) == 3
    assert calibrate.trace_slots(0, [10] * 5, 15) == 5  # no budget: every problem
    rng = random.Random(0)
    for _ in range(200):  # against brute force: the smallest k whose k longest-possible traces reach the budget
        lengths, budget, cap = [rng.randint(1, 50) for _ in range(rng.randint(1, 12))], rng.randint(1, 600), 20
        fits = [k for k in range(1, len(lengths) + 1) if sum(lengths[:k]) + k * cap >= budget]
        assert calibrate.trace_slots(budget, lengths, cap) == (fits[0] if fits else len(lengths))


def test_prompts_and_text_sources(tmp_path, tiny_llama):
    out = tmp_path / "p.jsonl"
    calibrate.main(["--model", tiny_llama, "--source", "prompts", "--tokens", "300", "-o", str(out)])
    recs = lines(out)
    assert all(r["trace"] == "" and r["text"] == r["prompt"] for r in recs)
    assert sum(r["tokens"] for r in recs) >= 300
    out = tmp_path / "t.jsonl"
    calibrate.main(["--model", tiny_llama, "--source", "text", "--tokens", "0", "--limit", "5", "-o", str(out)])
    recs = lines(out)
    assert [r["id"] for r in recs] == [f"distract-{i}" for i in range(5)]
    source = [json.loads(x)["text"] for x in open("data/distract/distract_mix_1000.jsonl")][:5]
    assert [r["text"] for r in recs] == source


def test_text_source_needs_text_field(tmp_path, tiny_llama):
    with pytest.raises(CotpruneError, match="lacks field"):
        calibrate.main(["--model", tiny_llama, "--source", "text", "data/gsm8k/test.jsonl", "-o",
                        str(tmp_path / "x.jsonl")])
