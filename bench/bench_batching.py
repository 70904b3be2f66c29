"""Concurrent Predict calls of one task: each alone vs batched together (evolve.batching).

An in-process engine serves the bundled "digits" task (a tiny ViT trained in
seconds); C client threads each send batches of B real digit images back to
back, as a server's handler threads do for C concurrent clients. Three ways,
in interleaved rounds, the median round reported:

  alone         every call is its own device call (--predict-batch-window-ms -1)
  batched       calls that queue while one runs join one call (window 0 ms, 1 instance)
  batched x2    two calls may run at once; the others queue and join (--predict-instances 2)
  window 2 ms   1 instance; the first caller of a batch also waits 2 ms for others

Prints images/s, latency p50 / p99 and device calls per request for each,
the ratio batched / alone, and one JSON line.

    python bench/bench_batching.py [--clients 8] [--batch 1] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import benchmain  # noqa: E402
import serving  # noqa: E402  (sets up sys.path and the JAX memory environment)

TASK = "digits"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent calling threads")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per timing round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--window-ms", type=float, default=2.0, help="the third way's window")
    return parser.parse_args(argv)


def served_engine():
    """An engine serving the bundled digits task after a seconds-long search."""
    import dataclasses  # pylint: disable=import-outside-toplevel

    from evolve.config import get_config  # pylint: disable=import-outside-toplevel
    from evolve.data.bundled import bundled_task_specs  # pylint: disable=import-outside-toplevel
    from evolve.engine import Engine  # pylint: disable=import-outside-toplevel
    from evolve.types import SearchBudget  # pylint: disable=import-outside-toplevel

    config = get_config("tiny", image_sizes=(16,), default_image_size=16, generations=1, train_rounds=1,
                        examples_per_round=256)
    engine = Engine.create(config)
    spec = next(s for s in bundled_task_specs() if s.name == TASK)
    engine.add_task(dataclasses.replace(spec, budget=SearchBudget()))
    engine.run_search(TASK)
    return engine


def one_round(engine, images: np.ndarray, clients: int, seconds: float) -> dict[str, float]:
    """C threads calling predict back to back for `seconds`; throughput and latencies."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    gate = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(index: int) -> None:
        mine = latencies[index]
        gate.wait()
        while not stop.is_set():
            started = time.perf_counter()
            engine.predict(TASK, images)
            mine.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    calls_before = engine.batcher.stats().calls if engine.batcher else 0
    gate.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    done = [x for per_client in latencies for x in per_client]
    device_calls = (engine.batcher.stats().calls - calls_before) if engine.batcher else len(done)
    return {
        "images_per_s": len(done) * len(images) / elapsed,
        "p50_ms": float(np.percentile(done, 50) * 1000),
        "p99_ms": float(np.percentile(done, 99) * 1000),
        "device_calls_per_request": device_calls / max(len(done), 1),
    }


def run(args: argparse.Namespace) -> dict:
    import jax  # pylint: disable=import-outside-toplevel

    from evolve.batching import MicroBatcher  # pylint: disable=import-outside-toplevel

    started = time.perf_counter()
    engine = served_engine()
    search_seconds = time.perf_counter() - started
    images = serving.digits_images(args.batch)
    limit = engine.options.max_predict_batch
    ways = {
        "alone": None,
        "batched": MicroBatcher(limit, 0.0),
        "batched x2": MicroBatcher(limit, 0.0, instances=2),
        f"window {args.window_ms:g} ms": MicroBatcher(limit, args.window_ms / 1000.0),
    }
    for batcher in ways.values():  # compile every bucket a batch of these calls can reach
        engine.batcher = batcher
        for bucket in (1 << i for i in range((args.clients * args.batch).bit_length() + 1)):
            if bucket <= limit:
                engine.predict(TASK, serving.digits_images(bucket))
        one_round(engine, images, args.clients, 0.3)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, batcher in ways.items():
            engine.batcher = batcher
            rounds[name].append(one_round(engine, images, args.clients, args.seconds))
    summary = {name: {key: serving.median([r[key] for r in results]) for key in results[0]}
               for name, results in rounds.items()}
    device = jax.devices()[0]
    return {
        "benchmark": "batching", "task": TASK, "clients": args.clients, "batch": args.batch,
        "device": f"{device.platform}:{device.device_kind}", "jax": jax.__version__,
        "search_s": round(search_seconds, 1), "ways": summary,
        "batched_over_alone": summary["batched"]["images_per_s"] / summary["alone"]["images_per_s"],
        "batched_x2_over_alone": summary["batched x2"]["images_per_s"] / summary["alone"]["images_per_s"],
    }


def print_table(results: dict) -> None:
    print(f"device {results['device']}, jax {results['jax']}: {results['clients']} clients x batch "
          f"{results['batch']} on task {results['task']}")
    header = f"{'way':<14} {'images/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'device calls / request':>23}"
    print(header)
    print("-" * len(header))
    for name, row in results["ways"].items():
        print(f"{name:<14} {row['images_per_s']:>10.1f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
              f"{row['device_calls_per_request']:>23.3f}")
    print(f"throughput batched / alone = {results['batched_over_alone']:.2f}x, batched x2 / alone = "
          f"{results['batched_x2_over_alone']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    return benchmain.run_main(parse_args, run, print_table, argv, always_json=True)


if __name__ == "__main__":
    sys.exit(main())
