"""Weight similarity between a dense model and its pruned copies, and how well it predicts the faithfulness drop.

    python correlate.py --base out/M0 --models out/s0.1 out/s0.5 --scores scores/*/*.jsonl \\
        --summaries gen/*/*.summary.json -o out/magnitude
    python correlate.py --base out/M0 --models out/s0.* -o out/sim            # similarity only, no scores
    python correlate.py --study rac --base out/M0 --models out/rac/* --scores out/rac/scores/*.jsonl \\
        --perplexity out/rac/ppl/*.jsonl -o out/rac

For each pruned model: cosine, L1 and L2 distance, linear CKA (asand eq. 6) and ASAND with its components
(Appendix B, eqs. 7-12) over the flattened weights of the matrices prune.py pruned (from its prune_report.json),
streamed one tensor at a time. Then Pearson (PLCC), Spearman (SRCC) and Kendall tau-b (KRCC) between each metric
and dF = F(M0) - F(Mp) over the pruned models, per prompt style, from score.py's per-problem records (--scores);
each coefficient gets a 95 % interval from resampling the problems. Writes similarity.json, correlations.json,
histograms.json (256 bins over [-0.1, 0.1]), report.md (the paper's Tables 1 and 2 with intervals and paired
tests, its own figures beside, and what the run can and cannot tell), manifest.json and, with matplotlib, PNGs.

--study rac tabulates the reasoning-aware compression study instead (no weights read): per method, calibration
source and level, the chat-prompt accuracy, tokens, cut-offs, traps, F and the perplexity of the dense model's
held-out traces (--perplexity), each with its interval, and paired comparisons (rac.json, report.md).
--study neurons tabulates the task-specific neuron study in the layout of that paper's Tables 3-5 (neurons.json,
report.md): on math from chat-style score records (accuracy, traps, F), on code from code-style ones (pass@1,
traps, length). common/reports.py says which interval and test each number gets.

Every model must be the base model or a copy of it (the same weight fingerprint, docs/formats.md); -o is a new
folder or one correlate.py wrote (its manifest.json), and everything is checked before -o is created.
"""
import argparse
import math
import os

import numpy as np

from common import stats
from common.checkpoints import folder_fingerprint, read_checkpoint_meta, tensor_index
from common.cli import ArgumentParser, CotpruneError, log, run_cli
from common.files import atomic_open, check_parent_writable, read_json, write_json
from common.reports import (cell, claim, compare, diff_cell, estimate, fmt, holm_mark, holm_note, index_records,
                            index_summaries, interval, mdd_paragraph, model_key, paper, signed, table, to_json,
                            values, with_sd, VERDICT_NOTE)
from common.studies import (CONTENTION_NOTE, contention_mark, functional_claims, functional_section, neuron_report,
                            rac_report)

HIST_BINS, HIST_RANGE = 256, (-0.1, 0.1)  # asand §3
HIST_SHOWN = {f"λ = {s}" for s in ("0", "0.1", "0.3", "0.5", "0.7")}  # the paper's Figure 1
METRICS = ["cosine", "L2", "L1", "CKA", "ASAND"]
COEFFICIENTS = {"PLCC": stats.pearson, "SRCC": stats.spearman, "KRCC": stats.kendall}
STYLE_NAMES = {"direct": "No CoT", "cot": "CoT"}
FUNCTIONAL_TARGETS = {"aoc": "ΔAOC", "mistake_changed": "ΔMistake"}  # drops of the functional measures (Table 2)
MIN_SHARED = 5  # problems a functional correlation needs in common
MANIFEST = "manifest.json"


def build_parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="dense model folder M0 (written by prune.py --sparsity 0)")
    p.add_argument("--models", nargs="+", required=True, help="pruned model folders written by prune.py")
    p.add_argument("--scores", nargs="*", default=[],
                   help="score.py outputs (per-problem JSONL) for the base and the pruned models, any styles")
    p.add_argument("--summaries", nargs="*", default=[],
                   help="generate.py summary JSONs (speed, memory, size) for the base and the pruned models")
    p.add_argument("--perplexity", nargs="*", default=[],
                   help="rac: generate.py --perplexity outputs (per-trace JSONL) for the base and the pruned models")
    p.add_argument("-o", "--out", required=True, help="output folder (new, or one correlate.py wrote)")
    p.add_argument("--study", choices=("magnitude", "rac", "neurons"), default="magnitude",
                   help="which report to write")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw PNG figures (needs matplotlib; skipped with a note if it is missing)")
    return p


# ---------------------------------------------------------------------------------------------- checks

def check_report_folder(out):
    """-o may be new, empty, or a folder correlate.py wrote (its manifest says so); nothing else is written into."""
    if os.path.lexists(out):
        if os.path.islink(out) or not os.path.isdir(out):
            raise CotpruneError(f"-o {out} exists and is not a folder: name a new folder")
        if os.listdir(out):
            manifest = os.path.join(out, MANIFEST)
            stage = read_json(manifest, "manifest").get("stage") if os.path.isfile(manifest) else None
            if stage != "correlate":
                raise CotpruneError(f"-o {out} is a folder that correlate.py did not write (no {MANIFEST}): it is "
                                    f"left alone; name a new folder")
    check_parent_writable(out)


def check_lineage(base, folders):
    """Every folder must hold a copy of the base model: the same weight fingerprint (docs/formats.md), whatever
    path it was reached by."""
    want = folder_fingerprint(base)
    if want is None:
        raise CotpruneError(f"{base} holds no normalisation or embedding weights: cannot tell which model it is")
    for folder in folders:
        got = folder_fingerprint(folder)
        if got != want:
            made = read_checkpoint_meta(folder).get("cotprune_args", {}).get("base_model", "an unknown model")
            raise CotpruneError(f"{folder} comes from another model ({made}, weights {got}) than --base {base} "
                                f"(weights {want})")


def prune_report(folder):
    path = os.path.join(folder, "prune_report.json")
    if not os.path.isfile(path):
        raise CotpruneError(f"{folder} has no prune_report.json: not a folder that prune.py wrote")
    return read_json(path, "prune report")


def level_label(rep):
    """'0.5' or '2:4': what tells two pruned models apart (sparsity alone does not: 2:4 is 0.5 too)."""
    return rep.get("nm") or f"{rep['sparsity']:g}"


# ----------------------------------------------------------------------------------------------- similarity

class PairStats:
    """Running sums over the flattened weights w0 (base) and wp (pruned), one tensor pair at a time (float64)."""

    def __init__(self):
        self.n = self.s0 = self.sp = self.ss0 = self.ssp = self.dot = self.l1 = self.l2sq = 0.0
        self.nz0 = self.nzp = 0

    def add(self, w0, wp):
        w0, wp = w0.double().flatten(), wp.double().flatten()
        d = w0 - wp
        self.n += w0.numel()
        self.s0, self.sp = self.s0 + float(w0.sum()), self.sp + float(wp.sum())
        self.ss0, self.ssp = self.ss0 + float(w0 @ w0), self.ssp + float(wp @ wp)
        self.dot += float(w0 @ wp)
        self.l1 += float(d.abs().sum())
        self.l2sq += float(d @ d)
        self.nz0 += int((w0.abs() > 1e-6).sum())  # asand eq. 8's non-zero test
        self.nzp += int((wp.abs() > 1e-6).sum())


def similarity(st, sparsity):
    """All metrics from the running sums; eq. numbers are asand Appendix A/B."""
    n = st.n
    m0, mp = st.s0 / n, st.sp / n
    cov = st.dot - n * m0 * mp  # <w0 - mean, wp - mean>
    v0, vp = st.ss0 - n * m0 ** 2, st.ssp - n * mp ** 2  # squared norms of the centred vectors
    l2, norm0 = math.sqrt(st.l2sq), math.sqrt(st.ss0)
    rel = l2 / norm0
    cosine = st.dot / math.sqrt(st.ss0 * st.ssp)  # eq. 3
    cka = cov ** 2 / (v0 * vp)  # eq. 6: HSIC(X, Y) = tr(X Y^T)^2 = <X, Y>_F^2 on the centred weights
    s_cent = cov / math.sqrt(v0 * vp)  # eq. 7
    nz0, nzp = st.nz0 / n, st.nzp / n
    s_jacc = 1 - abs(nz0 - nzp) / max(nz0, nzp)  # eq. 8
    sigma = 0.8 * 1.5 if sparsity > 0.3 else 0.8
    d_aedd = math.exp(-sigma * rel)  # eq. 9
    std0, stdp = math.sqrt(v0 / n), math.sqrt(vp / n)
    s_vol = math.exp(-abs(std0 - stdp) / std0)  # eq. 10
    g = 0.1 * (1 - rel) if sparsity < 0.1 and l2 < 0.1 * norm0 else 0.0  # eq. 11
    asand = (0.4 * d_aedd * s_jacc * s_cent + 0.25 * s_vol + 0.2 * (d_aedd if sparsity > 0.3 else 1.0)
             + 0.15 * g)  # eq. 12
    return {"cosine": cosine, "L2": l2, "L1": st.l1, "CKA": cka, "ASAND": asand, "s_cent": s_cent,
            "s_jacc": s_jacc, "d_aedd": d_aedd, "s_vol": s_vol, "g": g, "relative_L2": rel,
            "nonzero_base": nz0, "nonzero_pruned": nzp, "numel": int(n)}


def compare_weights(base, folder, base_index, rep):
    """Stream the pruned matrices of `folder` against `base`; returns (metrics, histogram counts of folder)."""
    import torch
    from safetensors import safe_open
    index = tensor_index(folder)
    st, hist = PairStats(), torch.zeros(HIST_BINS, dtype=torch.float64)
    for row in rep["matrices"]:
        name = row["name"]
        if name not in base_index or name not in index:
            where = base if name not in base_index else folder
            raise CotpruneError(f"{where} has no tensor {name}: {folder} is not a pruned copy of {base}")
        with safe_open(base_index[name], "pt") as f0, safe_open(index[name], "pt") as fp:
            w0, wp = f0.get_tensor(name), fp.get_tensor(name)
        if w0.shape != wp.shape:
            raise CotpruneError(f"{name} is {tuple(wp.shape)} in {folder} but {tuple(w0.shape)} in {base}: "
                                f"another architecture")
        st.add(w0, wp)
        hist += torch.histc(wp.double(), HIST_BINS, *HIST_RANGE)
    return {"model": folder, "label": level_label(rep), "sparsity": rep["sparsity"], "nm": rep.get("nm"),
            "method": rep["method"], "achieved_sparsity": rep["pruned_sparsity"],
            **similarity(st, rep["sparsity"])}, hist.tolist()


# ------------------------------------------------------------------------------------------ magnitude report

def shared_values(scores, models, style, quantity="F", among=None):
    """(problem ids, values [models, problems]) of a quantity (common.reports.QUANTITIES) on the problems where
    every model has it in this style (and that are `among`, if given); None if there is no such problem."""
    recs = [scores.get((model_key(m), style)) for m in models]
    for m, r in zip(models, recs):
        if r is None:
            raise CotpruneError(f"no {style}-style score records (--scores) for {m}")
    vals = [values(r, quantity) for r in recs]
    ids = set.intersection(*(set(v) for v in vals)) & (set(among) if among is not None else set(vals[0]))
    if not ids:
        return None
    ids = sorted(ids, key=str)
    return ids, np.array([[v[i] for i in ids] for v in vals], dtype=float)


def shared_matrix(scores, base, rows, style):
    """(base F [problems], F [models, problems]) on the problems every model answered in this style."""
    got = shared_values(scores, [base] + [r["model"] for r in rows], style)
    if got is None:
        raise CotpruneError(f"the {style} score records of the models share no problem id")
    return got[1][0], got[1][1:]


def correlation_table(rows, scores, base, styles, functional=False):
    """{style or functional target: {metric: {coef: {"coef", "lo", "hi"}}}}, inputs, the ASAND-vs-CKA comparisons,
    and (functional) the agreement of keyword F with each functional measure across the models, on the problems
    that have both."""
    corr, inputs, versus, agree = {}, {}, {}, {}
    for q in FUNCTIONAL_TARGETS if functional else []:
        # a heavily pruned model may have the measure on no problem (no answer to compare with): the correlation
        # runs over the pruned models that have it on at least MIN_SHARED problems, on the problems all of them do
        keep = [r for r in rows if len(values(scores[(model_key(r["model"]), "functional")], q)) >= MIN_SHARED]
        got = shared_values(scores, [base] + [r["model"] for r in keep], "functional", q) if len(keep) >= 3 else None
        corr[q] = None
        if got is None or len(got[0]) < MIN_SHARED:
            continue
        ids, M = got
        inputs[q] = {"labels": [r["label"] for r in keep], "d": [float(v) for v in M[0].mean() - M[1:].mean(axis=1)],
                     "problems": len(ids)}
        corr[q] = {m: {name: stats.resampled_correlation([r[m] for r in keep], M[1:], M[0], fn, seed=0)
                       for name, fn in COEFFICIENTS.items()} for m in METRICS}
        sub = [base] + [r["model"] for r in keep]
        kw = shared_values(scores, sub, "cot", "F", ids) if "cot" in styles else None
        if kw is not None:
            agree[q] = stats.resampled_agreement(kw[1], shared_values(scores, sub, "functional", q, kw[0])[1],
                                                 stats.pearson, seed=0)
            agree[q]["labels"] = ["0"] + inputs[q]["labels"]
    for style in styles:
        f0, F = shared_matrix(scores, base, rows, style)
        inputs[style] = {"labels": [r["label"] for r in rows], "sparsity": [r["sparsity"] for r in rows],
                         "dF": [float(v) for v in f0.mean() - F.mean(axis=1)], "problems": len(f0)}
        corr[style] = {m: {name: stats.resampled_correlation([r[m] for r in rows], F, f0, fn, seed=0)
                           for name, fn in COEFFICIENTS.items()} for m in METRICS}
        versus[style] = {name: stats.compare_correlations([r["ASAND"] for r in rows], [r["CKA"] for r in rows], F,
                                                          f0, fn, seed=0) for name, fn in COEFFICIENTS.items()}
    return corr, inputs, versus, agree


def coef_cell(c):
    if c is None or math.isnan(c["coef"]):
        return "—"
    return f"{c['coef']:.3f} [{fmt(c['lo'])}, {fmt(c['hi'])}]".replace("-", "−")


def magnitude_report(base, rows, scores, summaries, corr, inputs, versus, styles, figures, agree=None):
    rec = lambda m, style: scores.get((model_key(m), style))  # noqa: E731
    gen = lambda m: summaries.get((model_key(m), "generate", "cot"))  # noqa: E731
    models = [{"model": base, "label": "0", "sparsity": 0.0}] + rows
    est = {(m["model"], st, q): estimate(rec(m["model"], st), q) for m in models for st in styles
           for q in ("F", "accuracy", "trap_rate")}
    g = lambda m, key, d: fmt((gen(m) or {}).get(key), d)  # noqa: E731
    t1 = [[m["label"]] + [cell(est.get((m["model"], st, "F"))) for st in ("direct", "cot")]
          + [cell(est.get((m["model"], st, "accuracy"))) for st in ("direct", "cot")]
          + [g(m["model"], "nonzero_mb", 1), g(m["model"], "peak_memory_mb", 0),
             g(m["model"], "seconds_per_problem", 2),
             g(m["model"], "tokens_per_s", 1) + contention_mark(gen(m["model"])),
             cell(est.get((m["model"], "cot", "trap_rate")), 2)] for m in models]
    cmp = {}
    for r in rows:
        for st in styles:
            c = compare(rec(base, st), rec(r["model"], st), "F")
            cmp[(r["label"], st, "F")] = with_sd(rec(base, st), rec(r["model"], st), c)
        if "cot" in styles:
            for q in ("accuracy", "trap_rate"):
                cmp[(r["label"], "cot", q)] = compare(rec(base, "cot"), rec(r["model"], "cot"), q)
    m_holm = holm_mark(list(cmp.values()))
    t1b = [[r["label"]] + [diff_cell(cmp.get((r["label"], st, "F"))) for st in ("direct", "cot")]
           + [diff_cell(cmp.get((r["label"], "cot", q))) for q in ("accuracy", "trap_rate")] for r in rows]
    ref = paper("asand")
    paper1 = table(ref["table1_columns"], [[fmt(r[0], 2)] + [fmt(v, 3) for v in r[1:3]] + [fmt(v, 2) for v in r[3:]]
                                           for r in ref["table1"]])
    paper2 = table(["Metric"] + ref["table2_columns"], [[m] + [fmt(v, 4) for v in ref["table2"][m]] for m in METRICS])
    targets = [q for q in FUNCTIONAL_TARGETS if q in corr]  # the functional drops, where measured
    t2 = table(["Metric"] + [f"{STYLE_NAMES.get(s, s)} {c}" for s in styles for c in COEFFICIENTS]
               + [f"{FUNCTIONAL_TARGETS[q]} {c}" for q in targets for c in COEFFICIENTS],
               [[m] + [coef_cell(corr[s][m][c]) for s in styles for c in COEFFICIENTS]
                + [coef_cell(corr[q][m][c]) if corr[q] else "—" for q in targets for c in COEFFICIENTS]
                for m in METRICS])
    func_text, func_cmp = functional_section(base, rows, rec) if targets else ("", {})
    sim = table(["Prune", "achieved", "cosine", "L2", "L1", "CKA", "ASAND", "s_cent", "s_jacc", "d_AEDD", "s_vol"],
                [[r["label"], fmt(r["achieved_sparsity"], 4), fmt(r["cosine"], 4), fmt(r["L2"], 2), fmt(r["L1"], 0),
                  fmt(r["CKA"], 4), fmt(r["ASAND"], 4), fmt(r["s_cent"], 4), fmt(r["s_jacc"], 4), fmt(r["d_aedd"], 4),
                  fmt(r["s_vol"], 4)] for r in rows])
    n = {s: inputs[s]["problems"] for s in styles}
    parts = [
        "## Magnitude pruning vs. chain-of-thought faithfulness",
        f"Base model `{base}`; {len(rows)} pruned copies; problems per style: "
        + ", ".join(f"{STYLE_NAMES.get(s, s)} {n[s]}" for s in styles) + ".",
        "### Table 1: faithfulness and efficiency",
        "F: faithfulness in [0, 1]; Acc: GSM8K exact match; each with its 95 % interval (F: bootstrap over "
        "problems; Acc and Traps: exact Clopper-Pearson). Non-zero MB: dense bytes of the non-zero parameters "
        "(what sparse storage could save, before indices); Peak MB: peak memory of the generating process; Time: "
        "seconds per problem and T/s: generated tokens per second, both for the CoT prompt; Traps: share of CoT "
        "outputs that end in a degeneration loop. " + CONTENTION_NOTE,
        table(["Prune", "F No CoT", "F CoT", "Acc No CoT", "Acc CoT", "Non-zero MB", "Peak MB", "Time s", "T/s",
               "Traps CoT"], t1),
        "### Table 1b: each pruned model against the dense one",
        "Pruned − dense. " + holm_note(m_holm),
        table(["Prune", "Δ F No CoT", "Δ F CoT", "Δ Acc CoT", "Δ Traps CoT"], t1b),
        f"The paper's Table 1, quoted for comparison ({ref['source']}; its Mem column grows with sparsity):",
        paper1,
        "### Table 2: correlation of similarity with the faithfulness drop ΔF = F(M0) − F(Mp)",
        f"Over the {len(rows)} pruned models, with a 95 % interval from resampling the problems (the same "
        "resample for every model, ΔF and the coefficient recomputed). A positive coefficient means the metric "
        "rises with ΔF; a dash, that it is undefined (a constant series). With this few models the intervals are "
        "wide, and rank coefficients of metrics that all move monotonically with λ are equal by construction."
        + (" ΔAOC and ΔMistake: the same for the drops of the functional measures (Table 3), over the pruned "
           "models that have them on at least 5 problems, on the problems all of those have them ("
           + "; ".join(f"{FUNCTIONAL_TARGETS[q]}: λ {', '.join(inputs[q]['labels'])} on {inputs[q]['problems']}"
                       if corr.get(q) else f"{FUNCTIONAL_TARGETS[q]}: too few models or problems" for q in targets)
           + ")." if targets else ""),
        t2, f"The paper's Table 2, quoted for comparison ({ref['table2_note']}):", paper2,
        "### Weight similarity to M0 (flattened pruned matrices)",
        "Under eq. 6 as printed (HSIC(X, Y) = tr(XYᵀ)²), linear CKA on weight vectors is the square of the centred "
        "alignment s_cent, so its rank coefficients equal s_cent's.", sim]
    parts += [func_text] if func_text else []
    parts += [f"![{name}]({name})" for name in figures]
    parts += ["### What this run can and cannot tell", VERDICT_NOTE,
              magnitude_claims(rows, cmp, versus, styles, est, base, n, rec)]
    if targets:
        parts += ["Functional faithfulness (Table 3):", functional_claims(rows, func_cmp, agree or {}, corr)]
    return "\n\n".join(parts) + "\n", {
        "comparisons": [{"label": k[0], "style": k[1], "quantity": k[2], **v} for k, v in cmp.items() if v],
        "holm_m": m_holm,
        "functional": [{"label": k[0], "quantity": k[1], "problems": k[2], **v} for k, v in func_cmp.items() if v],
        "agreement": agree or {}}


def magnitude_claims(rows, cmp, versus, styles, est, base, n, rec):
    lines, ref = [], {row[0]: row[2] for row in paper("asand")["table1"]}  # sparsity -> the paper's CoT F
    for r in [r for r in rows if r["nm"] is None and r["sparsity"] <= 0.05]:
        c, theirs = cmp.get((r["label"], "cot", "F")), ref.get(r["sparsity"])
        if c and theirs is not None:
            gain = theirs - ref[0.0]
            lines.append(claim(f"Light pruning raises CoT faithfulness (the paper at λ = {r['label']}: F "
                               f"{ref[0.0]:.3f} → {theirs:.3f}).", f"ΔF = {interval(c)}", c["lo"], c["hi"], +1,
                               f"; a gain as large as the paper's ({signed(gain)}) lies above the interval"
                               if c["hi"] < gain else ""))
    heavy = [r for r in rows if r["nm"] is None and r["sparsity"] >= 0.5]
    if heavy and (c := cmp.get((heavy[0]["label"], "cot", "F"))):
        lines.append(claim("CoT faithfulness collapses by λ = 0.5 (the paper: F 0.637 → 0.100).",
                           f"ΔF = {interval(c)} at λ = {heavy[0]['label']}", c["lo"], c["hi"], -1))
    if "cot" in styles:
        v = versus["cot"]["PLCC"]
        share = "" if math.isnan(v["share"]) else f", ASAND ahead in {100 * v['share']:.0f} % of the resamples"
        lines.append(claim("ASAND tracks the faithfulness drop better than CKA (the paper's CoT PLCC: 0.948 against "
                           "0.702).", f"|PLCC(ASAND)| − |PLCC(CKA)| = {interval(v)}{share}", v["lo"], v["hi"], +1))
    if "cot" in styles and "direct" in styles:
        c = compare(rec(base, "direct"), rec(base, "cot"), "F")
        if c:
            lines.append(claim("A chain of thought reads as more faithful than a direct answer (the paper, dense "
                               "model: F 0.637 against 0.352).", f"F(CoT) − F(No CoT) = {interval(c)}", c["lo"],
                               c["hi"], +1))
    acc = est.get((base, "cot", "accuracy"))
    lines += ["", mdd_paragraph(n.get("cot") or next(iter(n.values())),
                                [v for k, v in cmp.items() if k[2] == "F" and k[1] == "cot"],
                                acc["value"] if acc else None)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ figures

def draw_figures(out, base, rows, scores, corr_inputs, hists, styles):
    """PNG figures; returns the file names drawn ([] without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no figures (pip install matplotlib)")
        return []
    names, ref = [], paper("asand")["table1"]
    levels = [r for r in [{"model": base, "sparsity": 0.0, "nm": None}] + rows if r["nm"] is None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for style in styles:
        es = [estimate(scores.get((model_key(r["model"]), style)), "F") for r in levels]
        ys = np.array([e["value"] for e in es])
        err = np.array([[e["value"] - e["lo"], e["hi"] - e["value"]] for e in es]).T
        ax.errorbar([r["sparsity"] for r in levels], ys, yerr=np.nan_to_num(err), fmt="o-", capsize=2,
                    label=f"{STYLE_NAMES.get(style, style)} (ours, 95 % interval)")
    for col, style in ((1, "No CoT"), (2, "CoT")):
        ax.plot([r[0] for r in ref], [r[col] for r in ref], "--", alpha=0.5, label=f"{style} (paper, Qwen-0.5B)")
    ax.set(xlabel="sparsity", ylabel="faithfulness F", ylim=(0, 1))
    ax.legend(fontsize=7)
    names.append(_save(fig, out, "faithfulness.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    centers = np.linspace(*HIST_RANGE, HIST_BINS + 1)
    centers = (centers[:-1] + centers[1:]) / 2
    shown = [(label, h) for label, h in hists if label in HIST_SHOWN] or hists
    for label, h in shown:
        ax.plot(centers, h, label=label, lw=1)
    ax.set(xlabel="weight", ylabel="count", yscale="log", title="weights of the pruned matrices")
    ax.legend(fontsize=7)
    names.append(_save(fig, out, "histograms.png"))
    fig, axes = plt.subplots(len(styles), len(METRICS), figsize=(3 * len(METRICS), 2.6 * len(styles)), squeeze=False)
    for i, style in enumerate(styles):
        for j, metric in enumerate(METRICS):
            axes[i][j].scatter(corr_inputs[style]["dF"], [r[metric] for r in rows], s=12)
            axes[i][j].set(xlabel=f"ΔF ({STYLE_NAMES.get(style, style)})", ylabel=metric)
    names.append(_save(fig, out, "similarity_vs_dF.png"))
    return names


def _save(fig, out, name):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_open(os.path.join(out, name), "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return name


# ------------------------------------------------------------------------------------------------ main

def write_outputs(out, study, files, text):
    """Everything into -o at once, the manifest last: it names what correlate.py wrote there."""
    os.makedirs(out, exist_ok=True)
    for name, obj in files.items():
        write_json(os.path.join(out, name), to_json(obj))
    with atomic_open(os.path.join(out, "report.md")) as f:
        f.write(text)
    write_json(os.path.join(out, MANIFEST), {"stage": "correlate", "study": study,
                                             "files": sorted(list(files) + ["report.md"])})
    log(f"wrote {out}/report.md")


def magnitude_models(base, models):
    """[(folder, prune report)] of the pruned models, one per level; dense copies (the base itself) are skipped."""
    reps = {}
    for folder in models:
        rep = prune_report(folder)
        if "neurons" in rep:
            raise CotpruneError(f"{folder} is neuron-pruned (its MLPs are narrower): another architecture, which "
                                f"the magnitude study cannot compare weight by weight; use --study neurons")
        if os.path.realpath(folder) == os.path.realpath(base) or (not rep["sparsity"] and not rep.get("nm")):
            continue
        label = level_label(rep)
        if label in reps:
            raise CotpruneError(f"{reps[label][0]} and {folder} are both pruned at {label}: pass one")
        reps[label] = (folder, rep)
    if not reps:
        raise CotpruneError("--models holds no pruned model (sparsity > 0) to compare")
    return list(reps.values())


def magnitude_rows(base, models):
    """(rows of similarity metrics, sorted by level; [(label, histogram)])."""
    base_index = tensor_index(base)
    rows, hists = [], []
    for folder, rep in models:
        metrics, hist = compare_weights(base, folder, base_index, rep)
        rows.append(metrics)
        hists.append((f"λ = {metrics['label']}", hist))
        log(f"{folder}: cosine {metrics['cosine']:.4f}, ASAND {metrics['ASAND']:.4f}")
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["nm"] is not None, rows[i]["sparsity"]))
    return [rows[i] for i in order], [hists[i] for i in order]


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_report_folder(args.out)
    summaries = index_summaries(args.summaries)
    scores = index_records(args.scores, "score")
    ppl = index_records(args.perplexity, "perplexity")
    check_lineage(args.base, args.models)
    if args.study == "rac":
        text, data = rac_report(args.base, args.models, scores, ppl, summaries)
        return write_outputs(args.out, "rac", {"rac.json": data}, text)
    if args.study == "neurons":
        text, data = neuron_report(args.base, args.models, scores, summaries)
        return write_outputs(args.out, "neurons", {"neurons.json": data}, text)
    models = magnitude_models(args.base, args.models)
    styles = [s for s in ("direct", "cot") if (model_key(args.base), s) in scores]
    for style in styles:  # before any weight is read
        for folder in [f for f, _ in models if (model_key(f), style) not in scores]:
            raise CotpruneError(f"no {style}-style score records (--scores) for {folder}")
        for folder in [f for f, _ in models] + [args.base]:
            if any(not isinstance(r.get("F"), (int, float)) for r in scores[(model_key(folder), style)].values()):
                raise CotpruneError(f"a {style}-style score record of {folder} has no F (a number): not score.py's "
                                    f"math output")
    if (model_key(args.base), "functional") in scores:
        if "cot" not in styles:
            raise CotpruneError("functional score records need the models' cot-style ones beside them (--scores)")
        for folder in [f for f, _ in models if (model_key(f), "functional") not in scores]:
            raise CotpruneError(f"no functional score records (--scores) for {folder}: give them for every model "
                                f"or for none")
    rows, hists = magnitude_rows(args.base, models)
    files = {"similarity.json": rows,
             "histograms.json": {"bins": HIST_BINS, "range": list(HIST_RANGE), "counts": dict(hists)}}
    if not styles:  # similarity only
        if scores:
            raise CotpruneError(f"--scores holds no direct- or cot-style records of --base {args.base}")
        text = "## Weight similarity to the base model\n\n" + table(
            ["Prune", "cosine", "L2", "L1", "CKA", "ASAND"], [[r["label"]] + [fmt(r[m], 4) for m in METRICS]
                                                            for r in rows]) + "\n"
        return write_outputs(args.out, "magnitude", files, text)
    functional = (model_key(args.base), "functional") in scores
    corr, inputs, versus, agree = correlation_table(rows, scores, args.base, styles, functional)
    os.makedirs(args.out, exist_ok=True)
    figures = draw_figures(args.out, args.base, rows, scores, inputs, hists, styles) if args.figures else []
    text, tests = magnitude_report(args.base, rows, scores, summaries, corr, inputs, versus, styles, figures, agree)
    files["correlations.json"] = {"inputs": inputs, "coefficients": corr, "asand_vs_cka": versus,
                                  "f_vs_functional": agree}
    files["comparisons.json"] = tests
    write_outputs(args.out, "magnitude", files, text)


if __name__ == "__main__":
    run_cli(main)
