"""What one task's checkpoint costs as the system grows (issue 12).

For each system size N (synthetic: N READY tasks, each with its own head and
its own copy of one encoder block, on a tiny random root), it adds one more
task and saves, several times, two ways in the same run:

  store     the engine's save: a `checkpoint.Store` remembers the components
            on disk and the component ids of the retained manifests, so a
            save writes the new components and the manifest only;
  rescan    `checkpoint.save` without a store, what every save did before:
            it reads the stored hash of every component directory and every
            retained manifest again.

It prints the median seconds per save of both, their ratio, the manifest's
size (still one JSON of the whole system: it grows with N) and the restore
time, then ONE JSON line.

    python bench/bench_checkpoint.py                 # N = 10 100 400
    python bench/bench_checkpoint.py --tasks 10 1000 --saves 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from evolve import checkpoint  # noqa: E402
from evolve.config import get_config  # noqa: E402
from evolve.engine import Engine  # noqa: E402
from evolve.system import TaskRecord, TaskStatus  # noqa: E402
from evolve.types import BundledSource, Component, Path, TaskSpec  # noqa: E402

logger = logging.getLogger("bench_checkpoint")


def add_synthetic_task(engine: Engine, name: str, rng: np.random.Generator, own_blocks: int = 1) -> None:
    """A READY task whose path has its own head and its own copies of the
    first `own_blocks` encoder blocks."""
    system = engine.system
    names = dict(system.root_path.components)
    own = []
    for index in range(own_blocks):
        block = system.components[names[f"encoderblock_{index}"]]
        own.append((f"encoderblock_{index}", jax.tree.map(
            lambda a: (np.asarray(a) + rng.normal(0, 1e-3, np.shape(a))).astype(np.float32), block.params)))
    width = system.config.size.hidden_size
    head = {"kernel": rng.normal(0, 0.02, (width, 10)).astype(np.float32), "bias": np.zeros((10,), np.float32)}
    for component_name, params in (*own, ("head", head)):
        component = Component(system.new_id("c"), component_name, params, origin=name, trained=True)
        system.components[component.id] = component
        names[component_name] = component.id
    path = Path(system.new_id("p"), name, names, dict(system.root_path.hparams))
    system.paths[path.id] = path
    system.tasks[name] = TaskRecord(TaskSpec(name, BundledSource("digits")), TaskStatus.READY, 10)
    system.best[name] = path.id
    system.populations[name] = [path.id]
    system.lock(name, path)


def _manifest_bytes(state_dir: str, step: int) -> int:
    total = 0
    for directory, _, files in os.walk(os.path.join(state_dir, "manifest", str(step))):
        total += sum(os.path.getsize(os.path.join(directory, f)) for f in files)
    return total


def synthetic_system(num_tasks: int, state_dir: str, own_blocks: int = 1) -> tuple[Engine, np.random.Generator, float]:
    """An engine of `num_tasks` synthetic tasks, saved, with retention at its
    steady state; the generator for more tasks, and the first save's seconds."""
    engine = Engine.create(get_config("tiny"), state_dir=state_dir)
    rng = np.random.default_rng(num_tasks)
    for i in range(num_tasks):
        add_synthetic_task(engine, f"t{i:05d}", rng, own_blocks)
        # The pack the task's own save would have written (a save per task
        # without its manifest commit); the first save below adopts them.
        own = [c for c in engine.system.components.values() if c.origin == f"t{i:05d}"]
        checkpoint.write_pack(state_dir, own)
    engine.refresh_views()  # built by hand, not through the engine
    started = time.perf_counter()
    engine.save()
    first = time.perf_counter() - started
    for _ in range(checkpoint.KEEP_MANIFESTS):
        engine.save()
    return engine, rng, first


def measure(num_tasks: int, saves: int, root: str) -> dict:
    state_dir = os.path.join(root, f"n{num_tasks}")
    engine, rng, first = synthetic_system(num_tasks, state_dir)
    timings: dict[str, list[float]] = {"store": [], "rescan": []}
    for i in range(saves):
        for way in ("store", "rescan"):
            add_synthetic_task(engine, f"new_{way}_{i}", rng)
            engine.refresh_views()
            started = time.perf_counter()
            if way == "store":
                engine.save()
            else:
                checkpoint.save(engine.system, state_dir)
            timings[way].append(time.perf_counter() - started)
    started = time.perf_counter()
    restored = checkpoint.restore(state_dir)
    restore_seconds = time.perf_counter() - started
    result = {
        "tasks": num_tasks,
        "components": len(engine.system.components),
        "first_save_s": first,
        "store_s": statistics.median(timings["store"]),
        "rescan_s": statistics.median(timings["rescan"]),
        "manifest_bytes": _manifest_bytes(state_dir, restored.step),
        "restore_s": restore_seconds,
    }
    result["rescan_over_store"] = result["rescan_s"] / result["store_s"]
    shutil.rmtree(state_dir, ignore_errors=True)
    return result


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[10, 100, 400])
    parser.add_argument("--saves", type=int, default=3, help="saves measured per way and size")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as root:
        for num_tasks in args.tasks:
            logger.info("N=%d", num_tasks)
            results.append(measure(num_tasks, args.saves, root))
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs")
    print(f"{'tasks':>6} {'components':>10} {'store s':>8} {'rescan s':>9} {'ratio':>6} {'manifest KB':>11} "
          f"{'restore s':>9}")
    for r in results:
        print(f"{r['tasks']:>6} {r['components']:>10} {r['store_s']:>8.3f} {r['rescan_s']:>9.3f} "
              f"{r['rescan_over_store']:>6.1f} {r['manifest_bytes'] / 1024:>11.1f} {r['restore_s']:>9.2f}")
    print(json.dumps({"bench": "checkpoint", "device": device.platform, "results": results}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
