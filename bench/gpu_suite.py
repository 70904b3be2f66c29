"""The accelerator run (issue 10): every device benchmark in one prepared script.

It runs each benchmark in a child process of its own (a crash or an
out-of-memory in one leaves the others their numbers), each under a time
limit, collects the JSON line each prints, and writes them all to
`--out/gpu_suite.json` (default `$OUT` when set, as on the lent machine) as
soon as each finishes, so a run stopped at its limit keeps what it measured.
Nothing here imports TensorFlow: the lent machine has jax, flax, optax,
orbax, grpcio and protobuf only.

    python bench/gpu_suite.py                    # the GPU plan below (about 8 minutes on an H100/H200)
    python bench/gpu_suite.py --quick            # the same benchmarks at CPU sizes (a check of the script)

What each entry compares (each benchmark's docstring says more):
  - bench_train:  the engine's train step against a plain jitted fine-tune,
                  B/16 at 224, batch 128 (and a frozen-body variant);
  - bench_input:  device input pipeline vs host numpy vs a train step, at
                  224 from 375x500-like sources;
  - bench_prefix: a generation of candidates sharing a frozen prefix, whole
                  model vs shared prefix vs latent replay;
  - bench_attention: float32 vs bfloat16 step, and whether XLA picked cuDNN's
                  fused attention.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
logger = logging.getLogger("gpu_suite")

# (name, script, arguments, seconds allowed)
GPU_PLAN = (
    ("train_b16_224", "bench_train.py", ["--size", "B/16", "--image-size", "224", "--batch", "128", "--rounds", "6",
                                         "--json"], 210),
    ("input_224_from_500", "bench_input.py", ["--size", "B/16", "--image-size", "224", "--source-size", "500",
                                              "--batch", "128"], 90),
    ("prefix_b16_224", "bench_prefix.py", ["--size", "B/16", "--image-size", "224", "--batch", "128",
                                           "--examples", "4096", "--steps-per-round", "32", "--repeats", "1"], 180),
    ("attention_b16_224", "bench_attention.py", ["--size", "B/16", "--image-size", "224", "--batch", "128"], 120),
)
QUICK_PLAN = (
    ("train_tiny", "bench_train.py", ["--rounds", "2", "--json"], 240),
    ("input_tiny", "bench_input.py", ["--seconds", "1"], 120),
    ("prefix_tiny", "bench_prefix.py", ["--repeats", "1", "--steps-per-round", "32"], 240),
    ("attention_tiny", "bench_attention.py", [], 120),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU sizes: checks the script, measures nothing of GPUs")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of gpu_suite.json")
    parser.add_argument("--only", action="append", default=[], help="run only these entries (repeatable)")
    return parser.parse_args(argv)


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_entry(name: str, script: str, arguments: list[str], limit: float) -> dict:
    started = time.perf_counter()
    command = [sys.executable, os.path.join(HERE, script), *arguments]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        code = "timeout"
    entry = {"name": name, "command": " ".join(command[1:]), "returncode": code,
             "seconds": round(time.perf_counter() - started, 1), "result": last_json_line(output)}
    if entry["result"] is None:
        entry["tail"] = output[-2000:]
    return entry


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    plan = QUICK_PLAN if args.quick else GPU_PLAN
    if args.only:
        plan = tuple(entry for entry in plan if entry[0] in args.only)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_suite.json")
    entries = []
    for name, script, arguments, limit in plan:
        logger.info("== %s (at most %d s)", name, limit)
        entry = run_entry(name, script, arguments, limit)
        entries.append(entry)
        logger.info("%s: rc %s in %.1f s: %s", name, entry["returncode"], entry["seconds"],
                    json.dumps(entry["result"]) if entry["result"] else entry.get("tail", "")[-600:])
        with open(path + ".tmp", "w") as f:
            json.dump(entries, f, indent=1)
        os.replace(path + ".tmp", path)
    ok = sum(1 for e in entries if e["result"] is not None)
    print(json.dumps({"benchmark": "gpu_suite", "entries": len(entries), "with_results": ok, "file": path}))
    return 0 if ok == len(entries) else 1


if __name__ == "__main__":
    sys.exit(main())
