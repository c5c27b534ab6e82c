"""Wanda, SparseGPT, N:M and the layer-sequential driver, checked against independent properties."""
import json

import pytest
import torch

import prune
from common.layers import capture_block_inputs, decoder_layers
from common.models import load_model, load_tokenizer


def correlated_problem(rows=64, cols=256, n=2048, seed=0):
    """A weight matrix and inputs whose features are correlated and unevenly scaled (shuffled, so no column block
    is all-important: SparseGPT allots each block of columns the same share of zeros)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    scales = torch.logspace(-0.5, 0.5, cols)[torch.randperm(cols, generator=g)]
    X = (torch.randn(n, cols, generator=g) @ mix) * scales[None, :]  # [n, cols]
    W = torch.randn(rows, cols, generator=g)
    return W, X.T @ X  # W [rows, cols], G [cols, cols]


def prune_three_ways(W, G, sparsity=0.5, nm=None):
    mag = W.clone()
    prune.magnitude_prune_([("w", mag)], sparsity, "layer", nm)
    wan = W.clone()
    prune.wanda_prune_(wan, torch.diag(G).sqrt(), sparsity, nm)
    sgpt, _ = prune.sparsegpt_prune(W, 2 * G / 2048, sparsity, nm, blocksize=64)
    return mag, wan, sgpt


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_beats_wanda_beats_magnitude(nm, seed):
    W, G = correlated_problem(seed=seed)
    mag, wan, sgpt = prune_three_ways(W, G, 0.5, nm)
    errors = [prune.reconstruction_error(W, P, G) for P in (sgpt, wan, mag)]
    assert errors[0] < errors[1] < errors[2], errors


def test_reconstruction_error_matches_direct_computation():
    W, G = correlated_problem(8, 16, 100)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(100, 16, generator=g)
    P = W * (torch.rand(W.shape, generator=g) > 0.5)
    direct = ((X @ W.T - X @ P.T) ** 2).sum() / ((X @ W.T) ** 2).sum()
    assert prune.reconstruction_error(W, P, X.T @ X) == pytest.approx(float(direct), rel=1e-5)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_exact_unstructured_sparsity(sparsity):
    W, G = correlated_problem(48, 200)  # 200 columns: a partial last block
    _, wan, sgpt = prune_three_ways(W, G, sparsity)
    assert int((sgpt == 0).sum()) == round(sparsity * W.numel())  # SparseGPT: exact over the matrix
    assert ((wan == 0).sum(1) == round(sparsity * 200)).all()  # Wanda: exact in every row


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_in_every_row(n, m):
    W, G = correlated_problem(16, 64)
    for P in prune_three_ways(W, G, nm=(n, m)):
        zeros = (P == 0).reshape(16, 64 // m, m).sum(-1)
        assert (zeros == n).all()


def test_sparsegpt_updates_the_survivors():
    W, G = correlated_problem()
    _, wan, sgpt = prune_three_ways(W, G)
    kept = sgpt != 0
    assert not torch.equal(sgpt[kept], W[kept])  # the OBS update changed the survivors
    assert torch.equal(wan[wan != 0], W[wan != 0])  # Wanda, by contrast, leaves them as they were


def test_indefinite_hessian_is_retried_with_more_damping():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    eig = torch.full((32,), 10.0)
    eig[0] = -0.5  # 0.01 x mean(diag) = ~0.1 of damping is not enough; 0.08 x ~9.7 is
    H = Q @ torch.diag(eig) @ Q.T
    U, used = prune.inverse_cholesky_upper(H, 0.01)
    assert used > 0.01 and torch.isfinite(U).all()
    damped = H + used * torch.diag(H).mean() * torch.eye(32)
    assert torch.allclose(U.T @ U, torch.linalg.inv(damped), atol=1e-4)  # really the factor of the inverse
    W = torch.randn(8, 32, generator=g)
    P, used2 = prune.sparsegpt_prune(W, H, 0.5, blocksize=16)
    assert used2 == used and torch.isfinite(P).all() and int((P == 0).sum()) == 128
    with pytest.raises(prune.CotpruneError, match="not positive definite"):
        prune.inverse_cholesky_upper(-torch.eye(4), 0.01, max_percdamp=0.5)


def test_dead_inputs_are_zeroed():
    W, G = correlated_problem(8, 16)
    G[3, :] = G[:, 3] = 0
    P, _ = prune.sparsegpt_prune(W, 2 * G / 2048, 0.25, blocksize=8)
    assert (P[:, 3] == 0).all()


def test_windows_are_exact_slices_without_padding(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    texts = ["Tom has 3 apples.", "A much longer text about ducks and eggs and markets.", "x"] * 20
    win = prune.pack_windows(tok, texts, 4, 16)
    stream = sum((tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts), [])
    assert win.shape == (4, 16) and win.flatten().tolist() == stream[:64]
    assert tok.pad_token_id not in win.flatten().tolist()  # tiny tokenizer: pad differs from eos
    with pytest.raises(prune.CotpruneError, match="needs 6400"):
        prune.pack_windows(tok, texts, 100, 64)


def test_statistics_do_not_depend_on_batching(tiny_llama):
    model = load_model(tiny_llama, torch.device("cpu"), torch.float32)
    windows = torch.randint(3, 300, (5, 12), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_block_inputs(model, windows, torch.device("cpu"))
    layer = decoder_layers(model)[0]
    groups = prune.input_groups(layer, inputs[:1], kwargs, "cpu")
    assert sorted(map(sorted, groups)) == sorted([["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
                                                  ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
                                                  ["self_attn.o_proj"]])
    one = prune.gram_matrices(layer, groups, inputs, kwargs, "cpu", 1)
    many = prune.gram_matrices(layer, groups, inputs, kwargs, "cpu", 4)
    for key in one:
        assert one[key][1] == many[key][1] == 60  # exactly the real tokens
        rel = (one[key][0] - many[key][0]).norm() / one[key][0].norm()
        assert rel < 1e-5  # float32 summation order only; a padded or lost token would be ~1e-2
    # the captured inputs are the embeddings of the windows
    assert torch.allclose(inputs, model.get_input_embeddings()(windows))


def test_second_block_sees_the_pruned_first_block(tiny_llama, monkeypatch):
    model = load_model(tiny_llama, torch.device("cpu"), torch.float32)
    dense = load_model(tiny_llama, torch.device("cpu"), torch.float32)
    windows = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    real = prune.gram_matrices
    monkeypatch.setattr(prune, "gram_matrices", lambda layer, groups, inputs, *a: seen.append(inputs) or
                        real(layer, groups, inputs, *a))
    prune.calibrated_prune_(model, windows, "wanda", 0.5, None, torch.device("cpu"), batch=2)
    x0, kwargs = capture_block_inputs(dense, windows, torch.device("cpu"))
    pruned_block0 = decoder_layers(model)[0]
    dense_block0 = decoder_layers(dense)[0]
    want = prune.run_block(pruned_block0, x0, kwargs, "cpu", 4)
    assert torch.allclose(seen[1], want, atol=1e-5)
    assert not torch.allclose(seen[1], prune.run_block(dense_block0, x0, kwargs, "cpu", 4), atol=1e-3)


@pytest.mark.parametrize("method,flags", [("sparsegpt", ["--sparsity", "0.5"]), ("wanda", ["--nm", "2:4"])])
def test_calibrated_prune_stage(tmp_path, tiny_qwen, method, flags):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"id": i, "text": open("data/gsm8k/train.jsonl").readlines()[i]}) + "\n"
                             for i in range(30)))
    out = str(tmp_path / method)
    prune.main(["--model", tiny_qwen, "--method", method, "--calib", str(calib), "--n-samples", "4",
                "--seqlen", "32", *flags, "-o", out])
    report = json.load(open(f"{out}/prune_report.json"))
    assert report["pruned_sparsity"] == pytest.approx(0.5, abs=1e-9)
    for row in report["matrices"]:
        assert 0 < row["reconstruction_error"] < 1 and row["seconds"] >= 0 and row["tokens"] == 128
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert m.generate(torch.tensor([[5, 6]]), max_new_tokens=3, do_sample=False).shape == (1, 5)


@pytest.mark.parametrize("argv,msg", [
    (["--method", "wanda", "--sparsity", "0.5"], "needs --calib"),
    (["--sparsity", "0.5", "--nm", "2:4"], "exactly one of"),
    (["--nm", "4:2"], "0 < N < M"),
    (["--nm", "2-4"], "must look like N:M"),
    (["--nm", "2:4", "--scope", "global"], "cannot take --scope global"),
])
def test_contradictory_flags(tmp_path, tiny_llama, argv, msg):
    with pytest.raises(prune.CotpruneError, match=msg):
        prune.main(["--model", tiny_llama, "-o", str(tmp_path / "x"), *argv])
