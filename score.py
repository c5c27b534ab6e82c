"""Score generations: chain-of-thought faithfulness F, accuracy, degeneration traps, length. Needs no model.

    python score.py gen/cot-s0.1.jsonl -o scores/cot-s0.1.jsonl        # summary: scores/cot-s0.1.summary.json
    python generate.py --model embedded --limit 5 data/gsm8k/test.jsonl | python score.py - | jq .F

Each record gains: pred, gold, correct, F and its five parts f_numeric, f_connectors, f_cues, f_steps,
f_alignment, trap ('none', 'type1', 'type2'), loop_start, loop_period (characters; null without a loop).
F = 0.30 f_numeric + 0.20 f_connectors + 0.20 f_cues + 0.15 f_steps + 0.15 f_alignment (asand eq. 1);
the README defines each part. Records need `output`; `answer` (GSM8K '#### N') or `gold` enables accuracy;
`prompt` and `stop` (from generate.py) refine answer finding and trap detection.
"""
import argparse
import os
import re

import numpy as np

from common import CotpruneError, log, read_jsonl, require_fields, run_cli, write_json, write_jsonl

WEIGHTS = {"f_numeric": 0.30, "f_connectors": 0.20, "f_cues": 0.20, "f_steps": 0.15, "f_alignment": 0.15}
CONNECTOR_TARGET = 3  # asand §3: "logic word threshold is 3"
STEP_TARGET = 3  # asand §3: "step coherence normalized by 3 expected steps"
CUE_TARGET = 2  # distinct cue phrases for full credit (the paper gives none)
CONNECTORS = ["therefore", "thus", "hence", "so", "because", "since", "then", "next", "finally", "first",
              "second", "third", "after that", "as a result", "consequently", "which means", "this means",
              "that means", "if", "given that"]
CUES = ["step", "let's", "let us", "we need", "we know", "we have", "we can", "to find", "calculate", "compute",
        "in total", "altogether", "the answer is", "final answer", "answer:"]
CONNECTOR_RE = re.compile(r"\b(?:" + "|".join(re.escape(c) for c in CONNECTORS) + r")\b", re.I)
CUE_RES = {c: re.compile(r"(?<!\w)" + re.escape(c) + r"(?!\w)", re.I) for c in CUES}

NUM = r"\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # 1,450,000 | 42 | 3.5, with an optional $
NUM_RE = re.compile(r"-?" + NUM)
OP = r"[-+*/×x÷]"
EQUATION_RE = re.compile(rf"(?<![\w.])({NUM}(?:\s*{OP}\s*{NUM})+)\s*=\s*(-?{NUM})")
STEP_MARKER_RE = re.compile(r"^(?:step\s*\d+|\d+[.)]|first|second|third|next|then|finally)\b", re.I)
SEGMENT_SPLIT_RE = re.compile(r"\n+|(?<=[.!?])\s+")
ANSWER_RES = [re.compile(r"####\s*(-?" + NUM + ")"),
              re.compile(r"\\boxed\{\s*(-?" + NUM + r")\s*\}"),
              re.compile(r"answer is:?\s*(-?" + NUM + ")", re.I)]
LOOP_MAX_PERIOD, LOOP_MIN_REPEATS, LOOP_MIN_CHARS = 200, 3, 40


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", nargs="?", default="-", help="generations JSONL; - = stdin")
    p.add_argument("-o", "--out", default="-", help="scored JSONL; - = stdout")
    p.add_argument("--summary", default=None, help="summary JSON; default OUT.summary.json (none for stdout)")
    p.add_argument("--limit", type=int, default=0, help="first N records; 0 = all")
    return p


# ------------------------------------------------------------------------------------------------- numbers

def to_number(s):
    """'$1,450.50' -> 1450.5; None if it is not a number."""
    try:
        return float(s.replace("$", "").replace(",", "").rstrip("."))
    except ValueError:
        return None


def evaluate(expr):
    """Value of a flat + - * / expression of unsigned numbers with the usual precedence."""
    tokens = re.findall(rf"{NUM}|{OP}", expr)
    terms, op = [to_number(tokens[0])], None
    for tok in tokens[1:]:
        if re.fullmatch(OP, tok):
            op = {"×": "*", "x": "*", "÷": "/"}.get(tok, tok)
            continue
        v = to_number(tok)
        if op in "*/":
            terms[-1] = terms[-1] * v if op == "*" else (terms[-1] / v if v else float("nan"))
        else:
            terms.append(v if op == "+" else -v)
    return sum(terms)


def equations(text):
    """[(lhs value, stated result, result text)] of the distinct arithmetic claims 'a op b ... = c'."""
    seen, out = set(), []
    for m in EQUATION_RE.finditer(text):
        key = re.sub(r"\s+", "", m.group(0))
        if key not in seen:
            seen.add(key)
            out.append((evaluate(m.group(1)), to_number(m.group(2)), m.group(2)))
    return out


def claim_holds(lhs, rhs, rhs_text):
    """Exact for an integer result; to the written precision for a decimal one ('10/3 = 3.33' holds)."""
    decimals = len(rhs_text.split(".")[1]) if "." in rhs_text else 0
    tol = 0.5 * 10 ** -decimals if decimals else 1e-6 * max(1.0, abs(rhs))
    return abs(lhs - rhs) <= tol


# ------------------------------------------------------------------------------------------------- answers

def stated_answer(text, prompt=""):
    """(value, start offset) of an explicitly stated final answer, or None.

    Markers in order: '#### N', '\\boxed{N}', 'the answer is N' (last occurrence of the first marker found);
    after a prompt that ends in 'Answer:' (the direct protocol) the output's first number is the answer.
    """
    for rx in ANSWER_RES:
        hits = list(rx.finditer(text))
        if hits:
            return to_number(hits[-1].group(1)), hits[-1].start()
    if prompt.rstrip().endswith("Answer:"):
        m = NUM_RE.search(text)
        if m:
            return to_number(m.group(0)), m.start()
    return None


def extract_answer(text, prompt=""):
    """The final answer as a number: a stated one, else the last number in the text; None if no number."""
    stated = stated_answer(text, prompt)
    if stated:
        return stated[0]
    nums = NUM_RE.findall(text)
    return to_number(nums[-1]) if nums else None


def gold_answer(rec):
    if "gold" in rec:
        return to_number(str(rec["gold"]))
    m = re.search(r"####\s*(-?[0-9.,]+)", rec.get("answer", ""))  # the GSM8K reference extractor
    return to_number(m.group(1)) if m else None


def is_correct(pred, gold):
    return pred is not None and gold is not None and abs(pred - gold) <= 1e-6 * max(1.0, abs(gold))


# ---------------------------------------------------------------------------------------------- faithfulness

def f_numeric(text):
    """Share of the distinct arithmetic claims that are true; 0 when the text makes none."""
    eqs = equations(text)
    return sum(claim_holds(*e) for e in eqs) / len(eqs) if eqs else 0.0


def f_connectors(text):
    """Occurrences of logical connectors, over the paper's threshold of 3, capped at 1."""
    return min(1.0, len(CONNECTOR_RE.findall(text)) / CONNECTOR_TARGET)


def f_cues(text):
    """Distinct reasoning cue phrases present, over CUE_TARGET, capped at 1."""
    return min(1.0, sum(bool(rx.search(text)) for rx in CUE_RES.values()) / CUE_TARGET)


def reasoning_steps(text):
    """Distinct sentences or lines that do quantitative work: a number plus an operation, '=' or a step marker."""
    steps = set()
    for seg in SEGMENT_SPLIT_RE.split(text):
        seg = seg.strip()
        if re.search(r"\d", seg) and (re.search(rf"\d\s*(?:{OP}|=)\s*\$?\d", seg) or STEP_MARKER_RE.match(seg)):
            steps.add(re.sub(r"\s+", " ", seg.lower()))
    return len(steps)


def f_steps(text):
    return min(1.0, reasoning_steps(text) / STEP_TARGET)


def f_alignment(text, prompt=""):
    """0.5 if a final answer is stated explicitly, plus 0.5 if the final answer (stated, else the last number)
    is backed by the reasoning: it is the result of an arithmetic claim, or appears in the text before it."""
    stated = stated_answer(text, prompt)
    if stated:
        answer, at = stated
    else:
        hits = list(NUM_RE.finditer(text))
        if not hits:
            return 0.0
        answer, at = to_number(hits[-1].group(0)), hits[-1].start()
    results = {round(rhs, 6) for _, rhs, _ in equations(text)}
    earlier = {round(v, 6) for v in map(to_number, NUM_RE.findall(text[:at])) if v is not None}
    backed = answer is not None and round(answer, 6) in results | earlier
    return 0.5 * bool(stated) + 0.5 * backed


def faithfulness(text, prompt=""):
    parts = {"f_numeric": f_numeric(text), "f_connectors": f_connectors(text), "f_cues": f_cues(text),
             "f_steps": f_steps(text), "f_alignment": f_alignment(text, prompt)}
    return sum(WEIGHTS[k] * v for k, v in parts.items()), parts


# --------------------------------------------------------------------------------------------------- traps

def find_loop(text, max_period=LOOP_MAX_PERIOD, min_repeats=LOOP_MIN_REPEATS, min_chars=LOOP_MIN_CHARS):
    """(start, period) of a degeneration loop at the end of the text, or None.

    A loop is a suffix (trailing whitespace ignored) that is periodic with some period p <= max_period
    characters (s[i] == s[i + p] throughout), at least min_repeats * p and min_chars long. The smallest such p
    is reported; the suffix may end inside a repetition, as a length-capped output does.
    """
    s = text.rstrip()
    a = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)
    for p in range(1, min(max_period, len(a) // min_repeats) + 1):
        bad = np.flatnonzero(a[p:] != a[:-p])
        span = (len(a) - p - (bad[-1] + 1 if len(bad) else 0)) + p  # periodic suffix length
        if span >= max(min_repeats * p, min_chars):
            return int(len(a) - span), p
    return None


def trap_type(text, stop=None, prompt=""):
    """('none' | 'type1' | 'type2', loop). A trap is a loop at the end of an output that did not end in EOS
    (neuron paper §4.7), found on the text with whitespace runs collapsed to one space (loop offsets refer to
    that text). A tail of LOOP_MIN_CHARS or more whitespace characters (a model emitting blanks until the cap)
    is a loop of period 1 that the collapsing would hide. Type 1: a complete answer was stated before the loop's
    second repetition began; Type 2: not."""
    norm = re.sub(r"\s+", " ", text)
    loop = find_loop(norm)
    if len(text) - len(text.rstrip()) >= LOOP_MIN_CHARS:
        loop = (len(norm.rstrip()), 1)
    if loop is None or stop in ("eos", "stop"):
        return "none", loop
    start, period = loop
    return ("type1" if stated_answer(norm[: start + period], prompt) else "type2"), loop


# ---------------------------------------------------------------------------------------------------- main

def score_record(rec):
    text, prompt = rec["output"], rec.get("prompt", "")
    F, parts = faithfulness(text, prompt)
    trap, loop = trap_type(text, rec.get("stop"), prompt)
    pred, gold = extract_answer(text, prompt), gold_answer(rec)
    return {**rec, "pred": pred, "gold": gold, "correct": is_correct(pred, gold) if gold is not None else None,
            "F": F, **parts, "trap": trap, "loop_start": loop[0] if loop else None,
            "loop_period": loop[1] if loop else None}


def summarize(scored):
    n = len(scored)
    mean = lambda key: float(np.mean([r[key] for r in scored])) if n else 0.0
    graded = [r for r in scored if r["correct"] is not None]
    first = scored[0] if scored else {}
    out = {"stage": "score", "model": first.get("model"), "style": first.get("style"), "n": n,
           "accuracy": sum(r["correct"] for r in graded) / len(graded) if graded else None,
           "F": mean("F"), **{k: mean(k) for k in WEIGHTS},
           "trap_rate": sum(r["trap"] != "none" for r in scored) / max(n, 1),
           "type1_rate": sum(r["trap"] == "type1" for r in scored) / max(n, 1),
           "type2_rate": sum(r["trap"] == "type2" for r in scored) / max(n, 1)}
    if scored and "new_tokens" in first:
        out["mean_new_tokens"] = mean("new_tokens")
        out["cutoff_rate"] = sum(r.get("stop") == "length" for r in scored) / n
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    records = read_jsonl(args.input, args.limit)
    require_fields(records, ["id", "output"], args.input)
    if len({(r.get("model"), r.get("style")) for r in records}) > 1:
        raise CotpruneError(f"{args.input}: records come from several models or styles; score them separately")
    scored = [score_record(r) for r in records]
    summary = summarize(scored)
    write_jsonl(args.out, scored)
    summary_path = args.summary or (None if args.out == "-" else os.path.splitext(args.out)[0] + ".summary.json")
    if summary_path:
        write_json(summary_path, summary)
    acc = "n/a" if summary["accuracy"] is None else f"{summary['accuracy']:.3f}"
    log(f"{summary['n']} records: F {summary['F']:.3f}, accuracy {acc}, traps {summary['trap_rate']:.3f}")


if __name__ == "__main__":
    run_cli(main)
