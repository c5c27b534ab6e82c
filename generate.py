"""Generate answers to GSM8K-style questions with a model, in batches, resumably.

    python generate.py --model out/M0 --style cot data/gsm8k/test.jsonl --limit 50 -o gen/cot-M0.jsonl
    python generate.py --model embedded --style chat --limit 5 data/gsm8k/test.jsonl | python score.py - > scored.jsonl
    head -3 data/gsm8k/test.jsonl | python generate.py --model embedded --style direct - -o -
    python generate.py --model out/s0.5 --perplexity calib/heldout-traces.jsonl -o ppl/s0.5.jsonl

Input records need `id` and `question`; every other field (the gold `answer`, say) passes through. Each output
record adds: style, model, prompt, output, prompt_tokens, new_tokens (the EOS included), stop ('eos', 'length',
or 'stop' for a stop string or, with --stop-boxed, a closed \\boxed{}), seconds (the batch's wall time shared
evenly among its rows). Prompts run longest-first in batches, so rows of similar length pad little. An
interrupted run keeps what it finished in OUT.part; the same command again continues there. A summary (wall
time, tokens/s, peak memory, non-zero parameters) goes to OUT.summary.json, or to --summary.

--perplexity generates nothing: it teacher-forces the `trace` of each input record after its `prompt` (records from
calibrate.py --source traces) and writes each record's summed negative log-likelihood `nll` and `trace_tokens`;
the summary gives the perplexity exp(sum nll / sum trace_tokens).
"""
import argparse
import math
import os
import re

import torch
from tqdm import tqdm

from common.chat import chat_prompt
from common.cli import ArgumentParser, CotpruneError, count, log, non_negative, positive, run_cli, share
from common.engine import decode, eos_token_ids, fast_linears
from common.files import JsonlAppender, check_output_file, read_jsonl, require_fields, write_json, write_jsonl
from common.models import load_model, load_tokenizer, model_source, resolved_model
from common.runtime import (CONTENDED, CpuMeter, Timer, add_runtime_flags, describe_runtime, param_counts,
                            peak_memory_mb, resolve_device, resolve_dtype, runtime_info, set_seed)

STYLES = {  # the paper's two protocols (asand §3) and the chat template the RAC and neuron studies use
    "cot": {"template": "Solve this step by step: Question: {q} Step 1:", "max_new_tokens": 150,
            "stop": ["\nQuestion:"]},
    "direct": {"template": "Question: {q} Answer:", "max_new_tokens": 30, "stop": ["\nQuestion:"]},
    "chat": {"template": None, "max_new_tokens": 512, "stop": []},
}


BOXED_RE = re.compile(r"\\boxed\{")


def build_parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", nargs="?", default="-", help="JSONL of {id, question, ...}; - = stdin")
    p.add_argument("--model", required=True, help="hub id, model folder, .gguf file, or 'embedded'")
    p.add_argument("-o", "--out", default="-", help="output JSONL; - = stdout (no resume)")
    p.add_argument("--style", choices=sorted(STYLES), default="cot", help="prompt protocol")
    p.add_argument("--max-new-tokens", type=count, default=0, help="generation cap; 0 = the style's (150/30/512)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string, repeatable (cut from the output); default: the style's ('\\nQuestion:' "
                        "for cot and direct, none for chat)")
    p.add_argument("--stop-strings", action=argparse.BooleanOptionalAction, default=True,
                   help="cut at stop strings (--stop, else the style's); --no-stop-strings: none at all")
    p.add_argument("--stop-boxed", action=argparse.BooleanOptionalAction, default=False,
                   help="stop once the output holds a complete \\boxed{...} answer (the neuron paper's mitigation "
                        "of Type 1 traps)")
    p.add_argument("--batch-size", type=positive, default=16, help="prompts per forward pass")
    p.add_argument("--limit", type=count, default=0, help="first N input records; 0 = all")
    p.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=count, default=0, help="sampling: keep the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=share, default=1.0, help="sampling: nucleus mass, in (0, 1]")
    p.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=False,
                   help="score the `trace` of each record after its `prompt` (teacher-forced, no generation)")
    p.add_argument("--summary", default=None, help="summary JSON path; default OUT.summary.json (none for stdout)")
    add_runtime_flags(p, 'compute dtype', 'sampling seed')
    return p


def build_prompt(tokenizer, style, question):
    """(prompt text, token ids). The chat style's template already holds the special tokens."""
    if style == "chat":
        return chat_prompt(tokenizer, question)
    text = STYLES[style]["template"].format(q=question)
    return text, tokenizer(text)["input_ids"]


def boxed_complete(text):
    """Does the text hold \\boxed{...} with its braces closed (neuron paper, Appendix F.2)?"""
    for m in BOXED_RE.finditer(text):
        depth = 1
        for ch in text[m.end():]:
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return True
    return False


def stop_checker(tokenizer, stops, boxed=False):
    """stop_fn for common.decode: is a stop string in the last few decoded tokens of a row, or (boxed) has the row
    just closed a \\boxed{...}? The whole row is decoded only when a '}' has just appeared."""
    if not stops and not boxed:
        return None
    window = 2 + max([len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stops] + [1])

    def check(row, ids):
        tail = tokenizer.decode(ids[-window:])
        return any(s in tail for s in stops) or (boxed and "}" in tail and boxed_complete(tokenizer.decode(ids)))
    return check


def finish_text(tokenizer, ids, eos_ids, stops):
    """Decoded output without the EOS, cut at the first stop string."""
    text = tokenizer.decode([t for t in ids if t not in eos_ids], skip_special_tokens=True)
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def plan_batches(problems, prompts, batch_size, done):
    """[(plan index, batch)] of the problems not yet done, longest prompt first so that a batch pads little.

    The plan covers every problem and only then skips finished batches, so a resumed run batches exactly as an
    uninterrupted one: in bfloat16 a row's tokens can depend on the rows it shares a batch with. Sampling
    reseeds per plan index for the same reason.
    """
    ordered = sorted(problems, key=lambda p: -len(prompts[p["id"]][1]))
    plan = [ordered[i: i + batch_size] for i in range(0, len(ordered), batch_size)]
    return [(k, [p for p in batch if p["id"] not in done]) for k, batch in enumerate(plan)
            if any(p["id"] not in done for p in batch)]


def trace_nll(model, prompt_ids, trace_ids):
    """Summed negative log-likelihood (nats) of trace_ids following prompt_ids, one forward pass."""
    ids = torch.tensor([prompt_ids + trace_ids], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, logits_to_keep=len(trace_ids) + 1).logits[0, :-1].float()  # [T, V]
    return float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids):], reduction="sum"))


def trace_perplexities(model, tokenizer, records, model_name):
    """[{id, model, nll, trace_tokens}]: each record's `trace` scored teacher-forced after its `prompt`."""
    out = []
    with fast_linears(model):
        for r in tqdm(records, desc="perplexity", unit="trace", disable=None):
            p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            t = tokenizer(r["trace"], add_special_tokens=False)["input_ids"]
            if t:
                out.append({"id": r["id"], "model": model_name, "nll": trace_nll(model, p, t), "trace_tokens": len(t)})
    return out


def perplexity_summary(rows, model_name, runtime):
    nll, n = sum(r["nll"] for r in rows), sum(r["trace_tokens"] for r in rows)
    return {"stage": "perplexity", "model": model_name, "style": "traces", "n": len(rows), **runtime,
            "trace_tokens": n, "nll_per_token": nll / max(n, 1), "perplexity": math.exp(nll / max(n, 1))}


def summarize(records, model_name, style, runtime, counts, batch_size, max_new_tokens, peak_mb):
    seconds = sum(r["seconds"] for r in records)
    new_tokens = sum(r["new_tokens"] for r in records)
    total, nonzero, nbytes = counts
    return {"stage": "generate", "model": model_name, "style": style, "n": len(records), **runtime,
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "seconds": seconds,
            "seconds_per_problem": seconds / max(len(records), 1), "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / seconds if seconds else 0.0, "peak_memory_mb": peak_mb,
            "params": total, "nonzero_params": nonzero, "param_mb": nbytes / 2**20,
            "nonzero_mb": nbytes / total * nonzero / 2**20,
            "cutoff_rate": sum(r["stop"] == "length" for r in records) / max(len(records), 1)}


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.top_p == 0:
        raise CotpruneError("--top-p 0 keeps no token; use a value in (0, 1]")
    check_output_file(args.out)
    if args.summary:
        check_output_file(args.summary)
    problems = read_jsonl(args.input, args.limit)
    require_fields(problems, ["id", "prompt", "trace"] if args.perplexity else ["id", "question"], args.input,
                   strings=["prompt", "trace"] if args.perplexity else ["question"])
    model_source(args.model)  # a missing model fails here, before any work
    style = STYLES[args.style]
    max_new = args.max_new_tokens or style["max_new_tokens"]
    stops = (args.stop if args.stop is not None else style["stop"]) if args.stop_strings else []
    device = resolve_device(args.device)
    dtype, why = resolve_dtype(args.dtype, device)
    set_seed(args.seed)
    runtime = runtime_info(device, dtype, args.seed, why)
    summary_path = args.summary or (None if args.out == "-" else os.path.splitext(args.out)[0] + ".summary.json")
    if args.perplexity:
        describe_runtime(device, dtype, args.seed, why)
        tok = load_tokenizer(args.model, args.trust_remote_code)
        model = load_model(args.model, device, dtype, args.trust_remote_code)
        rows = trace_perplexities(model, tok, problems, args.model)
        write_jsonl(args.out, rows)
        summary = perplexity_summary(rows, args.model, runtime)
        log(f"{len(rows)} traces, {summary['trace_tokens']} tokens: perplexity {summary['perplexity']:.3f}")
        if summary_path:
            write_json(summary_path, summary)
        return
    out = JsonlAppender(args.out, {"stage": "generate", "model": resolved_model(args.model), "style": args.style,
                                   "input": resolved_model(args.input), "limit": args.limit,
                                   "max_new_tokens": max_new, "stops": stops, "stop_boxed": args.stop_boxed,
                                   "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                                   "seed": args.seed, "batch_size": args.batch_size, "dtype": runtime["dtype"],
                                   "device": runtime["device"]})
    describe_runtime(device, dtype, args.seed, why)  # after the checks above, so a refusal is one line
    if out.done:
        log(f"resuming: {len(out.done)} of {len(problems)} already in {args.out}.part")
    tok = load_tokenizer(args.model, args.trust_remote_code)
    model = load_model(args.model, device, dtype, args.trust_remote_code)
    eos_ids, stop_fn = eos_token_ids(model, tok), stop_checker(tok, stops, args.stop_boxed)
    generator = torch.Generator(device) if args.temperature > 0 else None
    prompts = {p["id"]: build_prompt(tok, args.style, p["question"]) for p in problems}
    batches = plan_batches(problems, prompts, args.batch_size, out.done)
    with tqdm(total=sum(len(b) for _, b in batches), desc=f"generate {args.style}", unit="q", disable=None) as bar, \
            fast_linears(model), CpuMeter() as meter, out:  # `out`: its part file is closed even on Ctrl-C
        for k, batch in batches:
            if generator is not None:
                generator.manual_seed(args.seed * 1_000_003 + k)
            with Timer() as t:
                results = decode(model, [prompts[p["id"]][1] for p in batch], max_new, eos_ids, tok.pad_token_id,
                                 stop_fn, args.temperature, args.top_k, args.top_p, generator)
            out.write([{**p, "style": args.style, "model": args.model, "prompt": prompts[p["id"]][0],
                        "output": finish_text(tok, ids, eos_ids, stops),
                        "prompt_tokens": len(prompts[p["id"]][1]), "new_tokens": len(ids), "stop": reason,
                        "seconds": t.seconds / len(batch)} for p, (ids, reason) in zip(batch, results)])
            bar.update(len(batch))
    order = {p["id"]: k for k, p in enumerate(problems)}
    records = sorted((r for r in out.records if r["id"] in order), key=lambda r: order[r["id"]])
    out.finish(records)
    summary = summarize(records, args.model, args.style, runtime, param_counts(model), args.batch_size, max_new,
                        peak_memory_mb(device))
    summary.update(stop_boxed=args.stop_boxed, **meter.info())  # wall and CPU time of this run, others' CPU share
    if meter.other is not None and meter.other > CONTENDED:
        log(f"other processes used {meter.other:.0%} of the CPUs during this run: its speed is not comparable")
    log(f"{summary['n']} answers, {summary['new_tokens']} tokens in {summary['seconds']:.1f}s "
        f"({summary['tokens_per_s']:.1f} tok/s), peak {summary['peak_memory_mb']:.0f} MiB")
    if summary_path:
        write_json(summary_path, summary)


if __name__ == "__main__":
    run_cli(main)
