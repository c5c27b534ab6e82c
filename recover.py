"""Recover a pruned model with LoRA in plain torch: train adapters on GSM8K or code solutions, merge, save a model folder.

    python recover.py --model out/n25 --max-steps 100 --lr 2e-4 -o out/n25-lora
    python recover.py --model out/s0.5 -o out/s0.5-lora       # the neuron paper's math recipe: r 8, alpha 16, 2 epochs
    python recover.py --model out/c25 data/stdlib/functions.jsonl --rank 16 --alpha 32 --lr 2e-4 -o out/c25-lora
    head -200 data/gsm8k/train.jsonl | python recover.py --model out/n25 - --epochs 1 -o out/n25-lora

Data: records with `question` and `answer` (GSM8K: reasoning with calculator notes <<...>>, then '#### N'). Each
becomes the chat prompt the evaluation uses (common.chat_prompt) followed by the target: the reasoning without the
calculator notes, then 'The final answer is \\boxed{N}.' and the end-of-turn token, as the chat template closes an
assistant turn. Records with `question` and `solution` instead (data/stdlib/functions.jsonl: a function's stub,
then its source) train the code task: the prompt generate.py --style code uses, and the source as the target (it
must parse as Python). The loss is the mean cross-entropy over target tokens only; logits are computed for those
alone.

LoRA (Hu et al. 2021): each chosen Linear y = W x becomes y = W x + (alpha / r) B A dropout(x), with A [r, in]
Kaiming-uniform, B [out, r] zero and W frozen. The base runs in bfloat16 where the device has it, the adapters are
float32. Merging writes W + (alpha / r) B A in the base checkpoint's own dtype. With --keep-mask (the default), weights
that are exactly zero in the base stay zero: training already sees that masked update, so the merged model computes
what was trained, and the report gives the sparsity before and after.

The output folder is an ordinary model folder (the merged weights) plus adapter.safetensors (A and B of every
Linear; rank, alpha and targets in its metadata), loss.jsonl (one record per optimiser step: step, epoch, loss, lr,
tokens, seconds) and recover_report.json. While training, a checkpoint (adapters, AdamW state, RNG state, loss log)
sits in OUT.part/; after an interruption the same command continues from it.
"""
import argparse
import contextlib
import json
import math
import os
import re

import torch
from tqdm import tqdm

from common.chat import chat_messages, chat_prompt
from common.checkpoints import check_output_folder, lineage, masked_matrices, save_model_folder, write_safetensors
from common.cli import (ArgumentParser, CotpruneError, count, log, non_negative, one_line, positive, positive_float,
                        run_cli, share)
from common.engine import eos_token_ids
from common.files import read_jsonl, require_fields, write_jsonl
from common.layers import decoder_layers
from common.models import load_model, load_tokenizer, model_source
from common.runtime import (add_runtime_flags, Timer, describe_runtime, param_counts, peak_memory_mb, resolve_device,
                            resolve_dtype, set_seed)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "gsm8k", "train.jsonl")
PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# flags that change the trained weights: a checkpoint made with other values must not be continued
TRAINING_FLAGS = ("model", "input", "limit", "targets", "rank", "alpha", "dropout", "lr", "weight_decay", "epochs",
                  "max_steps", "warmup_steps", "batch_size", "grad_accum", "max_length", "keep_mask",
                  "mask_min_sparsity", "seed", "dtype")


def build_parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", nargs="?", default=DEFAULT_DATA,
                   help="JSONL of {id, question, answer} (GSM8K format) or {id, question, solution} (code); "
                        "- = stdin; default GSM8K train")
    p.add_argument("--model", required=True, help="model folder to recover (hub id, .gguf or 'embedded' work too)")
    p.add_argument("-o", "--out", required=True, help="output folder: merged model, adapter, loss log, report")
    p.add_argument("--targets", default=PROJECTIONS, help="comma-separated Linear names inside the decoder blocks")
    p.add_argument("--rank", type=positive, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=positive_float, default=16, help="LoRA alpha; the update is scaled by alpha / r")
    p.add_argument("--dropout", type=share, default=0.1, help="dropout on the LoRA input")
    p.add_argument("--lr", type=positive_float, default=2e-5, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=non_negative, default=0.0, help="AdamW weight decay on the adapters")
    p.add_argument("--epochs", type=non_negative, default=2, help="passes over the data (used when --max-steps is 0)")
    p.add_argument("--max-steps", type=count, default=0, help="optimiser steps; 0 = as many as --epochs take")
    p.add_argument("--warmup-steps", type=count, default=0, help="linear warm-up steps, then linear decay to 0")
    p.add_argument("--batch-size", type=positive, default=4, help="examples per forward pass")
    p.add_argument("--grad-accum", type=positive, default=2, help="forward passes per optimiser step (effective batch "
                                                              "= batch size x this)")
    p.add_argument("--max-length", type=positive, default=512, help="prompt + target tokens; longer examples are skipped")
    p.add_argument("--keep-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="in a sparse matrix, weights that are zero in the base stay zero in training and merging")
    p.add_argument("--mask-min-sparsity", type=share, default=0.01,
                   help="share of exact zeros from which a matrix counts as sparse (dense checkpoints hold a few "
                        "zeros from quantisation: 0.03%% in SmolLM2's GGUF)")
    p.add_argument("--save-every", type=positive, default=25, help="checkpoint every N optimiser steps (for resume)")
    p.add_argument("--limit", type=count, default=0, help="first N training records; 0 = all")
    add_runtime_flags(p, 'compute dtype of the frozen base', 'adapter initialisation, data order and dropout')
    return p


# ------------------------------------------------------------------------------------------------------ data

def solution_target(answer):
    """GSM8K reference solution -> target text: calculator notes removed, '#### N' -> '\\boxed{N}'."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError("no '#### N' final answer")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe final answer is \\boxed{{{final.strip().replace(',', '')}}}."


def task_of(records, name):
    """'math' (every record has `answer`) or 'code' (every record has `solution`); refused otherwise."""
    kinds = {("answer" in r) - ("solution" in r) for r in records}
    if kinds == {1}:
        return "math"
    if kinds == {-1}:
        return "code"
    raise CotpruneError(f"{name}: each record needs `answer` (math) or `solution` (code), all of one kind")


def example_target(rec, task):
    """The assistant's target text of one record; ValueError if it has none."""
    if task == "math":
        return solution_target(rec["answer"])
    import ast
    try:
        ast.parse(rec["solution"])
    except SyntaxError as e:
        raise ValueError(f"its solution is not Python ({e.msg}, line {e.lineno})") from None
    if not rec["solution"].strip():
        raise ValueError("its solution is empty")
    return rec["solution"].rstrip() + "\n"


def encode_example(tokenizer, question, target, eos_ids, task="math"):
    """(prompt ids, target ids): the evaluation's chat prompt, then the assistant turn up to its end-of-turn token.

    The target is cut from the template's rendering of the whole conversation, so it closes the turn exactly as
    the chat template does; the prompt is tokenised alone, as generate.py tokenises it."""
    prompt_text, prompt_ids = chat_prompt(tokenizer, question, task)
    convo = tokenizer.apply_chat_template(chat_messages(question, target, task), tokenize=False)
    if not convo.startswith(prompt_text):  # a template that rewrites earlier turns: the target text, then EOS
        convo = prompt_text + target + (tokenizer.eos_token or "")
    ids = tokenizer(convo[len(prompt_text):], add_special_tokens=False)["input_ids"]
    end = next((k for k, t in enumerate(ids) if t in eos_ids), None)
    return prompt_ids, ids[: end + 1] if end is not None else ids + [tokenizer.eos_token_id]


def build_examples(tokenizer, records, name, eos_ids, max_length, task="math"):
    """[(prompt ids, target ids)] of the records that fit in max_length tokens."""
    examples, skipped = [], 0
    for i, r in enumerate(records, 1):
        try:
            p, t = encode_example(tokenizer, r["question"], example_target(r, task), eos_ids, task)
        except ValueError as e:
            raise CotpruneError(f"{name}: record {i} (id {r.get('id', '?')!r}): {e}") from None
        if len(p) + len(t) > max_length:
            skipped += 1
            continue
        examples.append((p, t))
    if skipped:
        log(f"skipped {skipped} of {len(records)} examples longer than --max-length")
    if not examples:
        raise CotpruneError(f"{name}: no training example fits in --max-length {max_length} tokens")
    return examples


def collate(examples, pad_id):
    """Right-padded ids [B, T], attention mask [B, T], and the loss mask [B, T] marking target tokens."""
    T = max(len(p) + len(t) for p, t in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    target = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, (p, t) in enumerate(examples):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        attn[i, : len(p) + len(t)] = 1
        target[i, len(p): len(p) + len(t)] = True
    return ids, attn, target


def step_plan(n_examples, batch, accum, epochs, max_steps, seed):
    """[[micro-batch of example indices] per optimiser step]: a seeded shuffle per epoch, cut into steps."""
    per_step = batch * accum
    steps, epoch = [], 0
    want = max_steps or math.ceil(epochs * math.ceil(n_examples / per_step))
    while len(steps) < want:
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        for k in range(0, n_examples, per_step):
            chunk = order[k: k + per_step]
            steps.append((epoch, [chunk[j: j + batch] for j in range(0, len(chunk), batch)]))
            if len(steps) == want:
                break
        epoch += 1
    return steps


# ------------------------------------------------------------------------------------------------------ LoRA

def dropout(x, p):
    """Inverted dropout with keep probability 1 - p quantised to 1/65536. On the CPU, drawing 16-bit integers is
    about twice as fast as the bernoulli_ behind nn.Dropout, which took a quarter of a LoRA step on SmolLM2."""
    drop = round(p * 65536)
    keep = torch.randint(-32768, 32768, x.shape, dtype=torch.int32 if x.is_cuda else torch.int16, device=x.device)
    return x * (keep >= drop - 32768) / (1 - drop / 65536)


class LoRALinear(torch.nn.Module):
    """y = base(x) + scale * B A dropout(x), scale = alpha / r; `mask` (bool [out, in]) confines the update to
    the weights that are non-zero in the base."""

    def __init__(self, base, rank, alpha, dropout, mask=None):
        super().__init__()
        self.base, self.scale, self.mask = base, alpha / rank, mask
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise
        self.p = dropout

    def delta(self):
        """The dense update scale * B A [out, in] in float32, masked when the base has zeros to keep."""
        D = self.scale * (self.lora_B @ self.lora_A)
        return D * self.mask if self.mask is not None else D

    def forward(self, x):
        y = self.base(x)
        h = dropout(x, self.p) if self.training and self.p > 0 else x
        if self.mask is not None:  # a masked update has no low-rank form: apply it as one dense matrix
            return y + torch.nn.functional.linear(h, self.delta().to(h.dtype))
        low = torch.nn.functional.linear(h, self.lora_A.to(h.dtype))  # [.., r]
        return y + self.scale * torch.nn.functional.linear(low, self.lora_B.to(h.dtype))


def add_lora(model, targets, rank, alpha, dropout, keep_mask, mask_min=0.01, masked=None):
    """Wrap the target Linears inside the decoder blocks; freeze everything else. Returns {name: LoRALinear}.

    With keep_mask, the matrices named in `masked` (common.checkpoints.masked_matrices) keep their zeros: their update is masked.
    masked None (a checkpoint cotprune did not write): a matrix whose share of exact zeros is at least mask_min
    counts as pruned; dense checkpoints hold a few zeros from quantisation (0.03 % in SmolLM2's GGUF; a Qwen2
    Q5_0/Q6_K file up to 20 % in one matrix), which is why the record is preferred."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    model.requires_grad_(False)
    wrapped = {}
    for name, mod in list(layers.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent = layers.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layers
            full = f"{prefix}.{name}"
            if masked is not None:
                sparse = keep_mask and full in masked
            else:
                sparse = keep_mask and float((mod.weight == 0).float().mean()) >= mask_min
            mask = (mod.weight != 0) if sparse else None
            wrapped[f"{prefix}.{name}"] = LoRALinear(mod, rank, alpha, dropout, mask)
            setattr(parent, name.rsplit(".", 1)[-1], wrapped[f"{prefix}.{name}"])
    if not wrapped:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in layers.named_modules() if isinstance(m, torch.nn.Linear)})
        raise CotpruneError(f"--targets {','.join(sorted(targets))} matches no Linear; the blocks have {names}")
    return wrapped


def merge_lora_(model, adapters):
    """W <- W + (the adapter's update, masked where it was trained masked) in each target Linear, in W's dtype."""
    modules = dict(model.named_modules())
    for name, lora in adapters.items():
        W = modules[name].weight
        with torch.no_grad():
            W.data.copy_((W.detach().float() + lora.delta().float().to(W.device)).to(W.dtype))


def lm_loss_sum(model, ids, attn, target):
    """Summed cross-entropy (nats) of the target tokens; logits only at the positions that predict them."""
    hidden = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    pick = target[:, 1:]  # position t predicts token t + 1
    logits = model.get_output_embeddings()(hidden[:, :-1][pick]).float()  # [n_target, V]
    return torch.nn.functional.cross_entropy(logits, ids[:, 1:][pick], reduction="sum")


# ------------------------------------------------------------------------------------------- checkpoint/resume

def adapter_tensors(adapters):
    return {f"{n}.{k}": getattr(a, k).detach().float().cpu()
            for n, a in adapters.items() for k in ("lora_A", "lora_B")}


def save_checkpoint(folder, step, adapters, optimizer, settings):
    """Adapters, AdamW moments and step counts, and the RNG state, as one safetensors file (no pickle)."""
    tensors = adapter_tensors(adapters)
    state = optimizer.state_dict()["state"]
    for i, s in state.items():
        tensors[f"optim.{i}.exp_avg"] = s["exp_avg"].cpu()
        tensors[f"optim.{i}.exp_avg_sq"] = s["exp_avg_sq"].cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"step": str(step), "settings": json.dumps(settings, sort_keys=True),
            "optim_steps": json.dumps({str(i): float(s["step"]) for i, s in state.items()})}
    write_safetensors(os.path.join(folder, "checkpoint.safetensors"), tensors, meta)


def load_checkpoint(folder, adapters, optimizer, settings):
    """The step a checkpoint in `folder` reached (0 if none), with adapters, optimizer and RNG restored."""
    from safetensors import safe_open
    path = os.path.join(folder, "checkpoint.safetensors")
    if not os.path.exists(path):
        return 0
    try:
        with safe_open(path, framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        saved = json.loads(meta["settings"])
    except Exception as e:  # noqa: BLE001 - safetensors raises its own type for a damaged header
        raise CotpruneError(f"{path} is damaged or not recover.py's ({one_line(e)}); delete it to start over") from None
    diff = [k for k in settings if saved.get(k) != settings[k]]
    if diff:
        raise CotpruneError(f"{folder} holds a checkpoint made with other settings ({diff[0]}: {saved.get(diff[0])!r} "
                            f"there, {settings[diff[0]]!r} now); rerun with the same flags or delete {folder}")
    for name, a in adapters.items():
        a.lora_A.data.copy_(tensors[f"{name}.lora_A"])
        a.lora_B.data.copy_(tensors[f"{name}.lora_B"])
    sd = optimizer.state_dict()
    sd["state"] = {int(i): {"step": torch.tensor(n), "exp_avg": tensors[f"optim.{i}.exp_avg"],
                            "exp_avg_sq": tensors[f"optim.{i}.exp_avg_sq"]}
                   for i, n in json.loads(meta["optim_steps"]).items()}
    optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"])


PART_FILES = ("checkpoint.safetensors", "loss.jsonl")


def checkpoint_folder(out, create=True):
    """OUT.part/, the resume checkpoint; refused if it holds anything recover.py does not write."""
    part = out.rstrip("/") + ".part"
    if os.path.lexists(part):
        if not os.path.isdir(part) or os.path.islink(part):
            raise CotpruneError(f"{part} exists and is not recover.py's checkpoint folder: move it away")
        foreign = [f for f in os.listdir(part) if f not in PART_FILES and not f.endswith(".tmp")]
        if foreign:
            raise CotpruneError(f"{part} holds {foreign[0]}, which recover.py did not write: move it away")
    if create:
        os.makedirs(part, exist_ok=True)
    return part


def remove_checkpoint_folder(part):
    """Delete the files recover.py wrote in OUT.part/, then the folder (only if that leaves it empty)."""
    for name in PART_FILES:
        if os.path.exists(os.path.join(part, name)):
            os.unlink(os.path.join(part, name))
    with contextlib.suppress(OSError):
        os.rmdir(part)


def read_loss_log(path, upto):
    """Loss records of steps <= upto (a rerun drops those after the checkpoint: they will be redone)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]
    return [r for r in rows if r["step"] <= upto]


def lr_at(step, lr, warmup, total):
    """Linear warm-up to lr over `warmup` steps, then linear decay to 0 at `total` (step counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


# ------------------------------------------------------------------------------------------------------ main

def check_args(args):
    if min(args.rank, args.batch_size, args.grad_accum, args.save_every, args.max_length) < 1:
        raise CotpruneError("--rank, --batch-size, --grad-accum, --save-every and --max-length must be positive")
    if not 0 <= args.dropout < 1:
        raise CotpruneError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 < args.mask_min_sparsity <= 1:
        raise CotpruneError(f"--mask-min-sparsity must be in (0, 1], got {args.mask_min_sparsity}")
    if args.lr <= 0 or args.epochs <= 0 or args.max_steps < 0 or args.warmup_steps < 0:
        raise CotpruneError("--lr and --epochs must be positive, --max-steps and --warmup-steps non-negative")
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise CotpruneError("--out must differ from --model: the source would be overwritten")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    check_output_folder(args.out, "recover", [args.model, args.input])
    part = checkpoint_folder(args.out, create=False)
    records = read_jsonl(args.input, args.limit)
    if not records:
        raise CotpruneError(f"{args.input} holds no training records")
    task = task_of(records, args.input)
    field = "answer" if task == "math" else "solution"
    require_fields(records, ["id", "question", field] if "id" in records[0] else ["question", field],
                   args.input, strings=["question", field])
    for i, r in enumerate(records, 1):  # a record without '#### N' or code fails here, before the model is loaded
        try:
            example_target(r, task)
        except ValueError as e:
            raise CotpruneError(f"{args.input}: record {i} (id {r.get('id', '?')!r}): {e}") from None
    model_source(args.model)  # a missing model fails here, before any work
    device = resolve_device(args.device)
    dtype, why = resolve_dtype(args.dtype, device, training=True)
    set_seed(args.seed)
    runtime = describe_runtime(device, dtype, args.seed, why)
    targets = {t.strip() for t in args.targets.split(",") if t.strip()}
    settings = {k: getattr(args, k) for k in TRAINING_FLAGS}
    tok = load_tokenizer(args.model, args.trust_remote_code)
    model = load_model(args.model, device, dtype, args.trust_remote_code)
    examples = build_examples(tok, records, args.input, eos_token_ids(model, tok), args.max_length, task)
    masked = masked_matrices(args.model)
    if masked is None and args.keep_mask:
        log(f"{args.model} has no cotprune prune report: matrices with >= {args.mask_min_sparsity:.2%} exact zeros "
            f"are taken as pruned (--mask-min-sparsity)")
    adapters = add_lora(model, targets, args.rank, args.alpha, args.dropout, args.keep_mask,
                        args.mask_min_sparsity, masked)
    params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    plan = step_plan(len(examples), args.batch_size, args.grad_accum, args.epochs, args.max_steps, args.seed)
    os.makedirs(part, exist_ok=True)
    start = load_checkpoint(part, adapters, optimizer, settings)
    log_path = os.path.join(part, "loss.jsonl")
    losses = read_loss_log(log_path, start)
    write_jsonl(log_path, losses)
    if start:
        log(f"resuming at step {start} of {len(plan)} from {part}")
    log(f"LoRA r={args.rank} alpha={args.alpha:g} on {len(adapters)} Linears ({sum(p.numel() for p in params):,} "
        f"trainable parameters); {len(examples)} examples, {len(plan)} steps of {args.batch_size}x{args.grad_accum}")
    model.train()
    with Timer() as t_train, open(log_path, "a", encoding="utf-8") as log_file:
        bar = tqdm(range(start, len(plan)), initial=start, total=len(plan), desc="recover", unit="step", disable=None)
        for step in bar:
            epoch, micro = plan[step]
            lr = lr_at(step, args.lr, args.warmup_steps, len(plan))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [collate([examples[i] for i in mb], tok.pad_token_id) for mb in micro]
            n_target = sum(int(t[:, 1:].sum()) for _, _, t in batches)
            total, tokens = 0.0, 0
            with Timer() as t_step:
                for ids, attn, target in batches:
                    loss = lm_loss_sum(model, ids.to(device), attn.to(device), target.to(device)) / n_target
                    loss.backward()
                    total, tokens = total + float(loss.detach()), tokens + int(attn.sum())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            row = {"step": step + 1, "epoch": epoch, "loss": total, "lr": lr, "tokens": tokens,
                   "target_tokens": n_target, "seconds": t_step.seconds}
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            losses.append(row)
            bar.set_postfix(loss=f"{total:.3f}")
            if (step + 1) % args.save_every == 0 or step + 1 == len(plan):
                save_checkpoint(part, step + 1, adapters, optimizer, settings)
        bar.close()
    merged, *sparsity = merge_into_base(args.model, adapters, args.trust_remote_code)
    report = {"stage": "recover", "source_model": args.model, **runtime, "rank": args.rank, "alpha": args.alpha,
              "keep_mask": args.keep_mask, **recovery_report(adapters, losses, merged, sparsity, len(examples),
                                                            t_train.seconds, peak_memory_mb(device))}
    # The masks this folder carries on: the source's, less those trained away (an adapter without a mask), plus
    # those kept; matrices without an adapter keep their zeros untouched.
    report["masked_matrices"] = sorted(((masked or set()) - set(adapters))
                                       | {n for n, a in adapters.items() if a.mask is not None})
    meta = {"cotprune_stage": "recover-adapter", "rank": str(args.rank), "alpha": str(args.alpha),
            "targets": ",".join(report["targets"]), "source_model": args.model}
    base, base_id = lineage(args.model, merged)
    files = {"adapter.safetensors": lambda p: write_safetensors(p, adapter_tensors(adapters), meta),
             "loss.jsonl": lambda p: write_jsonl(p, losses)}
    save_model_folder(merged, tok, args.out, stage="recover", source_model=args.model,
                      args={**vars(args), **runtime, "base_model": base}, extra_json={"recover_report.json": report},
                      extra_files=files, base_id=base_id)
    remove_checkpoint_folder(part)
    log(f"loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f} over {len(losses)} steps, "
        f"{report['tokens_per_s']:.0f} tok/s; wrote {args.out}")


def merge_into_base(model_spec, adapters, trust_remote_code=False):
    """A fresh copy of the base (its own dtype, on the CPU) with the adapters merged, and the share of zeros in the
    adapted matrices before and after the merge."""
    merged = load_model(model_spec, "cpu", None, trust_remote_code)
    modules = dict(merged.named_modules())
    zeros = lambda: sum(int((modules[n].weight == 0).sum()) for n in adapters)  # noqa: E731
    numel = sum(modules[n].weight.numel() for n in adapters)
    before = zeros()
    merge_lora_(merged, adapters)
    return merged, before / numel, zeros() / numel


def recovery_report(adapters, losses, merged, sparsity, n_examples, wall_seconds, peak_mb):
    """recover_report.json's measured fields: what was adapted and masked, the loss curve's ends, speed, sparsity."""
    total, nonzero, _ = param_counts(merged)
    train_s, tokens = sum(r["seconds"] for r in losses), sum(r["tokens"] for r in losses)
    return {"targets": sorted({n.rsplit(".", 1)[-1] for n in adapters}), "adapted_linears": len(adapters),
            "masked_linears": sum(a.mask is not None for a in adapters.values()),
            "masked_matrices": sorted(n for n, a in adapters.items() if a.mask is not None),
            "trainable_params": sum(p.numel() for a in adapters.values() for p in a.parameters() if p.requires_grad),
            "examples": n_examples, "steps": len(losses), "first_loss": losses[0]["loss"] if losses else None,
            "final_loss": losses[-1]["loss"] if losses else None, "train_seconds": train_s,
            "wall_seconds": wall_seconds, "tokens": tokens, "tokens_per_s": tokens / train_s if train_s else 0.0,
            "peak_memory_mb": peak_mb, "adapted_sparsity_before": sparsity[0], "adapted_sparsity_after": sparsity[1],
            "model_params": total, "model_sparsity": 1 - nonzero / total}


if __name__ == "__main__":
    run_cli(main)
