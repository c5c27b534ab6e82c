"""The Makefile passes every setting to every stage it concerns (read from the commands `make -n` would run)."""
import re
import shutil
import subprocess

import pytest

from conftest import ROOT


def planned_commands(tmp_path, *overrides):
    """The stage commands of `make -n -B all`, continuation lines joined."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-n", "-B", "all", "MODEL=x", f"OUT={tmp_path}/o", *overrides], cwd=ROOT,
                       capture_output=True, text=True)
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
    cmds = planned_commands(tmp_path, "FUNC_N=7", "FUNC_POINTS=3")
    inter = [c for c in cmds if "--intervene" in c]
    assert len(inter) == 11 and all("--limit 7" in c and "--early-points 3" in c for c in inter)  # every sparsity
    report = next(c for c in cmds if "correlate.py" in c and "--study" not in c)
    assert report.count("/functional/n7/scores/") == 11
    assert not [c for c in planned_commands(tmp_path, "FUNC_N=0") if "--intervene" in c]
