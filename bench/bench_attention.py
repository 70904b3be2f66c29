"""Which attention implementation the model's compiled step uses (issue 10).

`jax.nn.dot_product_attention` picks cuDNN's fused attention by itself where
the platform, dtype and shapes allow it (bfloat16 on NVIDIA GPUs), else XLA's.
This compiles the engine's train step in float32 and in bfloat16 and reports,
from the optimised HLO, whether a cuDNN fused-attention call is in it, with the
step time of each (best of `--steps` timed steps). Ends with one JSON line.

    python bench/bench_attention.py --size B/16 --image-size 224 --batch 128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from evolve.config import VIT_SIZES  # noqa: E402
from evolve.models import vit  # noqa: E402
from evolve.train import optimizer, steps  # noqa: E402
from evolve.types import PathStructure  # noqa: E402


def measure(structure: PathStructure, batch: int, timed_steps: int) -> dict:
    device = jax.local_devices()[0]
    params = jax.device_put(vit.init_path_params(structure, jax.random.key(0)), device)
    opt_state = jax.device_put(optimizer.make_optimizer(False).init(params), device)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.uniform(-1, 1, (batch, structure.image_size, structure.image_size, 3))
                            .astype(np.float32), device)
    labels = jax.device_put(rng.integers(0, structure.num_classes, batch).astype(np.int32), device)
    lr, momentum = jax.device_put((np.float32(0.01), np.float32(0.9)), device)
    args = (params, {}, opt_state, images, labels, lr, momentum)
    hlo = steps.train_step.jitted.lower(*args, structure=structure, nesterov=False).compile().as_text()
    state = {"params": params, "opt": opt_state}
    best = float("inf")
    for i in range(timed_steps + 1):
        started = time.perf_counter()
        state["params"], state["opt"], loss = steps.train_step(state["params"], {}, state["opt"], images, labels, lr,
                                                               momentum, structure=structure, nesterov=False)
        jax.block_until_ready(loss)
        if i:  # the first call compiles
            best = min(best, time.perf_counter() - started)
    return {"cudnn_attention": "cudnn" in hlo.lower() and "fmha" in hlo.lower(), "step_ms": round(1000 * best, 3),
            "images_per_s": round(batch / best, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(VIT_SIZES))
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    size = VIT_SIZES[args.size]
    structure = PathStructure(size, size.num_layers, args.image_size, 10)
    results = {dtype: measure(dataclasses.replace(structure, compute_dtype=dtype), args.batch, args.steps)
               for dtype in ("float32", "bfloat16")}
    device = jax.local_devices()[0]
    for dtype, r in results.items():
        print(f"{dtype:<9} cuDNN attention: {r['cudnn_attention']!s:<5} step {r['step_ms']:8.2f} ms "
              f"{r['images_per_s']:9.1f} img/s")
    ratio = results["float32"]["step_ms"] / results["bfloat16"]["step_ms"]
    print(f"bfloat16 / float32 throughput: {ratio:.2f}x on {device.device_kind}")
    print(json.dumps({"benchmark": "bench_attention", "device": device.device_kind, "size": args.size,
                      "image_size": args.image_size, "batch": args.batch, "bf16_over_f32": round(ratio, 3),
                      **{dtype: r for dtype, r in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
