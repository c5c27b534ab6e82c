"""Checks on the real embedded SmolLM2-135M-Instruct (make test-slow): convert, prune, load, answer."""
import json

import pytest

pytestmark = pytest.mark.slow


def test_embedded_model_prunes_and_answers(tmp_path):
    import generate
    import prune
    import score
    m0, p = str(tmp_path / "M0"), str(tmp_path / "s0.3")
    prune.main(["--model", "embedded", "--sparsity", "0", "-o", m0])
    prune.main(["--model", m0, "--sparsity", "0.3", "-o", p])
    report = json.load(open(f"{p}/prune_report.json"))
    assert len(report["matrices"]) == 210 and all(r["zeros"] == round(0.3 * r["numel"]) for r in report["matrices"])
    src = tmp_path / "q.jsonl"
    src.write_text(open("data/gsm8k/test.jsonl").readline())
    generate.main(["--model", m0, "--style", "chat", "--max-new-tokens", "64", str(src),
                   "-o", str(tmp_path / "g.jsonl")])
    rec = json.loads((tmp_path / "g.jsonl").read_text())
    assert rec["new_tokens"] > 5 and any(ch.isdigit() for ch in rec["output"])
    score.main([str(tmp_path / "g.jsonl"), "-o", str(tmp_path / "s.jsonl")])
    assert 0 <= json.loads((tmp_path / "s.jsonl").read_text())["F"] <= 1


def test_embedded_model_neuron_pruning_and_recovery(tmp_path):
    """A 25 % neuron-pruned SmolLM2 loads as a 1152-wide model, and two LoRA steps on it lower nothing to NaN."""
    import prune
    import recover
    from transformers import AutoModelForCausalLM
    m0, p, r = str(tmp_path / "M0"), str(tmp_path / "n25"), str(tmp_path / "n25-lora")
    prune.main(["--model", "embedded", "--sparsity", "0", "-o", m0])
    prune.main(["--model", m0, "--method", "neuron-random", "--sparsity", "0.25", "-o", p])
    model = AutoModelForCausalLM.from_pretrained(p, use_safetensors=True)
    assert model.config.intermediate_size == 1152 and model.model.layers[0].mlp.down_proj.in_features == 1152
    recover.main(["--model", p, "--max-steps", "2", "--limit", "16", "--batch-size", "2", "--grad-accum", "1",
                  "-o", r])
    rep = json.load(open(f"{r}/recover_report.json"))
    assert rep["steps"] == 2 and 0 < rep["final_loss"] < 10 and rep["masked_linears"] == 0
