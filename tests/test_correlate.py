"""correlate.py: metrics against direct numpy computations of the paper's equations, coefficients against
brute force and scipy, and the whole stage on tiny pruned folders."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

import correlate
import prune
from common import stats
from conftest import ROOT, one_line_error, run_script


def paper_metrics(w0, wp, lam):
    """asand eqs. 3-12 written out directly on whole numpy vectors."""
    d = w0 - wp
    X, Y = (w0 - w0.mean())[None, :], (wp - wp.mean())[None, :]  # centred, as 1 x n matrices
    hsic = lambda A, B: np.trace(A @ B.T) ** 2
    rel = np.linalg.norm(d) / np.linalg.norm(w0)
    nz = lambda w: np.mean(np.abs(w) > 1e-6)
    s_cent = float((X @ Y.T)[0, 0]) / (np.linalg.norm(X) * np.linalg.norm(Y))
    s_jacc = 1 - abs(nz(w0) - nz(wp)) / max(nz(w0), nz(wp))
    aedd = np.exp(-(0.8 * 1.5 if lam > 0.3 else 0.8) * rel)
    vol = np.exp(-abs(w0.std() - wp.std()) / w0.std())
    g = 0.1 * (1 - rel) if lam < 0.1 and np.linalg.norm(d) < 0.1 * np.linalg.norm(w0) else 0.0
    return {"cosine": w0 @ wp / (np.linalg.norm(w0) * np.linalg.norm(wp)), "L2": np.linalg.norm(d),
            "L1": np.abs(d).sum(), "CKA": hsic(X, Y) / math.sqrt(hsic(X, X) * hsic(Y, Y)),
            "s_cent": s_cent, "s_jacc": s_jacc, "d_aedd": aedd, "s_vol": vol, "g": g,
            "ASAND": 0.4 * aedd * s_jacc * s_cent + 0.25 * vol + 0.2 * (aedd if lam > 0.3 else 1) + 0.15 * g}


@pytest.mark.parametrize("lam", [0.01, 0.05, 0.2, 0.5, 0.8])
def test_similarity_matches_the_equations(lam):
    rng = np.random.default_rng(int(lam * 100))
    w0 = rng.normal(0.01, 0.05, 1000)
    wp = w0.copy()
    wp[np.argsort(np.abs(w0))[: int(lam * 1000)]] = 0
    st = correlate.PairStats()
    for a, b in zip(np.array_split(w0, 7), np.array_split(wp, 7)):  # streamed in uneven pieces
        st.add(torch.from_numpy(a.reshape(1, -1)), torch.from_numpy(b.reshape(1, -1)))
    got, want = correlate.similarity(st, lam), paper_metrics(w0, wp, lam)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert (want["g"] > 0) == (lam < 0.1)  # the booster really is exercised at low sparsity


def test_cka_on_matrices_equals_squared_centred_alignment():
    rng = np.random.default_rng(0)
    W0 = rng.normal(size=(5, 4))
    Wp = W0 * (rng.random((5, 4)) > 0.3)
    X, Y = W0 - W0.mean(), Wp - Wp.mean()
    cka = np.trace(X @ Y.T) ** 2 / math.sqrt(np.trace(X @ X.T) ** 2 * np.trace(Y @ Y.T) ** 2)
    st = correlate.PairStats()
    st.add(torch.from_numpy(W0), torch.from_numpy(Wp))
    assert correlate.similarity(st, 0.3)["CKA"] == pytest.approx(cka, rel=1e-12)


def brute_tau_b(x, y):
    """Kendall's tau-b by counting pairs one by one."""
    nc = nd = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        a, b = x[i] - x[j], y[i] - y[j]
        if a == 0 and b == 0:
            tx, ty = tx + 1, ty + 1
        elif a == 0:
            tx += 1
        elif b == 0:
            ty += 1
        elif (a > 0) == (b > 0):
            nc += 1
        else:
            nd += 1
    n0 = len(x) * (len(x) - 1) / 2
    return (nc - nd) / math.sqrt((n0 - tx) * (n0 - ty))


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_b_against_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 4, 12).astype(float), rng.integers(0, 5, 12).astype(float)  # many ties
    assert stats.kendall(x, y) == pytest.approx(brute_tau_b(x, y), rel=1e-12)


def test_hand_computed_coefficients():
    # x = 1..4, y = 1, 3, 2, 4: pairs 5 concordant, 1 discordant -> tau = 4/6; rank d^2 = 2 -> rho = 1 - 12/60
    x, y = [1, 2, 3, 4], [1, 3, 2, 4]
    assert stats.kendall(x, y) == pytest.approx(4 / 6)
    assert stats.spearman(x, y) == pytest.approx(0.8)
    assert stats.pearson(x, y) == pytest.approx(0.8)
    assert math.isnan(stats.pearson([1, 2, 3], [5, 5, 5]))  # undefined, not 0
    assert list(stats.rankdata([10, 20, 20, 5])) == [2, 3.5, 3.5, 1]


def test_coefficients_against_scipy():
    sps = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=15), rng.normal(size=15)
    y[3] = y[7]
    assert stats.pearson(x, y) == pytest.approx(sps.pearsonr(x, y)[0])
    assert stats.spearman(x, y) == pytest.approx(sps.spearmanr(x, y)[0])
    assert stats.kendall(x, y) == pytest.approx(sps.kendalltau(x, y)[0])


def write_scores(tmp_path, folder, style, Fs, correct=None, trap=None, name=None):
    """A score.py output for `folder`: one record per problem with the given F (and correct / trap flags)."""
    path = tmp_path / (name or f"scores-{abs(hash((folder, style)))}.jsonl")
    with open(path, "w") as f:
        for i, F in enumerate(Fs):
            f.write(json.dumps({"id": i, "model": folder, "style": style, "F": F, "new_tokens": 10, "stop": "eos",
                                "correct": bool(correct[i]) if correct else False,
                                "trap": trap[i] if trap else "none",
                                **{k: F for k in ("f_numeric", "f_connectors", "f_cues", "f_steps",
                                                  "f_alignment")}}) + "\n")
    return str(path)


def fake_scores(tmp_path, folders, fs, n=6):
    """Per-problem F around the given means (a fixed, problem-dependent wobble), for direct and cot."""
    paths = []
    for folder, f in zip(folders, fs):
        for style in ("direct", "cot"):
            paths.append(write_scores(tmp_path, folder, style, [f + 0.02 * ((k % 3) - 1) for k in range(n)]))
    return paths


@pytest.fixture
def chain(tmp_path, tiny_llama):
    """M0 and three magnitude-pruned copies."""
    base = str(tmp_path / "s0")
    prune.main(["--model", tiny_llama, "--sparsity", "0", "-o", base])
    folders = []
    for s in (0.2, 0.5, 0.8):
        folders.append(str(tmp_path / f"s{s}"))
        prune.main(["--model", base, "--sparsity", str(s), "-o", folders[-1]])
    return base, folders


def test_correlate_stage_on_pruned_folders(tmp_path, chain):
    base, folders = chain
    sums = fake_scores(tmp_path, [base] + folders, [0.6, 0.5, 0.3, 0.1])
    out = tmp_path / "corr"
    correlate.main(["--base", base, "--models", base, *folders, "--scores", *sums, "-o", str(out),
                    "--no-figures"])
    sim = json.loads((out / "similarity.json").read_text())
    assert [r["sparsity"] for r in sim] == [0.2, 0.5, 0.8]
    assert all(a["cosine"] > b["cosine"] for a, b in zip(sim, sim[1:]))  # more pruning, less similar
    corr = json.loads((out / "correlations.json").read_text())
    assert corr["inputs"]["cot"]["dF"] == pytest.approx([0.1, 0.3, 0.5])
    assert corr["coefficients"]["cot"]["cosine"]["SRCC"]["coef"] == pytest.approx(-1.0)
    assert corr["coefficients"]["cot"]["L2"]["KRCC"]["coef"] == pytest.approx(1.0)
    c = corr["coefficients"]["cot"]["ASAND"]["PLCC"]
    assert c["lo"] <= c["coef"] <= c["hi"]
    hist = json.loads((out / "histograms.json").read_text())
    assert len(hist["counts"]) == 3 and all(len(h) == 256 for h in hist["counts"].values())
    report = (out / "report.md").read_text()
    for word in correlate.METRICS + list(correlate.COEFFICIENTS) + ["What this run can and cannot tell", "Holm"]:
        assert word in report
    # the dense model's F CoT with its interval, and the paired drop of the 0.8 model, significant after Holm
    assert "0.600 [" in report
    tests = json.loads((out / "comparisons.json").read_text())
    drop = next(t for t in tests["comparisons"] if t["label"] == "0.8" and t["style"] == "cot" and t["quantity"] == "F")
    assert drop["diff"] == pytest.approx(-0.5) and drop["significant"] is False  # 6 problems: p >= 1/32 before Holm
    assert tests["holm_m"] == 3 * 2 + 3 * 2  # F in two styles, accuracy and traps for CoT, three models
    assert json.loads((out / "manifest.json").read_text())["stage"] == "correlate"


def test_identity_comes_from_the_weights_not_the_path(tmp_path, chain, tiny_llama, tiny_qwen):
    """./base, base/ and a symbolic link are the same model; a same-shape model from another seed is not."""
    from tiny import save_tiny
    base, folders = chain
    link = tmp_path / "link"
    os.symlink(base, link)
    sums = fake_scores(tmp_path, [base] + folders, [0.6, 0.5, 0.3, 0.1])
    for spelling in (str(link), base + "/", os.path.relpath(base, ROOT)):
        out = tmp_path / f"ok{abs(hash(spelling))}"
        r = run_script("correlate.py", "--base", spelling, "--models", *folders, "--scores", *sums, "-o", str(out),
                       "--no-figures")
        assert r.returncode == 0, r.stderr
    other = str(tmp_path / "other")
    save_tiny(other, "llama", seed=7)  # same shapes, other weights, no cotprune metadata
    r = run_script("correlate.py", "--base", other, "--models", *folders, "-o", str(tmp_path / "bad"))
    assert one_line_error(r) and "another model" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_a_neuron_pruned_model_is_another_architecture(tmp_path, chain):
    base, folders = chain
    sliced = str(tmp_path / "sliced")
    prune.main(["--model", base, "--method", "neuron-random", "--sparsity", "0.25", "--multiple", "16", "-o", sliced])
    r = run_script("correlate.py", "--base", base, "--models", folders[0], sliced, "-o", str(tmp_path / "c"))
    assert one_line_error(r) and "another architecture" in r.stderr and not (tmp_path / "c").exists()


def test_a_2_of_4_model_and_a_50_percent_model_are_two_rows(tmp_path, chain):
    base, folders = chain
    nm = str(tmp_path / "nm")
    prune.main(["--model", base, "--nm", "2:4", "-o", nm])
    sums = fake_scores(tmp_path, [base] + folders + [nm], [0.6, 0.5, 0.3, 0.1, 0.2])
    out = tmp_path / "c"
    correlate.main(["--base", base, "--models", *folders, nm, "--scores", *sums, "-o", str(out), "--no-figures"])
    assert [r["label"] for r in json.loads((out / "similarity.json").read_text())] == ["0.2", "0.5", "0.8", "2:4"]
    assert set(json.loads((out / "histograms.json").read_text())["counts"]) == {"λ = 0.2", "λ = 0.5", "λ = 0.8",
                                                                                "λ = 2:4"}
    assert "| 2:4 |" in (out / "report.md").read_text()


@pytest.mark.parametrize("case, message", [
    ("duplicate", "both hold score records"), ("no-style", "no style"), ("null-model", "no model"),
    ("score-summary", "pass the scored JSONL"), ("missing-base", "no cot-style score records"),
    ("no-base-flag", "the following arguments are required: --base"), ("no-F", "has no F")])
def test_bad_inputs_are_one_line_and_leave_no_folder(tmp_path, chain, case, message):
    base, folders = chain
    sums = fake_scores(tmp_path, [base] + folders, [0.6, 0.5, 0.3, 0.1])
    extra = []
    if case == "duplicate":
        extra = ["--scores", *sums, write_scores(tmp_path, folders[0], "cot", [0.1] * 6, name="again.jsonl")]
    elif case == "no-style":
        p = tmp_path / "x.jsonl"
        p.write_text(json.dumps({"id": 1, "model": base, "F": 0.5, "trap": "none"}) + "\n")
        extra = ["--scores", str(p)]
    elif case == "null-model":
        p = tmp_path / "x.jsonl"
        p.write_text(json.dumps({"id": 1, "model": None, "style": "cot", "F": 0.5, "trap": "none"}) + "\n")
        extra = ["--scores", str(p)]
    elif case == "score-summary":
        p = tmp_path / "x.summary.json"
        p.write_text(json.dumps({"stage": "score", "model": base, "style": "cot", "F": 0.5}))
        extra = ["--scores", *sums, "--summaries", str(p)]
    elif case == "no-F":  # a cot record without F (a code record relabelled, say): refused, not a traceback
        p = tmp_path / "noF.jsonl"
        p.write_text("".join(json.dumps({"id": i, "model": folders[0], "style": "cot", "trap": "none"}) + "\n"
                             for i in range(6)))
        extra = ["--scores", *sums[:3], str(p), *sums[4:]]
    elif case == "missing-base":
        extra = ["--scores", *sums[:3], *sums[4:]]  # no cot records of the first pruned model
    argv = ["--base", base, "--models", *folders, *extra, "-o", str(tmp_path / "c")]
    if case == "no-base-flag":
        argv = argv[2:]
    r = run_script("correlate.py", *argv)
    assert one_line_error(r) and message in r.stderr, r.stderr
    assert not (tmp_path / "c").exists()


def test_a_folder_correlate_did_not_write_is_left_alone(tmp_path, chain):
    base, folders = chain
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("my notes")
    r = run_script("correlate.py", "--base", base, "--models", *folders, "-o", str(notes))
    assert one_line_error(r) and "did not write" in r.stderr
    assert (notes / "report.md").read_text() == "my notes" and os.listdir(notes) == ["report.md"]
    out = str(tmp_path / "sim")
    for _ in range(2):  # its own folder it may replace
        r = run_script("correlate.py", "--base", base, "--models", *folders, "-o", out)
        assert r.returncode == 0, r.stderr


def test_correlate_rejects_a_checkpoint_from_another_model(tmp_path, tiny_llama, tiny_qwen):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    prune.main(["--model", tiny_llama, "--sparsity", "0", "-o", a])
    prune.main(["--model", tiny_qwen, "--sparsity", "0.5", "-o", b])
    r = run_script("correlate.py", "--base", a, "--models", b, "-o", str(tmp_path / "c"))
    assert one_line_error(r) and "another model" in r.stderr
    assert not (tmp_path / "c").exists()


def clopper_pearson(k, n):
    """The exact interval from scipy's beta quantiles (an independent oracle for the report cells)."""
    beta = pytest.importorskip("scipy.stats").beta
    return (0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)), (1.0 if k == n else beta.ppf(0.975, k + 1, n - k))


NEURON_MODELS = {"sel": ["--method", "neuron-selective"], "rev": ["--method", "neuron-reverse"],
                 "r7": ["--method", "neuron-random", "--seed", "7"]}


def neuron_models(tmp_path, model, names):
    """{name: folder}: the dense copy and the named neuron-pruned models at 30 % (NEURON_MODELS)."""
    from test_neurons import measure
    common = ["--model", model, "--multiple", "32", "--sparsity", "0.3", "--scores", measure(tmp_path, model)]
    folders = {"dense": str(tmp_path / "dense")}
    prune.main(["--model", model, "--sparsity", "0", "-o", folders["dense"]])
    for name in names:
        folders[name] = str(tmp_path / name)
        prune.main(common + NEURON_MODELS[name] + ["-o", folders[name]])
    return folders


def test_neuron_study_report(tmp_path, tiny_llama):
    """Tables 3-5 from hand-written records: each cell is the estimate of the model it names, with its interval."""
    folders = neuron_models(tmp_path, tiny_llama, ["sel", "rev", "r7"])
    dense = folders["dense"]
    scores, summaries = [], []
    for k, (name, folder) in enumerate(folders.items()):  # model k: k of 10 correct, 5 + k of 10 trapped
        scores.append(write_scores(tmp_path, folder, "chat", [0.25] * 10, correct=[i < k for i in range(10)],
                                   trap=["type2" if i < 5 + k else "none" for i in range(10)], name=f"{name}.jsonl"))
        path = tmp_path / f"{name}.generate.json"
        path.write_text(json.dumps({"stage": "generate", "model": folder, "style": "chat", "params": 1000 - k,
                                    "param_mb": 1.0, "peak_memory_mb": 10.0, "tokens_per_s": 100.0 + k,
                                    "contended": name == "rev"}))
        summaries.append(str(path))
    correlate.main(["--study", "neurons", "--base", dense, "--models", folders["sel"], folders["rev"],
                    folders["r7"], "--scores", *scores, "--summaries", *summaries, "-o", str(tmp_path / "rep")])
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| pruning (exact) | selective | random (seed 7) | reverse |" in report
    ci = lambda k: "{:.1f} [{:.1f}, {:.1f}]".format(100 * k / 10, *(100 * v for v in clopper_pearson(k, 10)))
    assert f"| 30% (50.00%) | {ci(1)} | {ci(3)} | {ci(2)} |" in report  # accuracy: sel k=1, r7 k=3, rev k=2
    assert f"| 30% (50.00%) | {ci(6)} | {ci(8)} | {ci(7)} |" in report  # traps
    assert "| original | 1,000 | 1.0 | 10 | 100.0 |" in report
    assert "| reverse 30% (50.00%) | 998 | 1.0 | 10 | 102.0 ‡ |" in report  # measured under contention
    assert "What this run can and cannot tell" in report and "Holm" in report
    rows = json.loads((tmp_path / "rep" / "neurons.json").read_text())
    assert [r.get("method") for r in rows[:-1]] == ["dense", "selective", "reverse", "random (seed 7)"]
    cmp = {(c["a"], c["b"]): c for c in rows[-1]["comparisons"]}
    # selective against reverse: 1 of 10 correct against 2 (one discordant pair): McNemar p = 1
    assert cmp[("selective", "reverse")]["accuracy"]["p"] == pytest.approx(1.0)
    assert cmp[("dense", "random (seed 7)")]["trap_rate"]["diff"] == pytest.approx(0.3)


def test_rac_study_report(tmp_path, tiny_llama):
    """The RAC tables from hand-written records: trace perplexity with its interval, own traces against text."""
    calib = tmp_path / "text.jsonl"
    calib.write_text("".join(json.dumps({"id": i, "text": "the cat sat on the mat " * 40, "source": src}) + "\n"
                             for i, src in enumerate(["traces"] * 4)))
    text = tmp_path / "generic.jsonl"
    text.write_text("".join(json.dumps({"id": i, "text": "a b c d e f g " * 60, "source": "text"}) + "\n"
                            for i in range(4)))
    dense = str(tmp_path / "dense")
    prune.main(["--model", tiny_llama, "--sparsity", "0", "-o", dense])
    models = {}
    for name, calib_file in (("rac", calib), ("txt", text)):
        models[name] = str(tmp_path / name)
        prune.main(["--model", dense, "--method", "sparsegpt", "--sparsity", "0.5", "--calib", str(calib_file),
                    "--n-samples", "2", "--seqlen", "32", "-o", models[name]])
    scores, ppl = [], []
    nll = {"dense": 1.0, "rac": 1.5, "txt": 3.0}  # nats per token of each trace
    for name, folder in [("dense", dense), *models.items()]:
        scores.append(write_scores(tmp_path, folder, "chat", [0.5] * 8, name=f"{name}.jsonl"))
        path = tmp_path / f"{name}.ppl.jsonl"
        path.write_text("".join(json.dumps({"id": i, "model": folder, "nll": nll[name] * (10 + i), "trace_tokens":
                                            10 + i}) + "\n" for i in range(5)))
        ppl.append(str(path))
    out = tmp_path / "rep"
    correlate.main(["--study", "rac", "--base", dense, "--models", *models.values(), "--scores", *scores,
                    "--perplexity", *ppl, "-o", str(out)])
    report = (out / "report.md").read_text()
    assert "| SparseGPT, own traces (RAC) | " + f"{math.exp(1.5):.2f} [{math.exp(1.5):.2f}, {math.exp(1.5):.2f}]" \
        in report  # every trace has the same nll per token: a zero-width interval
    data = json.loads((out / "rac.json").read_text())
    c = next(c for c in data[-1]["comparisons"] if c["a"] == "SparseGPT, generic text")
    assert c["ppl"]["ratio"] == pytest.approx(math.exp(1.5 - 3.0))
    assert "This run **supports it**" in report


def write_functional(tmp_path, folder, aocs, changed, full=None):
    """score.py functional records for `folder`: per problem an AOC, a mistake outcome and a full-CoT answer."""
    path = tmp_path / f"func-{abs(hash(folder))}.jsonl"
    with open(path, "w") as f:
        for i, (a, c) in enumerate(zip(aocs, changed)):
            f.write(json.dumps({"id": i, "model": folder, "style": "functional", "steps": 3, "aoc": a,
                                "full_pred": full[i] if full else float(i), "mistake_changed": c,
                                "mistake_followed": False, "nocot_same": a < 0.5, "filler_same": a < 0.5,
                                "full_correct": False, "nocot_correct": False, "filler_correct": False}) + "\n")
    return str(path)


def test_functional_measures_in_the_magnitude_report(tmp_path, chain):
    base, folders = chain
    sums = fake_scores(tmp_path, [base] + folders, [0.6, 0.5, 0.3, 0.1])
    # AOC falls with pruning (0.8, 0.6, 0.4, 0.2 + a wobble); the 0.8 model answers every problem otherwise
    aoc = {m: [v + 0.05 * (k % 2) for k in range(6)] for m, v in zip([base] + folders, (0.8, 0.6, 0.4, 0.2))}
    funcs = [write_functional(tmp_path, m, aoc[m], [k % 2 == 0 for k in range(6)], None if m != folders[-1] else [99.0] * 6)
             for m in [base] + folders]
    out = tmp_path / "corr"
    correlate.main(["--base", base, "--models", base, *folders, "--scores", *sums, *funcs, "-o", str(out),
                    "--no-figures"])
    corr = json.loads((out / "correlations.json").read_text())
    assert corr["inputs"]["aoc"]["d"] == pytest.approx([0.2, 0.4, 0.6])  # mean AOC(M0) - AOC(Mp), by hand
    assert corr["coefficients"]["aoc"]["cosine"]["SRCC"]["coef"] == pytest.approx(-1.0)
    # keyword F and AOC fall together across the four models: their across-model PLCC, by hand
    f_means, aoc_means = [0.6, 0.5, 0.3, 0.1], [np.mean(aoc[m]) for m in [base] + folders]
    assert corr["f_vs_functional"]["aoc"]["coef"] == pytest.approx(np.corrcoef(f_means, aoc_means)[0, 1])
    report = (out / "report.md").read_text()
    assert "Table 3: functional faithfulness" in report and "ΔAOC PLCC" in report
    assert "0.825 [" in report  # the dense model's AOC: mean of 0.8, 0.85, ...
    tests = json.loads((out / "comparisons.json").read_text())
    rows = {(t["label"], t["quantity"], t["problems"]): t for t in tests["functional"]}
    assert rows[("0.5", "aoc", "all")]["diff"] == pytest.approx(-0.4)
    assert rows[("0.5", "aoc", "same")]["n"] == 6  # same full-CoT answers as the dense model
    assert ("0.8", "aoc", "same") not in rows  # no problem answered alike: no controlled comparison
    assert "answer depends on it less" in report and "Keyword F agrees" in report


def test_functional_records_for_some_models_only_are_refused(tmp_path, chain):
    base, folders = chain
    sums = fake_scores(tmp_path, [base] + folders, [0.6, 0.5, 0.3, 0.1])
    funcs = [write_functional(tmp_path, m, [0.5] * 6, [True] * 6) for m in [base] + folders[:2]]
    r = run_script("correlate.py", "--base", base, "--models", *folders, "--scores", *sums, *funcs,
                   "-o", str(tmp_path / "corr"), "--no-figures")
    assert one_line_error(r) and "no functional score records" in r.stderr and not (tmp_path / "corr").exists()


def test_resampled_agreement():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 40)) + np.arange(5)[:, None]
    got = stats.resampled_agreement(a, 2 * a + 1, stats.pearson, n_boot=200)
    assert got["coef"] == pytest.approx(1.0) and got["lo"] == pytest.approx(1.0)  # an exact linear relation
    b = rng.normal(size=(5, 40))
    got = stats.resampled_agreement(a, b, stats.pearson, n_boot=500)
    assert got["coef"] == pytest.approx(np.corrcoef(a.mean(1), b.mean(1))[0, 1])
    assert got["lo"] <= got["coef"] <= got["hi"]
    with pytest.raises(ValueError):
        stats.resampled_agreement(a, b[:, :10], stats.pearson)
