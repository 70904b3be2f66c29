"""Predict latency over gRPC, with and without a search running beside it,
with and without Predict's priority over training (evolve.train.priority).

For each policy (--policies; default both) it starts a real server (`python
-m service.server`, temporary state directory, a fast search configuration,
`--serving-max-yield-ms` 50 for "priority", 0 for "none"), makes the bundled
"digits" task ready, then measures back-to-back Predict calls twice:

  idle    nothing else runs on the server;
  search  while an extension search of another bundled task (with a larger
          budget) trains on the same devices.

Only samples taken while that search's operation is RUNNING count for the
second column, for --busy-seconds (compiles of new candidate structures
included, as in real use); the search is then cancelled. The search's own
training rate in that window (its last TrainingProgress event) shows what
the priority costs training. Prints p50 / p90 / p99 / max side by side per
policy, the ratios, and one JSON line with --json.

    python bench/bench_latency.py [--batch 1] [--requests 300] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchmain  # noqa: E402
import serving  # noqa: E402  (sets up sys.path and the JAX memory environment)

TASK = "digits"
BUSY_TASK = "digits_parity"
RUNNING = 2  # evolve.v1.OPERATION_STATE_RUNNING
QUANTILES = (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
POLICIES = {"priority": 50.0, "none": 0.0}  # --serving-max-yield-ms of each


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="images per Predict call")
    parser.add_argument("--requests", type=int, default=300, help="timed calls while idle")
    parser.add_argument("--busy-seconds", type=float, default=20.0, help="seconds of calls during the search")
    parser.add_argument("--busy-generations", type=int, default=8, help="budget of the concurrent search")
    parser.add_argument("--busy-examples", type=int, default=4096, help="examples per round of that search")
    parser.add_argument("--busy-rounds", type=int, default=4)
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds to wait for the concurrent search to start running")
    parser.add_argument("--state-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra server configuration overrides")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--policies", default="priority,none",
                        help="comma-separated, from: " + ", ".join(POLICIES))
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    return parser.parse_args(argv)


def latencies(client, images, count: int, keep_going=lambda: True) -> list[float]:
    """Seconds of up to `count` sequential Predict calls, while keep_going()."""
    samples: list[float] = []
    while len(samples) < count and keep_going():
        started = time.perf_counter()
        client.predict(TASK, images)
        samples.append(time.perf_counter() - started)
    return samples


def summarize(samples: list[float]) -> dict[str, float]:
    summary = {name: round(serving.percentile_ms(samples, q), 3) for name, q in QUANTILES}
    summary["samples"] = len(samples)
    return summary


def busy_latencies(client, images, args: argparse.Namespace) -> tuple[list[float], dict]:
    """Latencies while BUSY_TASK's search runs; the search is cancelled after."""
    spec = serving.bundled_spec(
        BUSY_TASK, generations=args.busy_generations, train_rounds=args.busy_rounds,
        examples_per_round=args.busy_examples,
    )
    operation = client.submit_task(spec)
    name = operation.name
    deadline = time.monotonic() + args.start_timeout
    while (operation := client.get_operation(name)).metadata.state != RUNNING:
        if operation.done or time.monotonic() > deadline:
            raise RuntimeError(f"the concurrent search {name} never ran (is the search budget too small?)")
        time.sleep(0.2)
    time.sleep(2.0)  # past the data loading, into training
    progress: list = []
    stream = client.watch(BUSY_TASK)
    watcher = threading.Thread(target=_collect_progress, args=(stream, progress), daemon=True)
    watcher.start()
    calls = {"count": 0}
    stop_at = time.monotonic() + args.busy_seconds

    def still_running() -> bool:
        # Checking before every call would add an RPC per sample; every 10th is enough.
        calls["count"] += 1
        if time.monotonic() > stop_at:
            return False
        return calls["count"] % 10 != 0 or client.get_operation(name).metadata.state == RUNNING

    samples = latencies(client, images, sys.maxsize, still_running)
    final = client.get_operation(name)
    stream.cancel()
    info = {"operation": name, "still_running_at_end": final.metadata.state == RUNNING,
            "generation": final.metadata.generation, "candidates_scored": final.metadata.candidates_scored,
            "train_examples_per_second": round(progress[-1], 1) if progress else None}
    if not final.done:
        client.cancel_operation(name)
    return samples, info


def _collect_progress(stream, progress: list) -> None:
    """Appends the examples/s of every TrainingProgress event until cancelled."""
    import grpc  # pylint: disable=import-outside-toplevel

    try:
        for event in stream:
            if event.HasField("training_progress"):
                progress.append(event.training_progress.examples_per_second)
    except grpc.RpcError as error:  # CANCELLED once the bench stops the stream
        if error.code() != grpc.StatusCode.CANCELLED:
            raise


def run_policy(args: argparse.Namespace, policy: str) -> dict:
    overrides = list(serving.FAST_SEARCH) + list(args.set)
    images = serving.digits_images(args.batch)
    extra = ["--serving-max-yield-ms", str(POLICIES[policy])]
    with serving.running_server(args.state_dir, overrides, startup_timeout=args.startup_timeout,
                                extra_args=extra) as (_, client):
        search_seconds = serving.run_task(client, serving.bundled_spec(TASK))
        print(f"search of {TASK} done in {search_seconds:.1f}s", flush=True)
        latencies(client, images, 20)  # warm-up: compile, connection
        idle = latencies(client, images, args.requests)
        print(f"idle: {len(idle)} samples", flush=True)
        busy, info = busy_latencies(client, images, args)
        print(f"during the search of {BUSY_TASK}: {len(busy)} samples", flush=True)
    idle_ms, search_ms = summarize(idle), summarize(busy)
    return {
        "serving_max_yield_ms": POLICIES[policy],
        "idle_ms": idle_ms,
        "search_ms": search_ms,
        "p99_search_over_idle": round(search_ms["p99"] / idle_ms["p99"], 2) if idle_ms["p99"] else None,
        "concurrent_search": {"task": BUSY_TASK, **info},
        "server_overrides": overrides,
    }


def run(args: argparse.Namespace) -> dict:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(policies) - POLICIES.keys())
    if unknown or not policies:
        raise SystemExit(f"--policies: unknown {unknown or policies}; choose from {sorted(POLICIES)}")
    import jax  # pylint: disable=import-outside-toplevel  (the server's device, for the record)

    results = {"benchmark": "predict_latency", "task": TASK, "batch": args.batch,
               "device": jax.devices()[0].device_kind, "policies": {}}
    for policy in policies:
        results["policies"][policy] = run_policy(args, policy)
    if {"priority", "none"} <= results["policies"].keys():
        with_, without = results["policies"]["priority"], results["policies"]["none"]
        results["search_p99_priority_over_none"] = round(with_["search_ms"]["p99"] / without["search_ms"]["p99"], 3)
        rates = (with_["concurrent_search"]["train_examples_per_second"],
                 without["concurrent_search"]["train_examples_per_second"])
        results["train_rate_priority_over_none"] = round(rates[0] / rates[1], 3) if all(rates) else None
    return results


def print_table(results: dict) -> None:
    print(f"Predict latency, task {results['task']}, batch {results['batch']}, device {results['device']} "
          f"(ms; search = while {BUSY_TASK} trains)")
    for policy, result in results["policies"].items():
        idle, busy = result["idle_ms"], result["search_ms"]
        rate = result["concurrent_search"]["train_examples_per_second"]
        print(f"policy {policy} (--serving-max-yield-ms {result['serving_max_yield_ms']:g}); "
              f"the search trained at {rate} examples/s under this load")
        print(f"{'':>8} {'idle':>10} {'search':>10} {'x':>6}")
        for name, _ in QUANTILES:
            ratio = busy[name] / idle[name] if idle[name] else float("nan")
            print(f"{name:>8} {idle[name]:>10.2f} {busy[name]:>10.2f} {ratio:>6.2f}")
        print(f"{'samples':>8} {idle['samples']:>10} {busy['samples']:>10}")
    if "search_p99_priority_over_none" in results:
        print(f"p99 during the search, priority / none: {results['search_p99_priority_over_none']}; "
              f"training rate, priority / none: {results['train_rate_priority_over_none']}")


def main(argv: list[str] | None = None) -> int:
    return benchmain.run_main(parse_args, run, print_table, argv)


if __name__ == "__main__":
    sys.exit(main())
