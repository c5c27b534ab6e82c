"""Benchmark: recover.py's LoRA training speed and memory, and how much faster neuron-pruned models generate.

    python bench/bench_neurons.py                       # M0 of `make all`; 20 training steps; levels 0.15 0.25 0.35
    python bench/bench_neurons.py --model embedded --steps 10 --levels 0.25

Training: recover.py runs as its own process (so its peak RSS is its own) for --steps optimiser steps of 4 x 2
GSM8K examples, the study's settings; tokens/s counts prompt and target tokens and leaves out the first two steps
(allocator and oneDNN warm-up). When `peft` is importable, the same LoRA (rank, alpha, dropout, the seven
projections, same batches, same loss on target tokens) runs through peft in another process for comparison; it is
never a dependency.

Generation: the dense model and copies with MLP neurons sliced away (the kept counts of prune.py --multiple; which
neurons go does not change the speed) decode the same --n chat prompts to exactly --new-tokens tokens each (EOS
ignored, so every model does the same work), in bfloat16 with generate.py's decoder, at batch 1 (the paper's
Table 5; the first 4 prompts) and batch 16. Runs alternate between models and the best of --repeats counts. A
script that prints numbers, not a test.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common.chat import chat_prompt  # noqa: E402
from common.engine import decode, fast_linears  # noqa: E402
from common.files import read_jsonl  # noqa: E402
from common.models import load_model, load_tokenizer  # noqa: E402

DEFAULT_MODEL = "out/SmolLM2-135M-Instruct/models/s0"


def train_run(model, steps, use_peft):
    """(tokens/s after warm-up, peak RSS MiB) of one training process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r")
        if use_peft:
            cmd = [sys.executable, __file__, "--peft-worker", "--model", model, "--steps", str(steps), "--out", out]
        else:
            cmd = [sys.executable, os.path.join(ROOT, "recover.py"), "--model", model, "--max-steps", str(steps),
                   "--limit", "400", "--lr", "2e-4", "--save-every", "1000", "-o", out]
        subprocess.run(cmd, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
        rows = [json.loads(line) for line in open(os.path.join(out, "loss.jsonl"))][2:]
        peak = json.load(open(os.path.join(out, "recover_report.json")))["peak_memory_mb"]
    return sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows), peak


def peft_worker(model_name, steps, out):
    """recover.py's loop with peft's LoRA in place of ours; writes the same loss.jsonl and report fields."""
    import resource

    from peft import LoraConfig, get_peft_model

    import recover
    from common.engine import eos_token_ids
    tok = load_tokenizer(model_name)
    model = load_model(model_name, torch.device("cpu"), torch.bfloat16)
    examples = recover.build_examples(tok, read_jsonl(recover.DEFAULT_DATA, 400), "train",
                                      eos_token_ids(model, tok), 512)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=recover.PROJECTIONS.split(",")))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    inner = model.base_model.model
    inner.train()
    os.makedirs(out)
    rows = []
    for step, (_, micro) in enumerate(recover.step_plan(len(examples), 4, 2, 1, steps, 0)):
        batches = [recover.collate([examples[i] for i in mb], tok.pad_token_id) for mb in micro]
        n_target = sum(int(t[:, 1:].sum()) for _, _, t in batches)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for ids, attn, target in batches:
                (recover.lm_loss_sum(inner, ids, attn, target) / n_target).backward()
        opt.step()
        opt.zero_grad()
        rows.append({"step": step + 1, "tokens": sum(int(a.sum()) for _, a, _ in batches),
                     "seconds": time.perf_counter() - t0})
    with open(os.path.join(out, "loss.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(out, "recover_report.json"), "w") as f:
        json.dump({"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


def sliced_copy(model, keep):
    import copy

    import prune
    m = copy.deepcopy(model)
    L, d_ff = len(prune.decoder_layers(m)), m.config.intermediate_size
    if keep < d_ff:
        prune.slice_mlps_(m, prune.choose_kept(torch.zeros(L, d_ff), keep, "neuron-random", 0))
    return m


def gen_time(model, prompts, batch, new_tokens, pad):
    t = time.perf_counter()
    with fast_linears(model):
        for i in range(0, len(prompts), batch):
            decode(model, prompts[i: i + batch], new_tokens, {-1}, pad)  # no EOS: every row runs to the cap
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="dense model (folder, .gguf or 'embedded')")
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--levels", default="0.15 0.25 0.35", help="nominal pruning levels for generation")
    p.add_argument("--multiple", type=int, default=128, help="kept neurons per layer are a multiple of this")
    p.add_argument("--n", type=int, default=16, help="prompts")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per model; the best counts")
    p.add_argument("--skip-train", action="store_true", help="only the generation part")
    p.add_argument("--peft-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peft_worker:
        return peft_worker(args.model, args.steps, args.out)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}")
    if not args.skip_train:
        rate, peak = train_run(args.model, args.steps, False)
        print(f"recover.py LoRA r=8 on 7 projections, bf16, 4x2 examples/step: {rate:.0f} tokens/s, "
              f"peak RSS {peak:.0f} MiB")
        try:
            import peft  # noqa: F401
            rate_p, peak_p = train_run(args.model, args.steps, True)
            print(f"peft (same LoRA, autocast bf16): {rate_p:.0f} tokens/s, peak RSS {peak_p:.0f} MiB; "
                  f"ours/peft speed {rate / rate_p:.2f}x")
        except ImportError:
            print("peft is not installed: no comparison (pip install peft to add one)")

    import prune
    tok = load_tokenizer(args.model)
    dense = load_model(args.model, torch.device("cpu"), torch.bfloat16)
    qs = [r["question"] for r in read_jsonl(os.path.join(ROOT, "data", "gsm8k", "test.jsonl"), args.n)]
    prompts = [chat_prompt(tok, q)[1] for q in qs]
    d_ff = dense.config.intermediate_size
    models = {"dense": dense}
    for level in map(float, args.levels.split()):
        keep = prune.kept_count(d_ff, level, args.multiple)
        models[f"{level:.0%} ({1 - keep / d_ff:.1%} removed)"] = sliced_copy(dense, keep)
    for batch, some in ((1, prompts[:4]), (16, prompts)):  # batch 1 is slow: 4 prompts are enough to time it
        best = {name: float("inf") for name in models}
        for _ in range(args.repeats):
            for name, m in models.items():
                best[name] = min(best[name], gen_time(m, some, batch, args.new_tokens, tok.pad_token_id))
        tokens = len(some) * args.new_tokens
        print(f"\ngeneration, batch {batch}, {len(some)} prompts x {args.new_tokens} tokens, bf16:")
        for name, m in models.items():
            n_params = sum(p.numel() for p in m.parameters())
            print(f"  {name:24s} {n_params / 1e6:7.1f} M params  {tokens / best[name]:7.1f} tok/s  "
                  f"{best['dense'] / best[name]:.2f}x dense")


if __name__ == "__main__":
    main()
