"""The code task: the stdlib training set, generate.py --style code, score.py on HumanEval, recover.py on code,
and the neuron report for code. The sandbox itself is tested in test_sandbox.py."""
import importlib.util
import json
import math
import os
import platform
import re

import pytest

import generate
import recover
import score
from common.chat import CODE_INSTRUCTION
from common.sandbox import read_humaneval
from conftest import ROOT, one_line_error, run_script

HUMANEVAL_GZ = os.path.join(ROOT, "data", "humaneval", "HumanEval.jsonl.gz")
HUMANEVAL = os.path.join(ROOT, "data", "humaneval", "test.jsonl")
STDLIB = os.path.join(ROOT, "data", "stdlib", "functions.jsonl")


def lines(path):
    return [json.loads(x) for x in open(path)]


def load_builder():
    spec = importlib.util.spec_from_file_location("stdlib_build", os.path.join(ROOT, "data", "stdlib", "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------------ data

def test_stdlib_set_is_disjoint_from_humaneval_and_parses():
    import ast
    tasks, recs = read_humaneval(HUMANEVAL_GZ), lines(STDLIB)
    assert len(recs) >= 800 and len({r["id"] for r in recs}) == len(recs)  # CODE_PROMPTS 800 prompts exist
    entry_points = {t["entry_point"] for t in tasks}
    he_lines = {s.strip() for t in tasks for s in (t["prompt"] + t["canonical_solution"]).split("\n")
                if len(s.strip()) >= 30}
    for r in recs:
        assert r["name"] not in entry_points, r["id"]
        assert not any(s.strip() in he_lines for s in (r["question"] + r["solution"]).split("\n")), r["id"]
        ast.parse(r["solution"])
        fn = ast.parse(r["question"]).body[0]  # the stub is a function whose body is its docstring
        assert isinstance(fn, ast.FunctionDef) and fn.name == r["name"] and ast.get_docstring(fn)
        assert r["solution"].startswith(r["question"].rstrip("\n"))


@pytest.mark.skipif(platform.python_version() != load_builder().BUILT_WITH,
                    reason="functions.jsonl was built from another Python's standard library")
def test_stdlib_set_is_what_the_builder_makes():
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in load_builder().build())
    assert text == open(STDLIB, encoding="utf-8").read()


def test_humaneval_jsonl_is_the_official_file_with_ids():
    official, ours = read_humaneval(HUMANEVAL_GZ), lines(HUMANEVAL)
    assert len(ours) == len(official) == 164
    for t, r in zip(official, ours):
        assert r == {"id": t["task_id"], "task_id": t["task_id"], "question": t["prompt"],
                     "entry_point": t["entry_point"], "test": t["test"]}


def test_paper_code_figures_are_the_papers():
    paper = os.path.join(os.path.dirname(ROOT), "shared", "papers", "task-specific-neuron-pruning.txt")
    if not os.path.exists(paper):
        pytest.skip("the papers are not beside this checkout")
    text = open(paper, encoding="utf-8").read()
    tables = {}  # row label -> the last column (Qwen-1.5B Code) of each table, in order: 3a, 3b, 4a, 4b
    for line in text.split("\n"):
        m = re.fullmatch(r"(Original|\d+%) ([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)", line.strip())
        if m:
            tables.setdefault("0%" if m.group(1) == "Original" else m.group(1), []).append(float(m.group(5)))
    ref = json.load(open(os.path.join(ROOT, "data", "papers", "neurons-code.json")))
    for label, *vals in ref["rows"]:
        got = tables[label]
        assert vals == [got[0], got[1], got[2], got[3]], label


# --------------------------------------------------------------------------------------------- generate

def test_code_style_prompt_and_fields(tmp_path, tiny_llama):
    out = tmp_path / "code.jsonl"
    generate.main(["--model", tiny_llama, "--style", "code", "--max-new-tokens", "3", "--limit", "2", HUMANEVAL,
                   "-o", str(out)])
    recs, tasks = lines(out), lines(HUMANEVAL)[:2]
    for r, t in zip(recs, tasks):
        assert r["style"] == "code" and r["new_tokens"] <= 3
        assert CODE_INSTRUCTION in r["prompt"] and t["question"] in r["prompt"]
        assert r["prompt"].startswith("<|im_start|>user\n") and r["prompt"].endswith("<|im_start|>assistant\n")
        assert all(r[k] == t[k] for k in ("id", "task_id", "question", "entry_point", "test"))


# ------------------------------------------------------------------------------------------------ score

def code_records(tmp_path, outputs, name="gen.jsonl", stops=None, task_ids=None):
    tasks = {t["id"]: t for t in lines(HUMANEVAL)}
    recs = []
    for k, (tid, output) in enumerate(outputs):
        t = tasks[tid]
        recs.append({**t, "id": f"{tid}#{k}", "task_id": task_ids[k] if task_ids else tid, "style": "code",
                     "model": "m", "output": output, "new_tokens": 7,
                     "stop": (stops or {}).get(k, "eos")})
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def canonical(tid):
    t = next(x for x in read_humaneval(HUMANEVAL_GZ) if x["task_id"] == tid)
    return t["prompt"] + t["canonical_solution"]


def test_code_records_are_run_against_their_tests(tmp_path):
    loop_after = canonical("HumanEval/0") + "\nprint('again')" * 30
    loop_inside = "def has_close_elements(numbers, threshold):\n" + "    x = 1\n" * 40
    src = code_records(tmp_path, [
        ("HumanEval/0", "Here is the code:\n```python\n" + canonical("HumanEval/0") + "```\nIt works."),
        ("HumanEval/2", canonical("HumanEval/2")),
        ("HumanEval/2", "def truncate_number(number):\n    return number\n"),  # wrong
        ("HumanEval/0", "I cannot write code."),  # nothing usable: the stub fails
        ("HumanEval/0", loop_after),
        ("HumanEval/0", loop_inside)], stops={4: "length", 5: "length"})
    out = tmp_path / "scored.jsonl"
    score.main([src, "-o", str(out), "--workers", "2"])
    recs = lines(out)
    assert [r["passed"] for r in recs] == [True, True, False, False, True, False]
    assert [r["trap"] for r in recs] == ["none"] * 4 + ["type1", "type2"]
    assert all("F" not in r and "correct" not in r for r in recs)
    assert recs[2]["result"].startswith("failed") and "def has_close_elements" in recs[0]["program"]
    summary = json.loads((tmp_path / "scored.summary.json").read_text())
    # pass@1 per task, then averaged: HumanEval/0 passes 2 of 4, HumanEval/2 1 of 2
    assert summary["tasks"] == 2 and summary["pass_at_1"] == pytest.approx(0.5)
    assert summary["pass_at_2"] == pytest.approx(((1 - 1 / 6) + 1 - 0 / 1) / 2)  # 1 - C(2,2)/C(4,2); 1 - C(1,2)/C(2,2)
    assert summary["trap_rate"] == pytest.approx(2 / 6) and summary["type1_rate"] == pytest.approx(1 / 6)


def test_pass_at_k_over_tasks_by_hand():
    recs = [{"id": i, "task_id": t, "passed": p}
            for i, (t, p) in enumerate([("a", True), ("a", False), ("a", False), ("b", True), ("b", True),
                                        ("b", True)])]
    ks = score.pass_at(recs)
    assert ks[1] == pytest.approx((1 / 3 + 1) / 2)
    assert ks[2] == pytest.approx(((1 - math.comb(2, 2) / math.comb(3, 2)) + 1) / 2)
    assert ks[3] == pytest.approx(1.0) and set(ks) == {1, 2, 3}


def test_code_records_need_their_tests(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "style": "code", "output": "x", "question": "def f():\n", "entry_point": "f"})
                   + "\n")
    r = run_script("score.py", str(bad), "-o", str(tmp_path / "o.jsonl"))
    assert one_line_error(r) and "test" in r.stderr and not (tmp_path / "o.jsonl").exists()


def test_trap_offsets_map_back_to_the_original_text():
    import random
    rng = random.Random(1)
    for _ in range(500):
        t = "".join(rng.choice(["a", "bc", " ", "\n", "\t ", "  \n"]) for _ in range(rng.randint(0, 25)))
        norm = re.sub(r"\s+", " ", t)
        for k in range(len(norm) + 1):
            assert re.sub(r"\s+", " ", t[: score.original_offset(t, k)]) == norm[:k]


# ---------------------------------------------------------------------------------------------- recover

def test_code_examples_are_the_code_prompt_then_the_source(tiny_llama):
    from transformers import AutoTokenizer
    from common.engine import eos_token_ids
    from test_recover import load
    tok, model = AutoTokenizer.from_pretrained(tiny_llama), load(tiny_llama)
    rec = lines(STDLIB)[0]
    target = recover.example_target(rec, "code")
    p, t = recover.encode_example(tok, rec["question"], target, eos_token_ids(model, tok), "code")
    assert CODE_INSTRUCTION in tok.decode(p) and rec["question"] in tok.decode(p)
    assert tok.decode(t[:-1]).strip() == rec["solution"].strip()


@pytest.mark.parametrize("records, message", [
    ([{"id": 1, "question": "q", "answer": "#### 1"}, {"id": 2, "question": "q", "solution": "x = 1\n"}],
     "all of one kind"),
    ([{"id": 1, "question": "q", "solution": "def f(:\n"}], "not Python"),
])
def test_bad_code_training_data_fails_before_the_model_loads(tmp_path, records, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    r = run_script("recover.py", str(bad), "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "x"))
    assert one_line_error(r) and message in r.stderr and not (tmp_path / "x").exists()


def test_recovery_trains_on_code(tmp_path, tiny_llama):
    out = tmp_path / "lora"
    recover.main(["--model", tiny_llama, STDLIB, "--limit", "4", "--max-steps", "2", "--batch-size", "2", "--max-length", "8192",
                  "--grad-accum", "1", "--rank", "4", "--alpha", "8", "-o", str(out)])
    report = json.load(open(out / "recover_report.json"))
    assert report["steps"] == 2 and len(lines(out / "loss.jsonl")) == 2


# ----------------------------------------------------------------------------------------------- report

def test_neuron_code_report(tmp_path, tiny_llama):
    """The neuron tables for code: pass@1 with exact intervals, lengths instead of F, the paper's code figures."""
    import correlate
    from test_correlate import clopper_pearson, neuron_models
    folders = neuron_models(tmp_path, tiny_llama, ["sel", "rev"])
    dense = folders["dense"]
    scores = []
    for k, (name, folder) in enumerate(folders.items()):  # model k: 6 - 2k of 10 pass, k trapped, 50 + 10k tokens
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": f"HumanEval/{i}", "task_id": f"HumanEval/{i}", "model": folder,
                                            "style": "code", "passed": i < 6 - 2 * k, "new_tokens": 50 + 10 * k,
                                            "stop": "eos", "trap": "type2" if i < k else "none"}) + "\n"
                                for i in range(10)))
        scores.append(str(path))
    correlate.main(["--study", "neurons", "--base", dense, "--models", folders["sel"], folders["rev"],
                    "--scores", *scores, "-o", str(tmp_path / "rep")])
    report = (tmp_path / "rep" / "report.md").read_text()
    ci = lambda k: "{:.1f} [{:.1f}, {:.1f}]".format(100 * k / 10, *(100 * v for v in clopper_pearson(k, 10)))
    assert "### Table 3a: pass@1 (%) after pruning" in report
    assert f"| original | {ci(6)} | {ci(6)} |" in report and f"| 30% (50.00%) | {ci(4)} | {ci(2)} |" in report
    assert "Faithfulness F" not in report and "### Mean new tokens after pruning" in report
    assert "Qwen2.5-Coder-1.5B-Instruct" in report and "10 tasks" in report
    rows = json.loads((tmp_path / "rep" / "neurons.json").read_text())
    assert rows[0]["task"] == "code" and rows[0]["pass_at_1"]["value"] == pytest.approx(0.6)
    cmp = {(c["a"], c["b"]): c for c in rows[-1]["comparisons"]}
    assert cmp[("selective", "reverse")]["pass_at_1"]["diff"] == pytest.approx(-0.2)
    assert cmp[("dense", "reverse")]["mean_new_tokens"]["diff"] == pytest.approx(20)
