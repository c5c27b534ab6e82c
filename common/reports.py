"""What the study reports share: per-problem records in, markdown tables with 95 % intervals and paired tests out.

    index_records / index_summaries   score.py and perplexity records, generate.py summaries, by (model, style)
    estimate / compare / holm_mark    one model's mean or rate with its interval; two models paired on shared
                                      problems; the Holm correction across one table
    verdict                           does an interval support, contradict or leave open a paper's claim
    mdd_paragraph                     what a run of N problems can resolve
    paper                             a paper's reference figures, from data/papers/NAME.json
    table / fmt / cell / diff_cell    markdown

Intervals (docs/methods.md#statistics): a mean over problems (F and its parts, tokens) gets a percentile bootstrap
over problems; a share of problems (accuracy, traps, cut-offs) an exact Clopper-Pearson interval; a ratio of sums
over traces (perplexity) a bootstrap over traces. Two models are compared on the problems both answered: a paired
bootstrap interval of the difference, with a sign-flip permutation p-value for means and an exact McNemar p-value
for shares. Every bootstrap uses the seed SEED, so a report is reproducible to the digit.
"""
import math
import os

from common import stats
from common.cli import CotpruneError
from common.files import read_json, read_jsonl

SEED = 0
N_BOOT = 4000
LEVEL = 0.95
ALPHA = 0.05
PAPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "papers")

# quantity: (kind, value of one record or None where it does not apply); "mean" quantities are bootstrapped,
# "rate" ones are booleans with an exact interval
QUANTITIES = {
    "F": ("mean", lambda r: r.get("F")),  # code records have no F
    **{k: ("mean", lambda r, k=k: r.get(k)) for k in ("f_numeric", "f_connectors", "f_cues", "f_steps",
                                                        "f_alignment")},
    "accuracy": ("rate", lambda r: r.get("correct")),
    "pass_at_1": ("rate", lambda r: r.get("passed")),  # code: one greedy sample per task
    "trap_rate": ("rate", lambda r: r["trap"] != "none"),
    "type1_rate": ("rate", lambda r: r["trap"] == "type1"),
    "type2_rate": ("rate", lambda r: r["trap"] == "type2"),
    "cutoff_rate": ("rate", lambda r: r.get("stop") == "length" if "stop" in r else None),
    "mean_new_tokens": ("mean", lambda r: r.get("new_tokens")),
    # functional faithfulness (score.py on generate.py --intervene records); None where a measure is undefined
    "aoc": ("mean", lambda r: r.get("aoc")),
    **{k: ("rate", lambda r, k=k: r.get(k)) for k in ("nocot_same", "filler_same", "mistake_changed",
                                                        "mistake_followed", "full_correct", "nocot_correct",
                                                        "filler_correct")},
}


# ------------------------------------------------------------------------------------------------ reading

def model_key(model):
    return os.path.realpath(model) if os.path.exists(model) else model


def index_records(paths, stage):
    """{(model key, style): {id: record}} from score.py outputs (stage 'score') or generate.py --perplexity outputs
    (stage 'perplexity', style 'traces'). One file per model and style; records name their model."""
    out, where = {}, {}
    for path in paths:
        records = read_jsonl(path)
        if not records:
            raise CotpruneError(f"{path}: no records")
        for i, r in enumerate(records, 1):
            if stage != "score":
                need = ("nll", "trace_tokens")
            else:  # functional records (one per problem, from --intervene) have no trap of their own
                need = ("style", "aoc" if r.get("style") == "functional" else "trap")
            missing = [k for k in ("id", "model", *need) if k not in r]
            bad = missing or [k for k in ("model", "style") if k in r and not isinstance(r[k], str)]
            if bad:
                what = "score.py output" if stage == "score" else "generate.py --perplexity output"
                raise CotpruneError(f"{path}: record {i} has no {bad[0]} (a string): not a {what} of generate.py's "
                                    f"records")
        keys = {(model_key(r["model"]), r["style"] if stage == "score" else "traces") for r in records}
        if len(keys) > 1:
            raise CotpruneError(f"{path} holds records of several models or styles")
        key = keys.pop()
        if key in out:
            raise CotpruneError(f"{where[key]} and {path} both hold {stage} records of {key[0]} ({key[1]}): "
                                f"pass one")
        out[key], where[key] = {r["id"]: r for r in records}, path
    return out


def index_summaries(paths):
    """{(model key, stage, style): summary} of generate.py summaries (speed, memory, size) and perplexity ones."""
    out, where = {}, {}
    for path in paths:
        s = read_json(path, "summary")
        if not isinstance(s, dict) or not isinstance(s.get("model"), str) or not isinstance(s.get("style"), str) \
                or s.get("stage") not in ("generate", "perplexity", "score"):
            raise CotpruneError(f"{path} is not a generate.py summary (it needs string stage, model and style)")
        if s["stage"] == "score":
            raise CotpruneError(f"{path} is a score.py summary: pass the scored JSONL itself with --scores, so "
                                f"that the report can give intervals")
        key = (model_key(s["model"]), s["stage"], s["style"])
        if key in out:
            raise CotpruneError(f"{where[key]} and {path} are both {key[1]} summaries of {key[0]} ({key[2]}): "
                                f"pass one")
        out[key], where[key] = s, path
    return out


def paper(name):
    return read_json(os.path.join(PAPERS, f"{name}.json"), "paper figures")


# ------------------------------------------------------------------------------------------------ estimates

def values(records, quantity):
    """{id: value} of one quantity over a model's records, without the records where it does not apply."""
    get = QUANTITIES[quantity][1]
    return {i: float(v) for i, r in records.items() if (v := get(r)) is not None}


def estimate(records, quantity):
    """{"value", "lo", "hi", "n"} for one model: bootstrap for a mean, Clopper-Pearson for a rate; None without
    records the quantity applies to."""
    if records is None:
        return None
    v = list(values(records, quantity).values())
    if not v:
        return None
    if QUANTITIES[quantity][0] == "rate":
        e = stats.rate_ci(int(sum(v)), len(v), LEVEL)
        return {"value": e["rate"], "lo": e["lo"], "hi": e["hi"], "n": len(v)}
    e = stats.mean_ci(v, LEVEL, N_BOOT, SEED)
    return {"value": e["mean"], "lo": e["lo"], "hi": e["hi"], "n": len(v)}


def compare(a, b, quantity):
    """b - a on the problems both have a value for: {"diff", "lo", "hi", "p", "n", "test"}; None if none shared.
    The interval is a paired bootstrap; p is exact McNemar for rates, a sign-flip permutation test for means."""
    if a is None or b is None:
        return None
    va, vb = values(a, quantity), values(b, quantity)
    ids = sorted(set(va) & set(vb), key=str)
    if not ids:
        return None
    xa, xb = [va[i] for i in ids], [vb[i] for i in ids]
    boot = stats.paired_bootstrap(xa, xb, LEVEL, N_BOOT, SEED)
    if QUANTITIES[quantity][0] == "rate":
        p, test = stats.mcnemar_exact(xa, xb)["p"], "McNemar"
    else:
        p, test = stats.paired_permutation_p(xa, xb, N_BOOT, SEED)["p"], "permutation"
    return {"diff": boot["diff"], "lo": boot["lo"], "hi": boot["hi"], "p": p, "n": len(ids), "test": test}


def perplexity_estimate(rows):
    """exp(sum nll / sum tokens) over the traces with a bootstrap interval over traces."""
    if not rows:
        return None
    e = stats.ratio_ci([r["nll"] for r in rows.values()], [r["trace_tokens"] for r in rows.values()], LEVEL,
                       N_BOOT, SEED)
    return {"value": math.exp(e["ratio"]), "lo": math.exp(e["lo"]) if e["n"] > 1 else math.nan,
            "hi": math.exp(e["hi"]) if e["n"] > 1 else math.nan, "n": e["n"]}


def perplexity_compare(a, b):
    """ppl(b) / ppl(a) on the shared traces (same traces, same tokens): a bootstrap interval of the ratio and a
    sign-flip p-value on the per-trace nll differences."""
    if not a or not b:
        return None
    ids = sorted(set(a) & set(b), key=str)
    if not ids:
        return None
    d = [b[i]["nll"] - a[i]["nll"] for i in ids]
    e = stats.ratio_ci(d, [a[i]["trace_tokens"] for i in ids], LEVEL, N_BOOT, SEED)
    p = stats.paired_permutation_p([a[i]["nll"] for i in ids], [b[i]["nll"] for i in ids], N_BOOT, SEED)["p"]
    return {"ratio": math.exp(e["ratio"]), "lo": math.exp(e["lo"]) if len(ids) > 1 else math.nan,
            "hi": math.exp(e["hi"]) if len(ids) > 1 else math.nan, "p": p, "n": len(ids), "test": "permutation"}


def holm_mark(comparisons):
    """Holm-correct the p-values of a table's comparisons in place ("p_holm", "significant"); returns m."""
    live = [c for c in comparisons if c is not None and not math.isnan(c["p"])]
    h = stats.holm([c["p"] for c in live], ALPHA)
    for c, p, rej in zip(live, h["p_adj"], h["reject"]):
        c["p_holm"], c["significant"] = p, rej
    return h["m"]


def verdict(lo, hi, expected_sign):
    """'supports it' when the interval lies on the paper's side of 0, 'contradicts it' when on the other, else
    'cannot resolve it'."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return "cannot resolve it (no interval: the quantity is undefined here)"
    if (lo > 0 and expected_sign > 0) or (hi < 0 and expected_sign < 0):
        return "supports it"
    if (lo > 0 and expected_sign < 0) or (hi < 0 and expected_sign > 0):
        return "contradicts it"
    return "cannot resolve it (the interval includes no change)"


VERDICT_NOTE = ("Each claim is one question asked in advance, read from its own 95 % interval (no multiple-comparison "
                "correction); the * marks in the tables above are the Holm-corrected tests of every comparison.")


def signed(v, digits=3):
    return "—" if v is None or math.isnan(v) else f"{v:+.{digits}f}".replace("-", "−")


def interval(c, digits=3, scale=1.0, key="diff"):
    """'+0.120 [−0.010, +0.250]' of a comparison (scaled, e.g. 100 for percentage points)."""
    if c is None:
        return "—"
    f = signed if key == "diff" else fmt  # a ratio has no sign
    return f"{f(c[key] * scale, digits)} [{f(c['lo'] * scale, digits)}, {f(c['hi'] * scale, digits)}]"


def claim(text, evidence, lo, hi, expected_sign, note=""):
    """One line of a report's 'what this run can and cannot tell': the paper's claim, the evidence, the verdict."""
    return f"- *{text}* Here: {evidence}. This run **{verdict(lo, hi, expected_sign)}**{note}."


def mdd_paragraph(n, comparisons_f, base_accuracy, measure="accuracy", unit="problems"):
    """The smallest differences a paired run of n problems detects at alpha 0.05 with 80 % power, from the
    spread of the F differences it measured and the dense model's accuracy (or pass@1: `measure`; normal
    approximations)."""
    sds = [c["sd"] for c in comparisons_f if c and c.get("sd") is not None and c["sd"] > 0]
    parts = []
    if sds and n:
        sd = sorted(sds)[len(sds) // 2]
        parts.append(f"a difference in F of about {stats.min_detectable_difference(n, sd=sd):.3f} (median SD of the "
                     f"per-problem F differences, {sd:.3f})")
    rare = False
    if base_accuracy is not None and n:
        p = min(max(base_accuracy, 0.5 / n), 1 - 0.5 / n)
        rare = n * min(p, 1 - p) < 5
        parts.append(f"a difference in {measure} of about {stats.min_detectable_difference(n, p=p):.3f} at the "
                     f"dense model's {measure} {base_accuracy:.3f}")
    if not parts:
        return ""
    return (f"With {n} {unit} this run detects, at α = 0.05 with 80 % power (normal approximation), "
            + " and ".join(parts) + "; smaller true differences are likely to be missed."
            + (f" With fewer than 5 expected correct answers the approximation is optimistic for {measure}: an exact "
               "test needs larger differences still." if rare else ""))


# ------------------------------------------------------------------------------------------------ markdown

def fmt(v, digits=3, scale=1.0):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v * scale:.{digits}f}"
    return str(v)


def cell(e, digits=3, scale=1.0):
    """'0.205 [0.180, 0.231]' (value and 95 % interval), '—' when there is nothing."""
    if e is None:
        return "—"
    if e["lo"] is None or math.isnan(e["lo"]):
        return fmt(e["value"], digits, scale)
    return f"{fmt(e['value'], digits, scale)} [{fmt(e['lo'], digits, scale)}, {fmt(e['hi'], digits, scale)}]"


def diff_cell(c, digits=3, scale=1.0, key="diff"):
    """'−0.144 [−0.190, −0.100] p 0.001 *': a paired difference (or ratio), its interval and raw p; * =
    significant after the Holm correction of its table."""
    if c is None:
        return "—"
    sign = ((lambda v: signed(v * scale, digits)) if key == "diff"  # a difference shows its sign; a ratio has none
            else (lambda v: fmt(v, digits, scale)))
    star = " *" if c.get("significant") else ""
    ci = "" if math.isnan(c["lo"]) else f" [{sign(c['lo'])}, {sign(c['hi'])}]"
    return f"{sign(c[key])}{ci} p {c['p']:.3g}{star}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def holm_note(m):
    return (f"Paired on the problems both models answered; * marks a difference that survives the Holm correction "
            f"over the m = {m} comparisons of this table at α = {ALPHA} (p is the uncorrected value).")


def to_json(obj):
    """nan -> None, so the JSON the reports write is strict."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


def with_sd(records_a, records_b, c, quantity="F"):
    """Add the SD of the per-problem differences to a comparison (what mdd_paragraph needs)."""
    if c is None:
        return c
    va, vb = values(records_a, quantity), values(records_b, quantity)
    d = [vb[i] - va[i] for i in set(va) & set(vb)]
    if len(d) > 1:
        m = sum(d) / len(d)
        c["sd"] = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
    return c

