"""generate.py and engine.decode: same greedy tokens as model.generate, resumable, stop strings, summary
(continuous batching itself: tests/test_engine.py)."""
import json
import math
import os

import pytest
import torch

import common.engine as engine
from common.chat import CHAT_INSTRUCTION
from common.runtime import BF16_ENV, resolve_dtype
import generate
from common.engine import decode
from common.models import load_model, load_tokenizer
from conftest import one_line_error, run_script


def problems_file(tmp_path, n=6):
    path = tmp_path / "problems.jsonl"
    with open("data/gsm8k/test.jsonl") as f:
        path.write_text("".join(next(f) for _ in range(n)))
    return str(path)


@pytest.mark.parametrize("drop_finished", [True, False])
def test_decode_matches_model_generate(tiny_model_dir, drop_finished):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    prompts = [tok(t)["input_ids"] for t in ["Tom has 3 apples.", "A", "How many eggs does a duck lay in a week?"]]
    # a made-up EOS that the random model emits early for some rows, so rows finish at different steps
    first = [decode(model, [p], 12, set(), tok.pad_token_id)[0][0] for p in prompts]
    eos = {first[1][2]} if drop_finished else set()
    ours = decode(model, prompts, 12, eos, tok.pad_token_id)
    pad = tok.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         eos_token_id=sorted(eos) or None, pad_token_id=pad)[:, width:].tolist()
    for (out, reason), want in zip(ours, ref):
        if reason == "eos":
            assert out == want[: len(out)] and all(t == pad for t in want[len(out):])
        else:
            assert out == want and reason == "length"
    if drop_finished:
        assert any(r == "eos" for _, r in ours) and any(r == "length" for _, r in ours)


def test_sampling_is_deterministic_for_a_seed(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    model = load_model(tiny_llama, torch.device("cpu"), torch.float32)
    p = [tok("Tom has 3 apples.")["input_ids"]] * 3
    run = lambda seed: decode(model, p, 10, set(), tok.pad_token_id, temperature=0.7, top_k=50, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))
    assert run(1) == run(1) and run(1) != run(2)


def test_generate_stage_outputs_and_summary(tmp_path, tiny_llama):
    src = problems_file(tmp_path)
    out = tmp_path / "gen.jsonl"
    generate.main(["--model", tiny_llama, "--style", "cot", "--max-new-tokens", "8", "--batch-size", "4",
                   src, "-o", str(out)])
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    inputs = [json.loads(x) for x in open(src)]
    assert [r["id"] for r in recs] == [p["id"] for p in inputs]  # input order, though run longest-first
    for r, p in zip(recs, inputs):
        assert r["answer"] == p["answer"]  # unknown fields pass through
        assert r["prompt"] == f"Solve this step by step: Question: {p['question']} Step 1:"
        assert r["stop"] in ("eos", "length", "stop") and 1 <= r["new_tokens"] <= 8
    summary = json.loads((tmp_path / "gen.summary.json").read_text())
    assert summary["n"] == 6 and summary["new_tokens"] == sum(r["new_tokens"] for r in recs)
    assert 0 < summary["nonzero_params"] <= summary["params"] and summary["tokens_per_s"] > 0
    assert summary["engine"] == "continuous" and summary["decode_step"] == "written out"


def test_interrupted_run_resumes_without_repeating(tmp_path, tiny_llama, monkeypatch):
    src = problems_file(tmp_path, 7)
    out = tmp_path / "gen.jsonl"
    argv = ["--model", tiny_llama, "--style", "direct", "--max-new-tokens", "4", "--batch-size", "3",
            "--no-stop-strings", src, "-o", str(out)]
    eos_never(monkeypatch)  # every row runs to the cap: the first three finish after three steps
    monkeypatch.setattr(engine.Engine, "_step", dies_on_call(5, engine.Engine._step))
    with pytest.raises(KeyboardInterrupt):
        generate.main(argv)
    lines = (tmp_path / "gen.jsonl.part").read_text().splitlines()
    assert not out.exists() and len(lines) == 1 + 3  # the settings line and the three finished rows
    with open(tmp_path / "gen.jsonl.part", "a") as f:
        f.write('{"id": "torn')  # a write cut short by the interruption
    calls = []  # one entry per prompt prefilled, alone or packed with others
    alone, packed = engine.Engine.prefill, engine.Engine.prefill_packed
    monkeypatch.setattr(engine.Engine, "_step", engine.Engine._step.__wrapped__)
    monkeypatch.setattr(engine.Engine, "prefill", lambda self, *a, **k: calls.append(1) or alone(self, *a, **k))
    monkeypatch.setattr(engine.Engine, "prefill_packed",
                        lambda self, items: calls.extend([1] * len(items)) or packed(self, items))
    generate.main(argv)
    assert len(calls) == 4  # only the 4 missing problems were generated
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids == [json.loads(x)["id"] for x in open(src)] and not (tmp_path / "gen.jsonl.part").exists()


def test_stop_string_cuts_output(tmp_path, tiny_llama):
    src = problems_file(tmp_path, 2)
    run = lambda name, *flags: generate.main(["--model", tiny_llama, "--style", "cot", "--max-new-tokens", "20",
                                              *flags, src, "-o", str(tmp_path / name)]) or \
        json.loads((tmp_path / name).read_text().splitlines()[0])
    free = run("free.jsonl", "--no-stop-strings")
    stop = free["output"][4:7]  # a string the (random, seeded) model is known to produce
    assert stop.strip() and free["stop"] == "length"
    cut = run("cut.jsonl", "--stop", stop)
    assert cut["stop"] == "stop" and cut["new_tokens"] < free["new_tokens"]
    assert cut["output"] == free["output"][: free["output"].find(stop)]


def test_chat_prompt_uses_the_template(tmp_path, tiny_llama):
    out = tmp_path / "chat.jsonl"
    generate.main(["--model", tiny_llama, "--style", "chat", "--max-new-tokens", "2", problems_file(tmp_path, 1),
                   "-o", str(out)])
    prompt = json.loads(out.read_text())["prompt"]
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert CHAT_INSTRUCTION in prompt


def test_pipe_to_stdout_and_bad_input(tmp_path, tiny_llama):
    src = problems_file(tmp_path, 2)
    r = run_script("generate.py", "--model", tiny_llama, "--style", "direct", "--max-new-tokens", "3", "-",
                   stdin=open(src).read())
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q"}\n[1, 2]\n')
    r = run_script("generate.py", "--model", tiny_llama, str(bad), "-o", str(tmp_path / "o.jsonl"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"generate.py: error: {bad}:2: expected a JSON object, got list"
    assert not list(tmp_path.glob("o.jsonl*"))


def packed_bf16_available():
    """Can this CPU run oneDNN's packed bfloat16 linear at all (asked of torch directly, not of common)?"""
    w = torch.randn(8, 8, dtype=torch.bfloat16)
    try:
        torch.ops.mkldnn._reorder_linear_weight(w, 4)
        return torch.backends.mkldnn.is_available()
    except RuntimeError:  # AVX2-only CPUs
        return False


def dies_on_call(n, real):
    """`real` (a function or an Engine method), raising KeyboardInterrupt on its n-th call: an interrupted run."""
    calls = []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    dying.__wrapped__ = real
    return dying


def eos_never(monkeypatch):
    """No token ends a row (the random model may emit its EOS at any step): rows run to the cap."""
    monkeypatch.setattr(generate, "eos_token_ids", lambda model, tok: {-1})


def test_fast_linears_same_tokens_and_restores(tiny_llama):
    """The packed path where this CPU has it, the fallback where it has not (or COTPRUNE_CPU_BF16=0 forces it):
    either way the same tokens, and the modules restored afterwards."""
    tok = load_tokenizer(tiny_llama)
    model = load_model(tiny_llama, torch.device("cpu"), torch.bfloat16)
    prompts = [tok(t)["input_ids"] for t in ["Tom has 3 apples.", "How many eggs?"]]
    plain = decode(model, prompts, 10, set(), tok.pad_token_id)
    expect = packed_bf16_available() and os.environ.get(BF16_ENV) != "0"
    with engine.fast_linears(model) as used:
        assert used == expect
        assert any("forward" in vars(m) for m in model.modules()) == expect  # swapped in exactly when usable
        packed = decode(model, prompts, 10, set(), tok.pad_token_id)
    assert packed == plain
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_fast_linears_step_aside_when_forced_off(tiny_llama, monkeypatch):
    monkeypatch.setenv(BF16_ENV, "0")
    model = load_model(tiny_llama, torch.device("cpu"), torch.bfloat16)
    with engine.fast_linears(model) as used:
        assert used is False and not any("forward" in vars(m) for m in model.modules())


def test_packed_float32_linears_are_batch_invariant_and_close(tiny_qwen):
    """Where fast_linears packs float32 (its probe passed), every Linear gives a row the same bits alone as among
    other rows, agrees with F.linear to rounding, and the modules are restored afterwards."""
    model = load_model(tiny_qwen, torch.device("cpu"), torch.float32)
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {m: torch.randn(9, m.in_features) for m in lins}
    with torch.no_grad():
        plain = {m: m(x[m]) for m in lins}
        with engine.fast_linears(model) as used:
            if not used:
                pytest.skip("oneDNN's packed float32 linear is not usable on this CPU")
            for m in lins:
                batch = m(x[m])
                alone = torch.cat([m(x[m][i: i + 1]) for i in range(9)])
                assert torch.equal(batch, alone)
                assert torch.allclose(batch, plain[m], rtol=1e-4, atol=1e-5)
    assert not any("forward" in vars(m) for m in lins)


def test_fast_linears_step_aside_for_mixed_or_other_dtypes(tiny_llama):
    model = load_model(tiny_llama, torch.device("cpu"), torch.float16)
    with engine.fast_linears(model) as used:
        assert used is False and not any("forward" in vars(m) for m in model.modules())


def test_resumed_sampling_equals_uninterrupted(tmp_path, tiny_llama, monkeypatch):
    src = problems_file(tmp_path, 5)
    argv = lambda out: ["--model", tiny_llama, "--style", "direct", "--max-new-tokens", "6", "--batch-size", "2",
                        "--temperature", "1.0", "--seed", "3", "--dtype", "float32", src, "-o", str(tmp_path / out)]
    generate.main(argv("whole.jsonl"))
    real = engine.Engine._step
    monkeypatch.setattr(engine.Engine, "_step", dies_on_call(7, real))
    with pytest.raises(KeyboardInterrupt):
        generate.main(argv("resumed.jsonl"))
    assert 1 < len((tmp_path / "resumed.jsonl.part").read_text().splitlines()) < 6  # some rows were left to do
    monkeypatch.setattr(engine.Engine, "_step", real)
    generate.main(argv("resumed.jsonl"))
    outputs = lambda name: [json.loads(x)["output"] for x in (tmp_path / name).read_text().splitlines()]
    assert outputs("resumed.jsonl") == outputs("whole.jsonl")


def test_perplexity_matches_brute_force(tmp_path, tiny_llama):
    tok = load_tokenizer(tiny_llama)
    model = load_model(tiny_llama, torch.device("cpu"), torch.float32)
    recs = [{"id": "a", "prompt": "Question: 2 + 2?", "trace": " It is 4, so 4."},
            {"id": "b", "prompt": "Hi", "trace": " there friend"}]
    src = tmp_path / "traces.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    generate.main(["--model", tiny_llama, "--perplexity", str(src), "--dtype", "float32",
                   "-o", str(tmp_path / "p.jsonl")])
    got = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    total, count = 0.0, 0
    for r, g in zip(recs, got):
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        t = tok(r["trace"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([p + t])).logits[0].log_softmax(-1)
        nll = -sum(float(logp[len(p) + j - 1, tok_id]) for j, tok_id in enumerate(t))  # one token at a time
        assert g["nll"] == pytest.approx(nll, rel=1e-4) and g["trace_tokens"] == len(t)
        total, count = total + nll, count + len(t)
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


@pytest.mark.parametrize("text, done", [("so \\boxed{42}", True), ("so \\boxed{42", False), ("boxed{4}", False),
                                        ("\\boxed{\\frac{1}{2}}", True), ("\\boxed{\\frac{1}{2}", False),
                                        ("\\boxed{3} then \\boxed{", True)])
def test_boxed_complete(text, done):
    assert generate.boxed_complete(text) is done


def test_stop_boxed_fires_at_the_closing_brace(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    ids = tok("First 3 + 4 = 7, so the answer is \\boxed{7}. Then more text.", add_special_tokens=False)["input_ids"]
    check = generate.stop_checker(tok, [], boxed=True)
    first = next(k for k in range(1, len(ids) + 1) if check(0, ids[:k]))
    assert tok.decode(ids[:first]).rstrip().endswith("\\boxed{7}")  # brute force: the first prefix that closes it
    assert not generate.boxed_complete(tok.decode(ids[: first - 1]))
    assert generate.stop_checker(tok, [], boxed=False) is None


def test_resume_with_other_flags_is_refused(tmp_path, tiny_llama, monkeypatch):
    """A leftover OUT.part made with --max-new-tokens 6 is not merged into a run asking for 2 tokens."""
    src = problems_file(tmp_path, 4)
    out = tmp_path / "gen.jsonl"
    eos_never(monkeypatch)
    monkeypatch.setattr(engine.Engine, "_step", dies_on_call(7, engine.Engine._step))
    with pytest.raises(KeyboardInterrupt):
        generate.main(["--model", tiny_llama, "--style", "direct", "--max-new-tokens", "6", "--batch-size", "2", src,
                       "-o", str(out)])
    part = (tmp_path / "gen.jsonl.part").read_text()
    # the settings hold the resolved dtype, so the other dtype is the one that auto does not pick on this CPU
    auto = str(resolve_dtype("auto", torch.device("cpu"))[0]).replace("torch.", "")
    other = "float32" if auto == "bfloat16" else "bfloat16"
    for flag in (["--max-new-tokens", "2"], ["--temperature", "0.5"], ["--style", "cot"], ["--batch-size", "3"],
                 ["--stop-boxed"], ["--dtype", other]):
        argv = ["--model", tiny_llama, "--style", "direct", "--max-new-tokens", "6", "--batch-size", "2", src,
                "-o", str(out)]
        for k in range(0, len(flag), 2):
            if flag[k] in argv:
                argv[argv.index(flag[k]) + 1] = flag[k + 1]
            else:
                argv += flag[k: k + 2]
        r = run_script("generate.py", *argv)
        assert one_line_error(r) and "other settings" in r.stderr, (flag, r.stderr)
        assert (tmp_path / "gen.jsonl.part").read_text() == part and not out.exists()


def test_stdout_gets_the_same_records_in_the_same_order_as_a_file(tmp_path, tiny_llama):
    src = problems_file(tmp_path, 5)
    argv = ["--model", tiny_llama, "--style", "direct", "--max-new-tokens", "3", "--batch-size", "2", src]
    r = run_script("generate.py", *argv, "-o", "-")
    generate.main(argv + ["-o", str(tmp_path / "g.jsonl")])
    strip = lambda rec: {k: v for k, v in rec.items() if k != "seconds"}
    piped = [strip(json.loads(x)) for x in r.stdout.splitlines()]
    filed = [strip(json.loads(x)) for x in open(tmp_path / "g.jsonl")]
    assert piped == filed and [p["id"] for p in piped] == [json.loads(x)["id"] for x in open(src)]


@pytest.mark.parametrize("flags, what", [(["--limit", "-1"], "--limit"), (["--max-new-tokens", "-5"], "--max-new-tokens"),
                                         (["--temperature", "-1"], "--temperature"), (["--top-p", "1.5"], "--top-p"),
                                         (["--batch-size", "-1"], "--batch-size"), (["--top-k", "x"], "--top-k")])
def test_numbers_are_validated_at_parse_time(tmp_path, flags, what):
    r = run_script("generate.py", "--model", "no/such/model/dir", str(tmp_path / "none.jsonl"), *flags,
                   "-o", str(tmp_path / "o.jsonl"))
    assert one_line_error(r) and f"argument {what}" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_outputs_and_inputs_are_one_line_and_leave_nothing(tmp_path, tiny_llama):
    src = problems_file(tmp_path, 2)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "bad.jsonl").write_bytes(b'{"id": 1, "question": "caf\xe9"}\n')
    (tmp_path / "num.jsonl").write_text('{"id": 1, "question": 5}\n')
    before = sorted(os.listdir(tmp_path))
    cases = [([src, "-o", str(tmp_path / "adir")], "is a folder"),
             ([src, "-o", str(tmp_path / "afile" / "o.jsonl")], "is a file, not a folder"),
             ([str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o.jsonl")], "not UTF-8"),
             ([str(tmp_path / "num.jsonl"), "-o", str(tmp_path / "o.jsonl")], "question is int, not a string"),
             ([src, "--model", str(tmp_path / "adir"), "-o", str(tmp_path / "o.jsonl")], "no config.json")]
    for argv, msg in cases:
        r = run_script("generate.py", "--model", tiny_llama, *argv)
        assert one_line_error(r) and msg in r.stderr, (argv, r.stderr)
        assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "adir") == []


def test_a_model_that_fails_to_load_leaves_no_part_file(tmp_path, tiny_llama):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(tiny_llama):
        if not f.endswith(".safetensors"):
            (broken / f).write_bytes(open(os.path.join(tiny_llama, f), "rb").read())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    src = problems_file(tmp_path, 2)
    r = run_script("generate.py", "--model", str(broken), src, "-o", str(tmp_path / "o.jsonl"))
    assert one_line_error(r, logged=1) and "cannot load model" in r.stderr  # after the "device cpu, dtype" line
    assert not list(tmp_path.glob("o.jsonl*"))
