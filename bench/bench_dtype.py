"""Benchmark: generate.py's decoding in float32 and in bfloat16 on the same prompts, and what --dtype auto picks.

    python bench/bench_dtype.py                          # embedded model, 8 CoT prompts, 32 new tokens, batch 8
    COTPRUNE_CPU_BF16=0 python bench/bench_dtype.py      # the choice forced to "no native bfloat16"

Both dtypes decode the same tokenised prompts greedily to the same cap with generate.py's decoder (fast_linears
included, as generate.py uses it); the runs alternate (float32, bfloat16, float32, ...) and the best time of each
counts, so a busy core hurts both alike. Prints tokens/s per dtype, the dtype `auto` resolves to and why, and
whether auto is within 10 % of the faster one. The cap is small because bfloat16 can be several times slower than
float32 on CPUs without native bfloat16. A script that prints numbers, not a test.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.engine import decode, eos_token_ids, fast_linears  # noqa: E402
from common.files import read_jsonl  # noqa: E402
from common.models import load_model, load_tokenizer  # noqa: E402
from common.runtime import cpu_flags, resolve_dtype  # noqa: E402
from generate import build_prompt  # noqa: E402

DEFAULT_MODEL = "out/SmolLM2-135M-Instruct/models/s0"


def run(model, prompts, max_new, eos, pad):
    """Seconds and new tokens of one greedy decode of all prompts in one batch."""
    with fast_linears(model) as packed:
        t0 = time.perf_counter()
        out = decode(model, prompts, max_new, eos, pad)
        return time.perf_counter() - t0, sum(len(ids) for ids, _ in out), packed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL if os.path.isdir(DEFAULT_MODEL) else "embedded",
                   help="model (default: the converted embedded model if `make all` made it)")
    p.add_argument("--style", default="cot", help="prompt protocol (generate.py --style)")
    p.add_argument("--n", type=int, default=8, help="prompts (GSM8K test), decoded as one batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best time of each counts")
    args = p.parse_args()
    device = torch.device("cpu")
    tok = load_tokenizer(args.model)
    base = load_model(args.model, device, torch.float32)
    models = {torch.float32: base, torch.bfloat16: load_model(args.model, device, torch.bfloat16)}
    eos, pad = eos_token_ids(base, tok), tok.pad_token_id
    qs = read_jsonl(os.path.join(os.path.dirname(__file__), "..", "data", "gsm8k", "test.jsonl"), args.n)
    prompts = [build_prompt(tok, args.style, q["question"])[1] for q in qs]
    flags = cpu_flags() or set()
    print(f"model {args.model}, {len(prompts)} {args.style} prompts in one batch, {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads; CPU bf16 flags: "
          f"{', '.join(sorted(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})) or 'none'}; "
          f"COTPRUNE_CPU_BF16={os.environ.get('COTPRUNE_CPU_BF16', '(unset)')}")
    best, tokens, packed = {}, {}, {}
    for _ in range(args.repeats):
        for dtype, model in models.items():
            seconds, tokens[dtype], packed[dtype] = run(model, prompts, args.max_new_tokens, eos, pad)
            best[dtype] = min(best.get(dtype, float("inf")), seconds)
    rate = {d: tokens[d] / best[d] for d in models}
    for d in models:
        print(f"{str(d).replace('torch.', ''):9s} {best[d]:7.2f} s  {rate[d]:8.1f} tokens/s  "
              f"packed oneDNN linears: {'yes' if packed[d] else 'no'}")
    auto, why = resolve_dtype("auto", device)
    fastest = max(rate, key=rate.get)
    share = rate[auto] / rate[fastest]
    print(f"auto = {str(auto).replace('torch.', '')} ({why}); fastest {str(fastest).replace('torch.', '')}; "
          f"auto runs at {share:.0%} of the fastest ({'within' if share >= 0.9 else 'NOT within'} 10 %)")


if __name__ == "__main__":
    main()
