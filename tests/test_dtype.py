"""--dtype auto: bfloat16 only where the device runs it natively, decided from simulated CPUs and GPUs."""
import pytest
import torch

import common.runtime as runtime
from common.cli import CotpruneError
from common.runtime import resolve_dtype

CPU = torch.device("cpu")
AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}
SAPPHIRE_RAPIDS = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16", "amx_tile"}
SKYLAKE_X = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
GRAVITON3 = {"fp", "asimd", "sve", "bf16", "i8mm"}


@pytest.fixture
def cpu(monkeypatch):
    """Simulate a CPU: its /proc/cpuinfo flags and, for the ambiguous ones, what the timed probe finds."""
    monkeypatch.delenv(runtime.BF16_ENV, raising=False)
    for name in runtime.ISA_ENVS:  # CI caps oneDNN in one of its runs; these tests simulate CPUs themselves
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_CPU_BF16", None)
    probes = []

    def simulate(flags, probe_fast=None):
        monkeypatch.setattr(runtime, "_CPU_BF16", None)
        monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)

        def probe():
            probes.append(1)
            assert probe_fast is not None, "the probe ran for a CPU whose flags settle the question"
            return probe_fast, 2.0 if probe_fast else 0.1
        monkeypatch.setattr(runtime, "_bf16_probe", probe)
        return probes
    return simulate


@pytest.mark.parametrize("flags, expect", [(AVX2, torch.float32), (SAPPHIRE_RAPIDS, torch.bfloat16),
                                           (GRAVITON3, torch.bfloat16)])
def test_cpu_flags_decide_without_a_probe(cpu, flags, expect):
    probes = cpu(flags)
    dtype, why = resolve_dtype("auto", CPU)
    assert dtype == expect and not probes
    assert ("no native bfloat16" in why) == (expect == torch.float32)


@pytest.mark.parametrize("fast", [True, False])
def test_ambiguous_cpus_are_settled_by_the_probe_once(cpu, fast):
    for flags in (SKYLAKE_X, None):  # AVX-512 without bf16; no /proc/cpuinfo (macOS, some containers)
        probes = cpu(flags, probe_fast=fast)
        before = len(probes)
        assert resolve_dtype("auto", CPU)[0] == (torch.bfloat16 if fast else torch.float32)
        assert resolve_dtype("auto", CPU)[0] == (torch.bfloat16 if fast else torch.float32)
        assert len(probes) == before + 1  # once per process, not per call
        assert "probe" in resolve_dtype("auto", CPU)[1]


def test_environment_forces_either_path(cpu, monkeypatch):
    cpu(SAPPHIRE_RAPIDS)
    monkeypatch.setenv(runtime.BF16_ENV, "0")
    assert resolve_dtype("auto", CPU) == (torch.float32, f"{runtime.BF16_ENV}=0")
    monkeypatch.setattr(runtime, "_CPU_BF16", None)
    cpu(AVX2)
    monkeypatch.setenv(runtime.BF16_ENV, "1")
    assert resolve_dtype("auto", CPU)[0] == torch.bfloat16
    monkeypatch.setattr(runtime, "_CPU_BF16", None)
    monkeypatch.setenv(runtime.BF16_ENV, "yes")
    with pytest.raises(CotpruneError, match="must be 0 or 1"):
        resolve_dtype("auto", CPU)


@pytest.mark.parametrize("fast", [True, False])
def test_a_capped_onednn_is_settled_by_the_probe_whatever_the_flags(cpu, monkeypatch, fast):
    probes = cpu(SAPPHIRE_RAPIDS, probe_fast=fast)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    dtype, why = resolve_dtype("auto", CPU)
    assert dtype == (torch.bfloat16 if fast else torch.float32) and len(probes) == 1
    assert "ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN" in why


def test_onednn_capped_at_avx2_really_takes_the_slow_path(tmp_path):
    """Not simulated: with oneDNN capped at AVX2, torch emulates bfloat16 on any x86 CPU, and refuses the packed
    linears; auto must then be float32 and fast_linears must step aside (as on an AVX2-only laptop)."""
    import subprocess
    import sys
    from conftest import ROOT
    code = ("import torch, common.runtime as r, common.engine as e\n"
            "m = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(torch.bfloat16)\n"
            "with e.fast_linears(m) as packed: print(r.resolve_dtype('auto', torch.device('cpu'))[0], packed)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != runtime.BF16_ENV}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**env, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert r.returncode == 0, r.stderr
    if torch.backends.mkldnn.is_available() and __import__("platform").machine() in ("x86_64", "AMD64"):
        assert r.stdout.split() == ["torch.float32", "False"]


def test_explicit_dtype_is_kept_whatever_the_cpu(cpu):
    cpu(AVX2)
    assert resolve_dtype("bfloat16", CPU) == (torch.bfloat16, "--dtype bfloat16")
    assert resolve_dtype("float16", CPU)[0] == torch.float16


@pytest.mark.parametrize("native, training, expect", [(True, False, torch.bfloat16), (True, True, torch.bfloat16),
                                                      (False, False, torch.float16), (False, True, torch.float32)])
def test_gpus_without_bfloat16_get_float16_but_never_for_training(monkeypatch, native, training, expect):
    """A P100/V100/T4 has no native bfloat16: float16 for inference, float32 for LoRA training (no loss scaling)."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # emulated bfloat16 "works" everywhere, slowly
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    dtype, why = resolve_dtype("auto", torch.device("cuda"), training=training)
    assert dtype == expect and asked == [False]
    assert ("no native bfloat16" in why) == (not native)


def test_cpu_flags_reads_this_machine():
    flags = runtime.cpu_flags()
    assert flags is None or isinstance(flags, set)


def test_the_real_probe_is_quick_and_answers():
    import time
    t0 = time.perf_counter()
    fast, ratio = runtime._bf16_probe()
    assert isinstance(fast, bool) and ratio > 0
    assert time.perf_counter() - t0 < 30  # generous: it is ~0.1 s; this only catches a runaway probe
