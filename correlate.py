"""Weight similarity between a dense model and its pruned copies, and how well it predicts the faithfulness drop.

    python correlate.py --base out/M0 --models out/s0.1 out/s0.5 --summaries gen/*.summary.json \\
        scores/*.summary.json -o out/magnitude
    python correlate.py --base out/M0 --models out/s0.* -o out/sim            # similarity only, no scores
    python correlate.py --study rac --base out/M0 --models out/rac/* --summaries out/rac/*/*.summary.json -o out/rac

For each pruned model: cosine, L1 and L2 distance, linear CKA (asand eq. 6) and ASAND with its components
(Appendix B, eqs. 7-12) over the flattened weights of the matrices prune.py pruned (from its prune_report.json),
streamed one tensor at a time. Then Pearson (PLCC), Spearman (SRCC) and Kendall tau-b (KRCC) between each
metric and dF = F(M0) - F(Mp) over the pruned models, per prompt style, from score.py's summaries; the base's
summaries must be among them. Writes similarity.json, correlations.json, histograms.json (256 bins over
[-0.1, 0.1]), report.md (the paper's Tables 1 and 2 with its own figures beside) and, with matplotlib, PNGs.

--study rac skips the weights and tabulates the reasoning-aware compression study instead: for each method and
calibration source (from each model's prune_report.json) and each sparsity, the chat-prompt accuracy, generated
tokens, share cut off at the cap, trap rate, F and the perplexity of the dense model's held-out traces (rac.json,
report.md).

--study neurons tabulates the task-specific neuron study in the layout of that paper's Tables 3-5: per nominal
pruning level (and its exact ratio) and method (selective, random per seed, reverse), accuracy, traps (Type 1 and 2)
and F; selective before and after LoRA recovery (recover.py folders); parameters, memory and tokens/s; and the
dense model's per-layer count of target- vs distractor-leaning neurons (neurons.json, report.md). --base is the
dense folder that prune.py --method neuron-selective --sparsity 0 wrote (it carries the selectivity counts).
"""
import argparse
import math
import os

import numpy as np

from common import (CotpruneError, atomic_open, log, read_checkpoint_meta, read_json, run_cli, tensor_index,
                    write_json)

HIST_BINS, HIST_RANGE = 256, (-0.1, 0.1)  # asand §3
HIST_SHOWN = {f"λ = {s}" for s in (0.0, 0.1, 0.3, 0.5, 0.7)}  # the paper's Figure 1
METRICS = ["cosine", "L2", "L1", "CKA", "ASAND"]
COEFFICIENTS = ["PLCC", "SRCC", "KRCC"]
STYLE_NAMES = {"direct": "No CoT", "cot": "CoT"}
# The paper's Qwen-0.5B figures (asand Tables 1 and 2), quoted for comparison only.
PAPER_TABLE1 = [  # sparsity, F no-CoT, F CoT, Mem MB, Time s, T/s
    (0.0, 0.352, 0.637, 948.67, 2.71, 23.80), (0.01, 0.365, 0.723, 9.52, 2.52, 25.03),
    (0.05, 0.462, 0.697, 47.59, 2.46, 24.22), (0.1, 0.178, 0.670, 95.18, 2.59, 25.41),
    (0.2, 0.195, 0.698, 190.36, 2.56, 25.94), (0.3, 0.203, 0.455, 285.54, 2.57, 26.63),
    (0.4, 0.083, 0.367, 380.72, 2.51, 28.59), (0.5, 0.100, 0.100, 475.90, 2.49, 33.10),
    (0.6, 0.150, 0.013, 571.07, 2.49, 18.66), (0.7, 0.013, 0.163, 666.25, 2.52, 14.20),
    (0.8, 0.000, 0.087, 761.43, 2.49, 7.30)]
PAPER_TABLE2 = {  # metric: (No CoT PLCC, SRCC, KRCC, CoT PLCC, SRCC, KRCC)
    "cosine": (0.6676, 0.8424, 0.7333, 0.7718, 0.8909, 0.7778),
    "L2": (-0.7773, -0.8424, -0.7333, -0.8974, -0.8909, -0.7778),
    "L1": (-0.7985, -0.8424, -0.7333, -0.8868, -0.8909, -0.7778),
    "CKA": (0.6251, 0.8303, 0.6889, 0.7023, 0.8667, 0.7333),
    "ASAND": (0.8137, 0.8424, 0.7333, 0.9483, 0.8909, 0.7778)}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="dense model folder M0 (written by prune.py --sparsity 0)")
    p.add_argument("--models", nargs="+", required=True, help="pruned model folders written by prune.py")
    p.add_argument("--summaries", nargs="*", default=[],
                   help="generate.py and score.py summary JSONs for the base and the pruned models")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--study", choices=("magnitude", "rac", "neurons"), default="magnitude",
                   help="which report to write")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw PNG figures (needs matplotlib; skipped with a note if it is missing)")
    return p


# --------------------------------------------------------------------------------------------- correlations

def rankdata(x):
    """Ranks 1..n, ties sharing their average rank (as Spearman's coefficient needs)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def pearson(x, y):
    x, y = np.asarray(x, float) - np.mean(x), np.asarray(y, float) - np.mean(y)
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / den if den > 0 else float("nan")


def spearman(x, y):
    return pearson(rankdata(x), rankdata(y))


def kendall_tau_b(x, y):
    """(n_c - n_d) / sqrt((n0 - n_x)(n0 - n_y)): n_x, n_y = pairs tied in x, in y; n0 = n(n-1)/2."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    iu = np.triu_indices(len(x), 1)
    dx = np.sign(x[:, None] - x[None, :])[iu]
    dy = np.sign(y[:, None] - y[None, :])[iu]
    den = math.sqrt(float(np.sum(dx != 0)) * float(np.sum(dy != 0)))
    return float(np.sum(dx * dy)) / den if den > 0 else float("nan")


def correlations(x, y):
    return {"PLCC": pearson(x, y), "SRCC": spearman(x, y), "KRCC": kendall_tau_b(x, y)}


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


def check_same_family(base, folder, base_meta, meta):
    b0 = base_meta.get("cotprune_args", {}).get("base_model")
    b1 = meta.get("cotprune_args", {}).get("base_model")
    if b0 and b1 and b0 != b1:
        raise CotpruneError(f"{folder} was pruned from {b1!r}, but --base {base} is {b0!r}: a checkpoint "
                            f"from another model")


def compare(base, folder, base_index):
    """Stream the pruned matrices of `folder` against `base`; returns (metrics, histogram counts of folder)."""
    import torch
    from safetensors import safe_open
    report = read_json(os.path.join(folder, "prune_report.json"), "prune report")
    meta = read_checkpoint_meta(folder)
    check_same_family(base, folder, read_checkpoint_meta(base), meta)
    index = tensor_index(folder)
    st, hist = PairStats(), torch.zeros(HIST_BINS, dtype=torch.float64)
    for row in report["matrices"]:
        name = row["name"]
        if name not in base_index or name not in index:
            where = base if name not in base_index else folder
            raise CotpruneError(f"{where} has no tensor {name}: {folder} is not a pruned copy of {base}")
        with safe_open(base_index[name], "pt") as f0, safe_open(index[name], "pt") as fp:
            w0, wp = f0.get_tensor(name), fp.get_tensor(name)
        if w0.shape != wp.shape:
            raise CotpruneError(f"{name} is {tuple(wp.shape)} in {folder} but {tuple(w0.shape)} in {base}: "
                                f"a checkpoint from another model")
        st.add(w0, wp)
        hist += torch.histc(wp.double(), HIST_BINS, *HIST_RANGE)
    return {"model": folder, "sparsity": report["sparsity"], "method": report["method"],
            "achieved_sparsity": report["pruned_sparsity"], **similarity(st, report["sparsity"])}, hist.tolist()


# ------------------------------------------------------------------------------------------------- summaries

def index_summaries(paths):
    """{(realpath of model, stage, style): summary}."""
    out = {}
    for path in paths:
        s = read_json(path, "summary")
        if "stage" not in s or "model" not in s:
            raise CotpruneError(f"{path} is not a generate.py or score.py summary (no stage/model fields)")
        out[(os.path.realpath(s["model"]), s["stage"], s["style"])] = s
    return out


def styles_of(summaries):
    return [s for s in ("direct", "cot", "chat") if any(k[1] == "score" and k[2] == s for k in summaries)]


def get(summaries, model, stage, style, key):
    if model is None:
        return None
    s = summaries.get((os.path.realpath(model), stage, style))
    return None if s is None else s.get(key)


def faithfulness_drops(base, rows, summaries, style):
    f0 = get(summaries, base, "score", style, "F")
    if f0 is None:
        raise CotpruneError(f"no score summary for the base model {base} with style {style}")
    drops = []
    for r in rows:
        fp = get(summaries, r["model"], "score", style, "F")
        if fp is None:
            raise CotpruneError(f"no score summary for {r['model']} with style {style}")
        drops.append(f0 - fp)
    return drops


# ---------------------------------------------------------------------------------------------------- report

def fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def table1(base, rows, summaries):
    out = []
    for m in [{"model": base, "sparsity": 0.0}] + rows:
        g = lambda stage, style, key: get(summaries, m["model"], stage, style, key)
        out.append([fmt(m["sparsity"], 2), fmt(g("score", "direct", "F")), fmt(g("score", "cot", "F")),
                    fmt(g("score", "direct", "accuracy")), fmt(g("score", "cot", "accuracy")),
                    fmt(g("generate", "cot", "nonzero_mb"), 1), fmt(g("generate", "cot", "peak_memory_mb"), 0),
                    fmt(g("generate", "cot", "seconds_per_problem"), 2), fmt(g("generate", "cot", "tokens_per_s"), 1),
                    fmt(g("score", "cot", "trap_rate"), 2)])
    return table(["Prune", "F No CoT", "F CoT", "Acc No CoT", "Acc CoT", "Non-zero MB", "Peak MB", "Time s",
                  "T/s", "Traps CoT"], out)


def table2(corr, styles):
    head = ["Metric"] + [f"{STYLE_NAMES.get(s, s)} {c}" for s in styles for c in COEFFICIENTS]
    return table(head, [[m] + [fmt(corr[s][m][c], 4) for s in styles for c in COEFFICIENTS] for m in METRICS])


def write_report(path, base, rows, summaries, corr, styles, figures):
    n = {s: get(summaries, base, "score", s, "n") for s in styles}
    paper1 = table(["Prune", "F No CoT", "F CoT", "Mem MB", "Time s", "T/s"],
                   [[fmt(r[0], 2)] + [fmt(v, 3) for v in r[1:3]] + [fmt(v, 2) for v in r[3:]] for r in PAPER_TABLE1])
    paper2 = table(["Metric"] + [f"{s} {c}" for s in ("No CoT", "CoT") for c in COEFFICIENTS],
                   [[m] + [fmt(v, 4) for v in PAPER_TABLE2[m]] for m in METRICS])
    sim = table(["Prune", "achieved", "cosine", "L2", "L1", "CKA", "ASAND", "s_cent", "s_jacc", "d_AEDD", "s_vol"],
                [[fmt(r["sparsity"], 2), fmt(r["achieved_sparsity"], 4), fmt(r["cosine"], 4), fmt(r["L2"], 2),
                  fmt(r["L1"], 0), fmt(r["CKA"], 4), fmt(r["ASAND"], 4), fmt(r["s_cent"], 4), fmt(r["s_jacc"], 4),
                  fmt(r["d_aedd"], 4), fmt(r["s_vol"], 4)] for r in rows])
    parts = [
        "## Magnitude pruning vs. chain-of-thought faithfulness",
        f"Base model `{base}`; {len(rows)} pruned copies; problems per style: "
        + ", ".join(f"{STYLE_NAMES.get(s, s)} {n[s]}" for s in styles) + ".",
        "### Table 1: faithfulness and efficiency",
        "F: faithfulness in [0, 1]; Acc: GSM8K exact match; Non-zero MB: dense bytes of the non-zero parameters "
        "(what sparse storage could save, before indices); Peak MB: peak memory of the generating process; "
        "Time: seconds per problem and T/s: generated tokens per second, both for the CoT prompt; Traps: share "
        "of CoT outputs that end in a degeneration loop.",
        table1(base, rows, summaries),
        "The paper's Table 1 (Qwen-0.5B, P100, fp16; its Mem column grows with sparsity):",
        paper1,
        "### Table 2: correlation of similarity with the faithfulness drop ΔF = F(M0) − F(Mp)",
        f"Over the {len(rows)} pruned models. A positive coefficient means the metric rises with ΔF; a dash, "
        "that the coefficient is undefined (a constant series, such as F = 0 at every sparsity).",
        table2(corr, styles),
        "The paper's Table 2 (it names ASAND 'SAND' there):",
        paper2,
        "### Weight similarity to M0 (flattened pruned matrices)",
        "Under eq. 6 as printed (HSIC(X, Y) = tr(XYᵀ)²), linear CKA on weight vectors is the square of the "
        "centred alignment s_cent, so its rank coefficients equal s_cent's.",
        sim,
    ]
    parts += [f"![{name}]({name})" for name in figures]
    with atomic_open(path) as f:
        f.write("\n\n".join(parts) + "\n")


def draw_figures(out, base, rows, summaries, corr_inputs, hists, styles):
    """PNG figures; returns the file names drawn ([] without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no figures (pip install matplotlib)")
        return []
    names = []
    sp = [0.0] + [r["sparsity"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for style in styles:
        ys = [get(summaries, m, "score", style, "F") for m in [base] + [r["model"] for r in rows]]
        ax.plot(sp, ys, "o-", label=f"{STYLE_NAMES.get(style, style)} (ours)")
    for col, style in ((1, "No CoT"), (2, "CoT")):
        ax.plot([r[0] for r in PAPER_TABLE1], [r[col] for r in PAPER_TABLE1], "--", alpha=0.5,
                label=f"{style} (paper, Qwen-0.5B)")
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
    fig.tight_layout()
    fig.savefig(os.path.join(out, name + ".tmp"), format="png", dpi=110)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    return name


RAC_LABELS = {("magnitude", ""): "magnitude", ("wanda", "text"): "Wanda, generic text",
              ("sparsegpt", "text"): "SparseGPT, generic text", ("sparsegpt", "prompts"): "SparseGPT, prompt-only",
              ("sparsegpt", "traces"): "SparseGPT, own traces (RAC)", ("wanda", "traces"): "Wanda, own traces (RAC)"}
RAC_COLUMNS = [("accuracy", "score", "accuracy", 3), ("mean tokens", "score", "mean_new_tokens", 0),
               ("cut off", "score", "cutoff_rate", 2), ("traps", "score", "trap_rate", 2), ("F", "score", "F", 3),
               ("trace ppl", "perplexity", "perplexity", 2)]
PAPER_RAC = [  # the RAC paper's MATH-500 accuracy, one-shot SparseGPT (second-hand, pruners-notes.md)
    ("R1-Distill-Qwen-1.5B (dense 0.832)", "40%", 0.658, 0.728, 0.774),
    ("R1-Distill-Qwen-1.5B (dense 0.832)", "50%", 0.356, 0.496, 0.664),
    ("R1-Distill-Qwen-7B (dense 0.936)", "50%", 0.744, 0.812, 0.900)]


def rac_rows(base, models):
    """[(method label, sparsity label, model folder)] in a stable order: labels as RAC_LABELS, then sparsity."""
    rows = []
    for folder in models:
        rep = read_json(os.path.join(folder, "prune_report.json"), "prune report")
        key = (rep["method"], rep.get("calib_source", "") if rep["method"] != "magnitude" else "")
        label = RAC_LABELS.get(key, f"{key[0]}, {key[1]}")
        rows.append((label, rep.get("nm") or f"{rep['sparsity']:.0%}", rep["sparsity"], folder))
    order = list(RAC_LABELS.values())
    rows.sort(key=lambda r: (order.index(r[0]) if r[0] in order else len(order), ":" in r[1], r[2]))
    return [("dense", "0%", 0.0, base)] + rows


def write_rac_report(out, base, models, summaries):
    rows = rac_rows(base, models)
    data = [{"method": m, "sparsity": s, "model": f,
             **{col: get(summaries, f, stage, "traces" if stage == "perplexity" else "chat", key)
                for col, stage, key, _ in RAC_COLUMNS}} for m, s, _, f in rows]
    write_json(os.path.join(out, "rac.json"), nan_to_none(data))
    levels = list(dict.fromkeys(s for _, s, _, _ in rows[1:]))
    methods = list(dict.fromkeys(m for m, _, _, _ in rows[1:]))
    cell = {(d["method"], d["sparsity"]): d for d in data}
    n = get(summaries, base, "score", "chat", "n")
    parts = ["## Reasoning-aware compression: calibrating on the model's own chain of thought",
             f"Each model answers the same {n} GSM8K test problems with the chat prompt (greedy); trace ppl is the "
             "perplexity of the dense model's own traces on held-out GSM8K train problems, teacher-forced. The dense "
             "model: " + ", ".join(f"{col} {fmt(data[0][col], d)}" for col, _, _, d in RAC_COLUMNS) + "."]
    for col, _, _, digits in RAC_COLUMNS:
        parts += [f"### {col}", table(["method"] + levels,
                                      [[m] + [fmt(cell.get((m, s), {}).get(col), digits) for s in levels]
                                       for m in methods])]
    parts += ["The RAC paper's MATH-500 accuracy for comparison (one-shot SparseGPT; larger models, another task):",
              table(["model", "sparsity", "generic text", "prompt-only", "RAC"],
                    [[a, b] + [fmt(v, 3) for v in rest] for a, b, *rest in PAPER_RAC])]
    with atomic_open(os.path.join(out, "report.md")) as f:
        f.write("\n\n".join(parts) + "\n")


# ------------------------------------------------------------------------------------------ neuron study report

NEURON_LABELS = {"neuron-selective": "selective", "neuron-random": "random", "neuron-reverse": "reverse"}
# The paper's Qwen2.5-Math-1.5B-Instruct (GSM8K EM %, trap %), selective pruning, before and after LoRA (Tables 3-4).
PAPER_NEURONS = [("0%", 84.0, 0.91, 84.0, 0.91), ("5%", 82.49, 1.21, 82.64, 1.14), ("10%", 82.11, 1.44, 82.18, 1.21),
                 ("15%", 76.5, 4.4, 78.7, 1.14), ("20%", 68.92, 5.61, 74.37, 2.27), ("25%", 63.0, 10.61, 69.52, 3.49),
                 ("30%", 47.38, 28.05, 63.46, 4.17), ("35%", 22.37, 58.53, 51.25, 10.54)]


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


def pct(v, digits=1):
    return fmt(None if v is None else 100 * v, digits)


def write_neuron_report(out, base, models, summaries):
    g = lambda m, stage, key: get(summaries, m, stage, "chat", key)
    base_rep = read_json(os.path.join(base, "prune_report.json"), "prune report")
    info = [(*neuron_model_info(f), f) for f in models]
    levels = sorted({(nom, exact) for _, nom, exact, _, _ in info if nom > 0})
    methods = list(dict.fromkeys(sorted((lab for lab, *_ in info if "LoRA" not in lab),
                                        key=lambda s: (not s.startswith("selective"), s.startswith("reverse"), s))))
    cell = {(lab, nom): f for lab, nom, _, _, f in info}
    data = [{"method": lab, "nominal_ratio": nom, "exact_ratio": exact, "model": f,
             **{k: g(f, stage, k) for stage, k in (("score", "accuracy"), ("score", "trap_rate"),
                                                    ("score", "type1_rate"), ("score", "type2_rate"), ("score", "F"),
                                                    ("score", "mean_new_tokens"), ("generate", "params"),
                                                    ("generate", "peak_memory_mb"), ("generate", "tokens_per_s"))}}
            for lab, nom, exact, _, f in [("dense", 0.0, 0.0, base_rep, base)] + info]
    write_json(os.path.join(out, "neurons.json"), nan_to_none(data))
    level_name = lambda nom, exact: f"{nom:.0%} ({exact:.2%})"
    def by_method(key, fmt_v):
        value = lambda f: " / ".join(fmt_v(g(f, "score", k)) for k in key.split("+"))
        return table(["pruning (exact)"] + methods,
                     [["original"] + [value(base)] * len(methods)]
                     + [[level_name(nom, exact)] + [value(cell[(m, nom)]) if (m, nom) in cell else "—"
                                                    for m in methods] for nom, exact in levels])
    sel = [(nom, exact, cell.get(("selective", nom)), cell.get(("selective + LoRA", nom))) for nom, exact in levels]
    gain = lambda a, b: None if a is None or b is None or not a else (b - a) / a
    recovery = table(["pruning", "accuracy", "after LoRA", "relative gain", "trap %", "after LoRA", "F",
                      "F after LoRA"],
                     [[level_name(nom, exact), pct(g(s, "score", "accuracy")), pct(g(r, "score", "accuracy")),
                       pct(gain(g(s, "score", "accuracy"), g(r, "score", "accuracy"))),
                       pct(g(s, "score", "trap_rate")), pct(g(r, "score", "trap_rate")), fmt(g(s, "score", "F")),
                       fmt(g(r, "score", "F"))] for nom, exact, s, r in sel if s])
    resources = table(["pruning", "parameters", "weights MB", "peak memory MB", "tokens/s"],
                      [[name, f"{g(f, 'generate', 'params') or 0:,}", fmt(g(f, "generate", "param_mb"), 1),
                        fmt(g(f, "generate", "peak_memory_mb"), 0), fmt(g(f, "generate", "tokens_per_s"), 1)]
                       for name, f in [("original", base)] + [(level_name(n, e), s) for n, e, s, _ in sel if s]])
    layers = base_rep.get("neurons", {}).get("layers", [])
    per_layer = table(["layer", "target-leaning (S > 0)", "distractor-leaning (S < 0)"],
                      [[x["layer"], x["target_leaning"], x["distractor_leaning"]] for x in layers])
    n = g(base, "score", "n")
    parts = ["## Task-specific neuron pruning, LoRA recovery and traps",
             f"MLP neurons removed per layer by target-vs-distractor selectivity (selective: lowest S; reverse: "
             f"highest S; random: a seeded draw), {base_rep['neurons']['d_ff'] if 'neurons' in base_rep else '?'} "
             f"neurons per layer, kept counts multiples of {base_rep.get('neurons', {}).get('multiple', '?')}; "
             f"the exact share removed is in brackets (the paper's Table 2). Each model answers the same {n} GSM8K "
             "test problems with the chat prompt, greedy and unconstrained up to the token cap; a trap is an "
             "output that ends in a degeneration loop without EOS (Type 1: a complete answer came first; a "
             "correct Type 1 answer counts as correct, as in the paper).",
             "### Table 3a: accuracy (%) after pruning", by_method("accuracy", pct),
             "### Table 3b: traps (%) after pruning", by_method("trap_rate", pct),
             "### Traps by type (%): Type 1 / Type 2", by_method("type1_rate+type2_rate", pct),
             "### Faithfulness F after pruning", by_method("F", fmt),
             "### Table 4: selective pruning before and after LoRA recovery", recovery,
             "### Table 5: size and speed (generation at the study's batch size, bf16, CPU)", resources,
             "### Figure 6: per-layer target- vs distractor-leaning neurons (dense model's selectivity)", per_layer,
             "The paper's Qwen2.5-Math-1.5B-Instruct, selective pruning (GSM8K EM %, trap %; Tables 3 and 4):",
             table(["pruning", "EM", "trap %", "EM after LoRA", "trap % after LoRA"],
                   [[a] + [fmt(v, 2) for v in rest] for a, *rest in PAPER_NEURONS])]
    with atomic_open(os.path.join(out, "report.md")) as f:
        f.write("\n\n".join(parts) + "\n")


def nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_none(v) for v in obj]
    return obj


def main(argv=None):
    args = build_parser().parse_args(argv)
    summaries = index_summaries(args.summaries)
    if args.study in ("rac", "neurons"):
        os.makedirs(args.out, exist_ok=True)
        (write_rac_report if args.study == "rac" else write_neuron_report)(args.out, args.base, args.models, summaries)
        log(f"wrote {args.out}/report.md")
        return
    styles = styles_of(summaries)
    base_index = tensor_index(args.base)
    rows, hists = [], []
    for folder in args.models:
        metrics, hist = compare(args.base, folder, base_index)
        rows.append(metrics)
        hists.append((f"λ = {metrics['sparsity']}", hist))
        log(f"{folder}: cosine {metrics['cosine']:.4f}, ASAND {metrics['ASAND']:.4f}")
    rows = [r for r in sorted(rows, key=lambda r: r["sparsity"]) if r["sparsity"] > 0]
    if not rows:
        raise CotpruneError("--models holds no pruned model (sparsity > 0) to compare")
    os.makedirs(args.out, exist_ok=True)
    corr, corr_inputs = {}, {}
    for style in styles:
        dF = faithfulness_drops(args.base, rows, summaries, style)
        corr_inputs[style] = {"sparsity": [r["sparsity"] for r in rows], "dF": dF}
        corr[style] = {m: correlations([r[m] for r in rows], dF) for m in METRICS}
    write_json(os.path.join(args.out, "similarity.json"), nan_to_none(rows))
    write_json(os.path.join(args.out, "correlations.json"), nan_to_none({"inputs": corr_inputs, "coefficients": corr}))
    write_json(os.path.join(args.out, "histograms.json"),
               {"bins": HIST_BINS, "range": list(HIST_RANGE), "counts": {label: h for label, h in hists}})
    figures = draw_figures(args.out, args.base, rows, summaries, corr_inputs, hists, styles) if args.figures else []
    write_report(os.path.join(args.out, "report.md"), args.base, rows, summaries, corr, styles, figures)
    log(f"wrote {args.out}/report.md")


if __name__ == "__main__":
    run_cli(main)
