"""The user's files are never at risk: what prune.py and recover.py may replace, and what they refuse.

Every run here happens in a scratch working directory under tmp_path, so that a regression cannot reach the repo.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def run(cwd, script, *args, home=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(home or cwd)}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=cwd, env=env)


def refused(r, prog, msg):
    lines = r.stderr.strip().splitlines()
    return (r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error:") and msg in lines[0]
            and "Traceback" not in r.stderr)


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


@pytest.fixture
def work(tmp_path, tiny_llama):
    """A scratch working directory holding a user's notes, a model copy and a home directory."""
    cwd = tmp_path / "work"
    (cwd / "notes").mkdir(parents=True)
    (cwd / "notes" / "ideas.txt").write_text("my notes")
    (cwd / "home").mkdir()
    (cwd / "home" / "h.txt").write_text("home")
    (cwd / "models").mkdir()
    r = run(cwd, "prune.py", "--model", tiny_llama, "--sparsity", "0", "-o", "models/s0")
    assert r.returncode == 0, r.stderr
    (cwd / "models" / "sibling.txt").write_text("a sibling")
    return cwd


@pytest.mark.parametrize("out, msg", [("notes", "did not write"), (".", "working directory"),
                                      ("home", "home or working directory"), ("models", "holds the input"),
                                      ("notes/ideas.txt", "not a folder"), ("notes/ideas.txt/x", "is a file")])
def test_prune_refuses_to_replace_what_it_did_not_write(work, out, msg):
    before = snapshot(work)
    r = run(work, "prune.py", "--model", "models/s0", "--sparsity", "0.5", "-o", out, home=work / "home")
    assert refused(r, "prune.py", msg), r.stderr
    assert snapshot(work) == before and sorted(os.listdir(work)) == ["home", "models", "notes"]


def test_prune_replaces_its_own_output_and_leaves_a_users_tmp_alone(work):
    (work / "s5.tmp").mkdir()
    (work / "s5.tmp" / "keep.txt").write_text("mine")
    for sparsity in ("0.5", "0.3"):
        r = run(work, "prune.py", "--model", "models/s0", "--sparsity", sparsity, "-o", "s5")
        assert r.returncode == 0, r.stderr
    report = json.load(open(work / "s5" / "prune_report.json"))
    assert report["sparsity"] == 0.3
    assert (work / "s5.tmp" / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(work)) == ["home", "models", "notes", "s5", "s5.tmp"]  # no temporary folder left


def test_recover_refuses_a_prune_folder_and_a_foreign_part(work):
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n"
                            for i in range(4)))
    r = run(work, "prune.py", "--model", "models/s0", "--sparsity", "0.5", "-o", "s5")
    assert r.returncode == 0
    before = snapshot(work)
    flags = ["--max-steps", "1", "--dtype", "float32", "--rank", "2", "--batch-size", "2", "--grad-accum", "1"]
    r = run(work, "recover.py", str(data), "--model", "s5", "-o", "models/s0", *flags)
    assert refused(r, "recover.py", "did not write"), r.stderr
    (work / "out.part").mkdir()
    (work / "out.part" / "mine.txt").write_text("mine")
    r = run(work, "recover.py", str(data), "--model", "s5", "-o", "out", *flags)
    assert refused(r, "recover.py", "did not write: move it away"), r.stderr
    assert snapshot(work) == {**before, "out.part/mine.txt": b"mine"}


def test_two_runs_of_the_same_command_at_once_leave_one_whole_folder(work):
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "prune.py"), "--model", "models/s0", "--sparsity",
                               "0.5", "-o", "same"], cwd=work, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}) for _ in range(2)]
    codes = [p.wait() for p in procs]
    assert 0 in codes  # the other may win the race or be refused, but never leaves a half folder
    files = sorted(os.listdir(work / "same"))
    assert "prune_report.json" in files and "model.safetensors" in files
    assert not [f for f in os.listdir(work) if f.startswith(".same")]
