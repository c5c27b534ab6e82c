"""Device, dtype and seed, resolved once: bfloat16 only where the hardware runs it natively, measured, not assumed.

    resolve_device / resolve_dtype / cpu_bf16    auto = the fastest supported choice, with the reason in words
    describe_runtime / runtime_info              printed once on stderr, written into summaries and metadata
    set_seed / peak_memory_mb / param_counts / Timer
    CpuMeter                                     wall and CPU time, and how much of the machine others used meanwhile
"""
import os
import random
import resource
import time

from common.cli import CotpruneError, env_choice, log


def resolve_device(name="auto"):
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CotpruneError(f"unknown --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CotpruneError(f"--device {name} asked for, but torch sees no CUDA GPU")
    return device


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_runtime_flags(parser, dtype_help, seed_help):
    """--device, --dtype, --seed and --trust-remote-code, spelled and defaulted the same in every stage."""
    import argparse
    from common.cli import count
    parser.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help=f"{dtype_help}; auto = bfloat16 where the device runs it natively, else float32 "
                             f"(float16 on GPUs without bfloat16 and on MPS; never for training)")
    parser.add_argument("--seed", type=count, default=0, help=seed_help)
    parser.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                        help="allow model code from the hub (off: only transformers' own architectures)")


BF16_ENV = "COTPRUNE_CPU_BF16"  # 1 / 0 overrides the CPU bfloat16 check (tests and CI force both paths with it)
# oneDNN's own cap on the instructions it may use: ONEDNN_MAX_CPU_ISA=AVX2 on an avx512_bf16 CPU makes torch's bfloat16
# matmuls 2.5-4x slower than float32 (measured), exactly as on an AVX2-only CPU, so the flags no longer decide.
ISA_ENVS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (x86 'flags', Arm 'Features'); None where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


def _bf16_probe():
    """Is a decode-shaped bfloat16 matmul at least as fast as float32 here? (about 0.1 s; best of 3 each)"""
    import torch
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 512, generator=g), torch.randn(512, 1024, generator=g)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = a.to(dtype), b.to(dtype)
        x @ w  # warm-up: oneDNN builds its kernel on the first call
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ w
            times.append(time.perf_counter() - t0)
        best[dtype] = min(times)
    return best[torch.bfloat16] <= best[torch.float32], best[torch.float32] / best[torch.bfloat16]


_CPU_BF16 = None  # (native, reason), decided once per process


def cpu_bf16():
    """(True if bfloat16 is both supported and fast on this CPU, the reason in words).

    Where bfloat16 is native (avx512_bf16, AMX, Arm bf16) it is the faster dtype (1.8-3.2x float32 measured on a
    Zen 4 EPYC); on CPUs without it (AVX2-class x86: most laptops before 2022, AMD Zen 2/3, many cloud VMs) torch
    emulates bfloat16, several times slower than float32 (docs/methods.md, "Devices and dtypes", has the figures).
    AVX-512 without bf16, CPUs whose flags cannot be read, and a oneDNN capped by ONEDNN_MAX_CPU_ISA are settled
    by a timed probe.
    """
    global _CPU_BF16
    if _CPU_BF16 is None:
        forced = env_choice(BF16_ENV, ("0", "1"))
        flags = cpu_flags()
        if forced:
            _CPU_BF16 = forced == "1", f"{BF16_ENV}={forced}"
        elif cap := next((f"{k}={os.environ[k]}" for k in ISA_ENVS if os.environ.get(k, "").strip()), None):
            fast, ratio = _bf16_probe()
            _CPU_BF16 = fast, (f"{cap} caps oneDNN: a timed probe found bfloat16 matmuls {ratio:.2f}x the speed of "
                               f"float32 here")
        elif flags is not None and flags & {"avx512_bf16", "amx_bf16", "bf16"}:
            _CPU_BF16 = True, "this CPU has native bfloat16 (" + ", ".join(
                sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})) + ")"
        elif flags is not None and "avx2" in flags and "avx512bw" not in flags:
            _CPU_BF16 = False, "this CPU has no native bfloat16 (AVX2 only)"
        else:
            fast, ratio = _bf16_probe()
            _CPU_BF16 = fast, (f"a timed probe found bfloat16 matmuls {ratio:.2f}x the speed of float32 on this CPU, "
                               f"which has no native bfloat16 flag")
    return _CPU_BF16


def resolve_dtype(name, device, training=False):
    """(torch dtype, reason) for --dtype `name` on `device`; 'auto' picks what is supported and fast there.

    CPU: bfloat16 where cpu_bf16() says it is native and fast, else float32. CUDA: bfloat16 where the GPU has it
    natively (Ampere and later), else float16 for inference and float32 for training (float16 training needs loss
    scaling, which recover.py does not do). MPS: float16 for inference, float32 for training. SparseGPT's Hessians
    and all statistics are accumulated in float32 or float64 whatever this returns.
    """
    import torch
    if name != "auto":
        return getattr(torch, name), f"--dtype {name}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "this GPU has native bfloat16"
        if training:
            return torch.float32, "this GPU has no native bfloat16, and float16 training would need loss scaling"
        return torch.float16, "this GPU has no native bfloat16"
    if device.type == "mps":
        return (torch.float32, "training on MPS") if training else (torch.float16, "MPS")
    native, reason = cpu_bf16()
    return (torch.bfloat16 if native else torch.float32), reason


def set_seed(seed):
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device):
    """Peak memory of this process in MiB: allocated GPU memory on CUDA, else peak resident set size."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def param_counts(model):
    """(all parameters, non-zero parameters, bytes of the dense weights); tied tensors count once."""
    seen, total, nonzero, nbytes = set(), 0, 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        nonzero += int(p.count_nonzero())
        nbytes += p.numel() * p.element_size()
    return total, nonzero, nbytes


def runtime_info(device, dtype, seed, dtype_reason=None):
    """The resolved device, dtype (and why) and seed, as summaries and checkpoint metadata record them."""
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "dtype_reason": dtype_reason,
            "seed": seed}


def describe_runtime(device, dtype, seed, dtype_reason=None):
    """Log the resolved device, dtype (and why) and seed once on stderr; returns runtime_info."""
    info = runtime_info(device, dtype, seed, dtype_reason)
    log(f"device {device}, dtype {info['dtype']}" + (f" ({dtype_reason})" if dtype_reason else "") + f", seed {seed}")
    return info


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


CONTENDED = 0.10  # a run is flagged when other processes took more than this share of the machine's CPU time


def _machine_busy_seconds():
    """CPU seconds all processes (and the hypervisor's steal) have used since boot, from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """Measures a block: wall seconds, this process's CPU seconds, and the share of the machine's CPU time that other
    processes used meanwhile (other_cpu_share; None where /proc/stat is missing). Speeds measured with another job
    on the cores are not comparable with quiet ones: `contended` flags them (share > CONTENDED)."""

    def __enter__(self):
        self.t0, self.own0, self.busy0 = time.perf_counter(), self._own(), _machine_busy_seconds()
        return self

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t0, self._own() - self.own0
        busy = _machine_busy_seconds()
        self.other = None
        if busy is not None and self.busy0 is not None and self.wall > 0:
            self.other = max(0.0, busy - self.busy0 - self.cpu) / (self.wall * (os.cpu_count() or 1))

    def info(self):
        return {"wall_seconds": self.wall, "cpu_seconds": self.cpu, "cpus": os.cpu_count(),
                "other_cpu_share": self.other, "contended": None if self.other is None else self.other > CONTENDED}
