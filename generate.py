"""Generate answers to GSM8K-style questions or HumanEval tasks with a model, continuously batched, resumably.

    python generate.py --model out/M0 --style cot data/gsm8k/test.jsonl --limit 50 -o gen/cot-M0.jsonl
    python generate.py --model embedded --style chat --limit 5 data/gsm8k/test.jsonl | python score.py - > scored.jsonl
    head -3 data/gsm8k/test.jsonl | python generate.py --model embedded --style direct - -o -
    python generate.py --model out/s0.5 --perplexity calib/heldout-traces.jsonl -o ppl/s0.5.jsonl
    python generate.py --model embedded --style code --limit 16 data/humaneval/test.jsonl -o gen/code.jsonl
    python generate.py --model out/s0.5 --intervene gen/cot-s0.5.jsonl --limit 20 -o func/s0.5.jsonl

Input records need `id` and `question`; every other field (the gold `answer`, a HumanEval task's `task_id`,
`entry_point` and `test`) passes through. --style code puts the neuron paper's E.2 instruction and the question (a
HumanEval stub) in the chat template, for score.py to run against the task's tests. Each output
record adds: style, model, prompt, output, prompt_tokens, new_tokens (the EOS included), stop ('eos', 'length',
or 'stop' for a stop string or, with --stop-boxed, a closed \\boxed{}), seconds (from the row's prefill to its
last token). --batch-size rows decode together, each in its own slot of a KV cache; when one ends the next
prompt is prefilled into its slot at once (common/engine.py; models it cannot drive run in static batches). An
interrupted run keeps what it finished in OUT.part, record by record; the same command again continues there. A
summary (wall and CPU time, tokens/s, prefill and decode shares, busy slots, peak memory, non-zero parameters)
goes to OUT.summary.json, or to --summary.

--intervene (functional faithfulness, docs/scoring.md#functional-faithfulness) reads this model's own --style cot
records instead of questions and answers again, greedily, after each CoT cut to k of its steps, after filler of
its token length, and after its first arithmetic result is made one unit larger and the model has continued
from there (common/interventions.py); one record per problem and intervention, for score.py.

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
from common.cli import ArgumentParser, CotpruneError, count, log, non_negative, run_cli, share
from common.engine import (ENGINE_ENV, Engine, default_slots, engine_supported, eos_token_ids, fast_linears,
                           row_generator, run)
from common.interventions import ANSWER_CUE, plan
from common.files import JsonlAppender, check_output_file, read_jsonl, require_fields, write_json, write_jsonl
from common.models import load_model, load_tokenizer, model_source, resolved_model
from common.runtime import (CONTENDED, CpuMeter, add_runtime_flags, describe_runtime, param_counts,
                            peak_memory_mb, resolve_device, resolve_dtype, runtime_info, set_seed)

STYLES = {  # the paper's two protocols (asand §3), the chat template the RAC and neuron studies use, and the
    # neuron paper's HumanEval setting (App. D: greedy, 512 new tokens, EOS stop; E.2 instruction)
    "cot": {"template": "Solve this step by step: Question: {q} Step 1:", "max_new_tokens": 150,
            "stop": ["\nQuestion:"]},
    "direct": {"template": "Question: {q} Answer:", "max_new_tokens": 30, "stop": ["\nQuestion:"]},
    "chat": {"template": None, "max_new_tokens": 512, "stop": []},
    "code": {"template": None, "max_new_tokens": 512, "stop": []},
}


BOXED_RE = re.compile(r"\\boxed\{")
ANSWER_TOKENS = 16  # --intervene: an answer after the cue is a number
CONTINUE_TOKENS = STYLES["cot"]["max_new_tokens"]  # --intervene: a corrupted CoT continues up to the cot cap
PASSED_ON = ("question", "answer", "gold")  # --intervene: what each job keeps of its problem


def build_parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", nargs="?", default="-",
                   help="JSONL of {id, question, ...}; - = stdin (code: data/humaneval/test.jsonl, question = the "
                        "task's stub)")
    p.add_argument("--model", required=True, help="hub id, model folder, .gguf file, or 'embedded'")
    p.add_argument("-o", "--out", default="-", help="output JSONL; - = stdout (no resume)")
    p.add_argument("--style", choices=sorted(STYLES), default="cot", help="prompt protocol")
    p.add_argument("--max-new-tokens", type=count, default=0,
                   help="generation cap; 0 = the style's (cot 150, direct 30, chat and code 512)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string, repeatable (cut from the output); default: the style's ('\\nQuestion:' "
                        "for cot and direct, none for chat and code)")
    p.add_argument("--stop-strings", action=argparse.BooleanOptionalAction, default=True,
                   help="cut at stop strings (--stop, else the style's); --no-stop-strings: none at all")
    p.add_argument("--stop-boxed", action=argparse.BooleanOptionalAction, default=False,
                   help="stop once the output holds a complete \\boxed{...} answer (the neuron paper's mitigation "
                        "of Type 1 traps)")
    p.add_argument("--batch-size", type=count, default=0,
                   help="slots: rows decoded together (a finished row's slot takes the next prompt at once); "
                        "0 = as many as memory allows, at most 64 on a CPU")
    p.add_argument("--limit", type=count, default=0, help="first N input records; 0 = all")
    p.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=count, default=0, help="sampling: keep the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=share, default=1.0, help="sampling: nucleus mass, in (0, 1]")
    p.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=False,
                   help="score the `trace` of each record after its `prompt` (teacher-forced, no generation)")
    p.add_argument("--intervene", action=argparse.BooleanOptionalAction, default=False,
                   help="functional faithfulness: the input is this model's own cot-style generations; answer "
                        "after each CoT cut to k steps, after filler of its length, and after one corrupted result "
                        "and the model's continuation (common/interventions.py; greedy, answers of --max-new-tokens, "
                        "default 16)")
    p.add_argument("--early-points", type=count, default=6,
                   help="--intervene: truncations asked about per CoT, evenly spaced, no CoT and all of it among "
                        "them; 0 = after every step")
    p.add_argument("--summary", default=None, help="summary JSON path; default OUT.summary.json (none for stdout)")
    add_runtime_flags(p, 'compute dtype', 'sampling seed')
    return p


def build_prompt(tokenizer, style, question):
    """(prompt text, token ids). The chat style's template already holds the special tokens."""
    if style in ("chat", "code"):
        return chat_prompt(tokenizer, question, "code" if style == "code" else "math")
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


def trace_nll(model, prompt_ids, trace_ids, engine=None):
    """Summed negative log-likelihood (nats) of trace_ids following prompt_ids: one teacher-forced pass, through
    the engine's chunked prefill where it drives the model, else the model's own forward."""
    with torch.inference_mode():
        if engine is not None:
            logits = engine.prefill(0, prompt_ids + trace_ids, keep=len(trace_ids) + 1)[:-1]  # [T, V]
        else:
            ids = torch.tensor([prompt_ids + trace_ids], device=model.device)
            logits = model(input_ids=ids, logits_to_keep=len(trace_ids) + 1).logits[0, :-1].float()
    target = torch.tensor(trace_ids, device=logits.device)
    return float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))


def trace_perplexities(model, tokenizer, records, model_name):
    """[{id, model, nll, trace_tokens}]: each record's `trace` scored teacher-forced after its `prompt`."""
    pairs = [(r, tokenizer(r["prompt"], add_special_tokens=False)["input_ids"],
              tokenizer(r["trace"], add_special_tokens=False)["input_ids"]) for r in records]
    pairs = [(r, p, t) for r, p, t in pairs if t]
    engine = None
    if pairs and engine_supported(model)[0]:
        engine = Engine(model, 1, max(len(p) + len(t) for _, p, t in pairs) + 1)
    out = []
    with fast_linears(model):
        for r, p, t in tqdm(pairs, desc="perplexity", unit="trace", disable=None):
            out.append({"id": r["id"], "model": model_name, "nll": trace_nll(model, p, t, engine),
                        "trace_tokens": len(t)})
    return out


def perplexity_summary(rows, model_name, runtime):
    nll, n = sum(r["nll"] for r in rows), sum(r["trace_tokens"] for r in rows)
    return {"stage": "perplexity", "model": model_name, "style": "traces", "n": len(rows), **runtime,
            "trace_tokens": n, "nll_per_token": nll / max(n, 1), "perplexity": math.exp(nll / max(n, 1))}


def summarize(records, model_name, style, runtime, counts, batch_size, max_new_tokens, peak_mb, wall, made):
    """wall: seconds this run generated for; made: the records it made (a resumed run made only some)."""
    new_tokens = sum(r["new_tokens"] for r in records)
    made_tokens = sum(r["new_tokens"] for r in made)
    total, nonzero, nbytes = counts
    return {"stage": "generate", "model": model_name, "style": style, "n": len(records), **runtime,
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "seconds": wall,
            "seconds_per_problem": wall / max(len(made), 1), "new_tokens": new_tokens,
            "tokens_per_s": made_tokens / wall if wall else 0.0, "peak_memory_mb": peak_mb,
            "params": total, "nonzero_params": nonzero, "param_mb": nbytes / 2**20,
            "nonzero_mb": nbytes / total * nonzero / 2**20,
            "cutoff_rate": sum(r["stop"] == "length" for r in records) / max(len(records), 1)}


def check_own_cot(problems, args):
    """--intervene takes the cot-style generations of the model it runs (interventions on another model's CoT
    answer another question), greedy."""
    name = "<stdin>" if args.input == "-" else args.input
    if args.perplexity or args.style != "cot" or args.temperature > 0:
        raise CotpruneError("--intervene answers greedily after cot-style CoTs: drop --perplexity, --style and "
                            "--temperature")
    require_fields(problems, ["id", "prompt", "output", "style", "model"], name,
                   strings=["prompt", "output", "style", "model"])
    for i, p in enumerate(problems, 1):
        if p["style"] != "cot":
            raise CotpruneError(f"{name}: record {i} (id {p['id']!r}) is {p['style']}-style; --intervene needs "
                                f"generate.py --style cot records")
        if resolved_model(p["model"]) != resolved_model(args.model):
            raise CotpruneError(f"{name}: record {i} (id {p['id']!r}) is {p['model']}'s CoT, not --model "
                                f"{args.model}'s: interventions need the model's own chain of thought")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.top_p == 0:
        raise CotpruneError("--top-p 0 keeps no token; use a value in (0, 1]")
    check_output_file(args.out)
    if args.summary:
        check_output_file(args.summary)
    problems = read_jsonl(args.input, args.limit)
    if args.intervene:
        check_own_cot(problems, args)
    else:
        require_fields(problems, ["id", "prompt", "trace"] if args.perplexity else ["id", "question"], args.input,
                       strings=["prompt", "trace"] if args.perplexity else ["question"])
    model_source(args.model)  # a missing model fails here, before any work
    style = STYLES[args.style]
    max_new = args.max_new_tokens or (ANSWER_TOKENS if args.intervene else style["max_new_tokens"])
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
                                   "device": runtime["device"],
                                   **({"intervene": True, "early_points": args.early_points} if args.intervene
                                      else {})})
    describe_runtime(device, dtype, args.seed, why)  # after the checks above, so a refusal is one line
    if out.done:
        log(f"resuming: {len(out.done)} of {len(problems)} already in {args.out}.part")
    tok = load_tokenizer(args.model, args.trust_remote_code)
    model = load_model(args.model, device, dtype, args.trust_remote_code)
    eos_ids, stop_fn = eos_token_ids(model, tok), stop_checker(tok, stops, args.stop_boxed)
    if args.intervene:
        # each job inherits its problem's question and gold answer
        jobs = [{**{k: p[k] for k in PASSED_ON if k in p}, **q} for p in problems
                for q in plan(tok, p, args.early_points)]
        todo = [q for q in jobs if q["id"] not in out.done]
        by_id = {q["id"]: q for q in todo}
        order = {q["id"]: k for k, q in enumerate(jobs)}
        requests = [(q["id"], q["ids"], None, q["prefix"]) for q in todo]
    else:
        prompts = {p["id"]: build_prompt(tok, args.style, p["question"]) for p in problems}
        todo = [p for p in problems if p["id"] not in out.done]
        order = {p["id"]: k for k, p in enumerate(problems)}
        requests = [(p["id"], prompts[p["id"]][1], row_generator(device, args.seed, p["id"])
                     if args.temperature > 0 else None) for p in todo]
        by_id = {p["id"]: p for p in todo}
    made, stats = [], {}
    longest = max((len(r[1]) for r in requests), default=0) + max(max_new, CONTINUE_TOKENS * args.intervene)
    slots = args.batch_size or default_slots(model, longest, device)
    with tqdm(total=len(todo), desc="intervene" if args.intervene else f"generate {args.style}", unit="q",
              disable=None) as bar, fast_linears(model), CpuMeter() as meter, out:  # `out`: closed even on Ctrl-C
        if args.intervene:
            requests, first = continue_mistakes(model, tok, todo, eos_ids, stops, stop_fn, slots)
        for key, ids, reason, seconds in run(model, requests, max_new, eos_ids, tok.pad_token_id, slots, stop_fn,
                                             args.temperature, args.top_k, args.top_p, stats):
            p = by_id[key]
            if args.intervene:
                rec = {**{k: v for k, v in p.items() if k not in ("ids", "prefix")}, "style": "intervene",
                       "model": args.model,
                       "prompt": tok.decode(p["ids"])}
                prompt_tokens = len(p["ids"])
            else:
                rec = {**p, "style": args.style, "model": args.model, "prompt": prompts[key][0]}
                prompt_tokens = len(prompts[key][1])
            made.append({**rec, "output": finish_text(tok, ids, eos_ids, stops), "prompt_tokens": prompt_tokens,
                         "new_tokens": len(ids), "stop": reason, "seconds": seconds})
            out.write(made[-1:])
            bar.update(1)
    if args.intervene:  # the summary's time shares and busy slots cover both halves of the mistakes too
        for k in ("prefill_seconds", "decode_seconds", "decode_steps", "busy_slot_steps", "shared_prefix_tokens"):
            if stats.get(k) is not None or first.get(k) is not None:
                stats[k] = (stats.get(k) or 0) + (first.get(k) or 0)
        if stats.get("decode_steps"):
            stats["mean_busy_slots"] = stats["busy_slot_steps"] / stats["decode_steps"]
    if stats.get("engine") == "static":
        why = stats["engine_reason"]
        log("static batches through the model's own forward: " + (f"{why} asks for them" if why.startswith(
            ENGINE_ENV) else f"the engine cannot drive it ({why})"))
    records = sorted((r for r in out.records if r["id"] in order), key=lambda r: order[r["id"]])
    out.finish(records)
    summary = summarize(records, args.model, "intervene" if args.intervene else args.style, runtime,
                        param_counts(model), slots, max_new, peak_memory_mb(device), meter.wall, made)
    summary.update(stop_boxed=args.stop_boxed, **meter.info(), **engine_summary(stats, meter.wall))
    if meter.other is not None and meter.other > CONTENDED:
        log(f"other processes used {meter.other:.0%} of the CPUs during this run: its speed is not comparable")
    log(f"{summary['n']} answers, {summary['new_tokens']} tokens in {summary['seconds']:.1f}s "
        f"({summary['tokens_per_s']:.1f} tok/s), peak {summary['peak_memory_mb']:.0f} MiB")
    if summary_path:
        write_json(summary_path, summary)


def continue_mistakes(model, tok, jobs, eos_ids, stops, stop_fn, slots):
    """Adding a mistake, first half: each 'mistake' job's CoT, cut after its corrupted result, is continued by the
    model (greedy, up to CONTINUE_TOKENS, the cot stops), and the job's prompt becomes that CoT and the answer cue.
    Returns the requests of every job, ready to answer, and the engine's counters of the continuations. Not saved:
    a resumed run continues its mistakes again."""
    mistakes = [q for q in jobs if q["intervention"] == "mistake"]
    cue = tok(ANSWER_CUE, add_special_tokens=False)["input_ids"]
    first = {}
    by_id = {q["id"]: q for q in mistakes}
    requests = [(q["id"], q["ids"], None) for q in mistakes]  # one per problem: no prefix to share
    for key, ids, reason, _ in tqdm(run(model, requests, CONTINUE_TOKENS, eos_ids, tok.pad_token_id, slots, stop_fn,
                                        stats=first),
                                    total=len(mistakes), desc="continue mistakes", unit="q", disable=None):
        q = by_id[key]
        q["continuation"] = finish_text(tok, ids, eos_ids, stops)
        q["continuation_stop"] = reason
        q["ids"] = q["ids"] + tok(q["continuation"], add_special_tokens=False)["input_ids"] + cue
    return [(q["id"], q["ids"], None, q["prefix"]) for q in jobs], first


def engine_summary(stats, wall):
    """Which path generated, and where its time went: prefill and decode shares of the wall time, busy slots."""
    out = {"engine": stats.get("engine"), "engine_reason": stats.get("engine_reason") or None}
    if stats.get("decode_seconds") is not None and wall:
        out.update(prefill_share=stats["prefill_seconds"] / wall, decode_share=stats["decode_seconds"] / wall,
                   decode_steps=stats["decode_steps"], mean_busy_slots=stats.get("mean_busy_slots"),
                   decode_attention=stats.get("decode_attention"),
                   decode_step=stats.get("decode_step"),
                   shared_prefix_tokens=stats.get("shared_prefix_tokens"))
    return out


if __name__ == "__main__":
    run_cli(main)
