"""Benchmark: SparseGPT on a random model of Qwen2.5-0.5B's shape, on the CPU, against a FLOP floor.

    python bench/bench_sparsegpt.py                         # 24 layers, 64 windows x 512 tokens, bfloat16
    python bench/bench_sparsegpt.py --layers 4 --n-samples 16   # a quicker look

The model (hidden 896, intermediate 4864, 14 heads, 2 KV heads, vocab 151936) is built from a config with random
weights; the windows are random tokens. prune.py's layer-sequential driver prunes it to 50%. The floor is the work
SparseGPT itself must do, divided by the float32 matmul rate measured here, now: the Gram matrices (2 T n^2 per
input group), the factorisations (about 2 n^3 per group: Cholesky, inverse, Cholesky) and the weight updates
(about 2 rows cols (cols + blocksize) per matrix). The two passes of each block over the windows (statistics,
then the pruned outputs) are extra work the floor leaves out. A script that prints numbers, not a test.
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prune  # noqa: E402


def matmul_rate(n=4096, k=2048, repeats=3):
    """float32 FLOP/s of X^T X, the shape of a Gram-matrix update."""
    X = torch.randn(k, n)
    X.T @ X
    t = time.perf_counter()
    for _ in range(repeats):
        X.T @ X
    return 2 * k * n * n * repeats / (time.perf_counter() - t)


def floor_flops(model, tokens, blocksize):
    """Gram, factorisation and update FLOPs of SparseGPT on every decoder block of `model`."""
    total = 0
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        groups = [(a.q_proj.in_features, [a.q_proj, a.k_proj, a.v_proj]), (a.o_proj.in_features, [a.o_proj]),
                  (m.gate_proj.in_features, [m.gate_proj, m.up_proj]), (m.down_proj.in_features, [m.down_proj])]
        for n, mods in groups:
            total += 2 * tokens * n * n + 2 * n ** 3
            total += sum(2 * mod.out_features * n * (n + blocksize) for mod in mods)
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24, help="decoder blocks (Qwen2.5-0.5B has 24)")
    p.add_argument("--n-samples", type=int, default=64, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--dtype", default="bfloat16", help="model dtype (Qwen2.5 ships bfloat16)")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers,
                      num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, args.dtype)).eval()
    windows = torch.randint(0, cfg.vocab_size, (args.n_samples, args.seqlen))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rate = matmul_rate()
    t = time.perf_counter()
    rows = prune.calibrated_prune_(model, windows, "sparsegpt", 0.5, None, torch.device("cpu"), args.blocksize)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    flops = floor_flops(model, args.n_samples * args.seqlen, args.blocksize)
    floor = flops / rate
    print(f"Qwen2.5-0.5B shape, {args.layers} layers, {args.dtype}, {args.n_samples} x {args.seqlen} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"float32 matmul rate here: {rate / 1e9:.1f} GFLOP/s; SparseGPT work {flops / 1e12:.2f} TFLOP "
          f"-> floor {floor:.1f} s")
    print(f"pruned {len(rows)} matrices in {seconds:.1f} s = {seconds / floor:.2f}x the floor "
          f"(target <= 2x); peak RSS {peak:.0f} MiB (after building the model {rss0:.0f} MiB)")
    print(f"mean relative reconstruction error {sum(r['reconstruction_error'] for r in rows) / len(rows):.4f}")


if __name__ == "__main__":
    main()
