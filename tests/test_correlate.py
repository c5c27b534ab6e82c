"""correlate.py: metrics against direct numpy computations of the paper's equations, coefficients against
brute force and scipy, and the whole stage on tiny pruned folders."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

import correlate
import prune
from conftest import run_script


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
    assert correlate.kendall_tau_b(x, y) == pytest.approx(brute_tau_b(x, y), rel=1e-12)


def test_hand_computed_coefficients():
    # x = 1..4, y = 1, 3, 2, 4: pairs 5 concordant, 1 discordant -> tau = 4/6; rank d^2 = 2 -> rho = 1 - 12/60
    x, y = [1, 2, 3, 4], [1, 3, 2, 4]
    assert correlate.kendall_tau_b(x, y) == pytest.approx(4 / 6)
    assert correlate.spearman(x, y) == pytest.approx(0.8)
    assert correlate.pearson(x, y) == pytest.approx(0.8)
    assert math.isnan(correlate.pearson([1, 2, 3], [5, 5, 5]))  # undefined, not 0
    assert list(correlate.rankdata([10, 20, 20, 5])) == [2, 3.5, 3.5, 1]


def test_coefficients_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=15), rng.normal(size=15)
    y[3] = y[7]
    assert correlate.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert correlate.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    assert correlate.kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y)[0])


def fake_summaries(tmp_path, folders, fs):
    paths = []
    for folder, f in zip(folders, fs):
        for style in ("direct", "cot"):
            p = tmp_path / f"{abs(hash((folder, style)))}.json"
            p.write_text(json.dumps({"stage": "score", "model": folder, "style": style, "F": f, "n": 3}))
            paths.append(str(p))
    return paths


def test_correlate_stage_on_pruned_folders(tmp_path, tiny_llama):
    base = str(tmp_path / "s0")
    prune.main(["--model", tiny_llama, "--sparsity", "0", "-o", base])
    folders = []
    for s in (0.2, 0.5, 0.8):
        folders.append(str(tmp_path / f"s{s}"))
        prune.main(["--model", base, "--sparsity", str(s), "-o", folders[-1]])
    sums = fake_summaries(tmp_path, [base] + folders, [0.6, 0.5, 0.3, 0.1])
    out = tmp_path / "corr"
    correlate.main(["--base", base, "--models", base, *folders, "--summaries", *sums, "-o", str(out),
                    "--no-figures"])
    sim = json.loads((out / "similarity.json").read_text())
    assert [r["sparsity"] for r in sim] == [0.2, 0.5, 0.8]
    assert all(a["cosine"] > b["cosine"] for a, b in zip(sim, sim[1:]))  # more pruning, less similar
    corr = json.loads((out / "correlations.json").read_text())
    assert corr["inputs"]["cot"]["dF"] == pytest.approx([0.1, 0.3, 0.5])
    assert corr["coefficients"]["cot"]["cosine"]["SRCC"] == pytest.approx(-1.0)
    assert corr["coefficients"]["cot"]["L2"]["KRCC"] == pytest.approx(1.0)
    hist = json.loads((out / "histograms.json").read_text())
    assert len(hist["counts"]) == 4 and all(len(h) == 256 for h in hist["counts"].values())
    report = (out / "report.md").read_text()
    for word in correlate.METRICS + correlate.COEFFICIENTS:
        assert word in report


def test_correlate_rejects_a_checkpoint_from_another_model(tmp_path, tiny_llama, tiny_qwen):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    prune.main(["--model", tiny_llama, "--sparsity", "0", "-o", a])
    prune.main(["--model", tiny_qwen, "--sparsity", "0.5", "-o", b])
    r = run_script("correlate.py", "--base", a, "--models", b, "-o", str(tmp_path / "c"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "another model" in r.stderr and r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "c").exists()


def test_neuron_study_report(tmp_path, tiny_llama):
    """Tables 3-5 from hand-written summaries: each cell is the summary of the model it names."""
    from test_neurons import write_prompts
    target, distractor = write_prompts(tmp_path)
    common = ["--model", tiny_llama, "--multiple", "32", "--target", target, "--distractor", distractor,
              "--scores", str(tmp_path / "s.safetensors")]
    folders = {}
    for name, flags in [("dense", ["--method", "neuron-selective", "--sparsity", "0"]),
                        ("sel", ["--method", "neuron-selective", "--sparsity", "0.3"]),
                        ("rev", ["--method", "neuron-reverse", "--sparsity", "0.3"]),
                        ("r7", ["--method", "neuron-random", "--sparsity", "0.3", "--seed", "7"])]:
        folders[name] = str(tmp_path / name)
        prune.main(common + flags + ["-o", folders[name]])
    summaries = []
    for k, (name, folder) in enumerate(folders.items()):
        for stage, extra in (("score", {"accuracy": k / 10, "trap_rate": 0.5 + k / 10, "type1_rate": 0.1,
                                        "type2_rate": 0.4 + k / 10, "F": 0.25, "n": 4}),
                             ("generate", {"params": 1000 - k, "param_mb": 1.0, "peak_memory_mb": 10.0,
                                           "tokens_per_s": 100.0 + k})):
            path = tmp_path / f"{name}.{stage}.json"
            path.write_text(json.dumps({"stage": stage, "model": folder, "style": "chat", **extra}))
            summaries.append(str(path))
    correlate.main(["--study", "neurons", "--base", folders["dense"], "--models", folders["sel"], folders["rev"],
                    folders["r7"], "--summaries", *summaries, "-o", str(tmp_path / "rep")])
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| pruning (exact) | selective | random (seed 7) | reverse |" in report
    assert "| 30% (50.00%) | 10.0 | 30.0 | 20.0 |" in report  # accuracy: sel k=1, r7 k=3, rev k=2
    assert "| 30% (50.00%) | 60.0 | 80.0 | 70.0 |" in report  # traps
    assert "| original | 1,000 | 1.0 | 10 | 100.0 |" in report
    rows = json.loads((tmp_path / "rep" / "neurons.json").read_text())
    assert [r["method"] for r in rows] == ["dense", "selective", "reverse", "random (seed 7)"]
