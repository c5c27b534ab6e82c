"""Structural MLP neuron pruning: selectivity by hand, the multiple-of rule, and slicing == zeroing the neurons."""
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import calibrate
import prune
from common.cli import CotpruneError
from conftest import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()


def stats_of(rows):
    s = calibrate.ActivationStats()
    s.add(torch.tensor(rows, dtype=torch.float32)[:, None, :])  # [prompts, L=1, d_ff]
    return s


def test_selectivity_matches_a_hand_computation():
    # neuron 0: target 1, 3 (mean 2); distractor 1, 1 (mean 1); pooled 1 3 1 1: mean 1.5, squares 3, var 3/3 = 1
    # neuron 1: target 0, 2 (mean 1); distractor 4, 2 (mean 3); pooled 0 2 4 2: mean 2, squares 8, var 8/3
    S, mu_t, mu_d, sigma = calibrate.selectivity(stats_of([[1, 0], [3, 2]]), stats_of([[1, 4], [1, 2]]))
    assert mu_t[0].tolist() == [2.0, 1.0] and mu_d[0].tolist() == [1.0, 3.0]
    assert sigma[0].tolist() == pytest.approx([1.0, math.sqrt(8 / 3)], rel=1e-6)
    assert S[0].tolist() == pytest.approx([1 / (1 + 1e-6), -2 / (math.sqrt(8 / 3) + 1e-6)], rel=1e-6)


def test_streamed_statistics_equal_one_pass():
    a = torch.rand(10, 3, 5)
    one, two = calibrate.ActivationStats(), calibrate.ActivationStats()
    one.add(a)
    two.add(a[:4])
    two.add(a[4:])
    d, d_rows = calibrate.ActivationStats(), torch.rand(7, 3, 5)
    d.add(d_rows)
    (S1, mu_t, mu_d, sigma), S2 = calibrate.selectivity(one, d), calibrate.selectivity(two, d)[0]
    assert torch.allclose(S1, S2, atol=1e-6)
    assert torch.allclose(mu_t, a.mean(0), atol=1e-6) and torch.allclose(mu_d, d_rows.mean(0), atol=1e-6)
    assert torch.allclose(sigma, torch.cat([a, d_rows]).std(0), atol=1e-6)  # brute force: torch's pooled std
    assert torch.allclose(S1, (a.mean(0) - d_rows.mean(0)) / (torch.cat([a, d_rows]).std(0) + 1e-6), atol=1e-5)


def test_masked_means_ignore_padding_and_equal_the_swiglu(tiny_llama):
    model, tok = load(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    texts = ["Tom has 3 apples and buys 5 more.", "Hi", "How many legs do 4 spiders have in total, if each has 8?"]
    batched = calibrate.mean_abs_activations(model, tok, texts, torch.device("cpu"), 3, 512, calibrate.ActivationStats(), "t")
    mlp_in, singles = {}, calibrate.ActivationStats()
    layer0 = model.model.layers[0].mlp
    layer0.register_forward_pre_hook(lambda m, a: mlp_in.__setitem__("x", a[0]))
    for text in texts:  # one prompt per pass: no padding at all
        calibrate.mean_abs_activations(model, tok, [text], torch.device("cpu"), 1, 512, singles, "t")
        x = mlp_in["x"][0]  # [T, d]: recompute eq. 1 by hand from the MLP's input
        with torch.no_grad():
            h = torch.nn.functional.silu(x @ layer0.gate_proj.weight.T) * (x @ layer0.up_proj.weight.T)
        mlp_in.setdefault("means", []).append(h.abs().mean(0))
    assert torch.allclose(batched.sum, singles.sum, atol=1e-5)
    assert torch.allclose(batched.sumsq, singles.sumsq, atol=1e-5)
    assert torch.allclose(singles.sum[0].float(), torch.stack(mlp_in["means"]).sum(0), atol=1e-5)


PAPER_TABLE2 = {18944: [5.41, 10.14, 15.54, 20.27, 25.00, 30.41, 35.14],  # Qwen2.5-7B d_ff
                8960: [5.71, 10.00, 15.71, 20.00, 25.71, 30.00, 35.71]}  # Qwen2.5-1.5B d_ff


@pytest.mark.parametrize("d_ff", sorted(PAPER_TABLE2))
def test_kept_count_is_a_multiple_and_reproduces_the_papers_exact_ratios(d_ff):
    for nominal, exact in zip((0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35), PAPER_TABLE2[d_ff]):
        keep = prune.kept_count(d_ff, nominal, 128)
        assert keep % 128 == 0 and keep <= (1 - nominal) * d_ff + 1e-6
        assert round(100 * (1 - keep / d_ff), 2) == exact
    assert prune.kept_count(d_ff, 0.0, 128) == d_ff


def test_kept_count_that_keeps_nothing_is_an_error():
    with pytest.raises(CotpruneError, match="keep no neuron"):
        prune.kept_count(128, 0.5, 128)


def test_choose_kept_orders_and_seeds():
    S = torch.tensor([[0.5, -2.0, 3.0, 0.0, -1.0, 2.0]])
    assert prune.choose_kept(S, 4, "neuron-selective").tolist() == [[0, 2, 3, 5]]  # drops -2 and -1
    assert prune.choose_kept(S, 4, "neuron-reverse").tolist() == [[0, 1, 3, 4]]  # drops 3 and 2
    r42, r33 = (prune.choose_kept(torch.zeros(3, 64), 32, "neuron-random", s) for s in (42, 33))
    assert torch.equal(r42, prune.choose_kept(torch.zeros(3, 64), 32, "neuron-random", 42))
    assert not torch.equal(r42, r33) and r42.shape == (3, 32)
    assert all(len(set(row.tolist())) == 32 for row in r42)


def zeroed_logits(model, kept, ids):
    """Logits of `model` with every neuron outside `kept` silenced at the input of down_proj."""
    hooks = []
    for layer, idx in zip(model.model.layers, kept):
        keep = torch.zeros(layer.mlp.down_proj.in_features)
        keep[idx] = 1
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, keep=keep: (a[0] * keep,)))
    with torch.no_grad():
        out = model(ids).logits
    for h in hooks:
        h.remove()
    return out


def test_sliced_model_equals_zeroed_neurons_in_memory(tiny_model_dir):
    model, sliced = load(tiny_model_dir), load(tiny_model_dir)
    kept = prune.choose_kept(torch.randn(2, 128), 64, "neuron-selective")
    prune.slice_mlps_(sliced, kept)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        got = sliced(ids).logits
    assert sliced.config.intermediate_size == 64 and sliced.model.layers[1].mlp.up_proj.weight.shape == (64, 64)
    assert (got - zeroed_logits(model, kept, ids)).abs().max() < 1e-5


def write_prompts(tmp_path):
    lines = [json.loads(line) for line in open(os.path.join(ROOT, "data", "gsm8k", "train.jsonl"))][:12]
    target, distractor = str(tmp_path / "target.jsonl"), str(tmp_path / "distract.jsonl")
    with open(target, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    with open(os.path.join(ROOT, "data", "distract", "distract_mix_1000.jsonl")) as src, open(distractor, "w") as f:
        f.writelines(next(src) for _ in range(12))
    return target, distractor


@pytest.mark.parametrize("method", ["neuron-selective", "neuron-reverse", "neuron-random"])
def test_cli_saves_a_smaller_model_that_equals_the_zeroed_original(tmp_path, tiny_model_dir, method):
    out, cache = str(tmp_path / "n"), measure(tmp_path, tiny_model_dir)
    prune.main(["--model", tiny_model_dir, "--method", method, "--sparsity", "0.3", "--multiple", "32",
                "--scores", cache, "-o", out])
    report = json.load(open(os.path.join(out, "prune_report.json")))["neurons"]
    assert (report["kept"], report["removed"], report["exact_ratio"]) == (64, 64, 0.5)  # 0.7 * 128 = 89.6 -> 64
    with safe_open(os.path.join(out, "neuron_scores.safetensors"), "pt") as f:
        kept = f.get_tensor("kept_indices")
        S = f.get_tensor("selectivity") if method != "neuron-random" else None
    if S is not None:  # the removed neurons are the lowest (selective) or highest (reverse) S of their layer
        removed = torch.ones_like(S, dtype=torch.bool).scatter_(1, kept, False)
        for s, r in zip(S, removed):
            lo, hi = (s[r], s[~r]) if method == "neuron-selective" else (s[~r], s[r])
            assert lo.max() <= hi.min()
        assert sum(x["target_leaning"] + x["distractor_leaning"] for x in report["layers"]) <= S.numel()
        assert os.path.exists(cache)
    pruned, dense = load(out), load(tiny_model_dir)
    assert pruned.config.intermediate_size == 64
    ids = torch.randint(0, dense.config.vocab_size, (2, 10))
    with torch.no_grad():
        got = pruned(ids).logits
    assert (got - zeroed_logits(dense, kept, ids)).abs().max() < 1e-5


def measure(tmp_path, model):
    """calibrate.py --source selectivity on 12 target and 12 distractor prompts; returns the scores file."""
    target, distractor = write_prompts(tmp_path)
    path = str(tmp_path / f"scores-{os.path.basename(model)}.safetensors")
    calibrate.main(["--model", model, "--source", "selectivity", "--target", target, "--distractor", distractor,
                    "--n-prompts", "12", "--batch-size", "5", "-o", path])
    return path


def test_scores_file_records_its_inputs_and_is_checked_against_the_model(tmp_path, tiny_llama, tiny_qwen):
    scores = measure(tmp_path, tiny_llama)
    with safe_open(scores, "pt") as f:
        meta = f.metadata()
    assert meta["n_target"] == meta["n_distractor"] == "12" and meta["model_id"].startswith("sha256:")
    base = ["--method", "neuron-selective", "--multiple", "32", "--sparsity", "0.25", "--scores", scores]
    r = run_script("prune.py", "--model", tiny_llama, *base, "-o", str(tmp_path / "n25"))
    assert r.returncode == 0, r.stderr
    r = run_script("prune.py", "--model", tiny_qwen, *base, "-o", str(tmp_path / "bad"))  # another model's scores
    assert r.returncode == 2 and "measured on another model" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "bad")


@pytest.mark.parametrize("flags, message", [
    (["--nm", "2:4", "--scores", "x"], "not --nm"), (["--sparsity", "0.3"], "needs --scores"),
    (["--sparsity", "0.3", "--scores", "nope.safetensors"], "--scores nope.safetensors not found")])
def test_neuron_flag_errors_are_one_line(tmp_path, tiny_llama, flags, message):
    r = run_script("prune.py", "--model", tiny_llama, "--method", "neuron-selective", *flags, "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "x")
