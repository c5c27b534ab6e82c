"""Measure what prune.py calibrates on: the model's own chain-of-thought traces, bare prompts, generic text, or the
target-vs-distractor selectivity of its MLP neurons.

    python calibrate.py --model out/M0 --source traces --tokens 32768 -o calib/traces.jsonl
    python calibrate.py --model out/M0 --source prompts --tokens 32768 -o calib/prompts.jsonl
    python calibrate.py --model out/M0 --source text data/distract/distract_mix_1000.jsonl -o - | head -2
    python calibrate.py --model out/M0 --source selectivity --n-prompts 800 -o calib/selectivity.safetensors

traces (RAC, arXiv 2509.12464): the model answers calibration problems (GSM8K train by default; never test) in
its chat template with the step-by-step instruction, sampling (temperature 0.7, top-p 1.0, top-k 50 by default)
up to --max-new-tokens, in file order until --tokens tokens of prompt + trace are collected. prompts: the same
templated problems without a trace (RAC's prompt-only baseline). text: the `text` field of any JSONL (offline we
use the distractor set as the stand-in for generic web text).

Every record has `id`, `source`, `text` (what prune.py calibrates on) and `tokens`; traces and prompts also keep
`prompt`, `trace`, `prompt_tokens`, `trace_tokens` and `stop`. Trace collection is resumable (OUT.part) and
deterministic for a given --seed: each batch of the file-order plan is sampled from its own seed.

selectivity (task-specific neuron paper, §3 and Appendix B): each MLP neuron's mean |SwiGLU activation| (the input
of down_proj) over the real tokens of each of the first --n-prompts --target and --distractor prompts (`question`
or `text`; at most --max-prompt-tokens each), then S = (mu_target - mu_distractor) / (sigma + 1e-6), sigma pooled
over both sets. -o is a .safetensors file {selectivity, mu_target, mu_distractor, sigma} [layers, d_ff] whose
metadata records the inputs and the model's weight fingerprint, which prune.py --scores checks.
"""
import os

import torch
from tqdm import tqdm

from common.chat import chat_prompt
from common.cli import ArgumentParser, CotpruneError, count, log, non_negative, positive, run_cli, share
from common.engine import default_slots, eos_token_ids, fast_linears, row_generator, run
from common.files import JsonlAppender, check_output_file, read_jsonl, require_fields, write_jsonl
from common.layers import gated_mlps
from common.models import load_model, load_tokenizer, model_source, resolved_model
from common.runtime import add_runtime_flags, describe_runtime, resolve_device, resolve_dtype, runtime_info, set_seed

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_INPUT = {"traces": f"{DATA}/gsm8k/train.jsonl", "prompts": f"{DATA}/gsm8k/train.jsonl",
                 "text": f"{DATA}/distract/distract_mix_1000.jsonl"}
DEFAULT_TARGET, DEFAULT_DISTRACTOR = f"{DATA}/gsm8k/train.jsonl", f"{DATA}/distract/distract_mix_1000.jsonl"
EPS = 1e-6  # neuron paper eq. 2


def build_parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", nargs="?", default=None,
                   help="problems ({id, question}) or texts ({id, text}) JSONL; default: GSM8K train for traces and "
                        "prompts, the distractor set for text; - = stdin")
    p.add_argument("--model", required=True, help="the dense model (its tokenizer counts tokens; traces: it writes)")
    p.add_argument("--source", choices=("traces", "prompts", "text", "selectivity"), required=True,
                   help="what to measure")
    p.add_argument("-o", "--out", required=True,
                   help="output JSONL; - = stdout (no resume); selectivity: a .safetensors file")
    p.add_argument("--tokens", type=count, default=32768,
                   help="stop once this many tokens are collected; 0 = all input")
    p.add_argument("--max-new-tokens", type=positive, default=512, help="traces: cap per trace")
    p.add_argument("--temperature", type=non_negative, default=0.7, help="traces: sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=count, default=50, help="traces: keep the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=share, default=1.0, help="traces: nucleus mass, in (0, 1]")
    p.add_argument("--batch-size", type=count, default=0,
                   help="traces: slots decoded together (0 = as many as memory allows, at most 64 on a CPU, and "
                        "no more than the fewest traces that can hold --tokens); "
                        "selectivity: prompts per forward pass (0 = 16)")
    p.add_argument("--limit", type=count, default=0, help="first N input records; 0 = all")
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help="selectivity: JSONL of target-task prompts (`question` or `text`); default GSM8K train")
    p.add_argument("--distractor", default=DEFAULT_DISTRACTOR,
                   help="selectivity: JSONL of distractor prompts (`question` or `text`); default data/distract")
    p.add_argument("--n-prompts", type=count, default=800, help="selectivity: prompts taken from each set; 0 = all")
    p.add_argument("--max-prompt-tokens", type=positive, default=512,
                   help="selectivity: tokens per prompt (longer ones are cut)")
    add_runtime_flags(p, 'compute dtype', 'sampling seed (traces)')
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


def trace_slots(budget, prompt_lengths, max_new_tokens):
    """Slots for --batch-size 0 under a token budget: the fewest traces, in file order, that can hold it (each at
    most its prompt + max_new_tokens). Every one of them is needed, so no slot starts work that will be thrown
    away; more slots run traces past the budget's end that are then dropped (docs/results.md has the cost), and a
    slot freed early takes the next problem at once. 0 = no budget: no limit."""
    total = 0
    for k, n in enumerate(prompt_lengths, 1):
        total += n + max_new_tokens
        if budget and total >= budget:
            return k
    return max(1, len(prompt_lengths))


def collect_traces(model, tokenizer, problems, out, budget, batch_size, max_new_tokens, sampling, seed, device):
    """Sample traces of the problems in file order until the finished traces at the head of the file hold `budget`
    tokens (0 = all); appends each to `out` as it finishes. Each trace draws from its own generator, seeded by the
    seed and the problem's id (common.engine.row_generator), so a trace does not depend on its batch-mates and an
    interrupted run resumes to the same set. sampling: (temperature, top_k, top_p)."""
    eos = eos_token_ids(model, tokenizer)
    todo = [p for p in problems if p["id"] not in out.done]
    prompts = {p["id"]: chat_prompt(tokenizer, p["question"]) for p in todo}
    tokens = {r["id"]: r["tokens"] for r in out.records}

    def head_tokens():  # tokens of the finished traces before the first unfinished one, in file order
        total = 0
        for p in problems:
            if p["id"] not in tokens:
                break
            total += tokens[p["id"]]
        return total
    if not todo or (budget and head_tokens() >= budget):
        return
    requests = [(p["id"], prompts[p["id"]][1], row_generator(device, seed, p["id"])) for p in todo]
    with tqdm(total=budget or None, initial=head_tokens(), desc="trace tokens", unit="tok", disable=None) as bar, \
            fast_linears(model):
        longest = max(len(r[1]) for r in requests) + max_new_tokens
        left = budget - head_tokens() if budget else 0  # a resumed run needs only the rest (0: no budget)
        wanted = trace_slots(left, [len(r[1]) for r in requests], max_new_tokens)
        slots = batch_size or min(default_slots(model, longest, device), wanted)
        stats = {}
        rows = run(model, requests, max_new_tokens, eos, tokenizer.pad_token_id, slots, None, *sampling, stats=stats)
        for key, new, reason, _ in rows:
            text, ids = prompts[key]
            trace = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)
            out.write([{"id": key, "source": "traces", "prompt": text, "trace": trace, "text": text + trace,
                        "prompt_tokens": len(ids), "trace_tokens": len(new), "tokens": len(ids) + len(new),
                        "stop": reason}])
            tokens[key] = len(ids) + len(new)
            bar.update(head_tokens() - bar.n)
            if budget and head_tokens() >= budget:
                break  # the rows still in flight are not needed: the head of the file holds the budget
        rows.close()  # the engine's counters land in stats
    if stats.get("engine") == "continuous":  # one token per busy slot and step, and one per prefilled row
        log(f"{slots} slots decoded {stats['busy_slot_steps'] + stats['prefilled_rows']:,} new tokens in all")


def prompt_texts(records, name):
    """The prompt of each record: its `question`, else its `text`."""
    texts = []
    for i, r in enumerate(records, 1):
        text = r.get("question", r.get("text"))
        if not isinstance(text, str) or not text:
            raise CotpruneError(f"{name}: record {i} (id {r.get('id', '?')!r}) has no `question` or `text` string")
        texts.append(text)
    return texts


class ActivationStats:
    """Running per-neuron sums over prompts of their mean |activation| a_bar [L, d_ff] (float64, streamed)."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, 0.0, 0.0

    def add(self, a):  # a: [prompts, L, d_ff], one row per prompt
        a = a.double()
        self.n += a.shape[0]
        self.sum = self.sum + a.sum(0)
        self.sumsq = self.sumsq + (a * a).sum(0)


def selectivity(target, distractor, eps=EPS):
    """(S, mu_target, mu_distractor, sigma), each [L, d_ff]: S = (mu_t - mu_d) / (sigma + eps) (neuron paper eq. 2).

    sigma is the standard deviation over all prompts of both sets pooled, with Bessel's correction (n - 1).
    """
    n = target.n + distractor.n
    if target.n == 0 or distractor.n == 0 or n < 2:
        raise CotpruneError("selectivity needs at least one target and one distractor prompt")
    mu_t, mu_d = target.sum / target.n, distractor.sum / distractor.n
    mean = (target.sum + distractor.sum) / n
    var = ((target.sumsq + distractor.sumsq) - n * mean * mean).clamp(min=0) / (n - 1)
    sigma = var.sqrt()
    return ((mu_t - mu_d) / (sigma + eps)).float(), mu_t.float(), mu_d.float(), sigma.float()


def mean_abs_activations(model, tokenizer, texts, device, batch, max_tokens, stats, desc, dtype=torch.float32):
    """Add each prompt's mean |h| over its real tokens, per layer, to `stats`; h = act(gate x) * up x, the input of
    down_proj (neuron paper eq. 1 and eq. 7). Prompts are right-padded; padding never enters a mean."""
    downs = [down for _, _, down in gated_mlps(model)]
    caught, mask = [None] * len(downs), {}

    def grab(i):
        def hook(mod, args):
            m = mask["m"]  # [B, T, 1]
            caught[i] = (args[0].abs().float() * m).sum(1) / m.sum(1)  # [B, d_ff]
        return hook

    hooks = [d.register_forward_pre_hook(grab(i)) for i, d in enumerate(downs)]
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))  # similar lengths together: little padding
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    try:
        with torch.inference_mode(), autocast:
            for k in tqdm(range(0, len(order), batch), desc=desc, unit="batch", disable=None):
                enc = tokenizer([texts[j] for j in order[k: k + batch]], return_tensors="pt", padding=True,
                                truncation=True, max_length=max_tokens, padding_side="right")
                mask["m"] = enc["attention_mask"].to(device)[:, :, None].float()
                model.base_model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                 use_cache=False)  # the decoder only: no logits needed
                stats.add(torch.stack(caught, dim=1).cpu())  # [B, L, d_ff]
    finally:
        for h in hooks:
            h.remove()
    return stats

def read_prompt_sets(paths, n_prompts):
    """[[prompt text]] per file: the first n_prompts (0 = all) records' `question` or `text`."""
    sets = []
    for path in paths:
        records = read_jsonl(path, n_prompts)
        sets.append(prompt_texts(records, path))
        if n_prompts and len(records) < n_prompts:
            log(f"note: {path} holds {len(records)} prompts, fewer than --n-prompts {n_prompts}")
    return sets


def selectivity_main(args, device, dtype, runtime):
    """Measure selectivity on the model and write the scores file; prompts are read before the model is loaded."""
    from common.checkpoints import weights_fingerprint, write_safetensors
    sets = read_prompt_sets((args.target, args.distractor), args.n_prompts)
    tok = load_tokenizer(args.model, args.trust_remote_code)
    model = load_model(args.model, device, None, args.trust_remote_code)
    stats = [mean_abs_activations(model, tok, texts, device, args.batch_size or 16, args.max_prompt_tokens,
                                  ActivationStats(), name, dtype) for texts, name in zip(sets, ("target", "distractor"))]
    S, mu_t, mu_d, sigma = selectivity(*stats)
    meta = {"cotprune_scores": "1", "model": resolved_model(args.model),
            "model_id": weights_fingerprint(model.state_dict().items()), "target": resolved_model(args.target),
            "distractor": resolved_model(args.distractor), "n_target": str(stats[0].n),
            "n_distractor": str(stats[1].n), "max_prompt_tokens": str(args.max_prompt_tokens),
            "dtype": runtime["dtype"]}
    write_safetensors(args.out, {"selectivity": S, "mu_target": mu_t, "mu_distractor": mu_d, "sigma": sigma}, meta)
    log(f"selectivity of {S.shape[0]} x {S.shape[1]} neurons from {stats[0].n} target and {stats[1].n} distractor "
        f"prompts: {int((S > 0).sum()):,} lean to the target, {int((S < 0).sum()):,} to the distractors")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.top_p == 0:
        raise CotpruneError("--top-p 0 keeps no token; use a value in (0, 1]")
    check_output_file(args.out)
    if args.source == "selectivity":
        if args.out == "-" or not args.out.endswith(".safetensors"):
            raise CotpruneError(f"--source selectivity writes tensors: -o must name a .safetensors file, got "
                                f"{args.out!r}")
        model_source(args.model)
        device = resolve_device(args.device)
        dtype, why = resolve_dtype(args.dtype, device)
        selectivity_main(args, device, dtype, describe_runtime(device, dtype, args.seed, why))
        return
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
    with out:  # its part file is closed even on Ctrl-C, so a rerun in this process can take its lock
        collect_traces(model, tok, records, out, args.tokens, args.batch_size, args.max_new_tokens,
                       (args.temperature, args.top_k, args.top_p), args.seed, device)
    order = {r["id"]: k for k, r in enumerate(records)}
    chosen = take_until(sorted((r for r in out.records if r["id"] in order), key=lambda r: order[r["id"]]),
                        args.tokens)
    out.finish(chosen)
    log(f"{len(chosen)} traces, {sum(r['tokens'] for r in chosen):,} tokens "
        f"({sum(r['stop'] == 'length' for r in chosen)} cut at {args.max_new_tokens} new tokens)")


if __name__ == "__main__":
    run_cli(main)
