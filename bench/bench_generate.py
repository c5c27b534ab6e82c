"""Benchmark: the generation engine against model.generate, and against the machine's matmul bound.

    python bench/bench_generate.py                                   # chat at 512 and cot at 150, batch 16 and 64
    python bench/bench_generate.py --styles cot --batch-sizes 16 --dtypes float32
    python bench/bench_generate.py --styles cot --dtypes float32 --same-linears --prefill-alone
    python bench/bench_generate.py --profile                         # where one decode step's time goes

For each dtype, style and batch size B: the same 2·B GSM8K test prompts (`--n` to change), greedy, the style's cap
and stop strings. The baseline is model.generate on input-order batches of B (left-padded), with whichever of its
caches ("dynamic", "static") decodes these prompts faster, picked on a short probe in the same run. Ours is what
generate.py does: Engine with B slots (continuous batching, a static per-slot cache, packed prefill, packed oneDNN
linears where its probe allows them). The sides alternate (baseline, ours, baseline, ours: `--repeats`) and the
best time of each counts, so a busy core hurts both alike. `--same-linears` adds model.generate on the engine's
packed linears (the same kernels, so identical outputs are expected by construction in float32); `--prefill-alone`
adds the engine with every prompt prefilled on its own; `--other-attention` the engine with the decode attention
generate.py does not choose (batched in float32, slot by slot in bfloat16: what exactness costs); `--sdpa-decode`
the engine with torch's sdpa as its batched decode attention where generate.py runs the batched matmuls (bfloat16
on the CPU: what they buy); `--modules-step` the engine with its decode steps through the model's own decoder
modules instead of the written-out step of common/decodestep.py (what that buys).

The bound: one decode step at batch B cannot beat the time of the model's own Linear layers (lm_head included) on a
[B, in] input, measured here in the same dtype and with the same packing after every side (the best counts), so
B / that time is the tokens/s the matmuls alone allow; ours is printed as a share of it. Identical outputs: rows
whose tokens equal each other side's (in float32 all should; bfloat16 is not batch-invariant, see
docs/methods.md#determinism). A script that prints numbers, not a test.
"""
import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.engine import Engine, eos_token_ids, fast_linears  # noqa: E402
from common.files import read_jsonl  # noqa: E402
from common.models import load_model, load_tokenizer  # noqa: E402
from common.runtime import resolve_dtype  # noqa: E402
from generate import STYLES, build_prompt, stop_checker  # noqa: E402

DEFAULT_MODEL = "out/SmolLM2-135M-Instruct/models/s0"


def baseline(model, tok, prompts, batch_size, max_new, eos, pad, stops, cache):
    """model.generate on input-order batches; each row's new ids up to its end (EOS or stop string) or the cap."""
    outs = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i: i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in batch])[:, None]
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        rows = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=max_new, do_sample=False,
                              eos_token_id=sorted(eos), pad_token_id=pad, stop_strings=stops or None,
                              tokenizer=tok, **extra)[:, width:].tolist()
        for row in rows:
            end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            outs.append(row[:end])
    return outs


def ours(model, tok, prompts, batch_size, max_new, eos, stops, stats, pack_prompts=True, exact=None, bmm=None,
         written_out=True):
    """Engine, as generate.py drives it: returns each row's new ids (pack_prompts False: every prompt prefilled
    alone, as before packed prefill; exact False / True: decode attention batched / slot by slot, bmm False: batched
    through sdpa, not the batched matmuls; None: as generate.py chooses; written_out False: decode steps through the
    model's own modules, not common/decodestep.py)."""
    stop = stop_checker(tok, stops)
    eng = Engine(model, batch_size, max(map(len, prompts)) + max_new + 1)
    eng.pack_prompts = eng.pack_prompts and pack_prompts
    if exact is not None:
        eng.exact_attention = exact and eng.sdpa
        eng.bmm_attention = eng.bmm_attention and not eng.exact_attention
    if bmm is not None:
        eng.bmm_attention = bmm and not eng.exact_attention
    if not written_out:
        eng.stepper = None
    outs = [None] * len(prompts)
    with fast_linears(model) as packed:  # packing the weights is part of the timed work
        for k, ids, _, _ in eng.generate([(k, p, None) for k, p in enumerate(prompts)], max_new, eos, stop):
            outs[k] = ids
    stats.update(eng.stats, packed=packed, exact=eng.exact_attention, resizes=eng.cache.resizes,
                 attention="slot by slot" if eng.exact_attention else "batched (bmm)" if eng.bmm_attention
                 else "batched", step="written out" if eng.stepper is not None else "modules",
                 mean_busy_slots=eng.stats["busy_slot_steps"] / max(eng.stats["decode_steps"], 1))
    return outs


def linear_bound(model, batch_size):
    """Tokens/s the model's Linear layers alone allow at this batch: B / (one pass over every Linear, [B, in])."""
    mods = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(batch_size, m.in_features, dtype=m.weight.dtype) for m in mods}
    with torch.inference_mode(), fast_linears(model):
        for m in mods:
            m(xs[m.in_features])  # warm-up (oneDNN builds its kernels)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for m in mods:
                m(xs[m.in_features])
            best = min(best, time.perf_counter() - t0)
    flops = 2 * batch_size * sum(m.in_features * m.out_features for m in mods)
    return batch_size / best, flops / best / 1e9


def same_output(a, b, stops, tok):
    """Equal tokens; where the baseline kept going past a stop string that cut ours, equal up to ours' end."""
    return a == b or (bool(stops) and b[: len(a)] == a)


def profile_step(model, prompts, batch_size, steps=20, bmm=None):
    """torch.profiler over `steps` decode steps of a full batch (every slot prefilled first): time by operator
    (bmm False: the batched decode attention through sdpa, not the batched matmuls)."""
    from torch.profiler import ProfilerActivity, profile
    prompts = prompts[:batch_size]
    eng = Engine(model, batch_size, max(map(len, prompts)) + steps + 1)
    if bmm is not None:
        eng.bmm_attention = bmm and not eng.exact_attention
    with fast_linears(model), torch.inference_mode():
        for s, ids in enumerate(prompts):
            eng.prefill(s, ids)
        pos = torch.tensor([len(p) for p in prompts])
        tok = torch.zeros(batch_size, dtype=torch.long)
        eng.cache.reserve(eng.cache.capacity)  # every position the steps need: no resize inside the window
        eng._step(tok, pos, int(pos.max()) + 1)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof, named_decode_bmm():
            t0 = time.perf_counter()
            for k in range(1, steps + 1):
                tok = eng._step(tok, pos + k, int(pos.max()) + k + 1).argmax(-1)
            wall = time.perf_counter() - t0
    # Outermost ops only (aten::linear contains the aten::mm it calls): each time counted once.
    groups = {"matmuls (Linear layers)": ("aten::linear", "mkldnn::_linear_pointwise"),
              "attention (sdpa or bmm)": ("aten::scaled_dot_product_attention", "cotprune_decode_bmm"),
              "cache writes": ("aten::index_copy_", "aten::index_put_"), "argmax": ("aten::argmax",)}
    totals = {g: 0.0 for g in groups}
    for ev in prof.key_averages():
        for g, keys in groups.items():
            if ev.key in keys:
                totals[g] += ev.cpu_time_total / 1e6  # inclusive: the op with what it calls
    attention = "slot by slot" if eng.exact_attention else "batched (bmm)" if eng.bmm_attention else "batched"
    print(f"profile: {batch_size} slots, {steps} decode steps in {wall:.2f} s ({steps * batch_size / wall:.0f} "
          f"tokens/s), decode attention {attention}")
    for g, t in totals.items():
        print(f"  {g:28s} {t:6.2f} s  {t / wall:4.0%}")
    rest = wall - sum(totals.values())
    print(f"  {'the rest (norms, rotary, activations, Python)':28s} {rest:6.2f} s  {rest / wall:4.0%}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL if os.path.isdir(DEFAULT_MODEL) else "embedded",
                   help="model (default: the converted embedded model if `make all` made it)")
    p.add_argument("--styles", default="chat,cot", help="prompt protocols, comma-separated (caps: chat 512, cot 150)")
    p.add_argument("--batch-sizes", default="16,64", help="nominal batch sizes, comma-separated")
    p.add_argument("--dtypes", default="auto,float32", help="compute dtypes, comma-separated")
    p.add_argument("--n", type=int, default=0, help="prompts per case; 0 = twice the batch size")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds; the best time of each counts")
    p.add_argument("--same-linears", action="store_true",
                   help="also run model.generate on the engine's packed linears, for the identical-outputs check")
    p.add_argument("--prefill-alone", action="store_true",
                   help="also run the engine with every prompt prefilled alone (what packed prefill saves)")
    p.add_argument("--other-attention", action="store_true",
                   help="also run the engine with the other decode attention (batched where generate.py would run "
                        "it slot by slot, and the reverse)")
    p.add_argument("--sdpa-decode", action="store_true",
                   help="also run the engine with sdpa as its batched decode attention where generate.py runs the "
                        "batched matmuls (what they buy)")
    p.add_argument("--modules-step", action="store_true",
                   help="also run the engine with its decode steps through the model's own decoder modules instead "
                        "of the written-out step (what it buys)")
    p.add_argument("--profile", action="store_true",
                   help="only profile one decode step (chat, largest batch; with --sdpa-decode, both attentions)")
    args = p.parse_args()
    device = torch.device("cpu")
    tok = load_tokenizer(args.model)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    questions = read_jsonl(os.path.join(os.path.dirname(__file__), "..", "data", "gsm8k", "test.jsonl"),
                           args.n or 2 * max(batch_sizes))
    print(f"model {args.model}, {torch.get_num_threads()} threads")
    for dname in args.dtypes.split(","):
        dtype, why = resolve_dtype(dname, device)
        model = load_model(args.model, device, dtype)
        eos, pad = eos_token_ids(model, tok), tok.pad_token_id
        if args.profile:
            prompts = [build_prompt(tok, "chat", q["question"])[1] for q in questions]
            profile_step(model, prompts, max(batch_sizes))
            if args.sdpa_decode:
                profile_step(model, prompts, max(batch_sizes), bmm=False)
            continue
        for style in args.styles.split(","):
            prompts = [build_prompt(tok, style, q["question"])[1] for q in questions]
            max_new, stops = STYLES[style]["max_new_tokens"], STYLES[style]["stop"]
            for B in batch_sizes:
                case = prompts[: args.n or 2 * B]
                probe = {c: time_it(lambda c=c: baseline(model, tok, case[:B], B, 16, eos, pad, stops, c))
                         for c in ("dynamic", "static")}
                cache = min(probe, key=probe.get)
                best, outs, stats, alone_stats, other_stats, sdpa_stats, mod_stats = {}, {}, {}, {}, {}, {}, {}
                sides = [("model.generate", lambda: baseline(model, tok, case, B, max_new, eos, pad, stops, cache)),
                         ("engine", lambda: ours(model, tok, case, B, max_new, eos, stops, stats))]
                if args.prefill_alone:  # the engine with every prompt prefilled on its own: what packing saves
                    sides.append(("engine, prefill alone", lambda: ours(model, tok, case, B, max_new, eos, stops,
                                                                         alone_stats, pack_prompts=False)))
                if args.other_attention:  # the engine with the decode attention generate.py does not choose
                    sides.append(("engine, other attention", lambda: ours(
                        model, tok, case, B, max_new, eos, stops, other_stats, exact=not stats["exact"])))
                if args.sdpa_decode:  # the engine's batched decode attention through sdpa, not the matmuls
                    sides.append(("engine, sdpa decode", lambda: ours(model, tok, case, B, max_new, eos, stops,
                                                                       sdpa_stats, bmm=False)))
                if args.modules_step:  # decode steps through the model's modules: what the written-out step buys
                    sides.append(("engine, modules step", lambda: ours(model, tok, case, B, max_new, eos, stops,
                                                                        mod_stats, written_out=False)))
                if args.same_linears:  # model.generate on the packed linears: the same kernels, so the same bits
                    sides.append(("packed model.generate", lambda: packed_baseline(model, tok, case, B, max_new, eos,
                                                                                    pad, stops, cache)))
                bound = gflops = 0.0
                for _ in range(args.repeats):
                    for name, fn in sides:
                        t0 = time.perf_counter()
                        outs[name] = fn()
                        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
                        # the bound after every side, the best counting: once at the end it swung 1.6x between
                        # two cases at the same batch size in one run (49 and 78 GFLOP/s)
                        bound, gflops = max((bound, gflops), linear_bound(model, B))
                rate = {k: sum(map(len, outs[k])) / v for k, v in best.items()}
                same = {k: sum(same_output(a, b, stops, tok) for a, b in zip(outs["engine"], outs[k]))
                        for k in outs if k != "engine"}
                print(f"{str(dtype).replace('torch.', ''):8s} {style:4s} cap {max_new:3d} B {B:2d} n {len(case):3d}: "
                      f"model.generate ({cache} cache) {rate['model.generate']:6.1f} tok/s, engine "
                      f"{rate['engine']:6.1f} tok/s = {rate['engine'] / rate['model.generate']:.2f}x; matmul bound "
                      f"{bound:6.1f} tok/s ({gflops:.0f} GFLOP/s), engine at {rate['engine'] / bound:.0%} of it; "
                      f"busy slots {stats['mean_busy_slots']:.1f}, prefill "
                      f"{stats['prefill_seconds'] / best['engine']:.0%} of its time; packed linears "
                      f"{stats.get('packed')}; decode step {stats['step']}; decode attention {stats['attention']} "
                      f"({stats['resizes']} cache resizes); "
                      f"identical outputs to "
                      + ", ".join(f"{k} {v}/{len(case)}" for k, v in same.items())
                      + (f"; packed model.generate {rate['packed model.generate']:.1f} tok/s"
                         if "packed model.generate" in rate else "")
                      + (f"; engine with each prompt prefilled alone {rate['engine, prefill alone']:.1f} tok/s, "
                         f"prefill {alone_stats['prefill_seconds']:.1f} s against {stats['prefill_seconds']:.1f} s"
                         if alone_stats else "")
                      + (f"; engine with decode attention {other_stats['attention']} "
                         f"{rate['engine, other attention']:.1f} tok/s" if other_stats else "")
                      + (f"; engine with decode attention {sdpa_stats['attention']} "
                         f"{rate['engine, sdpa decode']:.1f} tok/s" if sdpa_stats else "")
                      + (f"; engine with the modules' decode step {rate['engine, modules step']:.1f} tok/s "
                         f"(written out {rate['engine'] / rate['engine, modules step']:.2f}x)" if mod_stats else ""),
                      flush=True)


@contextlib.contextmanager
def named_decode_bmm():
    """Within the block the engine's batched-matmul decode attention shows in the profile as one named range."""
    import common.attention as attention
    inner = attention._decode_bmm

    def named(*args, **kwargs):
        with torch.profiler.record_function("cotprune_decode_bmm"):
            return inner(*args, **kwargs)
    attention._decode_bmm = named
    try:
        yield
    finally:
        attention._decode_bmm = inner


def packed_baseline(model, tok, prompts, batch_size, max_new, eos, pad, stops, cache):
    with fast_linears(model):
        return baseline(model, tok, prompts, batch_size, max_new, eos, pad, stops, cache)


def time_it(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
