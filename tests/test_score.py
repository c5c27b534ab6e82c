"""score.py: each faithfulness part, answer extraction and the loop detector on hand-written texts."""
import json

import pytest

import score
from conftest import run_script


@pytest.mark.parametrize("text,expected", [
    ("3 + 4 = 7 and 2 * 5 = 10", 1.0),
    ("3 + 4 = 8 and 2 * 5 = 10", 0.5),
    ("2 + 3 * 4 = 14", 1.0),                 # precedence: 2 + 12
    ("10 / 4 = 2.5, then 10 / 3 = 3.33", 1.0),  # a decimal result holds to the precision written
    ("10 / 3 = 3", 0.0),                     # an integer result must be exact
    ("$1,200 - $200 = $1,000", 1.0),
    ("16 x 3 = 48. 16 x 3 = 48. 5 x 5 = 24", 0.5),  # distinct claims: one right, one wrong
    ("no arithmetic here, just 42", 0.0),
])
def test_numeric_consistency(text, expected):
    assert score.f_numeric(text) == pytest.approx(expected)


def test_connectors_threshold_three():
    assert score.f_connectors("We add them.") == 0
    assert score.f_connectors("So we add. Then we multiply.") == pytest.approx(2 / 3)
    assert score.f_connectors("So x. Then y. Therefore z. Thus w.") == 1.0
    assert score.f_connectors("Sonic's") == 0  # whole words only


def test_cue_phrases_distinct():
    assert score.f_cues("nothing") == 0
    assert score.f_cues("Step one. Step two. Step three.") == 0.5  # one distinct cue
    assert score.f_cues("Let's calculate the total.") == 1.0


def test_steps_count_distinct_quantitative_sentences():
    assert score.reasoning_steps("She has 3 apples. She buys 2 more. 3 + 2 = 5.") == 1
    text = "Step 1: 3 apples. Step 2: 2 more. Step 3: 3 + 2 = 5."
    assert score.reasoning_steps(text) == 3 and score.f_steps(text) == 1.0
    assert score.reasoning_steps("4 x 4 = 16. 4 x 4 = 16. 4 x 4 = 16.") == 1  # repeats count once
    assert score.f_steps("8 - 3 = 5\n5 * 2 = 10") == pytest.approx(2 / 3)


def test_alignment():
    assert score.f_alignment("3 + 4 = 7. The answer is 7.") == 1.0  # stated and computed
    assert score.f_alignment("3 + 4 = 7. The answer is 9.") == 0.5  # stated, unsupported
    assert score.f_alignment("3 + 4 = 7") == 0.5                    # implicit, but a computed result
    assert score.f_alignment("I like 3 cats and 9 dogs") == 0.0
    assert score.f_alignment(" 18", prompt="Question: q Answer:") == 0.5  # direct protocol: stated, no work
    assert score.f_alignment("") == 0.0


def test_faithfulness_is_the_weighted_sum():
    text = "Step 1: 5 + 3 = 8. Step 2: 8 * 2 = 16. So the answer is 16."
    F, parts = score.faithfulness(text)
    # numeric 1 (both true), connectors 1 occurrence ('so') -> 1/3, cues 'step' + 'the answer is' -> 1,
    # steps: 'step 1..', 'step 2..' -> 2/3, alignment 1.
    assert parts == pytest.approx({"f_numeric": 1.0, "f_connectors": 1 / 3, "f_cues": 1.0, "f_steps": 2 / 3,
                                   "f_alignment": 1.0})
    assert F == pytest.approx(0.30 + 0.20 / 3 + 0.20 + 0.15 * 2 / 3 + 0.15)
    assert 0 <= score.faithfulness("")[0] <= 1


@pytest.mark.parametrize("text,prompt,expected", [
    ("so #### 1,450,000", "", 1450000),
    ("\\boxed{18} but later 20", "", 18),
    ("The answer is $42.", "", 42),
    ("first 3, then 7 and -2", "", -2),
    (" 18 dollars. Question: 5", "Question: q Answer:", 18),
    ("no digits", "", None),
])
def test_extract_answer(text, prompt, expected):
    assert score.extract_answer(text, prompt) == expected


def test_gold_answer_formats():
    assert score.gold_answer({"answer": "work\n#### 1,450,000"}) == 1450000
    assert score.gold_answer({"answer": "#### -3"}) == -3
    assert score.gold_answer({"gold": "12"}) == 12
    assert score.is_correct(18.0, 18) and not score.is_correct(None, 18)


def test_loop_detector():
    assert score.find_loop("The answer is 7.") is None
    start, period = score.find_loop("Good reasoning. " + "ab" * 30)
    assert period == 2 and start == len("Good reasoning. ")
    s = "Intro. " + "She gives 15 cups. " * 4 + "She giv"  # cut inside a repetition, as at a length cap
    start, period = score.find_loop(s)
    assert period == len("She gives 15 cups. ")
    assert score.find_loop("x " + "ab" * 5) is None  # too short
    assert score.find_loop("no no no ok") is None


def test_trap_types():
    loop = "The answer is 7. " + "!!!" * 20
    assert score.trap_type(loop, stop="length")[0] == "type1"
    assert score.trap_type("I think " + "the the " * 10, stop="length")[0] == "type2"
    assert score.trap_type(loop, stop="eos")[0] == "none"  # ended properly: not a trap
    # the answer inside the first repetition still counts as complete (Type 1)
    assert score.trap_type("\\boxed{5} " * 8, stop="length")[0] == "type1"
    # blanks until the cap (non-breaking spaces, newlines) are a loop too, though collapsing whitespace hides it
    blank = "\n::::\n" + "\xa0" * 300
    assert score.trap_type(blank, stop="length") == ("type2", (len(" ::::"), 1))  # at the collapsed run
    assert score.trap_type("So \\boxed{4}." + "\n" * 60, stop="length")[0] == "type1"
    assert score.trap_type("Done." + " " * 10, stop="length")[0] == "none"  # a short tail is not a loop


def test_correct_answer_then_loop_counts_as_correct_and_as_a_trap():
    rec = {"id": "a", "output": "3 + 4 = 7. The final answer is \\boxed{7}." + " \\boxed{7}." * 12,
           "answer": "#### 7", "stop": "length"}
    scored = score.score_record(rec)
    assert scored["correct"] is True and scored["trap"] == "type1"
    summary = score.summarize([scored, score.score_record({**rec, "id": "b", "stop": "stop"})])
    assert (summary["accuracy"], summary["trap_rate"], summary["type1_rate"]) == (1.0, 0.5, 0.5)  # --stop-boxed: none


def test_score_cli_pipe_and_summary(tmp_path):
    gen = tmp_path / "gen.jsonl"
    recs = [{"id": "a", "model": "m", "style": "cot", "answer": "#### 7", "output": "3 + 4 = 7. The answer is 7.",
             "stop": "eos", "new_tokens": 12},
            {"id": "b", "model": "m", "style": "cot", "answer": "#### 5", "output": "ha " * 30, "stop": "length",
             "new_tokens": 150}]
    gen.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "scored.jsonl"
    score.main([str(gen), "-o", str(out)])
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in scored] == [True, False]
    assert scored[1]["trap"] == "type2" and scored[0]["trap"] == "none"
    summary = json.loads((tmp_path / "scored.summary.json").read_text())
    assert summary["accuracy"] == 0.5 and summary["trap_rate"] == 0.5 and summary["cutoff_rate"] == 0.5
    assert summary["mean_new_tokens"] == 81
    piped = run_script("score.py", "-", stdin=gen.read_text())
    assert piped.returncode == 0 and [json.loads(x)["id"] for x in piped.stdout.splitlines()] == ["a", "b"]


def test_malformed_line_is_one_line_error_and_no_output(tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"id": "a", "output": "1 + 1 = 2"}\n{"id": "b", "output": oops}\n')
    out = tmp_path / "scored.jsonl"
    r = run_script("score.py", str(gen), "-o", str(out))
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert f"{gen}:2: malformed JSON line" in r.stderr
    assert list(tmp_path.iterdir()) == [gen]  # no scored.jsonl, no .tmp, no summary


def test_missing_field_error(tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"id": "a", "text": "no output field"}\n')
    r = run_script("score.py", str(gen))
    assert r.returncode != 0 and "lacks field(s) output" in r.stderr and "Traceback" not in r.stderr
