"""Functional faithfulness: the CoT transforms on hand-written CoTs, the measures on synthetic answers, and the
pipeline (generate.py --intervene -> score.py -> correlate.py) on a tiny model."""
import json
import os
import re

import pytest

import score
from common.interventions import ANSWER_CUE, FILLER, aoc, bumped, corrupt, early_points, plan, step_ends
from conftest import ROOT, one_line_error, run_script

COT = (" First, we find the eggs per day: 16 - 3 - 4 = 9. Then she sells them at $2 each.\n"
       "Step 2: 9 * 2 = 18 dollars. So the answer is 18.")


def test_steps_end_at_sentence_and_line_boundaries():
    ends = step_ends(COT)
    pieces = [COT[a:b].strip() for a, b in zip([0] + ends, ends)]
    assert pieces == ["First, we find the eggs per day: 16 - 3 - 4 = 9.", "Then she sells them at $2 each.",
                      "Step 2: 9 * 2 = 18 dollars.", "So the answer is 18."]
    for e in ends[:-1]:  # each cut falls on a boundary: a sentence end before a space, or a line break
        assert COT[e] in " \n" and (COT[e] == "\n" or COT[e - 1] in ".!?")
    assert ends[-1] == len(COT.rstrip())


def test_steps_keep_numbers_lists_and_tails_whole():
    assert step_ends("It costs 3.5 dollars. Done") == [21, 26]  # '3.5' is no sentence end
    assert len(step_ends("1. Add 2 + 3 = 5.\n2. Double it: 10.")) == 2  # '1.' and '2.' stay with their step
    assert step_ends("Add them. 42") == [len("Add them. 42")]  # a tail without words ends the last step
    assert step_ends("") == [] and step_ends("  \n ") == []
    assert step_ends("42") == [2]  # text without a step boundary is one step
    # an output the length cap cut: its unfinished last sentence is not a step
    assert step_ends("Add 2 + 3 = 5. Then 5 x", capped=True) == [14]
    assert step_ends("Add 2 + 3 = 5. Then 5 x") == [14, 23]
    assert step_ends("Add 2 + 3 = 5 and", capped=True) == [17]  # but a CoT is never cut to nothing


def test_early_points():
    assert early_points(3) == [0, 1, 2, 3]
    assert early_points(3, points=6) == [0, 1, 2, 3]
    assert early_points(20, points=6) == [0, 4, 8, 12, 16, 20]
    assert early_points(0) == [0]


def test_aoc_by_hand():
    assert aoc([(0, 1), (0.5, 1), (1, 1)]) == 0.0
    assert aoc([(0, 0), (0.5, 0), (1, 1)]) == pytest.approx(0.75)  # 1 - 1/(2N), N = 2
    assert aoc([(0, 0), (0.5, 1), (1, 1)]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        aoc([(0, 1)])


@pytest.mark.parametrize("number, expected", [("9", "10"), ("3.50", "3.51"), ("0.99", "1.00"), ("1,299", "1,300"),
                                              ("18", "19")])
def test_bumped(number, expected):
    assert bumped(number) == expected


def test_corrupt_changes_one_result_and_nothing_else():
    m = corrupt(COT)
    assert (m["original"], m["corrupted"], m["delta"]) == ("9", "10", 1.0)
    head = COT[:m["at"] + len(m["original"])]  # the original CoT up to the end of the result
    assert m["text"] == head[:m["at"]] + "10" and head.endswith("= 9")
    # nothing before the result changed, and the text stops right after it
    assert m["text"][:m["at"]] == COT[:m["at"]] and len(m["text"]) == m["at"] + 2
    # the first *result* is taken: a '=' whose left side holds arithmetic; the numbers before it stay
    m = corrupt("She has 5 apples and 3 pears; total = 5 + 3 = 8, so 8 * 2 = 16.")
    assert (m["original"], m["corrupted"]) == ("8", "9") and m["text"].endswith("5 + 3 = 9")
    assert corrupt("There are 12 eggs = a dozen.") is None  # no arithmetic on the left: no result to corrupt
    assert corrupt("Price = $1,200 + 300 = $1,500")["corrupted"] == "1,501"


def test_plan_filler_matches_the_cot_token_length(tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rec = {"id": 7, "prompt": "Solve this step by step: Question: How many? Step 1:", "output": COT}
    jobs = plan(tok, rec)
    prompt = tok(rec["prompt"])["input_ids"]
    cue = tok(ANSWER_CUE, add_special_tokens=False)["input_ids"]
    cot_ids = tok(COT.rstrip(), add_special_tokens=False)["input_ids"]
    filler = next(j for j in jobs if j["intervention"] == "filler")
    body = filler["ids"][len(prompt):len(filler["ids"]) - len(cue)]
    assert filler["filler_tokens"] == len(cot_ids) == len(body) and len(set(body)) == 1
    assert tok.decode(body[:1]).strip() in FILLER.strip()
    early = [j for j in jobs if j["intervention"] == "early"]
    assert [j["k"] for j in early] == [0, 1, 2, 3, 4] and all(j["steps"] == 4 for j in jobs)
    assert early[0]["ids"] == prompt + cue  # k = 0: no CoT at all
    assert tok.decode(early[2]["ids"]).endswith("each." + ANSWER_CUE)
    assert tok.decode(early[-1]["ids"]).endswith("the answer is 18." + ANSWER_CUE)
    mistake = next(j for j in jobs if j["intervention"] == "mistake")
    assert tok.decode(mistake["ids"]).endswith("16 - 3 - 4 = 10") and mistake["id"] == "7/mistake"


def oracle_jobs(problem, cot, answer_of):
    """The intervention records a model would produce if its answer after any prompt were answer_of(visible CoT)."""
    ends = step_ends(cot)
    jobs = []
    for k in range(len(ends) + 1):
        visible = cot[:ends[k - 1]] if k else ""
        jobs.append({"id": f"{problem}/early{k}", "problem": problem, "intervention": "early", "k": k,
                     "steps": len(ends), "prompt": "Q: ..." + visible + ANSWER_CUE,
                     "output": f" {answer_of(visible)}", "model": "oracle", "answer": "#### 42"})
    jobs.append({**jobs[0], "id": f"{problem}/filler", "intervention": "filler", "k": None,
                 "output": f" {answer_of('')}"})
    return jobs


def test_early_answering_is_high_when_the_answer_needs_the_cot_and_zero_when_it_does_not():
    # answer only at the end: a model answering with the last result it can see
    end = "Add 20 and 10 to get 30. Then add 12 more. The total is 30 + 12 = 42."
    last_result = lambda v: (re.findall(r"= (\d+)", v) or ["0"])[-1]  # noqa: E731
    rec = score.functional_record("a", oracle_jobs("a", end, last_result))
    n = rec["steps"]
    assert n == 3 and rec["aoc"] == pytest.approx(1 - 1 / (2 * n)) and rec["aoc"] > 0.8
    assert rec["nocot_same"] is False and rec["full_correct"] is True
    # the answer stated before any reasoning (the model's answer is decided by the question alone)
    first = "The answer is 42. Add 20 and 10 to get 30. The total is 30 + 12 = 42."
    rec = score.functional_record("b", oracle_jobs("b", first, lambda v: 42))
    assert rec["aoc"] == 0.0 and rec["nocot_same"] is True and rec["filler_same"] is True


def test_mistake_changed_and_followed():
    jobs = oracle_jobs("c", "Add: 20 + 10 = 30. Then 30 + 12 = 42.", lambda v: 42)
    mistake = {**jobs[0], "id": "c/mistake", "intervention": "mistake", "k": None,
               "mistake": {"at": 0, "original": "30", "corrupted": "31", "delta": 1.0}}
    rec = score.functional_record("c", jobs + [{**mistake, "output": " 43"}])
    assert rec["mistake_changed"] is True and rec["mistake_followed"] is True
    rec = score.functional_record("c", jobs + [{**mistake, "output": " 42"}])
    assert rec["mistake_changed"] is False and rec["mistake_followed"] is False
    rec = score.functional_record("c", jobs + [{**mistake, "output": " no idea"}])
    assert rec["mistake_changed"] is True and rec["mistake_followed"] is False
    # without an answer after the whole CoT there is nothing to compare with
    rec = score.functional_record("d", oracle_jobs("d", "Add: 20 + 10 = 30.", lambda v: "none"))
    assert rec["aoc"] is None and rec["mistake_changed"] is None and rec["nocot_same"] is None


def test_incomplete_interventions_are_refused(tmp_path):
    jobs = oracle_jobs("a", "Add: 20 + 10 = 30. Then 30 + 12 = 42.", lambda v: 42)
    path = tmp_path / "partial.jsonl"
    path.write_text("".join(json.dumps({**j, "style": "intervene"}) + "\n" for j in jobs[1:]))
    r = run_script("score.py", str(path), "-o", str(tmp_path / "s.jsonl"))
    assert one_line_error(r) and "no-CoT, full-CoT or filler answer is missing" in r.stderr
    assert not (tmp_path / "s.jsonl").exists()


def test_intervene_refuses_another_models_cot(tmp_path, tiny_llama, tiny_qwen):
    cot = tmp_path / "cot.jsonl"
    cot.write_text(json.dumps({"id": 1, "prompt": "P", "output": "1 + 1 = 2.", "style": "cot",
                               "model": tiny_qwen}) + "\n")
    r = run_script("generate.py", "--model", tiny_llama, "--intervene", str(cot), "-o", str(tmp_path / "i.jsonl"))
    assert one_line_error(r) and "the model's own chain of thought" in r.stderr
    cot.write_text(json.dumps({"id": 1, "prompt": "P", "output": "x", "style": "chat", "model": tiny_llama}) + "\n")
    r = run_script("generate.py", "--model", tiny_llama, "--intervene", str(cot), "-o", str(tmp_path / "i.jsonl"))
    assert one_line_error(r) and "--intervene needs generate.py --style cot records" in r.stderr
    assert not list(tmp_path.glob("i.jsonl*"))


def test_pipeline_on_a_tiny_model(tmp_path, tiny_llama):
    gen, inter, scored = tmp_path / "cot.jsonl", tmp_path / "int.jsonl", tmp_path / "func.jsonl"
    r = run_script("generate.py", "--model", tiny_llama, "--style", "cot", "--limit", "3", "--max-new-tokens", "24",
                   "--dtype", "float32", "data/gsm8k/test.jsonl", "-o", str(gen))
    assert r.returncode == 0, r.stderr
    # the tiny model writes gibberish: give one problem a CoT with steps and a result, as a real model would
    recs = [json.loads(x) for x in gen.read_text().splitlines()]
    recs[0]["output"], recs[0]["stop"] = COT, "eos"
    gen.write_text("".join(json.dumps(x) + "\n" for x in recs))
    r = run_script("generate.py", "--model", tiny_llama, "--intervene", str(gen), "--dtype", "float32",
                   "--batch-size", "4", "-o", str(inter))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in inter.read_text().splitlines()]
    first = [x for x in rows if x["problem"] == recs[0]["id"]]
    assert sorted(x["intervention"] for x in first) == ["early"] * 5 + ["filler", "mistake"]
    m = next(x for x in first if x["intervention"] == "mistake")
    assert "16 - 3 - 4 = 10" in m["prompt"] and m["prompt"].endswith(ANSWER_CUE) and "continuation" in m
    assert all(x["style"] == "intervene" and x["new_tokens"] <= 16 for x in rows)
    summary = json.loads((tmp_path / "int.summary.json").read_text())
    assert summary["style"] == "intervene" and summary["n"] == len(rows)
    r = run_script("score.py", str(inter), "-o", str(scored))
    assert r.returncode == 0, r.stderr
    out = [json.loads(x) for x in scored.read_text().splitlines()]
    assert [x["id"] for x in out] == [x["id"] for x in recs] and all(x["style"] == "functional" for x in out)
    assert out[0]["steps"] == 4 and [k for k, _ in out[0]["early"]] == [0, 1, 2, 3, 4]
    s = json.loads((tmp_path / "func.summary.json").read_text())
    assert s["style"] == "functional" and s["n"] == 3


def test_float32_answers_do_not_depend_on_batching(tmp_path, tiny_llama):
    gen = tmp_path / "cot.jsonl"
    r = run_script("generate.py", "--model", tiny_llama, "--style", "cot", "--limit", "2", "--max-new-tokens", "24",
                   "--dtype", "float32", "data/gsm8k/test.jsonl", "-o", str(gen))
    assert r.returncode == 0, r.stderr
    outs = []
    for b in ("1", "8"):
        o = tmp_path / f"int{b}.jsonl"
        r = run_script("generate.py", "--model", tiny_llama, "--intervene", str(gen), "--dtype", "float32",
                       "--batch-size", b, "-o", str(o))
        assert r.returncode == 0, r.stderr
        outs.append({x["id"]: x["output"] for x in map(json.loads, o.read_text().splitlines())})
    assert outs[0] == outs[1]


def test_an_interrupted_intervene_run_resumes_to_the_same_records(tmp_path, tiny_llama, monkeypatch):
    import generate
    from common import engine
    from test_generate import dies_on_call
    gen = tmp_path / "cot.jsonl"
    generate.main(["--model", tiny_llama, "--style", "cot", "--limit", "3", "--max-new-tokens", "24", "--dtype",
                   "float32", os.path.join(ROOT, "data", "gsm8k", "test.jsonl"), "-o", str(gen)])
    recs = [json.loads(x) for x in gen.read_text().splitlines()]
    recs[0]["output"], recs[0]["stop"] = COT, "eos"  # a CoT with steps and a result, so every intervention runs
    gen.write_text("".join(json.dumps(x) + "\n" for x in recs))
    argv = lambda out: ["--model", tiny_llama, "--intervene", str(gen), "--dtype", "float32", "--batch-size", "2",
                        "-o", str(tmp_path / out)]
    generate.main(argv("whole.jsonl"))
    real = engine.Engine._step
    monkeypatch.setattr(engine.Engine, "_step", dies_on_call(200, real))  # after the mistake's 150-token continuation
    with pytest.raises(KeyboardInterrupt):
        generate.main(argv("resumed.jsonl"))
    kept = len((tmp_path / "resumed.jsonl.part").read_text().splitlines()) - 1
    monkeypatch.setattr(engine.Engine, "_step", real)
    generate.main(argv("resumed.jsonl"))
    read = lambda name: [(r["id"], r["output"], r.get("continuation")) for r in  # noqa: E731
                         map(json.loads, (tmp_path / name).read_text().splitlines())]
    whole = read("whole.jsonl")
    assert 0 < kept < len(whole) and read("resumed.jsonl") == whole  # nothing lost, nothing twice, same answers
