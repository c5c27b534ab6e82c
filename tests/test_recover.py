"""recover.py: targets, LoRA algebra (B = 0, merge == adapter forward, kept masks), learning, and resume."""
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import prune
import recover
from common.checkpoints import masked_matrices
from common.engine import eos_token_ids
from common.layers import block_linears
from conftest import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(ROOT, "data", "gsm8k", "train.jsonl")


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()


def test_solution_target_drops_calculator_notes_and_boxes_the_answer():
    answer = "She sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 1,072"
    assert recover.solution_target(answer) == ("She sold 48/2 = 24 clips in May.\nIn all 48+24 = 72.\n"
                                               "The final answer is \\boxed{1072}.")
    with pytest.raises(ValueError):
        recover.solution_target("no final answer here")


def test_examples_are_the_eval_prompt_then_the_turn_up_to_eos(tiny_llama):
    tok, model = AutoTokenizer.from_pretrained(tiny_llama), load(tiny_llama)
    eos = eos_token_ids(model, tok)
    p, t = recover.encode_example(tok, "What is 2+2?", recover.solution_target("2+2=<<2+2=4>>4\n#### 4"), eos)
    assert p == recover.chat_prompt(tok, "What is 2+2?")[1]
    assert t[-1] in eos and not any(x in eos for x in t[:-1])
    assert tok.decode(t[:-1]).strip() == "2+2=4\nThe final answer is \\boxed{4}."
    ids, attn, target = recover.collate([(p, t), ([1, 2], [3, 4])], tok.pad_token_id)
    assert target.sum() == len(t) + 2 and attn[1].sum() == 4 and not target[1, :2].any()


def lora_model(folder, keep_mask=True, B_scale=0.0, seed=0):
    torch.manual_seed(seed)
    model = load(folder)
    adapters = recover.add_lora(model, set(recover.PROJECTIONS.split(",")), 4, 8, 0.0, keep_mask)
    if B_scale:
        for a in adapters.values():
            a.lora_B.data.normal_(std=B_scale)
    return model.eval(), adapters


def test_zero_B_merges_to_the_base_exactly(tiny_llama):
    model, adapters = lora_model(tiny_llama)
    assert len(adapters) == 14 and all((a.lora_A != 0).any() for a in adapters.values())
    merged = load(tiny_llama)
    recover.merge_lora_(merged, adapters)
    for (name, m), (_, m0) in zip(block_linears(merged), block_linears(load(tiny_llama))):
        assert torch.equal(m.weight, m0.weight), name


@pytest.mark.parametrize("masked", [False, True])
def test_merged_model_computes_what_the_adapters_computed(tmp_path, tiny_llama, masked):
    folder = tiny_llama
    if masked:  # a base with unstructured zeros: they must survive merging
        folder = str(tmp_path / "s05")
        prune.main(["--model", tiny_llama, "--sparsity", "0.5", "-o", folder])
    model, adapters = lora_model(folder, keep_mask=True, B_scale=0.05)
    merged = load(folder)
    recover.merge_lora_(merged, adapters)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (model(ids).logits - merged(ids).logits).abs().max() < 1e-5
    for (name, m), (_, m0) in zip(block_linears(merged), block_linears(load(folder))):
        zeros = m0.weight == 0
        assert torch.equal(m.weight == 0, zeros) if masked else not zeros.any(), name
        assert not torch.equal(m.weight, m0.weight)


def write_set(tmp_path, n=8):
    path = str(tmp_path / "train.jsonl")
    with open(GSM8K) as src, open(path, "w") as f:
        f.writelines(next(src) for _ in range(n))
    return path


def run_recover(tiny, data, out, *extra):
    recover.main([data, "--model", tiny, "-o", out, "--dtype", "float32", "--batch-size", "2", "--grad-accum", "2",
                  "--rank", "4", "--alpha", "8", "--max-length", "256", *extra])
    return [json.loads(line) for line in open(os.path.join(out, "loss.jsonl"))]


def test_a_few_steps_lower_the_loss_on_a_tiny_set(tmp_path, tiny_llama):
    # The tiny model's embeddings (std 0.02, tied) cannot make logits much sharper than uniform; scaled up 8x
    # they can, so memorising one short answer shows whether training works at all.
    folder = str(tmp_path / "sharp")
    model = load(tiny_llama)
    model.get_input_embeddings().weight.data *= 8
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"id": 1, "question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5 in all.\n#### 5"}))
    rows = run_recover(folder, str(data), str(tmp_path / "r"), "--batch-size", "1", "--grad-accum", "1", "--rank", "8",
                       "--alpha", "16", "--lr", "3e-2", "--max-steps", "15", "--dropout", "0")
    assert [r["step"] for r in rows] == list(range(1, 16))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"] and rows[-1]["loss"] < math.log(model.config.vocab_size) - 1
    report = json.load(open(tmp_path / "r" / "recover_report.json"))
    assert report["steps"] == 15 and report["tokens_per_s"] > 0 and report["adapted_sparsity_after"] == 0
    with safe_open(str(tmp_path / "r" / "adapter.safetensors"), "pt") as f:
        assert f.metadata()["rank"] == "8" and len(list(f.keys())) == 28
    assert not os.path.exists(tmp_path / "r.part")


def test_pruned_zeros_stay_zero_after_recovery(tmp_path, tiny_llama):
    pruned = str(tmp_path / "s05")
    prune.main(["--model", tiny_llama, "--sparsity", "0.5", "-o", pruned])
    run_recover(pruned, write_set(tmp_path, 4), str(tmp_path / "r"), "--lr", "1e-2", "--max-steps", "3")
    report = json.load(open(tmp_path / "r" / "recover_report.json"))
    assert report["adapted_sparsity_before"] == report["adapted_sparsity_after"] == pytest.approx(0.5, abs=1e-3)
    off = str(tmp_path / "r-nomask")
    run_recover(pruned, write_set(tmp_path, 4), off, "--lr", "1e-2", "--max-steps", "3", "--no-keep-mask")
    assert json.load(open(os.path.join(off, "recover_report.json")))["adapted_sparsity_after"] < 0.01


def test_interrupted_recovery_resumes_to_the_same_adapter(tmp_path, tiny_llama, monkeypatch):
    data = write_set(tmp_path, 6)
    flags = ("--lr", "5e-3", "--max-steps", "6", "--save-every", "2", "--warmup-steps", "2")
    whole = run_recover(tiny_llama, data, str(tmp_path / "whole"), *flags)
    real_lr = recover.lr_at

    def crash_in_step_4(step, *a):
        if step == 3:  # 0-based: steps 1-3 are logged, the checkpoint holds step 2, so step 3 is redone
            raise KeyboardInterrupt
        return real_lr(step, *a)

    monkeypatch.setattr(recover, "lr_at", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_recover(tiny_llama, data, str(tmp_path / "cut"), *flags)
    assert os.path.exists(tmp_path / "cut.part" / "checkpoint.safetensors") and not os.path.exists(tmp_path / "cut")
    monkeypatch.setattr(recover, "lr_at", real_lr)
    r = run_script("recover.py", data, "--model", tiny_llama, "-o", str(tmp_path / "cut"), "--dtype", "float32",
                   "--batch-size", "2", "--grad-accum", "2", "--rank", "4", "--alpha", "8", "--max-length", "256",
                   "--lr", "1e-3", "--max-steps", "6", "--save-every", "2", "--warmup-steps", "2")
    assert r.returncode == 2 and "other settings (lr" in r.stderr and "Traceback" not in r.stderr
    resumed = run_recover(tiny_llama, data, str(tmp_path / "cut"), *flags)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    with safe_open(str(tmp_path / "whole" / "adapter.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "cut" / "adapter.safetensors"), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [recover.lr_at(s, 1.0, 2, 6) for s in range(6)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize("flags, message", [(["--dropout", "1.5"], "--dropout"),
                                            (["--targets", "nope_proj"], "matches no Linear")])
def test_bad_flags_are_one_line_errors(tmp_path, tiny_llama, flags, message):
    r = run_script("recover.py", write_set(tmp_path, 2), "--model", tiny_llama, "-o", str(tmp_path / "x"), *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "x")


def test_malformed_training_line_is_one_line_error(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q", "answer": "#### 1"}\n{oops\n')
    r = run_script("recover.py", str(bad), "--model", tiny_llama, "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and f"{bad}:2: malformed JSON line" in r.stderr


def test_only_sparse_matrices_are_masked(tiny_llama):
    """A few exact zeros (a quantised dense checkpoint has some) do not make a mask; a pruned matrix does."""
    model = load(tiny_llama)
    q, k = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.k_proj.weight
    q.data.view(-1)[:3] = 0  # 3 of 4096: under 1%
    k.data.view(-1)[::2] = 0  # half
    adapters = recover.add_lora(model, {"q_proj", "k_proj"}, 4, 8, 0.0, keep_mask=True, mask_min=0.01)
    assert adapters["model.layers.0.self_attn.q_proj"].mask is None
    assert adapters["model.layers.0.self_attn.k_proj"].mask is not None


def test_dropout_rate_scale_and_eval_mode(tiny_llama):
    torch.manual_seed(0)
    y = recover.dropout(torch.ones(400, 500), 0.2)
    assert abs(float((y == 0).float().mean()) - 0.2) < 0.005 and abs(float(y.mean()) - 1) < 0.01
    model, adapters = lora_model(tiny_llama, B_scale=0.05)
    lora = next(iter(adapters.values()))
    lora.p = 0.5
    x = torch.randn(3, lora.base.in_features)
    with torch.no_grad():
        assert torch.equal(lora.eval()(x), lora(x))  # eval: no dropout
        assert not torch.equal(lora.train()(x), lora(x))


def test_masks_come_from_the_prune_report_not_from_zeros(tmp_path, tiny_llama):
    """A dense checkpoint dequantised from a GGUF holds many exact zeros (up to 20 % in one matrix of a Qwen2 Q5_0
    file): written by prune.py --sparsity 0 it records that it is dense, so nothing is masked; a pruned copy
    records which matrices it pruned, and exactly those are."""
    model = load(tiny_llama)
    k = model.model.layers[0].self_attn.k_proj.weight
    k.data.view(-1)[::5] = 0  # 20 % accidental zeros
    zeros = tmp_path / "zeros"
    model.save_pretrained(zeros)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(zeros)
    assert masked_matrices(str(zeros)) is None  # not cotprune's: zero counting is the stated fallback
    dense, sparse = str(tmp_path / "dense"), str(tmp_path / "sparse")
    prune.main(["--model", str(zeros), "--sparsity", "0", "-o", dense])
    prune.main(["--model", dense, "--sparsity", "0.5", "-o", sparse])
    assert masked_matrices(dense) == set()
    names = {n for n, _ in block_linears(load(sparse))}
    assert masked_matrices(sparse) == names
    m = load(dense)
    adapters = recover.add_lora(m, {"k_proj"}, 4, 8, 0.0, keep_mask=True, masked=masked_matrices(dense))
    assert all(a.mask is None for a in adapters.values())
    m = load(sparse)
    adapters = recover.add_lora(m, {"k_proj"}, 4, 8, 0.0, keep_mask=True, masked=masked_matrices(sparse))
    assert all(a.mask is not None for a in adapters.values())


def test_masks_travel_along_the_chain(tmp_path, tiny_llama):
    """A --sparsity 0 copy (a dtype change, say) and a neuron-sliced copy of a pruned model keep its masks, and so
    does recover.py's output: the zeros are never taken for dense weights further down the chain."""
    sparse, copy, sliced = (str(tmp_path / n) for n in ("sparse", "copy", "sliced"))
    prune.main(["--model", tiny_llama, "--sparsity", "0.5", "-o", sparse])
    names = masked_matrices(sparse)
    assert names == {n for n, _ in block_linears(load(sparse))}
    prune.main(["--model", sparse, "--sparsity", "0", "--save-dtype", "bfloat16", "-o", copy])
    prune.main(["--model", sparse, "--method", "neuron-random", "--sparsity", "0.25", "--multiple", "16",
                "-o", sliced])
    assert masked_matrices(copy) == masked_matrices(sliced) == names
    data = write_set(tmp_path, 4)
    out = str(tmp_path / "rec")
    run_recover(copy, data, out, "--max-steps", "1", "--targets", "q_proj")
    assert masked_matrices(out) == names  # q_proj trained masked, the rest untouched
    rec = load(out)
    assert float((rec.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert float((rec.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_adapter_file_is_byte_reproducible(tmp_path, tiny_llama):
    data = write_set(tmp_path, 4)
    for name in ("a", "b"):
        run_recover(tiny_llama, data, str(tmp_path / name), "--max-steps", "2")
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == (tmp_path / "b" / "adapter.safetensors").read_bytes()


@pytest.mark.parametrize("flags", [["--limit", "-1"], ["--rank", "0"], ["--lr", "-1"], ["--seed", "-3"],
                                   ["--mask-min-sparsity", "2"]])
def test_numbers_are_validated_at_parse_time(tmp_path, flags):
    r = run_script("recover.py", str(tmp_path / "none.jsonl"), "--model", "nope", "-o", str(tmp_path / "x"), *flags)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and f"argument {flags[0]}" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_record_without_a_final_answer_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q", "answer": "no final answer"}\n')
    r = run_script("recover.py", str(bad), "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "x"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no '#### N' final answer" in lines[0]  # not "model not found"
    assert not os.path.exists(tmp_path / "x")
