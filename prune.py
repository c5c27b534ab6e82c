"""Prune a causal LM and save an ordinary Hugging Face model folder whose pruned weights are exact zeros.

    python prune.py --model embedded --sparsity 0 -o out/M0                  # dense baseline (converts the GGUF once)
    python prune.py --model out/M0 --method magnitude --sparsity 0.5 -o out/s0.5
    python prune.py --model Qwen/Qwen2.5-0.5B-Instruct --sparsity 0.3 --scope global -o out/q-g0.3

Magnitude (L1) pruning zeroes the weights of smallest |w| in every nn.Linear inside the decoder blocks. By default
the threshold is per matrix, so each matrix reaches the requested sparsity exactly (round(S * numel) zeros);
`--scope global` ranks all those weights together. Embeddings and lm_head are left alone unless
`--prune-embeddings` (for a model with tied embeddings that is one shared matrix). The folder holds
prune_report.json: the achieved sparsity per matrix and overall.
"""
import argparse
import os
import struct

import torch

from common import (CotpruneError, Timer, block_linears, describe_runtime, load_model, load_tokenizer, log,
                    model_source, param_counts, read_checkpoint_meta, resolve_device, run_cli, save_model_folder,
                    set_seed)

METHODS = ("magnitude",)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="hub id, model folder, .gguf file, or 'embedded'")
    p.add_argument("-o", "--out", required=True, help="output model folder (replaced atomically)")
    p.add_argument("--method", choices=METHODS, default="magnitude", help="pruning criterion")
    p.add_argument("--sparsity", type=float, required=True, help="share of weights to zero, in [0, 1); 0 = dense copy")
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="layer: threshold per matrix (exact sparsity each); global: one threshold for all")
    p.add_argument("--prune-embeddings", action=argparse.BooleanOptionalAction, default=False,
                   help="also prune the input embeddings and lm_head (one matrix when tied)")
    p.add_argument("--dtype", choices=("keep", "float32", "bfloat16", "float16"), default="keep",
                   help="storage dtype of the output; keep = the source checkpoint's")
    p.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
    p.add_argument("--seed", type=int, default=0, help="recorded for reproducibility (magnitude uses no randomness)")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="allow model code from the hub (off: only transformers' own architectures)")
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


def magnitude_prune_(mats, sparsity, scope):
    weights = [w for _, w in mats]
    if scope == "global":
        prune_global_(weights, n_to_prune(sum(w.numel() for w in weights), sparsity))
    else:
        for w in weights:
            prune_smallest_(w, n_to_prune(w.numel(), sparsity))


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


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not 0 <= args.sparsity < 1:
        raise CotpruneError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise CotpruneError("--out must differ from --model: the source would be overwritten")
    model_source(args.model)  # a missing model fails here, before any work
    device = resolve_device(args.device)
    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    set_seed(args.seed)
    runtime = describe_runtime(device, dtype or "keep", args.seed)
    tok = load_tokenizer(args.model, args.trust_remote_code)
    with Timer() as t_load:
        model = load_model(args.model, device, dtype, args.trust_remote_code)
    log(f"loaded {args.model} in {t_load.seconds:.1f}s")
    mats = target_matrices(model, args.prune_embeddings)
    with Timer() as t_prune:
        magnitude_prune_(mats, args.sparsity, args.scope)
    report = {"method": args.method, "sparsity": args.sparsity, "scope": args.scope,
              "prune_embeddings": args.prune_embeddings, "source_model": args.model, **runtime,
              "seconds": t_prune.seconds, **sparsity_report(mats, model)}
    src_meta = read_checkpoint_meta(args.model) if os.path.isdir(args.model) else {}
    base = src_meta.get("cotprune_args", {}).get("base_model", args.model)
    log(f"{args.method} {args.scope} sparsity {args.sparsity}: {report['pruned_zeros']:,} of "
        f"{report['pruned_numel']:,} weights in {len(mats)} matrices are zero ({report['pruned_sparsity']:.4f}), "
        f"{t_prune.seconds:.1f}s")
    save_model_folder(model, tok, args.out, stage="prune", source_model=args.model,
                      args={**vars(args), **runtime, "base_model": base}, extra_json={"prune_report.json": report})
    log(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
