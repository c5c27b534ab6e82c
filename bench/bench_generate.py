"""Benchmark: generate.py's decoding against a plain model.generate call, same prompts, batch size and dtype.

    python bench/bench_generate.py                                  # embedded model, 32 CoT prompts, batch 16
    python bench/bench_generate.py --style chat --max-new-tokens 256 --n 16

Both sides see the same tokenised prompts and batch size and decode greedily to the same cap. The baseline
batches prompts in input order and calls model.generate; ours is what generate.py does (longest-first batches,
finished rows dropped from the batch and KV cache, a KV cache written in place, bfloat16 weights packed once for
oneDNN). Runs alternate (baseline, ours, baseline, ours, ...) and the
best time of each counts, so a busy core hurts both alike. Prints tokens/s, the speed-up, and how many outputs are
token-for-token identical. A script that prints numbers, not a test.
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
from common.runtime import resolve_dtype  # noqa: E402
from generate import STYLES, build_prompt, stop_checker  # noqa: E402

DEFAULT_MODEL = "out/SmolLM2-135M-Instruct/models/s0"


def baseline(model, tok, prompts, batch_size, max_new, eos, pad, stops):
    """Plain HF: input-order batches, left padding, model.generate; returns each row's new ids as generated
    (a row that finished early is padded to the batch's length)."""
    outs = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i: i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = (ids != pad) | (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in batch])[:, None])
        outs += model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=max_new, do_sample=False,
                               eos_token_id=sorted(eos), pad_token_id=pad, stop_strings=stops or None,
                               tokenizer=tok)[:, width:].tolist()
    return outs


def same_output(ours_ids, base_row, eos, pad):
    """Equal tokens, and after them the baseline row holds nothing but padding."""
    n = len(ours_ids)
    return base_row[:n] == ours_ids and all(t == pad or t in eos for t in base_row[n:])


def ours(model, tok, prompts, batch_size, max_new, eos, pad, stops):
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outs = [None] * len(prompts)
    with fast_linears(model):  # packing the weights is part of the timed work
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            for j, (ids, _) in zip(idx, decode(model, [prompts[j] for j in idx], max_new, eos, pad,
                                               stop_checker(tok, stops))):
                outs[j] = ids
    return outs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL if os.path.isdir(DEFAULT_MODEL) else "embedded",
                   help="model (default: the converted embedded model if `make all` made it)")
    p.add_argument("--style", choices=sorted(STYLES), default="cot", help="prompt protocol")
    p.add_argument("--n", type=int, default=32, help="prompts (GSM8K test)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the style's")
    p.add_argument("--dtype", default="auto", help="compute dtype")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best time of each counts")
    args = p.parse_args()
    device = torch.device("cpu")
    dtype, _ = resolve_dtype(args.dtype, device)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, device, dtype)
    eos, pad = eos_token_ids(model, tok), tok.pad_token_id
    qs = read_jsonl(os.path.join(os.path.dirname(__file__), "..", "data", "gsm8k", "test.jsonl"), args.n)
    prompts = [build_prompt(tok, args.style, q["question"])[1] for q in qs]
    max_new = args.max_new_tokens or STYLES[args.style]["max_new_tokens"]
    stops = STYLES[args.style]["stop"]
    print(f"model {args.model}, {len(prompts)} {args.style} prompts, batch {args.batch_size}, "
          f"max {max_new} new tokens, stop strings {stops}, {str(dtype).replace('torch.', '')}, "
          f"{torch.get_num_threads()} threads")
    best = {"model.generate": float("inf"), "cotprune decode": float("inf")}
    outs = {}
    for _ in range(args.repeats):
        for name, fn in (("model.generate", baseline), ("cotprune decode", ours)):
            t0 = time.perf_counter()
            outs[name] = fn(model, tok, prompts, args.batch_size, max_new, eos, pad, stops)
            best[name] = min(best[name], time.perf_counter() - t0)
    tokens = sum(map(len, outs["cotprune decode"]))  # the tokens both sides had to produce
    for name, seconds in best.items():
        print(f"{name:16s} {seconds:7.2f} s  {tokens / seconds:7.1f} tokens/s")
    same = [same_output(a, b, eos, pad) for a, b in zip(outs["cotprune decode"], outs["model.generate"])]
    print(f"speed-up {best['model.generate'] / best['cotprune decode']:.2f}x on {tokens} tokens; "
          f"identical outputs {sum(same)}/{len(prompts)}")
    for i in [i for i, ok in enumerate(same) if not ok][:3]:
        a, b = outs["cotprune decode"][i], outs["model.generate"][i]
        at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"  prompt {i} differs from token {at} (ours {len(a)} tokens)")


if __name__ == "__main__":
    main()
