"""The reasoning-aware compression and task-specific neuron study reports (correlate.py --study rac | neurons).

    rac_report(base, models, scores, ppl, summaries)      -> (markdown, rows for rac.json)
    neuron_report(base, models, scores, summaries)        -> (markdown, rows for neurons.json)

Both read each model's own record of how it was made (prune_report.json, recover_report.json) for its row label,
never its folder name, and every number is an estimate with a 95 % interval or a paired comparison
(common/reports.py).
"""
import math
import os

from common.checkpoints import read_checkpoint_meta
from common.cli import CotpruneError
from common.files import read_json
from common.mathtext import same_number
from common.reports import (cell, claim, compare, diff_cell, estimate, fmt, holm_mark, holm_note, interval,
                            mdd_paragraph, model_key, paper, perplexity_compare, perplexity_estimate, table, with_sd,
                            VERDICT_NOTE)

RAC_LABELS = {("magnitude", ""): "magnitude", ("wanda", "text"): "Wanda, generic text",
              ("sparsegpt", "text"): "SparseGPT, generic text", ("sparsegpt", "prompts"): "SparseGPT, prompt-only",
              ("sparsegpt", "traces"): "SparseGPT, own traces (RAC)", ("wanda", "traces"): "Wanda, own traces (RAC)"}
RAC_COLUMNS = [("accuracy", "accuracy", 3), ("mean tokens", "mean_new_tokens", 0), ("cut off", "cutoff_rate", 2),
               ("traps", "trap_rate", 2), ("F", "F", 3)]
RAC = "SparseGPT, own traces (RAC)"


def contention_mark(summary):
    """'‡' for a speed measured while other processes used the CPUs (generate.py records their share)."""
    return " ‡" if summary and summary.get("contended") else ""


CONTENTION_NOTE = ("‡: measured while other processes used more than 10 % of the machine's CPU time "
                   "(other_cpu_share in the generate.py summary); not comparable with the other rows.")


# ------------------------------------------------------------------------------------------------ RAC

def rac_rows(base, models):
    """[{label, level, sparsity, draw, folder}], dense first, then in RAC_LABELS order, levels, draws."""
    rows = []
    for folder in models:
        rep = read_json(os.path.join(folder, "prune_report.json"), "prune report")
        if rep.get("method") not in ("magnitude", "wanda", "sparsegpt"):
            raise CotpruneError(f"{folder} was pruned by {rep.get('method')!r}: the RAC study compares magnitude, "
                                f"Wanda and SparseGPT models")
        key = (rep["method"], rep.get("calib_source", "") if rep["method"] != "magnitude" else "")
        rows.append({"label": RAC_LABELS.get(key, f"{key[0]}, {key[1]}"), "level": rep.get("nm") or
                     f"{rep['sparsity']:.0%}", "sparsity": rep["sparsity"], "draw": rep.get("calib_seed", 0),
                     "folder": folder})
    order = list(RAC_LABELS.values())
    rows.sort(key=lambda r: (order.index(r["label"]) if r["label"] in order else len(order), ":" in r["level"],
                             r["sparsity"], r["draw"]))
    seen = {}
    for r in rows:
        k = (r["label"], r["level"], r["draw"])
        if k in seen:
            raise CotpruneError(f"{seen[k]} and {r['folder']} are both {r['label']} at {r['level']} "
                                f"(calibration draw {r['draw']}): pass one")
        seen[k] = r["folder"]
    return [{"label": "dense", "level": "0%", "sparsity": 0.0, "draw": 0, "folder": base}] + rows


def rac_report(base, models, scores, ppl, summaries):
    rows = rac_rows(base, models)
    rec = lambda r: scores.get((model_key(r["folder"]), "chat"))  # noqa: E731
    trace = lambda r: ppl.get((model_key(r["folder"]), "traces"))  # noqa: E731
    missing = [r["folder"] for r in rows if rec(r) is None]
    if missing:
        raise CotpruneError(f"no chat-style score records (--scores) for {missing[0]}")
    dense = rows[0]
    for r in rows:
        r.update({q: estimate(rec(r), q) for _, q, _ in RAC_COLUMNS})
        r["trace ppl"] = perplexity_estimate(trace(r))
    main = [r for r in rows[1:] if r["draw"] == 0]
    levels = list(dict.fromkeys(r["level"] for r in main))
    methods = list(dict.fromkeys(r["label"] for r in main))
    at = {(r["label"], r["level"]): r for r in main}

    # comparisons: each model against the dense one, and own traces against the other sources at one level
    pairs = [(dense, r) for r in main]
    for level in levels:
        for other in ("SparseGPT, generic text", "SparseGPT, prompt-only"):
            if (RAC, level) in at and (other, level) in at:
                pairs.append((at[(other, level)], at[(RAC, level)]))
        if ("Wanda, own traces (RAC)", level) in at and ("Wanda, generic text", level) in at:
            pairs.append((at[("Wanda, generic text", level)], at[("Wanda, own traces (RAC)", level)]))
    cmp = []
    for a, b in pairs:
        c = {q: compare(rec(a), rec(b), q) for q in ("accuracy", "trap_rate", "F")}
        with_sd(rec(a), rec(b), c["F"])
        c["ppl"] = perplexity_compare(trace(a), trace(b))
        cmp.append((a, b, c))
    m = holm_mark([c[q] for _, _, c in cmp for q in ("accuracy", "trap_rate", "F", "ppl")])

    # run-to-run spread: the same method and level with another calibration draw
    draws = [r for r in rows[1:] if r["draw"] != 0]
    spread = []
    for r in draws:
        first = at.get((r["label"], r["level"]))
        if first:
            c = {q: compare(rec(first), rec(r), q) for q in ("accuracy", "F")}
            c["ppl"] = perplexity_compare(trace(first), trace(r))
            spread.append((first, r, c))

    n = dense["F"]["n"]
    parts = ["## Reasoning-aware compression: calibrating on the model's own chain of thought",
             f"Each model answers the same {n} GSM8K test problems with the chat prompt (greedy). Trace ppl is the "
             "perplexity of the dense model's own traces on held-out GSM8K train problems, teacher-forced. Every "
             "cell is the value with its 95 % interval (accuracy, cut off and traps: exact Clopper-Pearson; F, "
             "tokens and perplexity: bootstrap over problems or traces). The dense model: "
             + ", ".join(f"{name} {cell(dense[q], d)}" for name, q, d in RAC_COLUMNS)
             + f", trace ppl {cell(dense['trace ppl'], 2)}."]
    for name, q, digits in RAC_COLUMNS + [("trace ppl", "trace ppl", 2)]:
        parts += [f"### {name}", table(["method"] + levels, [[meth] + [cell(at[(meth, lv)][q], digits)
                                                                      if (meth, lv) in at else "—" for lv in levels]
                                                             for meth in methods])]
    parts += ["### Paired comparisons",
              "b − a in accuracy, traps and F; for trace perplexity the ratio ppl(b) / ppl(a) (< 1: b fits the "
              "dense model's traces better). " + holm_note(m),
              table(["a", "b", "level", "Δ accuracy", "Δ traps", "Δ F", "ppl ratio"],
                    [[a["label"], b["label"], b["level"], diff_cell(c["accuracy"]), diff_cell(c["trap_rate"]),
                      diff_cell(c["F"]), diff_cell(c["ppl"], 3, key="ratio")] for a, b, c in cmp])]
    if spread:
        parts += ["### Run-to-run spread: the same method with another calibration draw",
                  "The calibration windows drawn in another order (prune.py --calib-seed); a method gap smaller "
                  "than this spread says nothing about the method.",
                  table(["method", "level", "draw", "Δ accuracy", "Δ F", "ppl ratio"],
                        [[a["label"], a["level"], b["draw"], diff_cell(c["accuracy"]), diff_cell(c["F"]),
                          diff_cell(c["ppl"], 3, key="ratio")] for a, b, c in spread])]
    ref = paper("rac")
    parts += ["The RAC paper's figures, quoted for comparison (" + ref["source"] + "):",
              table(ref["columns"], [[a, b] + [fmt(v, 3) for v in rest] for a, b, *rest in ref["rows"]])]
    parts += ["### What this run can and cannot tell", VERDICT_NOTE, rac_claims(cmp, spread, n, dense)]
    data = [{k: v for k, v in r.items()} for r in rows]
    data.append({"comparisons": [{"a": a["label"], "b": b["label"], "level": b["level"], **c} for a, b, c in cmp],
                 "holm_m": m})
    return "\n\n".join(parts) + "\n", data


def rac_claims(cmp, spread, n, dense):
    lines = []
    for a, b, c in cmp:
        if b["label"] != RAC or a["label"] == "dense":
            continue
        other, p, f, acc = a["label"].split(", ")[1], c["ppl"], c["F"], c["accuracy"]
        if p:
            lines.append(claim(f"Calibrating on the model's own traces preserves its reasoning better than {other} "
                               f"(the RAC paper).", f"trace perplexity ratio {interval(p, key='ratio')} at "
                               f"{b['level']}", p["lo"] - 1, p["hi"] - 1, -1))
        if f:
            lines.append(claim(f"... and keeps the chain of thought more faithful than {other}.",
                               f"ΔF = {interval(f)} at {b['level']}", f["lo"], f["hi"], +1))
        if acc:
            lines.append(claim(f"... and keeps more accuracy than {other} (the RAC paper's MATH-500 gains).",
                               f"Δ accuracy = {interval(acc)} (McNemar p {acc['p']:.3g}) at {b['level']}",
                               acc["lo"], acc["hi"], +1))
    for a, b, c in spread:
        if c["ppl"] and c["F"]:
            lines.append(f"- Run-to-run spread of {a['label']} at {a['level']}, calibration draw {b['draw']} against "
                         f"draw 0: trace perplexity ratio {interval(c['ppl'], key='ratio')}, ΔF = {interval(c['F'])}. "
                         "A method gap inside this spread is not a property of the method.")
    mdd = mdd_paragraph(n, [c["F"] for a, _, c in cmp if a["label"] == "dense"],
                        dense["accuracy"]["value"] if dense["accuracy"] else None)
    return "\n".join(lines + ([""] if lines else []) + [mdd])


# ------------------------------------------------------------------------------------------------ neurons

NEURON_LABELS = {"neuron-selective": "selective", "neuron-random": "random", "neuron-reverse": "reverse"}


def neuron_model_info(folder):
    """(label, nominal ratio, exact ratio, report) of a neuron-pruned folder or a recover.py folder made from one."""
    rec = os.path.join(folder, "recover_report.json")
    if os.path.exists(rec):
        label, nominal, exact, rep = neuron_model_info(read_json(rec, "recover report")["source_model"])
        return label + " + LoRA", nominal, exact, rep
    rep = read_json(os.path.join(folder, "prune_report.json"), "prune report")
    if "neurons" not in rep:
        raise CotpruneError(f"{folder} was not made by a neuron method (its prune report has no `neurons`)")
    label = NEURON_LABELS[rep["method"]]
    if rep["method"] == "neuron-random":
        label += f" (seed {read_checkpoint_meta(folder).get('cotprune_args', {}).get('seed')})"
    return label, rep["neurons"]["nominal_ratio"], rep["neurons"]["exact_ratio"], rep


NEURON_TASKS = {  # what the neuron study measures on each task (score.py records; generate.py --style)
    "math": {"style": "chat", "measure": "accuracy", "name": "accuracy", "paper": "neurons", "F": True,
             "what": "GSM8K test problems with the chat prompt", "complete": "a complete answer",
             "unit": "problems"},
    "code": {"style": "code", "measure": "pass_at_1", "name": "pass@1", "paper": "neurons-code", "F": False,
             "what": "HumanEval tasks with the code prompt (the paper's E.2 instruction), each run against its "
                     "tests in the sandbox", "complete": "a complete function", "unit": "tasks"},
}


def neuron_task(scores):
    """'math' or 'code', from the styles of the score records passed; both at once is refused."""
    styles = {style for _, style in scores}
    tasks = [t for t, c in NEURON_TASKS.items() if c["style"] in styles]
    if len(tasks) > 1:
        raise CotpruneError("--scores hold both chat (math) and code records: make one neuron report per task")
    return tasks[0] if tasks else "math"


def neuron_report(base, models, scores, summaries):
    task = neuron_task(scores)
    T = NEURON_TASKS[task]
    style, meas = T["style"], T["measure"]
    rec = lambda f: scores.get((model_key(f), style))  # noqa: E731
    gen = lambda f: summaries.get((model_key(f), "generate", style))  # noqa: E731
    info = []
    for f in models:
        label, nom, exact, rep = neuron_model_info(f)
        info.append({"label": label, "nominal": nom, "exact": exact, "folder": f, "layers": rep["neurons"].get(
            "layers") if rep["method"] != "neuron-random" else None})
    for f in [base] + models:
        if rec(f) is None:
            raise CotpruneError(f"no {style}-style score records (--scores) for {f}")
    seen = {}
    for r in info:
        if (r["label"], r["nominal"]) in seen:
            raise CotpruneError(f"{seen[(r['label'], r['nominal'])]} and {r['folder']} are both {r['label']} at "
                                f"{r['nominal']:.0%}: pass one")
        seen[(r["label"], r["nominal"])] = r["folder"]
    levels = sorted({(r["nominal"], r["exact"]) for r in info if r["nominal"] > 0})
    methods = list(dict.fromkeys(sorted((r["label"] for r in info if "LoRA" not in r["label"]),
                                        key=lambda s: (not s.startswith("selective"), s.startswith("reverse"), s))))
    cell_of = {(r["label"], r["nominal"]): r["folder"] for r in info}
    qs = (meas, "trap_rate", "type1_rate", "type2_rate", "F", "mean_new_tokens")
    est = {f: {q: estimate(rec(f), q) for q in qs} for f in [base] + models}
    level_name = lambda nom, exact: f"{nom:.0%} ({exact:.2%})"  # noqa: E731

    def by_method(q, digits, scale):
        return table(["pruning (exact)"] + methods,
                     [["original"] + [cell(est[base][q], digits, scale)] * len(methods)]
                     + [[level_name(nom, exact)] + [cell(est[cell_of[(m, nom)]][q], digits, scale)
                                                    if (m, nom) in cell_of else "—" for m in methods]
                        for nom, exact in levels])

    # comparisons: each model against the dense one; selective against random and reverse; LoRA against its source
    pairs = [("dense", base, r["label"], r["folder"], r["nominal"]) for r in info]
    for nom, _ in levels:
        sel = cell_of.get(("selective", nom))
        for m in methods[1:]:
            if sel and (m, nom) in cell_of:
                pairs.append(("selective", sel, m, cell_of[(m, nom)], nom))
        if sel and ("selective + LoRA", nom) in cell_of:
            pairs.append(("selective", sel, "selective + LoRA", cell_of[("selective + LoRA", nom)], nom))
    third = "F" if T["F"] else "mean_new_tokens"  # code has no F: its length carries what signal there is
    cmp = []
    for la, fa, lb, fb, nom in pairs:
        c = {q: compare(rec(fa), rec(fb), q) for q in (meas, "trap_rate", third)}
        if T["F"]:
            with_sd(rec(fa), rec(fb), c["F"])
        cmp.append((la, lb, nom, c))
    m = holm_mark([c[q] for *_, c in cmp for q in (meas, "trap_rate", third)])

    resources = table(["model", "parameters", "weights MB", "peak memory MB", "tokens/s"],
                      [[name, f"{(gen(f) or {}).get('params') or 0:,}", fmt((gen(f) or {}).get("param_mb"), 1),
                        fmt((gen(f) or {}).get("peak_memory_mb"), 0),
                        fmt((gen(f) or {}).get("tokens_per_s"), 1) + contention_mark(gen(f))]
                       for name, f in [("original", base)] + [(f"{r['label']} {level_name(r['nominal'], r['exact'])}",
                                                               r["folder"]) for r in info]])
    layers = next((r["layers"] for r in info if r["layers"]), [])  # from the selectivity every S-method read
    n = est[base][meas]["n"] if est[base][meas] else 0
    ref = paper(T["paper"])
    title = "Task-specific neuron pruning, LoRA recovery and traps" + (": code" if task == "code" else "")
    parts = [f"## {title}",
             "MLP neurons removed per layer by target-vs-distractor selectivity (selective: lowest S; reverse: "
             "highest S; random: a seeded draw); the exact share removed is in brackets (the paper's Table 2). Each "
             f"model answers the same {n} {T['what']}, greedy and unconstrained up to the token cap; a trap is an "
             f"output that ends in a degeneration loop without EOS (Type 1: {T['complete']} came first; a correct "
             f"Type 1 answer counts as correct, as in the paper). Cells: value with its 95 % interval (shares: exact "
             "Clopper-Pearson; means: bootstrap over " + T["unit"] + ").",
             f"### Table 3a: {T['name']} (%) after pruning", by_method(meas, 1, 100),
             "### Table 3b: traps (%) after pruning", by_method("trap_rate", 1, 100),
             "### Traps by type (%): Type 1", by_method("type1_rate", 1, 100),
             "### Traps by type (%): Type 2", by_method("type2_rate", 1, 100)]
    parts += (["### Faithfulness F after pruning", by_method("F", 3, 1)] if T["F"] else
              ["### Mean new tokens after pruning", by_method("mean_new_tokens", 0, 1)])
    third_name = "Δ F" if T["F"] else "Δ mean tokens"
    parts += ["### Paired comparisons (Table 4 included: selective against selective + LoRA)",
              f"b − a in percentage points ({T['name']}, traps) and in {third_name[2:]}. " + holm_note(m),
              table(["a", "b", "pruning", f"Δ {T['name']} (pp)", "Δ traps (pp)", third_name],
                    [[la, lb, f"{nom:.0%}", diff_cell(c[meas], 1, 100), diff_cell(c["trap_rate"], 1, 100),
                      diff_cell(c[third], 3 if T["F"] else 1)] for la, lb, nom, c in cmp]),
              "### Table 5: size and speed (generation at the study's batch size)", resources, CONTENTION_NOTE]
    if layers:
        parts += ["### Figure 6: per-layer target- vs distractor-leaning neurons (the dense model's selectivity)",
                  table(["layer", "target-leaning (S > 0)", "distractor-leaning (S < 0)"],
                        [[x["layer"], x["target_leaning"], x["distractor_leaning"]] for x in layers])]
    parts += [f"The paper's figures, quoted for comparison ({ref['source']}):",
              table(ref["columns"], [[a] + [fmt(v, 2) for v in rest] for a, *rest in ref["rows"]]),
              "### What this run can and cannot tell", VERDICT_NOTE, neuron_claims(cmp, n, est[base], T)]
    data = [{"task": task, "method": "dense", "nominal_ratio": 0.0, "exact_ratio": 0.0, "model": base, **est[base],
             **{k: (gen(base) or {}).get(k) for k in ("params", "peak_memory_mb", "tokens_per_s", "contended")}}]
    data += [{"task": task, "method": r["label"], "nominal_ratio": r["nominal"], "exact_ratio": r["exact"],
              "model": r["folder"], **est[r["folder"]],
              **{k: (gen(r["folder"]) or {}).get(k) for k in ("params", "peak_memory_mb", "tokens_per_s", "contended")}}
             for r in info]
    data.append({"comparisons": [{"a": la, "b": lb, "nominal_ratio": nom, **c} for la, lb, nom, c in cmp],
                 "holm_m": m})
    return "\n\n".join(parts) + "\n", data


def neuron_claims(cmp, n, dense, T=NEURON_TASKS["math"]):
    lines, name = [], T["name"]
    for la, lb, nom, c in cmp:
        acc, trap = c[T["measure"]], c["trap_rate"]
        if la != "selective" or not (acc and trap):
            continue
        if lb == "selective + LoRA":
            lines.append(claim(f"LoRA recovers {name} after selective pruning (the paper's Table 4).",
                               f"Δ {name} = {interval(acc, 1, 100)} pp (McNemar p {acc['p']:.3g}) at {nom:.0%}",
                               acc["lo"], acc["hi"], +1))
            lines.append(claim("... and removes traps.", f"Δ traps = {interval(trap, 1, 100)} pp (McNemar p "
                               f"{trap['p']:.3g})", trap["lo"], trap["hi"], -1))
        else:
            lines.append(claim(f"Selective pruning keeps more {name} than {lb} pruning (the paper's Table 3a).",
                               f"{lb} − selective: Δ {name} = {interval(acc, 1, 100)} pp (McNemar p "
                               f"{acc['p']:.3g}) at {nom:.0%}", acc["lo"], acc["hi"], -1))
            lines.append(claim(f"... and falls into fewer traps than {lb} pruning (Table 3b).",
                               f"Δ traps = {interval(trap, 1, 100)} pp (McNemar p {trap['p']:.3g})", trap["lo"],
                               trap["hi"], +1))
    base = dense[T["measure"]]
    mdd = mdd_paragraph(n, [c.get("F") for la, *_, c in cmp if la == "dense"] if T["F"] else [],
                        base["value"] if base else None, name, T["unit"])
    if base is not None and base["value"] == 0:
        mdd += (f" The dense model gets none of the {T['unit']} right, so {name} cannot separate the methods at all "
                f"here; traps and {'F' if T['F'] else 'lengths'} carry what signal there is.")
    return "\n".join(lines + ([""] if lines else []) + [mdd])


# --------------------------------------------------------------------------------- functional faithfulness

FUNCTIONAL_COLUMNS = [("aoc", "AOC", 3), ("mistake_changed", "Mistake changes", 2),
                      ("mistake_followed", "Mistake followed", 2), ("filler_same", "Filler same", 2),
                      ("nocot_same", "No-CoT same", 2), ("full_correct", "Acc CoT", 2),
                      ("filler_correct", "Acc filler", 2), ("nocot_correct", "Acc no CoT", 2)]
FUNCTIONAL_DIFFS = ["aoc", "mistake_changed", "filler_same", "nocot_same"]
SUBSET = ("aoc", "mistake_changed")  # also on the problems both models answer alike (Bentham et al. 2024)


def same_answer(a, b):
    """(a, b) restricted to the problems where both give the same answer after the whole CoT: the control for the
    accuracy confound, so a model that answers otherwise is not read as reasoning otherwise."""
    ids = {i for i in set(a) & set(b) if same_number(b[i]["full_pred"], a[i]["full_pred"])}
    return {i: a[i] for i in ids}, {i: b[i] for i in ids}


def functional_section(base, rows, rec):
    """Table 3 (each model's functional measures beside its keyword F) and Table 3b (each pruned model against
    the dense one, on all problems and on the same-answer ones) -> (markdown, comparisons)."""
    f = lambda m: rec(m, "functional")  # noqa: E731
    models = [{"model": base, "label": "0"}] + rows
    t3 = [[m["label"], cell(estimate(rec(m["model"], "cot"), "F"))]
          + [cell(estimate(f(m["model"]), q), d) for q, _, d in FUNCTIONAL_COLUMNS] for m in models]
    cmp, alike = {}, {}
    for r in rows:
        a, b = f(base), f(r["model"])
        sa, sb = same_answer(a, b)
        alike[r["label"]] = len(sa)
        for q in FUNCTIONAL_DIFFS:
            cmp[(r["label"], q, "all")] = compare(a, b, q)
        for q in SUBSET:
            cmp[(r["label"], q, "same")] = compare(sa, sb, q) if sa else None
    m = holm_mark(list(cmp.values()))
    t3b = [[r["label"], alike[r["label"]]] + [diff_cell(cmp[(r["label"], q, s)]) for q in SUBSET
                                              for s in ("all", "same")]
           + [diff_cell(cmp[(r["label"], q, "all")]) for q in FUNCTIONAL_DIFFS if q not in SUBSET] for r in rows]
    n = len(f(base))
    text = "\n\n".join([
        "### Table 3: functional faithfulness: does the answer depend on the chain of thought?",
        f"Interventions on each model's own CoT (first {n} problems; docs/scoring.md#functional-faithfulness). "
        "AOC: area over the early-answering curve (the answer after the CoT cut to k of its N steps, against the "
        "answer after all of it; 0 = the answer never needed the CoT, 1 − 1/(2N) = only the whole CoT gives it); "
        "Mistake changes / followed: share of CoTs whose final answer changes when their first arithmetic result is "
        "made one unit larger and the model continues (followed: it moves by that unit); Filler / No-CoT same: "
        "share answered alike after filler of the CoT's length, and with no CoT; Acc: GSM8K accuracy after the "
        "whole CoT, filler, no CoT. F is the keyword score of the same model's CoT outputs (all N problems). Each "
        "with its 95 % interval, over the problems where the measure is defined.",
        table(["Prune", "F CoT"] + [h for _, h, _ in FUNCTIONAL_COLUMNS], t3),
        "### Table 3b: each pruned model against the dense one, with the accuracy confound controlled",
        "Pruned − dense, on all problems and on the problems where the two models give the same answer after the "
        "whole CoT (same-answer n), so that a changed answer is not read as changed reasoning (Bentham et al. "
        "2024). " + holm_note(m),
        table(["Prune", "same-answer n", "Δ AOC", "Δ AOC same-answer", "Δ Mistake changes",
               "Δ Mistake same-answer", "Δ Filler same", "Δ No-CoT same"], t3b)])
    return text, cmp


def functional_claims(rows, cmp, agree, corr):
    """Plain answers to the two questions the functional study asks, each read from its interval."""
    lines = []
    heavy = [r for r in rows if r["nm"] is None and r["sparsity"] >= 0.5]
    if heavy:
        lab = heavy[0]["label"]
        c, s = cmp.get((lab, "aoc", "all")), cmp.get((lab, "aoc", "same"))
        if c:
            lines.append(claim(f"When pruning degrades the reasoning text, the answer depends on it less (λ = {lab}: "
                               f"the early-answering AOC falls).", f"ΔAOC = {interval(c)} (n {c['n']})"
                               + (f"; on the {s['n']} problem(s) answered alike, {interval(s)}" if s else
                                  "; no problem is answered alike, so the accuracy confound cannot be controlled"),
                               c["lo"], c["hi"], -1))
        c = cmp.get((lab, "mistake_changed", "all"))
        if c:
            lines.append(claim(f"After pruning (λ = {lab}) a mistake in the CoT changes the answer less often.",
                               f"Δ share changed = {interval(c)} (n {c['n']})", c["lo"], c["hi"], -1))
    if len(rows) < 3:  # two points make any coefficient +-1
        return "\n".join(lines + [f"- Across-model agreement and prediction need at least 3 pruned models; this run "
                                   f"has {len(rows)}, so it cannot tell."])
    for q, name in (("aoc", "AOC"), ("mistake_changed", "the mistake-changes share")):
        a = agree.get(q)
        if not a:
            lines.append(f"- *Does keyword F agree with {name} across the sweep?* Too few models have it on enough "
                         f"problems (Table 2's note): this run cannot tell.")
        else:
            lines.append(claim(f"Keyword F agrees with functional faithfulness across the sweep (models with a higher "
                               f"F have a higher {name}).", f"PLCC over λ {', '.join(a['labels'])} = "
                               f"{interval({'diff': a['coef'], 'lo': a['lo'], 'hi': a['hi']})}",
                               a["lo"], a["hi"], +1))
    c = (corr.get("aoc") or {}).get("ASAND", {}).get("PLCC")
    if not c or math.isnan(c["lo"]):
        lines.append("- *Does ASAND predict the loss of functional faithfulness?* Too few models have an AOC on "
                     "enough problems: this run cannot tell.")
    else:
        lines.append(f"- *Does ASAND predict the loss of functional faithfulness?* Here: PLCC(ASAND, ΔAOC) = "
                     f"{interval({'diff': c['coef'], 'lo': c['lo'], 'hi': c['hi']})}"
                     + (": the interval excludes 0, so ASAND carries information about it."
                        if c["lo"] > 0 or c["hi"] < 0 else ": the interval includes 0, so this run cannot tell."))
    return "\n".join(lines)
