"""Memory and recompiles of compiled train steps over a sequence of searches.

Twelve "searches" of two candidates each draw their structures (a tiny ViT
with 3..12 classes) from a Zipf-like distribution, so a few structures come
back often; each candidate runs three train steps and one eval. Every policy
runs in a fresh process:

  lru   steps.train_step / count_correct: least recently used executables
        evicted beyond --bound (what the engine does now);
  trim  the plain jax.jit steps, their whole cache dropped after a search once
        more than --bound executables are cached (what the engine did before);
  none  the plain jax.jit steps, never dropped.

It prints, per policy, the compiles (traces), the hit rate of the executables
looked up (train + eval per candidate), and RSS and malloc's heap in use after
each search relative to the start; the last line is one JSON object.

    python bench/bench_compiled_lru.py [--bound 8] [--policies lru,trim,none]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCHES, CANDIDATES, STEPS = 12, 2, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bound", type=int, default=8, help="train + eval executables kept")
    parser.add_argument("--policies", default="lru,trim,none")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class _MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _memory_mb() -> tuple[float, float]:
    """(RSS, heap in use) in MiB."""
    gc.collect()
    with open("/proc/self/statm") as handle:
        rss = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo
    info = libc.mallinfo2()
    return rss / 2**20, (info.uordblks + info.hblkhd) / 2**20


def child(policy: str, bound: int) -> dict:
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    from evolve.models import vit
    from evolve.train import optimizer, steps
    from evolve.types import PathStructure, ViTSize

    size = ViTSize("test", patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
    base = vit.init_path_params(PathStructure(size, 1, 16, 2, (), 8), jax.random.key(0))
    images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    train_step, count_correct = steps.train_step, steps.count_correct
    if policy == "lru":
        steps.set_compiled_bounds(training=bound)
    else:
        train_step, count_correct = train_step.jitted, count_correct.jitted

    def candidate(classes: int) -> None:
        structure = PathStructure(size, 1, 16, classes, (), 8)
        head = {"kernel": np.full((32, classes), 0.01, np.float32), "bias": np.zeros(classes, np.float32)}
        params = dict(base, head=head)
        trainable = {n: p for n, p in params.items() if n in ("head", "encoder_norm")}
        frozen = {n: p for n, p in params.items() if n not in trainable}
        # zeros of the state's shapes: an init with jax would compile eager ops per head shape
        opt_state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                 jax.eval_shape(optimizer.make_optimizer(False).init, trainable))
        trainable, frozen, opt_state = jax.device_put((trainable, frozen, opt_state))
        labels = np.arange(4, dtype=np.int32) % classes
        for _ in range(STEPS):
            trainable, opt_state, _ = train_step(trainable, frozen, opt_state, images, labels, np.float32(0.1),
                                                 np.float32(0.9), structure=structure, nesterov=False)
        int(count_correct(trainable, frozen, images, labels, np.ones(4, bool), structure=structure))

    rng = np.random.default_rng(0)
    pool = np.arange(3, 13)
    weights = 1.0 / np.arange(1, len(pool) + 1)
    searches = [[int(c) for c in rng.choice(pool, CANDIDATES, replace=False, p=weights / weights.sum())]
                for _ in range(SEARCHES)]
    candidate(2)  # warm-up
    traces = lambda: steps.TRACE_COUNTS["train_step"] + steps.TRACE_COUNTS["count_correct"]  # noqa: E731
    traces_before, start, started = traces(), _memory_mb(), time.perf_counter()
    after_search = []
    for search in searches:
        for classes in search:
            candidate(classes)
        if policy == "trim" and train_step._cache_size() + count_correct._cache_size() > bound:
            train_step.clear_cache()
            count_correct.clear_cache()
        rss, heap = _memory_mb()
        after_search.append([round(rss - start[0], 1), round(heap - start[1], 1)])
    compiles = traces() - traces_before
    lookups = 2 * SEARCHES * CANDIDATES
    return {
        "policy": policy, "bound": bound, "searches": searches, "distinct": len({c for s in searches for c in s}),
        "compiles": compiles, "lookups": lookups, "hit_rate": round(1 - compiles / lookups, 3),
        "rss_mb": after_search[-1][0], "rss_max_mb": max(r for r, _ in after_search),
        "heap_mb": after_search[-1][1], "heap_max_mb": max(h for _, h in after_search),
        "after_search_rss_heap_mb": after_search, "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.bound)))
        return
    results = []
    for policy in args.policies.split(","):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, __file__, "--child", policy, "--bound", str(args.bound)],
                             capture_output=True, text=True, env=env, check=True, cwd=ROOT)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{policy:5} bound {args.bound}: {result['compiles']} compiles of {result['lookups']} lookups "
              f"(hit rate {result['hit_rate']:.0%}, {result['distinct']} structures); RSS +{result['rss_mb']} MB "
              f"(max +{result['rss_max_mb']}), heap +{result['heap_mb']} MB (max +{result['heap_max_mb']}); "
              f"{result['seconds']} s", flush=True)
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
