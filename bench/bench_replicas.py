"""Predict throughput of one read-only serving replica against two, and the
time a new task takes to reach a replica.

Starts a real writing server (`python -m service.server`, temporary state
directory, a fast search), trains the bundled "digits" task on it, then two
replicas of its state directory (`--read-only`). C client threads send batches
of B real digit images back to back for a few seconds:

  one replica    every thread calls replica 1;
  two replicas   threads alternate between replica 1 and replica 2.

Rounds of the two alternate; the median round of each is reported, with the
ratio two / one. Then the writer trains "digits_parity" and the bench times
how long after its operation is done a replica serves it.

Every process shares this machine's cores, so the ratio says what a second
replica buys on this machine, not on a cluster of one replica per node.

    python bench/bench_replicas.py [--clients 8] [--batch 1] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchmain  # noqa: E402
import serving  # noqa: E402  (sets up sys.path and the JAX memory environment)

TASK, NEW_TASK = "digits", "digits_parity"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent calling threads")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per timing round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each way, alternating")
    parser.add_argument("--follow-seconds", type=float, default=0.5, help="the replicas' --follow-seconds")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    return parser.parse_args(argv)


@contextlib.contextmanager
def replica(state_dir: str, run_dir: str, follow_seconds: float, timeout: float):
    """A SERVING read-only server of state_dir; its log and port file in run_dir."""
    from service.client import EvolveClient  # pylint: disable=import-outside-toplevel
    from service.demo import ServerProcess  # pylint: disable=import-outside-toplevel

    server = ServerProcess(state_dir, run_dir=run_dir,
                           extra_args=["--read-only", "--follow-seconds", str(follow_seconds)])
    server.start()
    try:
        server.wait_port(timeout)
        with EvolveClient(server.target, timeout=120.0) as client:
            server.wait_serving(client, timeout)
        yield server
    finally:
        server.stop()


def one_round(targets: list[str], images, clients: int, seconds: float) -> float:
    """Calls per second of `clients` threads spread over `targets` for `seconds`."""
    from service.client import EvolveClient  # pylint: disable=import-outside-toplevel

    counts = [0] * clients
    connections = [EvolveClient(targets[i % len(targets)], timeout=60.0) for i in range(clients)]
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def call(index: int) -> None:
        client = connections[index]
        start.wait()
        while time.perf_counter() < deadline[0]:
            client.predict(TASK, images)
            counts[index] += 1

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    for connection in connections:
        connection.close()
    return sum(counts) / elapsed


def time_to_replica(writer_client, replica_target: str, timeout: float = 600.0) -> tuple[float, float]:
    """(search seconds, seconds from its operation done to the replica serving it)."""
    from service.client import EvolveClient  # pylint: disable=import-outside-toplevel

    search = serving.run_task(writer_client, serving.bundled_spec(NEW_TASK))
    done = time.monotonic()
    images = serving.digits_images(1)
    with EvolveClient(replica_target, timeout=30.0) as client:
        while True:
            try:
                client.predict(NEW_TASK, images)
                return search, time.monotonic() - done
            except Exception:  # not there yet: NOT_FOUND, or FAILED_PRECONDITION while still searching
                if time.monotonic() - done > timeout:
                    raise
                time.sleep(0.05)


def run(args: argparse.Namespace) -> dict:
    images = serving.digits_images(args.batch)
    with contextlib.ExitStack() as stack:
        state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="evolve-bench-replicas-"))
        run_dirs = [stack.enter_context(tempfile.TemporaryDirectory(prefix="evolve-replica-")) for _ in range(2)]
        _, writer = stack.enter_context(serving.running_server(state_dir, serving.FAST_SEARCH,
                                                               startup_timeout=args.startup_timeout))
        train_seconds = serving.run_task(writer, serving.bundled_spec(TASK))
        replicas = [stack.enter_context(replica(state_dir, run_dir, args.follow_seconds, args.startup_timeout))
                    for run_dir in run_dirs]
        ways = {"one": [replicas[0].target], "two": [r.target for r in replicas]}
        for targets in ways.values():  # warm-up: connections, the predict program of this batch bucket
            one_round(targets, images, args.clients, 0.5)
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(args.rounds):
            for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
                rates[name].append(one_round(ways[name], images, args.clients, args.seconds))
        search_seconds, reach_seconds = time_to_replica(writer, replicas[1].target)
    one, two = statistics.median(rates["one"]), statistics.median(rates["two"])
    return {
        "benchmark": "replicas",
        "clients": args.clients,
        "batch": args.batch,
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "first_task_search_s": round(train_seconds, 1),
        "calls_per_s": {"one": round(one, 1), "two": round(two, 1)},
        "rounds_calls_per_s": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "ratio_two_over_one": round(two / one, 3),
        "follow_seconds": args.follow_seconds,
        "new_task_search_s": round(search_seconds, 1),
        "new_task_to_replica_s": round(reach_seconds, 2),
    }


def print_table(results: dict) -> None:
    print(f"{results['clients']} client threads x batch {results['batch']}, {results['rounds']} rounds of "
          f"{results['seconds_per_round']:.0f} s per way, {results['cpu_count']} CPU cores shared by every process")
    for name in ("one", "two"):
        print(f"  {name} replica(s): {results['calls_per_s'][name]:8.1f} calls/s  "
              f"(rounds {results['rounds_calls_per_s'][name]})")
    print(f"  two / one = {results['ratio_two_over_one']:.3f}")
    print(f"a new task ({NEW_TASK}, searched in {results['new_task_search_s']:.1f} s on the writer) served by a "
          f"replica {results['new_task_to_replica_s']:.2f} s after its operation was done "
          f"(--follow-seconds {results['follow_seconds']})")


def main(argv: list[str] | None = None) -> int:
    return benchmain.run_main(parse_args, run, print_table, argv)


if __name__ == "__main__":
    sys.exit(main())
