"""Predict throughput over gRPC against the engine called in-process.

Starts a real server (`python -m service.server`, temporary state directory,
a fast search configuration), submits the bundled "digits" task and waits for
its search, then classifies the same real digit images at batch sizes 1, 32
and 256 two ways:

  grpc        EvolveClient.predict: a raw UINT8 tensor through Predict;
  in-process  Engine.restore(state_dir).predict on the same images.

Both are timed after a warm-up (the compile of each batch bucket), in
interleaved rounds; the median round is reported. Goal: grpc / in-process
>= 0.9 at batch 256, i.e. the service adds at most ~10% to a large batch.

    python bench/bench_predict.py [--batches 1,32,256] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import benchmain  # noqa: E402
import serving  # noqa: E402  (sets up sys.path and the JAX memory environment)

TASK = "digits"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,32,256", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=1.0, help="target seconds per timing round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--state-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra server configuration overrides")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    return args


def time_calls(call, images: np.ndarray, calls: int) -> float:
    """Seconds for `calls` back-to-back predictions of `images`."""
    started = time.perf_counter()
    for _ in range(calls):
        call(images)
    return time.perf_counter() - started


def calibrate(call, images: np.ndarray, seconds: float) -> int:
    """Calls per round so that a round lasts about `seconds`."""
    one = time_calls(call, images, 3) / 3
    return max(3, int(seconds / max(one, 1e-6)))


def measure(ways: dict, images: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """images/s of each way of predicting, median of interleaved rounds."""
    for call in ways.values():
        call(images)  # compile this batch's bucket
        call(images)
    calls = {name: calibrate(call, images, args.seconds) for name, call in ways.items()}
    rounds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, call in ways.items():
            rounds[name].append(len(images) * calls[name] / time_calls(call, images, calls[name]))
    return {name: serving.median(values) for name, values in rounds.items()}


def run(args: argparse.Namespace) -> dict:
    import jax  # pylint: disable=import-outside-toplevel

    from evolve.engine import Engine  # pylint: disable=import-outside-toplevel

    overrides = list(serving.FAST_SEARCH) + list(args.set)
    images = serving.digits_images(max(args.batches))
    results = {"benchmark": "predict", "task": TASK, "server_overrides": overrides, "batches": {}}
    with serving.running_server(args.state_dir, overrides, startup_timeout=args.startup_timeout) as (server, client):
        search_seconds = serving.run_task(client, serving.bundled_spec(TASK))
        print(f"search of {TASK} done in {search_seconds:.1f}s", flush=True)
        engine = Engine.restore(server.state_dir)
        if engine is None:
            raise RuntimeError(f"no checkpoint under {server.state_dir} after the search")
        device = engine.devices[0]
        results["device"] = f"{device.platform}:{device.device_kind}"
        results["jax"] = jax.__version__
        results["search_s"] = round(search_seconds, 1)
        ways = {
            "grpc": lambda x: client.predict(TASK, x),
            "in_process": lambda x: engine.predict(TASK, x),
        }
        # Same model, same answers: otherwise the comparison means nothing.
        sample = images[: min(32, len(images))]
        difference = float(np.max(np.abs(ways["grpc"](sample).probabilities - ways["in_process"](sample).probabilities)))
        results["max_probability_difference"] = difference
        if difference > 1e-4:
            raise RuntimeError(f"gRPC and in-process predictions differ by {difference}")
        for batch in args.batches:
            throughput = measure(ways, images[:batch], args)
            results["batches"][str(batch)] = {
                "grpc_images_per_s": round(throughput["grpc"], 1),
                "in_process_images_per_s": round(throughput["in_process"], 1),
                "ratio": round(throughput["grpc"] / throughput["in_process"], 3),
            }
            print(f"  batch {batch}: done", flush=True)
    return results


def print_table(results: dict) -> None:
    print(f"device {results['device']}, jax {results['jax']}, task {results['task']} "
          f"(search {results['search_s']}s; gRPC vs in-process max |dp| {results['max_probability_difference']:.1e})")
    header = f"{'batch':>6} {'gRPC images/s':>14} {'in-process images/s':>20} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for batch, row in results["batches"].items():
        print(f"{batch:>6} {row['grpc_images_per_s']:>14.1f} {row['in_process_images_per_s']:>20.1f} "
              f"{row['ratio']:>6.3f}")
    largest = results["batches"].get("256")
    if largest is not None:
        goal = "meets" if largest["ratio"] >= 0.9 else "BELOW"
        print(f"gRPC / in-process at batch 256 = {largest['ratio']:.3f} ({goal} the 0.9 goal)")


def main(argv: list[str] | None = None) -> int:
    return benchmain.run_main(parse_args, run, print_table, argv)


if __name__ == "__main__":
    sys.exit(main())
