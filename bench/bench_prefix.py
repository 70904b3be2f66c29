"""Frozen-prefix economics (issue 10): one generation of candidates that
share a frozen prefix, trained three ways in one run.

  (a) whole    every step runs each candidate's whole model on images (the
               loop before this change; AD already skips the prefix's backward);
  (b) shared   the prefix runs forward only, once per batch for all the
               candidates that share it (latent cache off);
  (c) latent   the prefix's features of the training and validation splits
               are computed once and read by index (latent replay).
All three with augmentation off (the only case (c) applies to).

Candidates: `--candidates` children of one parent that freeze the stem and
the first `--frozen-layers` blocks and train the rest (the common later-task
child). It prints seconds per generation, the ratios whole/shared and
whole/latent, and ends with one JSON line. No TensorFlow.

    python bench/bench_prefix.py                      # tiny ViT on the CPU, about a minute
    python bench/bench_prefix.py --size B/16 --image-size 224 --batch 128 --examples 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from evolve.config import VIT_SIZES, get_config  # noqa: E402
from evolve.data import ImageSet, TaskData  # noqa: E402
from evolve.models import vit  # noqa: E402
from evolve.train import loop  # noqa: E402
from evolve.types import PathStructure  # noqa: E402

logger = logging.getLogger("bench_prefix")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(VIT_SIZES))
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--examples", type=int, default=2048, help="training examples (the validation split: 1/4)")
    parser.add_argument("--frozen-layers", type=int, default=None, help="default: all but the last block")
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps-per-round", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant (after one warm-up)")
    return parser.parse_args(argv)


def make_data(examples: int, image_size: int, classes: int = 10) -> TaskData:
    rng = np.random.default_rng(0)

    def split(n: int) -> ImageSet:
        labels = rng.integers(0, classes, n).astype(np.int32)
        images = (labels[:, None, None, None] * 20 + rng.integers(0, 60, (n, image_size, image_size, 3)))
        return ImageSet(images.astype(np.uint8), labels)

    validation = split(max(examples // 4, 1))
    return TaskData(train=split(examples), validation=validation, test=validation, num_classes=classes)


def make_plans(structure: PathStructure, frozen_layers: int, candidates: int) -> list[loop.CandidatePlan]:
    params = vit.init_path_params(structure, jax.random.key(0))
    frozen_names = set(vit.prefix_names(vit.prefix_structure(structure, frozen_layers)))
    hparams = dict(get_config("tiny").default_hparams(), learning_rate=0.01)
    plans = []
    for i in range(candidates):
        plans.append(loop.CandidatePlan(
            structure=structure,
            trainable={n: p for n, p in params.items() if n not in frozen_names},
            frozen={n: p for n, p in params.items() if n in frozen_names},
            momentum={}, hparams=dict(hparams, learning_rate=0.01 * (i + 1)), start_score=-math.inf,
            score_of_quality=lambda q: q, frozen_ids={n: f"parent-{n}" for n in frozen_names},
        ))
    return plans


def timed(run, repeats: int) -> float:
    run()  # compiles
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    size = VIT_SIZES[args.size]
    frozen_layers = size.num_layers - 1 if args.frozen_layers is None else args.frozen_layers
    structure = PathStructure(size, size.num_layers, args.image_size, 10, (), 8)
    data = make_data(args.examples, args.image_size)
    settings = loop.TrainSettings(batch_size=args.batch, rounds=args.rounds,
                                  examples_per_round=args.batch * args.steps_per_round, eval_batch_size=256)
    plans = make_plans(structure, frozen_layers, args.candidates)
    uncached = dataclasses.replace(settings, latent_cache_bytes=0)
    device = jax.local_devices()[0]

    def whole():
        original = loop._Prefix.of
        loop._Prefix.of = staticmethod(lambda plan: None)
        try:
            return loop.train_candidates(plans, data, uncached, {}, seed=0, devices=[device])
        finally:
            loop._Prefix.of = original

    seconds = {
        "whole": timed(whole, args.repeats),
        "shared": timed(lambda: loop.train_candidates(plans, data, uncached, {}, seed=0, devices=[device]),
                        args.repeats),
        "latent": timed(lambda: loop.train_candidates(plans, data, settings, {}, seed=0, devices=[device]),
                        args.repeats),
    }
    steps_done = args.rounds * args.steps_per_round
    result = {
        "benchmark": "bench_prefix",
        "device": device.device_kind,
        "platform": device.platform,
        "size": args.size,
        "image_size": args.image_size,
        "batch": args.batch,
        "candidates": args.candidates,
        "frozen_layers": frozen_layers,
        "layers": size.num_layers,
        "steps": steps_done,
        "seconds_whole": round(seconds["whole"], 3),
        "seconds_shared": round(seconds["shared"], 3),
        "seconds_latent": round(seconds["latent"], 3),
        "whole_over_shared": round(seconds["whole"] / seconds["shared"], 3),
        "whole_over_latent": round(seconds["whole"] / seconds["latent"], 3),
    }
    logger.info("%d candidates x %d steps of %d, %s at %d px, stem + %d of %d blocks frozen, on %s",
                args.candidates, steps_done, args.batch, args.size, args.image_size, frozen_layers, size.num_layers,
                device.device_kind)
    for name in ("whole", "shared", "latent"):
        logger.info("%-8s %8.2f s a generation (with its validations)", name, seconds[name])
    logger.info("whole / shared: %.2fx   whole / latent: %.2fx", result["whole_over_shared"],
                result["whole_over_latent"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
