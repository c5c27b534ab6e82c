"""Bad input, as a user would give it, across the stages: one line, exit 2, nothing left behind, checked early."""
import json
import os
import shutil

import pytest

from conftest import one_line_error, run_script


@pytest.mark.parametrize("script, flags, what", [
    ("generate.py", ["--model", "m", "--temperature", "inf"], "--temperature"),
    ("generate.py", ["--model", "m", "--limit", "-1"], "--limit"),
    ("generate.py", ["--model", "m", "--max-new-tokens", "-5"], "--max-new-tokens"),
    ("prune.py", ["--model", "m", "-o", "x", "--percdamp", "inf"], "--percdamp"),
    ("prune.py", ["--model", "m", "-o", "x", "--n-samples", "0"], "--n-samples"),
    ("prune.py", ["--model", "m", "-o", "x", "--calib-seed", "-1"], "--calib-seed"),
    ("calibrate.py", ["--model", "m", "--source", "text", "-o", "x", "--tokens", "1.5"], "--tokens"),
    ("calibrate.py", ["--model", "m", "--source", "traces", "-o", "x", "--top-p", "nan"], "--top-p"),
    ("recover.py", ["--model", "m", "-o", "x", "--alpha", "0"], "--alpha"),
    ("recover.py", ["--model", "m", "-o", "x", "--lr", "inf"], "--lr"),
    ("score.py", ["-", "--limit", "-2"], "--limit")])
def test_numbers_are_checked_when_the_command_line_is_read(tmp_path, script, flags, what):
    r = run_script(script, *flags)
    assert one_line_error(r) and what in r.stderr, r.stderr


def test_score_refuses_a_summary_path_that_is_a_folder_before_writing_anything(tmp_path):
    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps({"id": 1, "output": "2 + 2 = 4. #### 4", "answer": "#### 4"}) + "\n")
    (tmp_path / "sdir").mkdir()
    r = run_script("score.py", str(src), "-o", str(tmp_path / "s.jsonl"), "--summary", str(tmp_path / "sdir"))
    assert one_line_error(r) and "is a folder" in r.stderr
    assert not (tmp_path / "s.jsonl").exists() and os.listdir(tmp_path / "sdir") == []


@pytest.mark.parametrize("out", ["-", "scores.txt"])
def test_selectivity_must_go_to_a_safetensors_file(tmp_path, tiny_llama, out):
    r = run_script("calibrate.py", "--model", tiny_llama, "--source", "selectivity", "-o", out)
    assert one_line_error(r) and ".safetensors" in r.stderr and r.stdout == ""


def broken_weights(tmp_path, tiny_llama):
    """A model folder whose tokenizer reads but whose weights do not: any check done after loading would fail on
    the weights instead."""
    bad = tmp_path / "broken"
    shutil.copytree(tiny_llama, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    return str(bad)


def test_too_little_calibration_text_is_refused_before_the_model_loads(tmp_path, tiny_llama):
    calib = tmp_path / "c.jsonl"
    calib.write_text(json.dumps({"id": 1, "text": "too short"}) + "\n")
    r = run_script("prune.py", "--model", broken_weights(tmp_path, tiny_llama), "--method", "sparsegpt", "--sparsity",
                   "0.5", "--calib", str(calib), "--n-samples", "4", "--seqlen", "64", "-o", str(tmp_path / "x"))
    assert one_line_error(r) and "--n-samples 4 x --seqlen 64 needs 256" in r.stderr
    assert not (tmp_path / "x").exists()


def test_a_model_that_does_not_load_says_why_on_one_line(tmp_path, tiny_llama):
    r = run_script("generate.py", "--model", broken_weights(tmp_path, tiny_llama), "-", stdin='{"id": 1, '
                   '"question": "q"}\n')
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("generate.py:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr
    assert "cannot load model" in lines[0] and "broken" in lines[0] and len(lines[0]) > 60  # the loader's reason too


def test_a_damaged_recover_checkpoint_is_one_line(tmp_path, tiny_llama):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n"
                            for i in range(4)))
    out = tmp_path / "rec"
    part = tmp_path / "rec.part"
    part.mkdir()
    (part / "checkpoint.safetensors").write_bytes(b"\xff" * 64)
    r = run_script("recover.py", str(data), "--model", tiny_llama, "-o", str(out), "--max-steps", "1", "--dtype",
                   "float32")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "damaged" in r.stderr.strip().splitlines()[-1]
    assert not out.exists() and (part / "checkpoint.safetensors").read_bytes() == b"\xff" * 64


def test_calibrate_refuses_to_merge_traces_made_with_other_flags(tmp_path, tiny_llama):
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"id": i, "question": f"What is {i} + 1?"}) + "\n" for i in range(4)))
    out = tmp_path / "traces.jsonl"
    (tmp_path / "traces.jsonl.part").write_text(json.dumps({"cotprune_part": {"stage": "calibrate"}}) + "\n")
    r = run_script("calibrate.py", "--model", tiny_llama, "--source", "traces", str(src), "--max-new-tokens", "4",
                   "--tokens", "0", "-o", str(out))
    assert one_line_error(r) and "other settings" in r.stderr, r.stderr
    assert not out.exists()


def test_calibrate_writes_the_same_records_to_stdout_and_to_a_file(tmp_path, tiny_llama):
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"id": i, "question": f"What is {i} + 1?"}) + "\n" for i in range(5)))
    argv = ["--model", tiny_llama, "--source", "traces", str(src), "--max-new-tokens", "4", "--tokens", "20",
            "--batch-size", "2", "--dtype", "float32"]
    r = run_script("calibrate.py", *argv, "-o", "-")
    assert r.returncode == 0, r.stderr
    run_script("calibrate.py", *argv, "-o", str(tmp_path / "t.jsonl"))
    assert r.stdout == (tmp_path / "t.jsonl").read_text()
