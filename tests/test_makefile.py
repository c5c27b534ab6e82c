"""The Makefile passes every setting to every stage it concerns (read from the commands `make -n` would run)."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT


def make_n(*overrides):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Under `make test` the outer make's flags and its command-line variables (`make test SIZE=large`) reach this
    # make through the environment, as would any variable a user exported: plan from a bare environment instead.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    return subprocess.run(["make", "-n", "-B", "all", "MODEL=x", *overrides], cwd=ROOT, capture_output=True, text=True,
                          env=env)


def planned_commands(tmp_path, *overrides):
    """The stage commands of `make -n -B all`, continuation lines joined."""
    out = [] if any(o.startswith("SIZE=") for o in overrides) else [f"OUT={tmp_path}/o"]  # SIZE picks its own OUT
    r = make_n(*out, *overrides)
    assert r.returncode == 0, r.stderr
    return [c for c in r.stdout.replace("\\\n", " ").splitlines() if re.search(r"\b\w+\.py\b", c)]


def computes(cmd):
    """Does this stage run the model (and so take a compute dtype and a device)?"""
    if re.search(r"\b(generate|recover)\.py\b", cmd):
        return True
    if "calibrate.py" in cmd:
        return re.search(r"--source (traces|selectivity)", cmd) is not None
    if "prune.py" in cmd:
        return re.search(r"--method (wanda|sparsegpt)", cmd) is not None  # the others compute nothing in a dtype
    return False


def test_dtype_and_device_reach_every_stage_that_computes(tmp_path):
    cmds = [c for c in planned_commands(tmp_path, "DTYPE=float16", "DEVICE=cpu") if computes(c)]
    stages = {re.search(r"(\w+\.py)", c).group(1) for c in cmds}
    assert stages == {"generate.py", "calibrate.py", "prune.py", "recover.py"}
    missing = [c for c in cmds if not ("--dtype float16" in c and "--device cpu" in c)]
    assert not missing, missing[:3]


def test_batch_reaches_generation_and_traces(tmp_path):
    cmds = planned_commands(tmp_path, "BATCH=7")
    gen = [c for c in cmds if ("generate.py" in c and "--perplexity" not in c) or "--source traces" in c]
    assert gen and all("--batch-size 7" in c for c in gen)


def test_functional_settings_reach_the_interventions(tmp_path):
    cmds = planned_commands(tmp_path, "FUNC_N=7", "FUNC_POINTS=3", "SPARSITIES=0.1 0.2 0.5")
    inter = [c for c in cmds if "--intervene" in c]
    assert len(inter) == 4 and all("--limit 7" in c and "--early-points 3" in c for c in inter)  # every sparsity
    report = next(c for c in cmds if "correlate.py" in c and "--study" not in c)
    assert report.count("/functional/n7/scores/") == 4
    assert not [c for c in planned_commands(tmp_path, "FUNC_N=0") if "--intervene" in c]


def size_settings(cmds):
    """What the SIZE presets set, read back from the planned commands."""
    magnitude = [c for c in cmds if "--method magnitude" in c and "/rac/" not in c]
    neuron_gen = [c for c in cmds if "generate.py" in c and "/neurons/" in c]
    return {"sweep": len(magnitude),
            "prompts": sorted({re.search(r"--n-prompts (\d+)", c).group(1) for c in cmds if "--n-prompts" in c}),
            "tokens": sorted({re.search(r"--max-new-tokens (\d+)", c).group(1) for c in neuron_gen}),
            "steps": sorted({re.search(r"--max-steps (\d+)", c).group(1) for c in cmds if "recover.py" in c})}


def test_size_presets_and_their_trees(tmp_path):
    quick = size_settings(planned_commands(tmp_path, "SIZE=quick"))
    assert quick == {"sweep": 5, "prompts": ["400"], "tokens": ["512"], "steps": ["12"]}
    large = size_settings(planned_commands(tmp_path, "SIZE=large"))
    assert large == {"sweep": 10, "prompts": ["800"], "tokens": ["1024"], "steps": ["30"]}
    assert size_settings(planned_commands(tmp_path)) == quick
    # each size writes its own tree, so that neither takes the other's files as done
    trees = {size: set(re.findall(r" -o (out/[^/\s]+)/", make_n(f"SIZE={size}").stdout)) for size in ("quick", "large")}
    assert trees == {"quick": {"out/x"}, "large": {"out/x-large"}}


def test_a_variable_wins_over_its_size_and_a_bad_size_stops_make(tmp_path):
    assert size_settings(planned_commands(tmp_path, "SIZE=large", "NEURON_TOKENS=64"))["tokens"] == ["64"]
    r = make_n("SIZE=huge")
    assert r.returncode != 0 and "SIZE=huge: use SIZE=quick" in r.stderr and not r.stdout
