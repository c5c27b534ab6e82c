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
