"""What a system of N tasks costs per task as it grows (issue 12).

For each N (default 10, 100 and 1,000; --quick: 10, 30 and 100) it builds a
synthetic system of N READY tasks through the engine, without training: each
task has its own head and its own copy of one encoder block on the tiny
random root (`bench_checkpoint.add_synthetic_task`). Save, restore, reads and
Predict then run the real code on it, each N in fresh processes:

  build   saves the N tasks, brings retention to its steady state, then adds
          one task and saves, three times: the median seconds of such a save,
          and the bytes it wrote (its new component directories, its new
          record files and its manifest step);
  serve   a new process restores the state directory and warms it up, as a
          server does before it reports SERVING (time to SERVING); then
          GetTask of random tasks, ListTasks pages of 50 at random offsets
          (`Engine.task_page`, what the servicer pages over), Predict of one
          image on random tasks (p50 / p99), and the process's RSS after
          restore and after the reads, with the bytes of parameters it holds.

Every figure is also printed as a ratio against the smallest N; the issue's
bar is <= 1.5x at N = 1,000 for a save per task, GetTask, a page and Predict.
Restore is expected to grow with the components it loads, and is printed per
component too. The last line is one JSON object.

With --server-tasks K it instead runs a real server (`python -m
service.server`, a fast search configuration) and submits K small tasks one
after another (the bundled digits data under K names, each searched for
real), recording the server's RSS after each; it prints the RSS after the
first five (warm-up) and at the end, and their ratio.

    python bench/bench_growth.py --quick          # minutes on 2 cores
    python bench/bench_growth.py                  # N up to 1,000
    python bench/bench_growth.py --server-tasks 50
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

logger = logging.getLogger("bench_growth")

RATIO_KEYS = ("save_s", "save_bytes", "get_task_us", "page_ms", "predict_p50_ms", "predict_p99_ms",
              "rss_overhead_mb")


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _tree_bytes(directory: str) -> int:
    total = 0
    for parent, _, files in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(parent, f)) for f in files)
    return total


def build(num_tasks: int, state_dir: str, saves: int, own_blocks: int = 1) -> dict:
    """Phase 1, in its own process: the system and the cost of one more task's save."""
    from bench_checkpoint import add_synthetic_task, synthetic_system  # pylint: disable=import-outside-toplevel

    engine, rng, first = synthetic_system(num_tasks, state_dir, own_blocks)
    seconds, written = [], []
    components, records = os.path.join(state_dir, "components"), os.path.join(state_dir, "records")
    for i in range(saves):
        add_synthetic_task(engine, f"t{num_tasks + i:05d}", rng, own_blocks)
        engine.refresh_views()
        records_before = set(os.listdir(records)) if os.path.isdir(records) else set()
        components_before = set(os.listdir(components))
        started = time.perf_counter()
        step = engine.save()
        seconds.append(time.perf_counter() - started)
        new_components = set(os.listdir(components)) - components_before  # a pack, or one directory a component
        new_records = set(os.listdir(records)) - records_before if os.path.isdir(records) else set()
        written.append(sum(_tree_bytes(os.path.join(components, name)) for name in new_components)
                       + sum(os.path.getsize(os.path.join(records, name)) for name in new_records)
                       + _tree_bytes(os.path.join(state_dir, "manifest", str(step))))
    return {"tasks": num_tasks, "first_save_s": first, "save_s": statistics.median(seconds),
            "save_bytes": int(statistics.median(written)),
            "manifest_bytes": _tree_bytes(os.path.join(state_dir, "manifest", str(step)))}


def serve(state_dir: str, reads: int, seed: int) -> dict:
    """Phase 2, in a fresh process: restore to SERVING, then reads and Predict."""
    rss_start = _rss_mb()
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from evolve.engine import Engine  # pylint: disable=import-outside-toplevel

    rss_imports = _rss_mb()
    started = time.perf_counter()
    engine = Engine.restore(state_dir)
    restored = time.perf_counter() - started
    engine.warm_up()
    to_serving = time.perf_counter() - started
    gc.collect()
    rss_restored = _rss_mb()
    names = sorted(engine.system.tasks)
    rng = np.random.default_rng(seed)

    def timed(call, count: int) -> list[float]:
        samples = []
        for _ in range(count):
            begun = time.perf_counter()
            call()
            samples.append(time.perf_counter() - begun)
        return samples

    get_task = timed(lambda: engine.task(names[rng.integers(len(names))]), reads)
    page = timed(lambda: engine.task_page(int(rng.integers(max(len(names) - 50, 1))), 50), reads)
    image = np.asarray(rng.integers(0, 256, (1, 16, 16, 3)), np.uint8)
    timed(lambda: engine.predict(names[0], image), 20)  # warm: one structure serves every task
    predict = timed(lambda: engine.predict(names[rng.integers(len(names))], image), reads)
    gc.collect()
    rss_after = _rss_mb()
    param_bytes = sum(int(np.asarray(leaf).nbytes) for c in engine.system.components.values()
                      for leaf in jax.tree.leaves(c.params))
    return {
        "components": len(engine.system.components),
        "restore_s": restored, "to_serving_s": to_serving,
        "restore_ms_per_component": 1000.0 * restored / max(len(engine.system.components), 1),
        "get_task_us": 1e6 * statistics.median(get_task),
        "page_ms": 1000.0 * statistics.median(page),
        "predict_p50_ms": 1000.0 * float(np.percentile(predict, 50)),
        "predict_p99_ms": 1000.0 * float(np.percentile(predict, 99)),
        "rss_start_mb": rss_start, "rss_imports_mb": rss_imports, "rss_restored_mb": rss_restored,
        "rss_after_reads_mb": rss_after, "param_mb": param_bytes / 2**20,
        # What the process holds beyond the imports and the parameters themselves.
        "rss_overhead_mb": rss_after - rss_imports - param_bytes / 2**20,
    }


def _child(phase: str, num_tasks: int, state_dir: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--tasks", str(num_tasks),
               "--state-dir", state_dir, "--saves", str(args.saves), "--reads", str(args.reads),
               "--own-blocks", str(args.own_blocks)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure(num_tasks: int, root: str, args: argparse.Namespace) -> dict:
    state_dir = os.path.join(root, f"n{num_tasks}")
    started = time.monotonic()
    result = _child("build", num_tasks, state_dir, args)
    result.update(_child("serve", num_tasks, state_dir, args))
    result["state_dir_mb"] = _tree_bytes(state_dir) / 2**20
    shutil.rmtree(state_dir, ignore_errors=True)
    logger.info("N=%d measured in %.0f s", num_tasks, time.monotonic() - started)
    return result


def server_memory(tasks: int, server_args: list[str]) -> dict:
    """RSS of a real server over `tasks` small searches in sequence."""
    import serving  # pylint: disable=import-outside-toplevel

    from evolve import types  # pylint: disable=import-outside-toplevel

    def server_rss_mb(pid: int) -> float:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    rss, seconds = [], []
    with serving.running_server(None, serving.FAST_SEARCH, extra_args=server_args) as (server, client):
        pid = server.process.pid
        start = server_rss_mb(pid)
        for i in range(tasks):
            spec = types.TaskSpec(name=f"digits_{i:03d}", source=types.BundledSource(name="digits"))
            seconds.append(serving.run_task(client, spec))
            rss.append(server_rss_mb(pid))
            logger.info("task %d/%d: %.1f s, server RSS %.0f MB", i + 1, tasks, seconds[-1], rss[-1])
    warm = rss[min(4, len(rss) - 1)]
    return {"bench": "growth_server_memory", "tasks": tasks, "rss_start_mb": start, "rss_mb": rss,
            "server_args": server_args, "search_seconds": seconds, "rss_after_5_mb": warm, "rss_end_mb": rss[-1],
            "end_over_after_5": rss[-1] / warm, "mb_per_task_after_5": (rss[-1] - warm) / max(len(rss) - 5, 1)}


def print_table(results: list[dict], device: str) -> None:
    base = results[0]
    print(f"device: {device}, {os.cpu_count()} CPUs; ratios against N = {base['tasks']}")
    header = (f"{'tasks':>6} {'comps':>6} {'save s':>7} {'save KB':>8} {'restore s':>9} {'ms/comp':>7} "
              f"{'SERVING s':>9} {'GetTask us':>10} {'page ms':>8} {'pred p50':>8} {'pred p99':>8} "
              f"{'RSS MB':>7} {'params MB':>9} {'overhead':>8}")
    print(header)
    for r in results:
        print(f"{r['tasks']:>6} {r['components']:>6} {r['save_s']:>7.3f} {r['save_bytes'] / 1024:>8.1f} "
              f"{r['restore_s']:>9.2f} {r['restore_ms_per_component']:>7.1f} {r['to_serving_s']:>9.2f} "
              f"{r['get_task_us']:>10.1f} {r['page_ms']:>8.3f} {r['predict_p50_ms']:>8.2f} "
              f"{r['predict_p99_ms']:>8.2f} {r['rss_after_reads_mb']:>7.0f} {r['param_mb']:>9.1f} "
              f"{r['rss_overhead_mb']:>8.0f}")
    for r in results[1:]:
        ratios = ", ".join(f"{k} {r['ratios'][k]:.2f}x" for k in RATIO_KEYS)
        print(f"N = {r['tasks']} / N = {base['tasks']}: {ratios}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="system sizes; default 10 100 1000")
    parser.add_argument("--quick", action="store_true", help="N = 10 30 100 (minutes on 2 cores)")
    parser.add_argument("--saves", type=int, default=3, help="one-more-task saves measured per N")
    parser.add_argument("--reads", type=int, default=300, help="calls timed per read kind and Predict")
    parser.add_argument("--server-tasks", type=int, default=0,
                        help="instead: a real server's RSS over this many small searches in sequence")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="with --server-tasks: one more server argument, e.g. --server-arg=--max-compiled-steps=8")
    parser.add_argument("--own-blocks", type=int, default=1,
                        help="encoder blocks each synthetic task owns a copy of (besides its head); default 1")
    parser.add_argument("--phase", choices=("build", "serve"), help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    if args.phase:
        logging.getLogger().setLevel(logging.WARNING)
        if args.phase == "build":
            result = build(args.tasks[0], args.state_dir, args.saves, args.own_blocks)
        else:
            result = serve(args.state_dir, args.reads, args.tasks[0])
        print(json.dumps(result))
        return 0
    if args.server_tasks:
        result = server_memory(args.server_tasks, args.server_arg)
        print(f"server RSS: {result['rss_start_mb']:.0f} MB at start, {result['rss_after_5_mb']:.0f} MB after 5 "
              f"tasks, {result['rss_end_mb']:.0f} MB after {result['tasks']}: {result['end_over_after_5']:.2f}x, "
              f"{result['mb_per_task_after_5']:.2f} MB a task after the fifth")
        print(json.dumps(result, sort_keys=True))
        return 0
    sizes = args.tasks or ([10, 30, 100] if args.quick else [10, 100, 1000])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_growth_") as root:
        for num_tasks in sizes:
            results.append(measure(num_tasks, root, args))
    base = results[0]
    for r in results:
        r["ratios"] = {k: r[k] / base[k] if base[k] else float("nan") for k in RATIO_KEYS}
    import jax  # pylint: disable=import-outside-toplevel

    device = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    print_table(results, device)
    print(json.dumps({"bench": "growth", "device": device, "results": results}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
