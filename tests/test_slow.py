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
    assert len(report["matrices"]) == 210 and all(abs(r["sparsity"] - 0.3) < 1e-6 for r in report["matrices"])
    src = tmp_path / "q.jsonl"
    src.write_text(open("data/gsm8k/test.jsonl").readline())
    generate.main(["--model", m0, "--style", "chat", "--max-new-tokens", "64", str(src),
                   "-o", str(tmp_path / "g.jsonl")])
    rec = json.loads((tmp_path / "g.jsonl").read_text())
    assert rec["new_tokens"] > 5 and any(ch.isdigit() for ch in rec["output"])
    score.main([str(tmp_path / "g.jsonl"), "-o", str(tmp_path / "s.jsonl")])
    assert 0 <= json.loads((tmp_path / "s.jsonl").read_text())["F"] <= 1
