"""Input pipeline throughput against train-step throughput (issue 10).

In one run, on the same uint8 source batches:
  (a) device   `steps.train_inputs`: upload of uint8, then crop + resize,
               flip, colour jitter and scaling on the device (what the
               training loop runs now);
  (b) host     `preprocess_train` in numpy, then upload of float32 (what the
               loop ran before);
  (c) step     one `steps.train_step` of a whole-model fine-tune at the same
               batch and image size, on device-resident inputs.

It prints images/s of each and the ratios (a)/(c) and (b)/(c): a ratio >= 1
means input never bounds training. Imports nothing of TensorFlow.

    python bench/bench_input.py                    # tiny ViT, 16 px from 32 px, CPU, < 1 min
    python bench/bench_input.py --size B/16 --image-size 384 --source-size 500 --batch 128
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from evolve.config import VIT_SIZES  # noqa: E402
from evolve.data import preprocess_device, preprocess_train  # noqa: E402
from evolve.data.preprocess_device import Augmentation  # noqa: E402
from evolve.models import vit  # noqa: E402
from evolve.train import optimizer, steps  # noqa: E402
from evolve.types import PathStructure  # noqa: E402

logger = logging.getLogger("bench_input")
AUGMENTED = dict(crop_area=0.5, crop_aspect=0.75, flip=True, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(VIT_SIZES))
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--source-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per variant")
    return parser.parse_args(argv)


def rate(run, batch: int, seconds: float) -> float:
    """Images/s of `run()` (returns something to block on), after one warm-up call."""
    jax.block_until_ready(run())
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        jax.block_until_ready(run())
        done += batch
    return done / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = jax.local_devices()[0]
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (args.batch, args.source_size, args.source_size, 3), dtype=np.uint8)
    key_data = rng.integers(0, 2**32, (2,), dtype=np.uint32)
    values = jax.device_put(preprocess_device.magnitudes(AUGMENTED), device)
    augmentation = Augmentation.of(AUGMENTED)

    def on_device():
        images, key = jax.device_put((source, key_data), device)
        return steps.train_inputs(images, key, values, image_size=args.image_size, augmentation=augmentation)

    host_rng = np.random.default_rng(1)

    def on_host():
        return jax.device_put(preprocess_train(source, args.image_size, AUGMENTED, host_rng), device)

    structure = PathStructure(VIT_SIZES[args.size], VIT_SIZES[args.size].num_layers, args.image_size, 10, (), 8)
    params = jax.device_put(vit.init_path_params(structure, jax.random.key(0)), device)
    state = {"params": params, "opt": optimizer.make_optimizer(False).init(params)}
    inputs = on_device()
    labels = jax.device_put(rng.integers(0, 10, args.batch).astype(np.int32), device)
    lr, momentum = jax.device_put((np.float32(0.01), np.float32(0.9)), device)

    def step():
        state["params"], state["opt"], loss = steps.train_step(
            state["params"], {}, state["opt"], inputs, labels, lr, momentum, structure=structure, nesterov=False)
        return loss

    rates = {}
    for name, run in (("device", on_device), ("host", on_host), ("step", step)):
        rates[name] = rate(run, args.batch, args.seconds)
    result = {
        "benchmark": "bench_input",
        "device": device.device_kind,
        "platform": device.platform,
        "size": args.size,
        "image_size": args.image_size,
        "source_size": args.source_size,
        "batch": args.batch,
        "device_input_images_per_s": round(rates["device"], 1),
        "host_input_images_per_s": round(rates["host"], 1),
        "step_images_per_s": round(rates["step"], 1),
        "device_input_over_step": round(rates["device"] / rates["step"], 3),
        "host_input_over_step": round(rates["host"] / rates["step"], 3),
        "device_over_host_input": round(rates["device"] / rates["host"], 3),
    }
    logger.info("%-40s %12s", "variant", "images/s")
    logger.info("%-40s %12.1f", "device input (uint8 upload + jitted aug)", rates["device"])
    logger.info("%-40s %12.1f", "host input (numpy aug + float32 upload)", rates["host"])
    logger.info("%-40s %12.1f", f"train step ({args.size}, full fine-tune)", rates["step"])
    logger.info("device input / step: %.2fx   host input / step: %.2fx   device / host input: %.2fx",
                result["device_input_over_step"], result["host_input_over_step"], result["device_over_host_input"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
