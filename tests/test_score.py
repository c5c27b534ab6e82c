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


# ------------------------------------------------------------------------------------- hardening (linear time)

MB = 1_000_000
PATHOLOGICAL = {  # what made a regex retry or backtrack over a whole run, and its neighbours
    "plus chain": "1+", "spaced chain": "1 + ", "times chain": "1 x ", "alternating operators": "1+-*/",
    "operators only": "+-*/", "digits": "1", "digits and spaces": "1" * 50 + " ", "boxed opens": "\\boxed{",
    "equals": "= ", "claims": "1+1=", "number equals": "1 =", "open braces": "{", "spaces": " ", "newlines": "\n",
    "dollar thousands": "$1,", "commas": "1,", "decimals": "1.", "hashes": "#### ", "answer is": "answer is ",
    "frac opens": "\\frac{", "parentheses": "(", "open parenthesis chain": "1+(", "backslashes": "\\",
    "dashes": "-", "step labels": "Step 1 ", "bold": "**", "cues": "let's ",
}


@pytest.mark.parametrize("unit", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_megabyte_outputs_score_in_linear_time(unit):
    # '1+' * 10000 took 58 s before (quadratic); linear code does a megabyte in about a second. 5 s is a bound
    # that only a super-linear scan can break, not a benchmark.
    import time
    rec = {"id": "x", "output": unit * (MB // len(unit)), "stop": "length"}
    t = time.perf_counter()
    score.score_record(rec)
    assert time.perf_counter() - t < 5


def test_find_loop_matches_a_brute_force_scan():
    import random
    rng = random.Random(0)

    def brute(s):  # the definition, one period at a time, character by character
        s = s.rstrip()
        for p in range(1, min(200, len(s) // 3) + 1):
            i = len(s) - p
            while i > 0 and s[i - 1] == s[i - 1 + p]:
                i -= 1
            if len(s) - i >= max(3 * p, 40):
                return i, p
        return None
    texts = ["Intro. " + "abc" * 3000, "x" * 9000 + "y", "q" * 5 + "She gives 15 cups. " * 700 + "She"]
    texts += ["".join(rng.choice("ab ") for _ in range(rng.randrange(1, 300))) + "ab" * rng.randrange(0, 40)
              for _ in range(200)]
    for s in texts:
        assert score.find_loop(s) == brute(s)


# ----------------------------------------------------------------------------------- claims, chains, LaTeX

@pytest.mark.parametrize("text,expected", [
    ("-5 + 3 = -2", 1.0),                       # a leading sign belongs to its number
    ("10 - -5 = 15", 1.0),
    ("- 48 / 2 = 24", 1.0),                     # a markdown bullet is no sign
    ("2 + 3 = 5 + 1 = 7", 0.5),                 # 2 + 3 = 5 holds (running total), 5 + 1 = 7 does not
    ("48 / 2 = 24 + 3 = 27", 1.0),              # 48/2 = 24, then 24 + 3 = 27
    ("2 * (3 + 4) = 2 * 7 = 14", 1.0),          # both sides equal: 14 = 14, then 2 * 7 = 14
    ("3 * 4 = 12 = 12", 1.0),                   # one claim: '12 = 12' has no operator
    ("(2 + 3) * 4 = 20", 1.0),
    ("2 ^ 10 = 1024", 1.0),
    ("5 / 0 = 0", 0.0),
    ("Total = 72", 0.0),                        # no claim at all
])
def test_claims_chains_and_signs(text, expected):
    assert score.f_numeric(text) == pytest.approx(expected)


def test_claim_counts():
    assert len(score.claims("2 + 3 = 5 + 1 = 7")) == 2
    assert len(score.claims("3 * 4 = 12 = 12")) == 1
    assert len(score.claims("v2 + 3 = 5")) == 0  # 'v2' is a word, and '+ 3 = 5' has no left operand
    assert len(score.claims("20\\% \\times 50 = 10")) == 0  # percentages are not read


@pytest.mark.parametrize("text", [
    "\\[ \\frac{48}{2} = 24 \\]", "$48 \\times 2 = 96$", "\\( 3 \\cdot 4 = 12 \\)", "$$12 \\div 3 = 4$$",
    "\\[\n\\text{Total} = 48 + 24 = 72 \\text{ clips}\n\\]", "48 + 24 = \\boxed{72}", "\\dfrac{1}{2} \\times 8 = 4",
    "\\frac{\\frac{1}{2}}{4} = 0.125", "2^{10} = 1024", "1{,}000 - 200 = 800", "\\$1{,}200 - \\$200 = \\$1{,}000",
    "\\left( 2 + 3 \\right) \\times 4 = 20", "6 − 2 = 4", "3 × 4 = 12", "12 ÷ 4 = 3",
])
def test_latex_arithmetic_is_read(text):
    assert len(score.claims(text)) == 1 and score.f_numeric(text) == 1.0


def test_latex_wrong_claim_is_false():
    assert score.f_numeric("\\[ \\frac{48}{2} = 25 \\]") == 0.0
    assert score.f_numeric("$36 \\cdot 2 = \\$62$") == 0.0


# -------------------------------------------------------------------------------------------------- steps

def test_numbered_lists_and_markdown_steps():
    assert score.reasoning_steps("1. Add the apples.\n2. Subtract the pears.\n3. Count the rest.") == 3
    assert score.reasoning_steps("1) Add the apples.\n2) Subtract the pears.") == 2
    assert score.reasoning_steps("**Step 1: Calculate the clips sold in May.**") == 1
    assert score.reasoning_steps("### Step 2: Add the totals") == 1
    assert score.reasoning_steps("### Step 2") == 0                      # a marker with nothing after it
    assert score.reasoning_steps("1.\n2.\n3.") == 0
    assert score.reasoning_steps("2. Add the totals.\n**Step 2: Add the totals.**") == 1  # plan and heading: one
    assert score.reasoning_steps("- 48 / 2 = 24\n- 48 + 24 = 72") == 2   # bullets
    assert score.reasoning_steps("\\[ \\frac{48}{2} = 24 \\]") == 1


# ---------------------------------------------------------------------------------- whole answers, by hand

GSM_1 = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
GSM_2 = ("Betty has 100 / 2 = $50 at the start. Her parents give her $15, and her grandparents give her 15 * 2 = $30. "
         "That makes 50 + 15 + 30 = $95 in total, so she needs 100 - 95 = $6 more.\n#### 6")
QWEN_1 = r"""To find out how much money the baker makes, we need to work through the problem step by step.

### Step 1: Calculate the total number of muffins
The baker makes 4 trays with 12 muffins each:
\[
4 \times 12 = 48
\]

### Step 2: Calculate the number of muffins sold
She sells \(\frac{3}{4}\) of the muffins:
\[
\frac{3}{4} \times 48 = 36
\]

### Step 3: Calculate the money earned
Each muffin sells for \$2, so:
\[
36 \cdot 2 = \$72
\]

Therefore, the baker makes \(\boxed{72}\) dollars."""
QWEN_2 = r"""Let's solve this step by step.

1. **Find the cost of the laptops.** The school buys 5 laptops at \$1{,}200 each: $5 \times 1{,}200 = 6{,}000$ dollars.
2. **Find the discount.** The discount is $\dfrac{1}{10}$ of the cost: $6{,}000 \div 10 = 500$ dollars.
3. **Find the final price.** Subtracting the discount: $6{,}000 - 600 = 5{,}400$ dollars.

So the school pays $\boxed{5{,}400}$ dollars."""


@pytest.mark.parametrize("text,parts,answer", [
    # claims 48/2 = 24, 48+24 = 72 both hold -> 1; no connector -> 0; one cue ('altogether') -> 1/2;
    # steps: the two arithmetic lines ('#### 72' is none) -> 2/3; '#### 72' stated and a claim's result -> 1.
    (GSM_1, (1.0, 0.0, 0.5, 2 / 3, 1.0), 72),
    # claims 100/2 = 50, 15*2 = 30, 50+15+30 = 95 hold, 100-95 = 6 does not -> 3/4; connectors 'so' -> 1/3;
    # cue 'in total' -> 1/2; three arithmetic sentences -> 1; '#### 6' stated, and 6 is a claim's result -> 1.
    (GSM_2, (0.75, 1 / 3, 0.5, 1.0, 1.0), 6),
    # claims 4*12 = 48, 3/4*48 = 36, 36*2 = 72 hold -> 1; connectors 'so', 'Therefore' -> 2/3; cues 'to find',
    # 'we need', 'step', 'calculate' -> 1; steps: 3 headings, 3 computations and 'She sells 3/4 of the
    # muffins' -> 7 -> 1; \boxed{72} stated and the result of 36*2 -> 1.
    (QWEN_1, (1.0, 2 / 3, 1.0, 1.0, 1.0), 72),
    # claims 5*1,200 = 6,000 and 6,000-600 = 5,400 hold, 6,000/10 = 500 does not -> 2/3; connector 'So' -> 1/3;
    # cues "let's", 'step' -> 1; steps: the three numbered lines -> 1; \boxed{5{,}400} = 5400 stated and a
    # claim's result -> 1.
    (QWEN_2, (2 / 3, 1 / 3, 1.0, 1.0, 1.0), 5400),
])
def test_whole_answers_hand_computed(text, parts, answer):
    F, got = score.faithfulness(text)
    assert tuple(got.values()) == pytest.approx(parts)
    assert F == pytest.approx(sum(w * p for w, p in zip(score.WEIGHTS.values(), parts)))
    assert score.extract_answer(text) == answer


@pytest.mark.parametrize("text,parts", [
    # Pruned-model garbage without LaTeX scores what it scored before the LaTeX and markdown readers.
    ("The answer is 5. " * 6, (0, 0, 0.5, 0, 1.0)),     # one cue; stated 5, and 5 appears before the last one
    ("1. " * 20, (0, 0, 0, 0, 0.5)),                    # list numbers without words are no steps
    ("48 " * 30, (0, 0, 0, 0, 0.5)),                    # last number 48 appeared before
    ("She has 5 apples and 3 apples. " * 5 + "She has 5 apples and", (0, 0, 0, 0, 0.5)),
    ("5 + 3 = 8 = 8 = 8 = 8 = 8", (1.0, 0, 0, 1 / 3, 0.5)),  # one claim, one step, last number 8 a result
    ("So so so so so so so so", (0, 1.0, 0, 0, 0)),
    ("Step 1: The\nStep 2: The\nStep 3: The", (0, 0, 0.5, 1 / 3, 0)),  # one distinct step (was 3)
])
def test_garbage_does_not_gain(text, parts):
    assert tuple(score.faithfulness(text)[1].values()) == pytest.approx(parts)


# ------------------------------------------------------------------------------------------------ answers

def _answer_table():
    """Rows of the accepted-forms table in docs/scoring.md: (written, value or None)."""
    import os
    import re
    doc = open(os.path.join(os.path.dirname(score.__file__), "docs", "scoring.md"), encoding="utf-8").read()
    table = doc.split("| written | read as |")[1].split("\n\n")[0]
    rows = []
    for line in table.splitlines()[2:]:
        written, value = line.strip("|").rsplit("|", 1)
        for example in re.findall(r"`([^`]*)`", written):
            rows.append((example, None if value.strip() == "not read" else float(value)))
    return rows


def test_answer_table_is_complete():
    rows = _answer_table()
    assert len(rows) >= 30 and any(v is None for _, v in rows)


@pytest.mark.parametrize("written,value", _answer_table())
def test_boxed_answer_forms(written, value):
    text = "We add 3 and 4 to get 7. So " + written + " is what we get."
    if value is None:  # not a stated answer: the last number is taken instead
        assert score.stated_answer(text) is None
    else:
        assert score.extract_answer(text) == pytest.approx(value)
        assert score.stated_answer(text)[0] == pytest.approx(value)


def test_answer_is_and_gold_strings():
    assert score.extract_answer("The answer is: **18**.") == 18
    assert score.extract_answer("The answer is \\$18.") == 18
    assert score.gold_answer({"gold": "\\$1{,}000"}) == 1000
    assert score.gold_answer({"gold": 12}) == 12 and score.gold_answer({"gold": "abc"}) is None
    assert score.gold_answer({"gold": None, "answer": "#### 7"}) == 7


# ---------------------------------------------------------------------------------- files, types, errors

def _strict(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_and_output_is_strict_json(tmp_path):
    gen = tmp_path / "gen.jsonl"
    big = "9" * 400
    gen.write_text(json.dumps({"id": "a", "output": f"{big} + 1 = {big}. The answer is {big}.", "gold": big}) + "\n"
                   + json.dumps({"id": "b", "output": f"So 1 + 1 = 2 and {big}", "answer": f"#### {big}"}) + "\n")
    out = tmp_path / "scored.jsonl"
    score.main([str(gen), "-o", str(out)])
    scored = [_strict(line) for line in out.read_text().splitlines()]
    assert [(r["pred"], r["gold"], r["correct"]) for r in scored] == [(None, None, None), (None, None, None)]
    summary = _strict((tmp_path / "scored.summary.json").read_text())
    assert summary["accuracy"] is None and summary["n"] == 2


def test_summary_of_nothing_invents_no_zero():
    summary = score.summarize([])
    assert summary["n"] == 0 and summary["F"] is None and summary["f_numeric"] is None
    assert summary["trap_rate"] is None and summary["accuracy"] is None


def _one_line_error(r, tmp_path, inputs):
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("score.py: error:")
    assert sorted(tmp_path.iterdir()) == sorted(inputs)  # no output, no summary, no temporary file


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_input_is_an_error(tmp_path, content):
    gen = tmp_path / "gen.jsonl"
    gen.write_text(content)
    r = run_script("score.py", str(gen), "-o", str(tmp_path / "scored.jsonl"))
    _one_line_error(r, tmp_path, [gen])
    assert f"{gen}: no records" in r.stderr


@pytest.mark.parametrize("rec,field", [
    ({"id": "a", "output": 5}, "output"), ({"id": "a", "output": None}, "output"),
    ({"id": "a", "output": ["x"]}, "output"), ({"id": "a", "output": "1", "answer": 7}, "answer"),
    ({"id": "a", "output": "1", "prompt": {"q": 1}}, "prompt"), ({"id": "a", "output": "1", "gold": [1]}, "gold"),
    ({"id": "a", "output": "1", "gold": True}, "gold"), ({"id": [1], "output": "1"}, "id"),
    ({"id": 1.5, "output": "1"}, "id"),
])
def test_wrong_field_types_are_one_line_errors(tmp_path, rec, field):
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps(rec) + "\n")
    r = run_script("score.py", str(gen), "-o", str(tmp_path / "scored.jsonl"))
    _one_line_error(r, tmp_path, [gen])
    assert str(gen) in r.stderr and "record 1" in r.stderr and field in r.stderr


def test_negative_limit_is_refused_at_parse_time(tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"id": "a", "output": "1 + 1 = 2"}\n')
    r = run_script("score.py", str(gen), "--limit", "-1", "-o", str(tmp_path / "scored.jsonl"))
    assert r.returncode == 2 and "--limit" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == [gen]
