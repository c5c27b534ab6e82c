"""prune.py: exact sparsity, the right weights zeroed, embeddings intact, and a folder that loads and generates."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import prune
from common.checkpoints import read_checkpoint_meta
from common.layers import block_linears
from conftest import run_script


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)


@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.3, 0.5, 0.8])
def test_per_matrix_sparsity_is_exact_and_removes_the_smallest(tmp_path, tiny_model_dir, sparsity):
    out = str(tmp_path / "p")
    prune.main(["--model", tiny_model_dir, "--sparsity", str(sparsity), "-o", out])
    dense, pruned = load(tiny_model_dir), load(out)
    dense_mods = dict(block_linears(dense))
    for name, mod in block_linears(pruned):
        W0, W = dense_mods[name].weight.detach(), mod.weight.detach()
        k = round(sparsity * W0.numel())
        zeroed = W == 0
        assert int(zeroed.sum()) == k, name  # the random init has no exact zeros of its own
        assert torch.equal(W[~zeroed], W0[~zeroed])  # survivors untouched
        if 0 < k < W0.numel():
            assert W0[zeroed].abs().max() <= W0[~zeroed].abs().min()  # brute-force check of "smallest"
    for get in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(dense, get)().weight, getattr(pruned, get)().weight)
    report = json.load(open(os.path.join(out, "prune_report.json")))
    assert report["pruned_zeros"] == sum(round(sparsity * r["numel"]) for r in report["matrices"])
    assert len(report["matrices"]) == 7 * dense.config.num_hidden_layers


def test_global_scope_exact_count_and_one_threshold(tmp_path, tiny_llama):
    out = str(tmp_path / "g")
    prune.main(["--model", tiny_llama, "--sparsity", "0.6", "--scope", "global", "-o", out])
    dense, pruned = dict(block_linears(load(tiny_llama))), dict(block_linears(load(out)))
    W0 = torch.cat([m.weight.detach().flatten() for m in dense.values()])
    W = torch.cat([pruned[n].weight.detach().flatten() for n in dense])
    k = round(0.6 * W0.numel())
    assert int((W == 0).sum()) == k
    assert torch.equal(W0.abs().sort().values[:k].max(), W0[W == 0].abs().max())  # the k smallest overall
    per = [float((pruned[n].weight == 0).float().mean()) for n in dense]
    assert max(per) - min(per) > 0.01  # a global threshold gives matrices different sparsities


def test_ties_are_broken_to_exact_count():
    W = torch.tensor([[0.5, -0.5, 0.5, 1.0], [0.5, 2.0, -0.5, 0.1]])
    prune.prune_smallest_(W, 4)  # 0.1 and three of the five +-0.5 entries
    assert int((W == 0).sum()) == 4 and W[1, 3] == 0 and W[0, 3] == 1.0 and W[1, 1] == 2.0
    ws = [torch.full((3, 3), 0.25), torch.full((2, 2), 0.25)]
    prune.prune_global_(ws, 10)
    assert sum(int((w == 0).sum()) for w in ws) == 10


def test_global_threshold_is_the_kth_smallest():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(17, 5, generator=g), torch.randn(3, 40, generator=g)]
    flat = torch.cat([w.flatten() for w in ws]).abs().sort().values
    for k in (1, 50, 100, len(flat)):
        assert prune.global_threshold(ws, k) == float(flat[k - 1])


def test_prune_embeddings_flag(tmp_path, tiny_llama):
    out = str(tmp_path / "e")
    prune.main(["--model", tiny_llama, "--sparsity", "0.5", "--prune-embeddings", "-o", out])
    m = load(out)
    emb = m.get_input_embeddings().weight
    assert int((emb == 0).sum()) == round(0.5 * emb.numel())
    assert m.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied


def test_folder_is_self_describing_and_generates(tmp_path, tiny_qwen):
    out = str(tmp_path / "q")
    prune.main(["--model", tiny_qwen, "--sparsity", "0.4", "-o", out])
    meta = read_checkpoint_meta(out)
    assert meta["cotprune_format"] == "1" and meta["cotprune_stage"] == "prune"
    assert meta["cotprune_source_model"] == tiny_qwen and meta["cotprune_args"]["sparsity"] == 0.4
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
    m = load(out)
    ids = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False)
    assert ids.shape == (1, 8)
    assert not os.path.exists(out + ".tmp")


@pytest.mark.parametrize("bad", ["1", "1.5", "-0.1"])
def test_sparsity_out_of_range_is_a_one_line_error(tmp_path, tiny_llama, bad):
    r = run_script("prune.py", "--model", tiny_llama, "--sparsity", bad, "-o", str(tmp_path / "x"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"prune.py: error: --sparsity must be in [0, 1), got {float(bad)}"]
    assert not (tmp_path / "x").exists()


def test_missing_model_is_a_one_line_error(tmp_path):
    r = run_script("prune.py", "--model", str(tmp_path / "nope"), "--sparsity", "0.1", "-o", str(tmp_path / "x"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "model not found" in r.stderr and r.stderr.strip().count("\n") == 0
