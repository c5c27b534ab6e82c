"""Benchmark: correlate.py's time and peak memory for one pair of models, against just reading both files.

    python bench/bench_correlate.py                       # M0 and the 0.5 model that `make all` wrote
    python bench/bench_correlate.py --base A --pruned B

Each measurement runs in a fresh process so its peak resident memory is its own: (1) import torch and
safetensors only, the floor any stage pays; (2) read both safetensors files end to end, the I/O floor (after one
untimed read, so both sides find them in the page cache); (3) correlate.compare() on the pair. Streaming means
(3) should need about one matrix beyond (1), not two flattened models. A script that prints numbers, not a test.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "out", "SmolLM2-135M-Instruct", "models")

PROBES = {
    "import only": "import torch, safetensors",
    "read both files": """
import torch, safetensors
from common.checkpoints import safetensors_files
for folder in (BASE, PRUNED):
    for path in safetensors_files(folder):
        with open(path, 'rb') as f:
            while f.read(64 << 20):
                pass
""",
    "correlate.compare": """
import torch, safetensors
from common.checkpoints import tensor_index
from correlate import compare
compare(BASE, PRUNED, tensor_index(BASE))
""",
}


def probe(code, base, pruned):
    """(seconds, peak RSS MiB) of `code` in a fresh interpreter; the timer starts after the imports."""
    body = code.replace("BASE", repr(base)).replace("PRUNED", repr(pruned))
    lines = body.strip().splitlines()
    imports = [x for x in lines if x.startswith(("import", "from"))]
    work = [x for x in lines if not x.startswith(("import", "from"))]
    script = "\n".join(["import resource, time, json, sys", f"sys.path.insert(0, {ROOT!r})", *imports,
                        "t0 = time.perf_counter()", *work,
                        "print(json.dumps([time.perf_counter() - t0,"
                        " resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))"])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=os.path.join(OUT, "s0"), help="dense model folder")
    p.add_argument("--pruned", default=os.path.join(OUT, "s0.5"), help="pruned model folder")
    args = p.parse_args()
    for folder in (args.base, args.pruned):
        if not os.path.isdir(folder):
            sys.exit(f"bench_correlate.py: error: {folder} does not exist; run `make all` or pass --base/--pruned")
    sizes = sum(os.path.getsize(os.path.join(f, n)) for f in (args.base, args.pruned) for n in os.listdir(f)
                if n.endswith(".safetensors"))
    probe(PROBES["read both files"], args.base, args.pruned)  # warm the page cache
    results = {name: probe(code, args.base, args.pruned) for name, code in PROBES.items()}
    report = json.load(open(os.path.join(args.pruned, "prune_report.json")))
    print(f"{args.base} vs {args.pruned}: {sizes / 2**20:.0f} MiB of safetensors, "
          f"{report['pruned_numel'] / 1e6:.1f} M compared weights "
          f"(one flattened float64 copy would be {report['pruned_numel'] * 8 / 2**20:.0f} MiB)")
    for name, (seconds, rss) in results.items():
        print(f"{name:18s} {seconds:7.2f} s   peak RSS {rss:7.0f} MiB")
    (t_read, _), (t_cmp, rss_cmp), (_, rss_0) = (results["read both files"], results["correlate.compare"],
                                                   results["import only"])
    print(f"compare / read time {t_cmp / t_read:.2f}x; memory above the import floor {rss_cmp - rss_0:.0f} MiB")


if __name__ == "__main__":
    main()
