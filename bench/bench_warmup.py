"""First Predict after a restart against steady state, without and with warm-up.

Starts a real server (temporary state directory, a fast search
configuration), runs the bundled "digits" task, predicts at batch sizes 1, 3
and 16 (so those buckets count as used), and stops it with SIGTERM. Then, in
fresh processes on that state directory and its compilation cache, as a
restarted server would be:

  cold  Engine.restore, then Predict at once (what the server did before
        warm-up existed: the first call per bucket traced and compiled);
  warm  Engine.restore, Engine.warm_up() (what the server now does before it
        reports SERVING), then Predict.

For each batch size it prints the first call's latency over the steady
state's (the median of later calls); 64 was never used before the restart,
so it is not warmed and shows what an unwarmed bucket costs. The last line is
one JSON object.

    python bench/bench_warmup.py [--batches 1,3,16,64] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import serving  # noqa: E402  (sets up sys.path and the JAX memory environment)

TASK = "digits"
USED_BEFORE_RESTART = (1, 3, 16)
STEADY_CALLS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,3,16,64", help="comma-separated batch sizes to time")
    parser.add_argument("--state-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--child", choices=("cold", "warm"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    return args


def prepare(state_dir: str) -> None:
    """A state directory with a READY digits task whose clients used USED_BEFORE_RESTART."""
    with serving.running_server(state_dir, serving.FAST_SEARCH) as (_, client):
        serving.run_task(client, serving.bundled_spec(TASK))
        for batch in USED_BEFORE_RESTART:
            client.predict(TASK, serving.digits_images(batch))


def time_predictions(engine, batches: list[int]) -> dict[str, dict[str, float]]:
    """Per batch size: the first call's and the steady state's latency in ms."""
    timings = {}
    for batch in batches:
        images = serving.digits_images(batch)
        started = time.perf_counter()
        engine.predict(TASK, images)
        first = time.perf_counter() - started
        steady = []
        for _ in range(STEADY_CALLS):
            started = time.perf_counter()
            engine.predict(TASK, images)
            steady.append(time.perf_counter() - started)
        median = statistics.median(steady)
        timings[str(batch)] = {"first_ms": 1e3 * first, "steady_ms": 1e3 * median, "ratio": first / median}
    return timings


def child(mode: str, state_dir: str, batches: list[int]) -> None:
    """One restarted process: restore, maybe warm up, time; prints one JSON line."""
    from evolve.engine import Engine, enable_compilation_cache  # pylint: disable=import-outside-toplevel

    enable_compilation_cache(os.path.join(state_dir, "xla_cache"))  # as the server does
    started = time.perf_counter()
    engine = Engine.restore(state_dir)
    restore_s = time.perf_counter() - started
    warm_up_s, buckets = 0.0, []
    if mode == "warm":
        result = engine.warm_up()
        warm_up_s, buckets = result.seconds, list(result.buckets)
    print(json.dumps({"mode": mode, "restore_s": restore_s, "warm_up_s": warm_up_s, "warm_buckets": buckets,
                      "batches": time_predictions(engine, batches)}))


def run_child(mode: str, state_dir: str, batches: list[int]) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, "--state-dir", state_dir,
               "--batches", ",".join(map(str, batches))]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.state_dir, args.batches)
        return 0
    with tempfile.TemporaryDirectory(prefix="evolve-bench-warmup-") as scratch:
        state_dir = args.state_dir or os.path.join(scratch, "state")
        prepare(state_dir)
        results = {mode: run_child(mode, state_dir, args.batches) for mode in ("cold", "warm")}
    print(f"{'batch':>5} {'used before':>11} | {'cold first':>10} {'steady':>7} {'ratio':>6} | "
          f"{'warm first':>10} {'steady':>7} {'ratio':>6}")
    for batch in args.batches:
        cold, warm = results["cold"]["batches"][str(batch)], results["warm"]["batches"][str(batch)]
        used = "yes" if batch in USED_BEFORE_RESTART else "no"
        print(f"{batch:>5} {used:>11} | {cold['first_ms']:>8.1f}ms {cold['steady_ms']:>5.1f}ms {cold['ratio']:>6.1f} | "
              f"{warm['first_ms']:>8.1f}ms {warm['steady_ms']:>5.1f}ms {warm['ratio']:>6.1f}")
    warm = results["warm"]
    print(f"warm-up before SERVING: {warm['warm_up_s']:.2f} s for buckets {warm['warm_buckets']}")
    used = [str(b) for b in args.batches if b in USED_BEFORE_RESTART]
    summary = {
        "bench": "warmup",
        "warm_up_s": warm["warm_up_s"],
        "warm_buckets": warm["warm_buckets"],
        "first_over_steady_cold": {b: results["cold"]["batches"][b]["ratio"] for b in map(str, args.batches)},
        "first_over_steady_warm": {b: warm["batches"][b]["ratio"] for b in map(str, args.batches)},
        "max_ratio_used_buckets_cold": max((results["cold"]["batches"][b]["ratio"] for b in used), default=None),
        "max_ratio_used_buckets_warm": max((warm["batches"][b]["ratio"] for b in used), default=None),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
