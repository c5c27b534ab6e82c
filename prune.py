"""Prune a causal LM and save an ordinary Hugging Face model folder whose pruned weights are exact zeros.

    python prune.py --model embedded --sparsity 0 -o out/M0                  # dense baseline (converts the GGUF once)
    python prune.py --model out/M0 --method magnitude --sparsity 0.5 -o out/s0.5
    python prune.py --model Qwen/Qwen2.5-0.5B-Instruct --sparsity 0.3 --scope global -o out/q-g0.3
    python prune.py --model out/M0 --method sparsegpt --calib calib/traces.jsonl --sparsity 0.5 -o out/rac0.5
    python prune.py --model out/M0 --method wanda --calib calib/text.jsonl --nm 2:4 -o out/wanda-2of4
    python calibrate.py --model out/M0 --source selectivity -o out/sel.safetensors && \
        python prune.py --model out/M0 --method neuron-selective --sparsity 0.25 --scores out/sel.safetensors -o out/n25

Magnitude (L1) pruning zeroes the weights of smallest |w| in every nn.Linear inside the decoder blocks. By default
the threshold is per matrix, so each matrix reaches the requested sparsity exactly (round(S * numel) zeros);
`--scope global` ranks all those weights together. Embeddings and lm_head are left alone unless
`--prune-embeddings` (for a model with tied embeddings that is one shared matrix). `--nm N:M` zeroes the N
smallest of every M consecutive weights in each row instead.

Wanda and SparseGPT are calibrated: texts from --calib (JSONL with `text`, e.g. from calibrate.py) are packed into
--n-samples windows of --seqlen tokens (no padding), and the blocks are pruned in order, each on the outputs of the
already pruned blocks before it, one block on the compute device at a time. Linears that read the same input
(q/k/v, gate/up) share one Gram matrix G = sum x x^T and, for SparseGPT, one factorised Hessian H = 2G/n.

Neuron methods remove whole MLP neurons (task-specific neuron paper, §3 and Appendix B) by the selectivity S that
calibrate.py --source selectivity measured (--scores FILE, as the calibrated methods read --calib):
neuron-selective removes the lowest S in every layer, neuron-reverse the highest, neuron-random a seeded random set
of the same size (it needs no scores). The kept count per layer is the largest multiple of --multiple not above
(1 - S) * d_ff. The rows of gate/up and the columns of down are sliced away and config.intermediate_size shrinks,
so the folder is a smaller ordinary model; the scores and the kept indices go to neuron_scores.safetensors in it.

The folder holds prune_report.json: the achieved sparsity per matrix and overall, and for calibrated methods the
relative reconstruction error |WX - W'X|^2 / |WX|^2 on the calibration windows and the seconds per matrix.
"""
import argparse
import math
import os
import random
import struct

import torch
from tqdm import tqdm

from common.checkpoints import (check_output_folder, lineage, masked_matrices, save_model_folder, weights_fingerprint,
                                write_safetensors)
from common.cli import ArgumentParser, CotpruneError, count, log, non_negative, positive, run_cli
from common.files import read_jsonl, require_fields
from common.layers import (block_linears, capture_block_inputs, decoder_layers, gated_mlps, gram_matrices,
                           input_groups, run_block)
from common.models import load_model, load_tokenizer, model_source
from common.runtime import add_runtime_flags, Timer, describe_runtime, param_counts, resolve_device, resolve_dtype, set_seed

NEURON_METHODS = ("neuron-selective", "neuron-random", "neuron-reverse")
METHODS = ("magnitude", "wanda", "sparsegpt") + NEURON_METHODS
CALIBRATED = ("wanda", "sparsegpt")


def build_parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="hub id, model folder, .gguf file, or 'embedded'")
    p.add_argument("-o", "--out", required=True, help="output model folder (replaced atomically)")
    p.add_argument("--method", choices=METHODS, default="magnitude", help="pruning criterion")
    p.add_argument("--sparsity", type=float, default=None,
                   help="share of weights to zero, in [0, 1); 0 = dense copy (required unless --nm)")
    p.add_argument("--nm", default=None, help="semi-structured N:M, e.g. 2:4 (N zeros in every M consecutive weights)")
    p.add_argument("--calib", default=None, help="calibration JSONL with a `text` field (wanda, sparsegpt)")
    p.add_argument("--n-samples", type=positive, default=64, help="calibration windows")
    p.add_argument("--seqlen", type=positive, default=512, help="tokens per calibration window")
    p.add_argument("--calib-batch", type=positive, default=8, help="calibration windows per forward pass")
    p.add_argument("--calib-seed", type=count, default=0,
                   help="calibration draw: 0 = the texts in file order; k > 0 = shuffled by seed k first (another "
                        "draw of windows from the same file, for the method's run-to-run spread)")
    p.add_argument("--blocksize", type=positive, default=128, help="SparseGPT: columns per lazy-update block")
    p.add_argument("--percdamp", type=non_negative, default=0.01, help="SparseGPT: damping, as a share of mean(diag H)")
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="layer: threshold per matrix (exact sparsity each); global: one threshold for all")
    p.add_argument("--prune-embeddings", action=argparse.BooleanOptionalAction, default=False,
                   help="also prune the input embeddings and lm_head (one matrix when tied)")
    p.add_argument("--multiple", type=positive, default=128,
                   help="neuron methods: the kept neurons per layer are a multiple of this")
    p.add_argument("--scores", default=None,
                   help="neuron-selective, neuron-reverse: selectivity file from calibrate.py --source selectivity")
    p.add_argument("--save-dtype", choices=("keep", "float32", "bfloat16", "float16"), default="keep",
                   help="storage dtype of the output; keep = the source checkpoint's")
    add_runtime_flags(p, "compute dtype of the calibrated methods' forward passes (Gram matrices and Hessians are float32 whatever it is)", "neuron-random's draw (other methods use no randomness)")
    return p


def target_matrices(model, prune_embeddings):
    """[(name, weight)] to prune: decoder-block Linears, plus embeddings/lm_head on request (tied = once)."""
    mats = [(f"{n}.weight", m.weight) for n, m in block_linears(model)]
    if prune_embeddings:
        seen = {w.data_ptr() for _, w in mats}
        for name, mod in (("embed_tokens", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
            if mod is not None and mod.weight.data_ptr() not in seen:
                seen.add(mod.weight.data_ptr())
                full = next(n for n, m in model.named_modules() if m is mod)
                mats.append((f"{full}.weight", mod.weight))
    return mats


def n_to_prune(numel, sparsity):
    return int(round(sparsity * numel))


def zero_smallest_(weights, t, k):
    """Zero every |w| < t, then entries equal to t in model order until exactly k are zero in all."""
    below = [w.detach().abs().float() < t for w in weights]
    left = k - sum(int(b.sum()) for b in below)
    for w, b in zip(weights, below):
        w.data[b] = 0
        if left > 0:
            ties = (w.detach().abs().float() == t).flatten().nonzero().squeeze(1)[:left]
            w.data.view(-1)[ties] = 0
            left -= len(ties)


def prune_smallest_(W, k):
    """Zero exactly the k entries of smallest |W| in place; ties go to the lower flat index."""
    if k:
        zero_smallest_([W], float(W.detach().abs().flatten().float().kthvalue(k).values), k)


def _bits_to_float(bits):
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def global_threshold(weights, k):
    """Smallest float32 t with #{|w| <= t} >= k over all weights, by bisection on the float's bit pattern.

    Non-negative float32 values order like their bit patterns, so 31 streamed counting passes give the exact
    k-th smallest |w| without ever concatenating the model's weights into one tensor.
    """
    lo, hi = 0, 0x7F800000  # 0.0 .. +inf
    while lo < hi:
        mid = (lo + hi) // 2
        t = _bits_to_float(mid)
        if sum(int((w.detach().abs().float() <= t).sum()) for w in weights) >= k:
            hi = mid
        else:
            lo = mid + 1
    return _bits_to_float(lo)


def prune_global_(weights, k):
    """Zero exactly the k smallest |w| across all matrices."""
    if k:
        zero_smallest_(weights, global_threshold(weights, k), k)


def magnitude_prune_(mats, sparsity, scope, nm=None):
    weights = [w for _, w in mats]
    if nm:
        for w in weights:
            w.data[nm_mask(w.detach().abs().float(), *nm)] = 0
    elif scope == "global":
        prune_global_(weights, n_to_prune(sum(w.numel() for w in weights), sparsity))
    else:
        for w in weights:
            prune_smallest_(w, n_to_prune(w.numel(), sparsity))


def parse_nm(text):
    """'2:4' -> (2, 4); None stays None."""
    if text is None:
        return None
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise CotpruneError(f"--nm must look like N:M (e.g. 2:4), got {text!r}") from None
    if not 0 < n < m:
        raise CotpruneError(f"--nm N:M needs 0 < N < M, got {text}")
    return n, m


def nm_mask(score, n, m):
    """Boolean mask [rows, cols] of the n lowest scores in every group of m consecutive columns of each row."""
    rows, cols = score.shape
    if cols % m:
        raise CotpruneError(f"--nm {n}:{m} needs a column count divisible by {m}; a matrix has {cols}")
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def row_mask(score, sparsity):
    """Boolean mask of the round(sparsity * cols) lowest scores in each row (Wanda compares within a row)."""
    k = n_to_prune(score.shape[1], sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
    return mask


def wanda_prune_(W, norms, sparsity=0.0, nm=None):
    """Wanda (Sun et al. 2024): zero the lowest |W_ij| * |X_j|_2 per row (or per N:M group). W: [rows, cols]."""
    score = W.detach().abs().float() * norms[None, :].float()
    W.data[nm_mask(score, *nm) if nm else row_mask(score, sparsity)] = 0


def inverse_cholesky_upper(H, percdamp=0.01, max_percdamp=1.0):
    """(U, percdamp used): U the upper Cholesky factor of (H + d I)^-1, d = percdamp * mean(diag H).

    A failed factorisation is retried with the damping doubled, up to max_percdamp; past that it is an error,
    never a silent switch to the identity.
    """
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = torch.diag(H).mean()
    while True:
        L, info = torch.linalg.cholesky_ex(H + percdamp * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U, percdamp
        if percdamp >= max_percdamp:
            raise CotpruneError(f"the Hessian is not positive definite even with damping {percdamp} x mean(diag H)")
        percdamp = min(max_percdamp, 2 * percdamp if percdamp > 0 else 0.01)


def with_dead_inputs_fixed(H):
    """A float32 copy of H whose dead inputs (H_jj = 0, never active in calibration) have H_jj = 1."""
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    return H


def sparsegpt_prune(W, H, sparsity=0.0, nm=None, blocksize=128, percdamp=0.01, Hinv=None):
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): prune W and update the survivors by OBS.

    W: [rows, cols]; H = 2 X X^T / n: [cols, cols] over calibration inputs X. Unstructured: in each block of
    `blocksize` columns the mask takes the lowest w^2 / [Hinv]_jj^2 over all rows jointly, and block allotments
    add up to exactly round(sparsity * rows * cols) zeros; N:M: the n lowest of every m columns, per row. Hinv,
    when given, is the (upper Cholesky factor, damping) pair of an H shared with other matrices.
    Returns (pruned W in float32, the damping used).
    """
    W = W.detach().float().clone()
    rows, cols = W.shape
    W[:, torch.diag(H) == 0] = 0  # inputs that never fire: their weights cannot matter
    Hinv, damp = Hinv if Hinv is not None else inverse_cholesky_upper(with_dead_inputs_fixed(H), percdamp)
    if nm and blocksize % nm[1]:
        raise CotpruneError(f"--blocksize {blocksize} must be a multiple of M={nm[1]}")
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]  # [rows, b], [b, b]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not nm:
            k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            if k:
                score = (W1 ** 2 / d[None, :] ** 2).flatten()
                mask1.view(-1)[score.topk(k, largest=False).indices] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            if nm and i % nm[1] == 0:
                score = W1[:, i: i + nm[1]] ** 2 / d[None, i: i + nm[1]] ** 2
                mask1[:, i: i + nm[1]].scatter_(1, score.topk(nm[0], dim=1, largest=False).indices, True)
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # the OBS update of the rest of the block
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of all later columns
    return W, damp


def reconstruction_error(W0, W, G):
    """|W0 X - W X|^2 / |W0 X|^2 from the Gram matrix G = X X^T (no need to keep X)."""
    D = (W0.float() - W.float())
    return float((D @ G * D).sum() / (W0.float() @ G * W0.float()).sum())


# ----------------------------------------------------------------------------------- layer-sequential driver

def pack_windows(tokenizer, texts, n_samples, seqlen):
    """[n_samples, seqlen] token windows cut from the texts joined by EOS: every position is a real token."""
    stream, need = [], n_samples * seqlen
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise CotpruneError(f"the calibration texts hold {len(stream)} tokens, but --n-samples {n_samples} x "
                            f"--seqlen {seqlen} needs {need}: add texts or ask for fewer windows")
    return torch.tensor(stream[:need]).view(n_samples, seqlen)



def prune_matrix_(method, mod, G, n_tokens, sparsity, nm, blocksize, percdamp, shared):
    """Prune one Linear in place from its group's statistics; returns (relative error, damping or None)."""
    W0 = mod.weight.detach().clone()
    damp = None
    if method == "wanda":
        wanda_prune_(mod.weight, torch.diag(G).clamp(min=0).sqrt(), sparsity, nm)
    else:
        if "Hinv" not in shared:  # one factorisation serves every matrix of the group
            shared["Hinv"] = inverse_cholesky_upper(with_dead_inputs_fixed(2 * G / n_tokens), percdamp)
        W, damp = sparsegpt_prune(mod.weight, 2 * G / n_tokens, sparsity, nm, blocksize, percdamp, shared["Hinv"])
        mod.weight.data.copy_(W.to(mod.weight.dtype))
    return reconstruction_error(W0, mod.weight.detach(), G), damp


def calibrated_prune_(model, windows, method, sparsity, nm, device, blocksize=128, percdamp=0.01, batch=8):
    """Prune every decoder block in order, each calibrated on the outputs of the pruned blocks before it.

    Only the block being pruned sits on `device`; activations stay in CPU memory. Returns per-matrix rows.
    """
    layers = decoder_layers(model)
    home = next(layers[0].parameters()).device
    prefix = next(n for n, m in model.named_modules() if m is layers)
    inputs, kwargs = capture_block_inputs(model, windows, device)  # [n, T, d]
    rows = []
    for i, layer in enumerate(tqdm(layers, desc=f"{method} blocks", disable=None)):
        layer.to(device)
        groups = input_groups(layer, inputs[:1], kwargs, device)
        stats = gram_matrices(layer, groups, inputs, kwargs, device, batch)
        modules = dict(layer.named_modules())
        for group in groups:
            G, n_tokens = stats[group[0]]
            shared = {}
            for name in group:
                with Timer() as t:
                    err, damp = prune_matrix_(method, modules[name], G, n_tokens, sparsity, nm, blocksize,
                                              percdamp, shared)
                rows.append({"name": f"{prefix}.{i}.{name}.weight", "reconstruction_error": err,
                             "seconds": t.seconds, "percdamp": damp, "tokens": n_tokens})
        inputs = run_block(layer, inputs, kwargs, device, batch)  # what the next block sees: pruned outputs
        layer.to(home)
    return rows


# ------------------------------------------------------------------------------------ structural neuron pruning

def kept_count(d_ff, sparsity, multiple):
    """Neurons kept per layer: d_ff at sparsity 0, else the largest multiple of `multiple` not above
    (1 - sparsity) * d_ff, so at least the nominal share goes (the neuron paper's Table 2 ratios)."""
    if sparsity == 0:
        return d_ff
    keep = math.floor((1 - sparsity) * d_ff / multiple + 1e-9) * multiple
    if keep < multiple:
        raise CotpruneError(f"--sparsity {sparsity} with --multiple {multiple} would keep no neuron of {d_ff}")
    return keep


def choose_kept(S, keep, method, seed=0):
    """Kept neuron indices per layer [L, keep], ascending. S: selectivity [L, d_ff] (unused by random).

    selective drops the lowest S (distractor-leaning first), reverse the highest, random a seeded uniform draw."""
    L, d_ff = S.shape
    if method == "neuron-random":
        g = torch.Generator().manual_seed(seed)
        kept = torch.stack([torch.randperm(d_ff, generator=g)[:keep] for _ in range(L)])
    else:
        order = torch.sort(S, dim=1, descending=method == "neuron-selective", stable=True).indices
        kept = order[:, :keep]  # the `keep` highest S (selective) or lowest S (reverse) of each layer
    return kept.sort(dim=1).values


def _sliced(linear, idx, dim):
    """A new Linear holding only rows (dim 0) or columns (dim 1) `idx` of `linear`."""
    W = linear.weight.detach().index_select(dim, idx.to(linear.weight.device)).clone()
    bias = linear.bias is not None
    new = torch.nn.Linear(W.shape[1], W.shape[0], bias=bias, device=W.device, dtype=W.dtype)
    new.weight.data.copy_(W)
    if bias:
        b = linear.bias.detach()
        new.bias.data.copy_(b.index_select(0, idx.to(b.device)) if dim == 0 else b)
    return new


def slice_mlps_(model, kept):
    """Remove every neuron not in kept [L, keep]: rows of gate and up, columns of down (neuron paper eqs. 11-13)."""
    for layer, (gate, up, down), idx in zip(decoder_layers(model), gated_mlps(model), kept):
        mlp = layer.mlp
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = _sliced(gate, idx, 0), _sliced(up, idx, 0), _sliced(down, idx, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = kept.shape[1]
    model.config.intermediate_size = kept.shape[1]


def load_scores(path, model, shape):
    """{selectivity, mu_target, mu_distractor, sigma} [L, d_ff] from calibrate.py --source selectivity, refused if
    they were measured on another model (weight fingerprints differ) or have another shape."""
    from safetensors import safe_open
    meta = read_scores_meta(path)
    here = weights_fingerprint(model.state_dict().items())
    if meta.get("model_id") != here:
        raise CotpruneError(f"--scores {path} was measured on another model ({meta.get('model_id')} vs {here}): "
                            f"run calibrate.py --source selectivity on this one")
    with safe_open(path, framework="pt") as f:
        scores = {k: f.get_tensor(k) for k in ("selectivity", "mu_target", "mu_distractor", "sigma")}
    if tuple(scores["selectivity"].shape) != shape:
        raise CotpruneError(f"{path} holds scores of shape {tuple(scores['selectivity'].shape)}, the model has {shape}")
    return scores


def read_scores_meta(path):
    """The metadata of a selectivity file (checked before the model is loaded: it must be one)."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise CotpruneError(f"--scores {path} not found: make it with calibrate.py --source selectivity")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise CotpruneError(f"--scores {path} is not a readable safetensors file ({e})") from None
    if meta.get("cotprune_scores") != "1":
        raise CotpruneError(f"--scores {path} is not a selectivity file from calibrate.py --source selectivity")
    return meta


def neuron_report(S, kept, d_ff, multiple, sparsity):
    """Exact removal ratio and, per layer, target- vs distractor-leaning neurons (S > 0 / S < 0; paper Figure 6)."""
    layers = []
    if S is not None:
        removed = torch.ones_like(S, dtype=torch.bool).scatter_(1, kept, False)
        layers = [{"layer": i, "target_leaning": int((s > 0).sum()), "distractor_leaning": int((s < 0).sum()),
                   "removed_target_leaning": int(((s > 0) & r).sum()),
                   "removed_distractor_leaning": int(((s < 0) & r).sum())}
                  for i, (s, r) in enumerate(zip(S, removed))]
    return {"nominal_ratio": sparsity, "d_ff": d_ff, "kept": kept.shape[1], "removed": d_ff - kept.shape[1],
            "exact_ratio": 1 - kept.shape[1] / d_ff, "multiple": multiple, "layers": layers}


def neuron_prune_(model, method, sparsity, multiple, seed, scores_path):
    """Choose and slice away MLP neurons in place, by the selectivity in `scores_path` (random: a seeded draw);
    returns (report, {file name: writer})."""
    mlps = gated_mlps(model)
    d_ff = mlps[0][0].out_features
    if any(g.out_features != d_ff for g, _, _ in mlps):
        raise CotpruneError("neuron pruning keeps one intermediate size for all blocks; this model's differ")
    keep = kept_count(d_ff, sparsity, multiple)
    scores = load_scores(scores_path, model, (len(mlps), d_ff)) if method != "neuron-random" else None
    S = scores["selectivity"] if scores else torch.zeros(len(mlps), d_ff)
    kept = choose_kept(S, keep, method, seed)
    slice_mlps_(model, kept)
    tensors = {**(scores or {}), "kept_indices": kept}
    files = {"neuron_scores.safetensors": lambda path: write_safetensors(path, tensors, {"method": method})}
    return neuron_report(scores["selectivity"] if scores else None, kept, d_ff, multiple, sparsity), files


def sparsity_report(mats, model):
    rows = []
    for name, w in mats:
        zeros = w.numel() - int(w.count_nonzero())
        rows.append({"name": name, "shape": list(w.shape), "numel": w.numel(), "zeros": zeros,
                     "sparsity": zeros / w.numel()})
    numel, zeros = sum(r["numel"] for r in rows), sum(r["zeros"] for r in rows)
    total, nonzero, nbytes = param_counts(model)
    return {"matrices": rows, "pruned_numel": numel, "pruned_zeros": zeros, "pruned_sparsity": zeros / max(numel, 1),
            "model_params": total, "model_nonzero": nonzero, "model_sparsity": 1 - nonzero / total,
            "model_bytes": nbytes}


def check_args(args):
    """Reject contradictory flags before any work; returns (sparsity, nm)."""
    nm = parse_nm(args.nm)
    if (args.sparsity is None) == (nm is None):
        raise CotpruneError("give exactly one of --sparsity S and --nm N:M")
    if args.sparsity is not None and not 0 <= args.sparsity < 1:
        raise CotpruneError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.method in CALIBRATED and not args.calib:
        raise CotpruneError(f"--method {args.method} needs --calib FILE.jsonl (texts, e.g. from calibrate.py)")
    if args.method != "magnitude" and args.prune_embeddings:
        raise CotpruneError("--prune-embeddings works with --method magnitude only")
    if args.method in NEURON_METHODS and nm:
        raise CotpruneError(f"--method {args.method} removes whole neurons: give --sparsity, not --nm")
    if args.method in ("neuron-selective", "neuron-reverse") and not args.scores:
        raise CotpruneError(f"--method {args.method} needs --scores FILE (from calibrate.py --source selectivity)")
    if nm and args.scope == "global":
        raise CotpruneError("--nm is a per-row pattern; it cannot take --scope global")
    if min(args.n_samples, args.seqlen, args.calib_batch, args.blocksize) < 1:
        raise CotpruneError("--n-samples, --seqlen, --calib-batch and --blocksize must be positive")
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise CotpruneError("--out must differ from --model: the source would be overwritten")
    return (nm[0] / nm[1] if nm else args.sparsity), nm


def main(argv=None):
    args = build_parser().parse_args(argv)
    sparsity, nm = check_args(args)
    model_source(args.model)  # a missing model fails here, before any work
    check_output_folder(args.out, "prune", [args.model])
    texts = None
    device = resolve_device(args.device)
    dtype, why = resolve_dtype(args.dtype, device)  # the compute dtype of the calibrated methods
    if args.method in ("neuron-selective", "neuron-reverse"):
        read_scores_meta(args.scores)  # a missing or foreign file fails here, before any work
    if args.method in CALIBRATED:
        texts = read_jsonl(args.calib)
        require_fields(texts, ["text"], args.calib, strings=["text"])
    save_dtype = None if args.save_dtype == "keep" else getattr(torch, args.save_dtype)
    tok = load_tokenizer(args.model, args.trust_remote_code)
    windows = None
    if texts is not None:  # too little calibration text fails here, before the model is loaded
        order = list(range(len(texts)))
        if args.calib_seed:
            random.Random(args.calib_seed).shuffle(order)
        windows = pack_windows(tok, [texts[i]["text"] for i in order], args.n_samples, args.seqlen)
    set_seed(args.seed)
    runtime = describe_runtime(device, dtype, args.seed, why)
    with Timer() as t_load:  # calibrated methods bring one block at a time to the device
        model = load_model(args.model, "cpu" if texts else device, save_dtype, args.trust_remote_code)
    save_dtype = model.dtype  # keep = what the checkpoint holds
    if texts is not None:
        model.to(dtype)  # the blocks compute in the compute dtype; the weights are stored back in save_dtype
    log(f"loaded {args.model} in {t_load.seconds:.1f}s")
    base, base_id = lineage(args.model, model)  # before pruning: the identity of the model this chain starts from
    mats = target_matrices(model, args.prune_embeddings)
    calib_rows, neurons, extra_files = [], None, {}
    with Timer() as t_prune:
        if args.method in NEURON_METHODS:
            neurons, extra_files = neuron_prune_(model, args.method, sparsity, args.multiple, args.seed, args.scores)
            mats = target_matrices(model, False)  # the sliced matrices
        elif texts is None:
            magnitude_prune_(mats, sparsity, args.scope, nm)
        else:
            calib_rows = calibrated_prune_(model, windows, args.method, sparsity, nm, device, args.blocksize,
                                           args.percdamp, args.calib_batch)
    report = {"method": args.method, "sparsity": sparsity, "nm": args.nm, "scope": args.scope,
              "prune_embeddings": args.prune_embeddings, "source_model": args.model, **runtime,
              "save_dtype": str(save_dtype).replace("torch.", ""),
              "seconds": t_prune.seconds, **sparsity_report(mats, model)}
    # Masks travel along the chain: the source's (a neuron-sliced or --sparsity 0 copy of a pruned model keeps
    # them), plus the matrices this run zeroed.
    own = {r["name"].removesuffix(".weight") for r in report["matrices"]} if sparsity and not neurons else set()
    report["masked_matrices"] = sorted((masked_matrices(args.model) or set()) | own)
    if neurons:
        report["neurons"] = neurons
        log(f"{args.method}: kept {neurons['kept']} of {neurons['d_ff']} MLP neurons per layer (removed "
            f"{neurons['exact_ratio']:.2%}); {report['model_params']:,} parameters")
    if calib_rows:
        by_name = {r["name"]: r for r in calib_rows}
        for row in report["matrices"]:
            row.update({k: v for k, v in by_name[row["name"]].items() if k != "name"})
        report.update(calib=args.calib, calib_source="+".join(sorted({str(r.get("source", "text")) for r in texts})),
                      n_samples=args.n_samples, seqlen=args.seqlen, calib_seed=args.calib_seed)
    if not neurons:
        log(f"{args.method} {args.nm or args.scope} sparsity {sparsity}: {report['pruned_zeros']:,} of "
            f"{report['pruned_numel']:,} weights in {len(mats)} matrices are zero ({report['pruned_sparsity']:.4f}), "
            f"{t_prune.seconds:.1f}s")
    save_model_folder(model.to("cpu", save_dtype), tok, args.out, stage="prune", source_model=args.model,
                      args={**vars(args), **runtime, "base_model": base}, extra_json={"prune_report.json": report},
                      extra_files=extra_files, base_id=base_id)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
