"""Collect calibration text for prune.py: the model's own chain-of-thought traces, bare prompts, or generic text.

    python calibrate.py --model out/M0 --source traces --tokens 32768 -o calib/traces.jsonl
    python calibrate.py --model out/M0 --source prompts --tokens 32768 -o calib/prompts.jsonl
    python calibrate.py --model out/M0 --source text data/distract/distract_mix_1000.jsonl -o - | head -2

traces (RAC, arXiv 2509.12464): the model answers calibration problems (GSM8K train by default; never test) in
its chat template with the step-by-step instruction, sampling (temperature 0.7, top-p 1.0, top-k 50 by default)
up to --max-new-tokens, in file order until --tokens tokens of prompt + trace are collected. prompts: the same
templated problems without a trace (RAC's prompt-only baseline). text: the `text` field of any JSONL (offline we
use the distractor set as the stand-in for generic web text).

Every record has `id`, `source`, `text` (what prune.py calibrates on) and `tokens`; traces and prompts also keep
`prompt`, `trace`, `prompt_tokens`, `trace_tokens` and `stop`. Trace collection is resumable (OUT.part) and
deterministic for a given --seed: each batch of the file-order plan is sampled from its own seed.
"""
import argparse
import os

import torch
from tqdm import tqdm

from common.chat import chat_prompt
from common.cli import ArgumentParser, CotpruneError, count, log, non_negative, positive, run_cli, share
from common.engine import decode, eos_token_ids, fast_linears
from common.files import JsonlAppender, check_output_file, read_jsonl, require_fields, write_jsonl
from common.models import load_model, load_tokenizer, model_source, resolved_model
from common.runtime import DTYPES, describe_runtime, resolve_device, resolve_dtype, runtime_info, set_seed

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_INPUT = {"traces": f"{DATA}/gsm8k/train.jsonl", "prompts": f"{DATA}/gsm8k/train.jsonl",
                 "text": f"{DATA}/distract/distract_mix_1000.jsonl"}


def build_parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", nargs="?", default=None,
                   help="problems ({id, question}) or texts ({id, text}) JSONL; default: GSM8K train for traces and "
                        "prompts, the distractor set for text; - = stdin")
    p.add_argument("--model", required=True, help="the dense model (its tokenizer counts tokens; traces: it writes)")
    p.add_argument("--source", choices=("traces", "prompts", "text"), required=True, help="kind of calibration text")
    p.add_argument("-o", "--out", required=True, help="output JSONL; - = stdout (no resume)")
    p.add_argument("--tokens", type=count, default=32768,
                   help="stop once this many tokens are collected; 0 = all input")
    p.add_argument("--max-new-tokens", type=positive, default=512, help="traces: cap per trace")
    p.add_argument("--temperature", type=non_negative, default=0.7, help="traces: sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=count, default=50, help="traces: keep the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=share, default=1.0, help="traces: nucleus mass, in (0, 1]")
    p.add_argument("--batch-size", type=positive, default=16, help="traces: problems per forward pass")
    p.add_argument("--limit", type=count, default=0, help="first N input records; 0 = all")
    p.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype; auto = bfloat16 where the device runs it natively, else float32 (float16 on "
                        "GPUs without bfloat16 and on MPS)")
    p.add_argument("--seed", type=count, default=0, help="sampling seed")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="allow model code from the hub")
    return p


def take_until(records, budget):
    """The shortest prefix of `records` whose `tokens` add up to at least `budget` (0 = all)."""
    out, total = [], 0
    for rec in records:
        if budget and total >= budget:
            break
        out.append(rec)
        total += rec["tokens"]
    return out


def text_records(tokenizer, records, source):
    """Calibration records for the prompt-only and generic-text sources (no generation)."""
    out = []
    for r in records:
        if source == "text":
            out.append({"id": r["id"], "source": "text", "text": r["text"],
                        "tokens": len(tokenizer(r["text"], add_special_tokens=False)["input_ids"])})
        else:
            text, ids = chat_prompt(tokenizer, r["question"])
            out.append({"id": r["id"], "source": "prompts", "prompt": text, "trace": "", "text": text,
                        "prompt_tokens": len(ids), "trace_tokens": 0, "tokens": len(ids), "stop": None})
    return out


def collect_traces(model, tokenizer, problems, out, budget, batch_size, max_new_tokens, sampling, seed, generator):
    """Sample traces batch by batch in file order until `budget` tokens (0 = all) are collected; appends to `out`.

    sampling: (temperature, top_k, top_p)."""
    eos = eos_token_ids(model, tokenizer)
    total = sum(r["tokens"] for r in out.records)
    plan = [problems[i: i + batch_size] for i in range(0, len(problems), batch_size)]
    with tqdm(total=budget or None, initial=total, desc="trace tokens", unit="tok", disable=None) as bar, \
            fast_linears(model):
        for k, batch in enumerate(plan):
            if budget and total >= budget:
                break
            todo = [p for p in batch if p["id"] not in out.done]
            if not todo:
                continue
            generator.manual_seed(seed * 1_000_003 + k)  # the same stream for a batch, resumed or not
            prompts = [chat_prompt(tokenizer, p["question"]) for p in todo]
            results = decode(model, [ids for _, ids in prompts], max_new_tokens, eos, tokenizer.pad_token_id,
                             None, *sampling, generator)
            recs = []
            for p, (text, ids), (new, reason) in zip(todo, prompts, results):
                trace = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)
                recs.append({"id": p["id"], "source": "traces", "prompt": text, "trace": trace,
                             "text": text + trace, "prompt_tokens": len(ids), "trace_tokens": len(new),
                             "tokens": len(ids) + len(new), "stop": reason})
            out.write(recs)
            total += sum(r["tokens"] for r in recs)
            bar.update(sum(r["tokens"] for r in recs))


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.top_p == 0:
        raise CotpruneError("--top-p 0 keeps no token; use a value in (0, 1]")
    check_output_file(args.out)
    path = args.input or DEFAULT_INPUT[args.source]
    records = read_jsonl(path, args.limit)
    field = "text" if args.source == "text" else "question"
    require_fields(records, ["id", field], path, strings=[field])
    if not records:
        raise CotpruneError(f"{path} holds no records")
    model_source(args.model)
    tok = load_tokenizer(args.model, args.trust_remote_code)
    if args.source != "traces":
        chosen = take_until(text_records(tok, records, args.source), args.tokens)
        write_jsonl(args.out, chosen)
        log(f"{len(chosen)} {args.source} records, {sum(r['tokens'] for r in chosen):,} tokens")
        return
    device = resolve_device(args.device)
    dtype, why = resolve_dtype(args.dtype, device)
    set_seed(args.seed)
    runtime = runtime_info(device, dtype, args.seed, why)
    out = JsonlAppender(args.out, {"stage": "calibrate", "model": resolved_model(args.model),
                                   "input": resolved_model(path), "limit": args.limit,
                                   "max_new_tokens": args.max_new_tokens,
                                   "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                                   "seed": args.seed, "batch_size": args.batch_size, "dtype": runtime["dtype"],
                                   "device": runtime["device"]})
    describe_runtime(device, dtype, args.seed, why)  # after the checks above, so a refusal is one line
    if out.done:
        log(f"resuming: {len(out.done)} traces already in {args.out}.part")
    model = load_model(args.model, device, dtype, args.trust_remote_code)
    collect_traces(model, tok, records, out, args.tokens, args.batch_size, args.max_new_tokens,
                   (args.temperature, args.top_k, args.top_p), args.seed, torch.Generator(device))
    order = {r["id"]: k for k, r in enumerate(records)}
    chosen = take_until(sorted((r for r in out.records if r["id"] in order), key=lambda r: order[r["id"]]),
                        args.tokens)
    out.finish(chosen)
    log(f"{len(chosen)} traces, {sum(r['tokens'] for r in chosen):,} tokens "
        f"({sum(r['stop'] == 'length' for r in chosen)} cut at {args.max_new_tokens} new tokens)")


if __name__ == "__main__":
    run_cli(main)
