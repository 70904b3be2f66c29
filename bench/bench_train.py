"""Engine train-step throughput against a plain jitted full fine-tune.

Measures, in one run and on identical device-resident random batches:

  (a) baseline  a plain `jax.jit` train step over the whole parameter dict:
                optax clip-by-global-norm + SGD with momentum, constant
                hyperparameters, params and optimizer state donated;
  (b) engine    `evolve.train.steps.train_step` with every component
                trainable (the same work as (a));
  (c) partial   the engine step with only the last block(s), `encoder_norm`
                and `head` trainable, the rest a frozen, non-differentiated
                argument;
  (d) bf16      (b) computing in bfloat16 (`compute_dtype`), float32
                parameters and optimizer state;
  (e) remat     (b) recomputing each encoder layer's activations in the
                backward pass (`remat`);
  (f) bf16-mom  (b) with the SGD momentum trace in bfloat16
                (`momentum_dtype`).

For the engine variants it also reports the compiled step's memory (XLA's
memory analysis: arguments, outputs and temporaries), which is what remat
and a bfloat16 momentum are for.

For context it also times the host input path the training loop runs
synchronously before every step: `preprocess_eval` of uint8 images
(--source-size px) to the model's size, then `device_put`. When its images/s
is below a step's, the loop, not the step, bounds training throughput.

Compile time (the first call, minus one steady step) is reported apart from
the steady-state step time (warm-up, then N steps timed with
block_until_ready). Variants are timed in many short interleaved rounds, in
alternating order, so drifting load hits all of them alike; ratios use each
variant's best round (the least disturbed, as timeit does), medians are shown
beside them.

Imports nothing that loads TensorFlow: it runs on accelerator machines that
only have jax / flax / optax.

    python bench/bench_train.py                      # tiny ViT, CPU, < 2 min
    python bench/bench_train.py --size B/16 --image-size 224 --batch 128 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import benchmain  # noqa: E402
from evolve.config import VIT_SIZES  # noqa: E402
from evolve.data import preprocess_eval  # noqa: E402
from evolve.models import vit  # noqa: E402
from evolve.train import optimizer, steps  # noqa: E402
from evolve.types import PathStructure  # noqa: E402

LEARNING_RATE = 0.01
MOMENTUM = 0.9
DEFAULT_IMAGE_SIZE = {"tiny": 16}  # every other size: 224


@dataclasses.dataclass
class Variant:
    """One way of running a train step; `step()` runs one and returns its loss."""

    name: str
    description: str
    trainable_params: int
    step: Callable[[int], jax.Array]
    compile_seconds: float = 0.0
    round_seconds: list[float] = dataclasses.field(default_factory=list)
    memory: dict[str, int] | None = None  # the compiled step's bytes (engine variants)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=[s for s in VIT_SIZES if s != "L/16"] + ["L/16"])
    parser.add_argument("--image-size", type=int, default=None, help="default: 16 for tiny, else 224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--trainable-blocks", type=int, default=1, help="last blocks trainable in variant (c)")
    parser.add_argument("--num-batches", type=int, default=4, help="distinct random batches cycled on device")
    parser.add_argument("--source-size", type=int, default=32, help="side of the host-input source images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = DEFAULT_IMAGE_SIZE.get(args.size, 224)
    if args.image_size % VIT_SIZES[args.size].patch_size:
        parser.error(f"--image-size must be a multiple of the patch size {VIT_SIZES[args.size].patch_size}")
    if not 0 <= args.trainable_blocks <= VIT_SIZES[args.size].num_layers:
        parser.error("--trainable-blocks must be within 0..number of blocks")
    return args


def count(tree: Any) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def make_batches(args: argparse.Namespace, device: jax.Device) -> list[tuple[jax.Array, jax.Array]]:
    """Identical random batches for every variant, already on the device."""
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.image_size, args.image_size, 3)
    batches = []
    for _ in range(args.num_batches):
        images = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
        labels = rng.integers(0, args.num_classes, size=(args.batch,)).astype(np.int32)
        batches.append(jax.device_put((images, labels), device))
    return batches


def baseline_variant(structure, params, batches, device) -> Variant:
    """(a) A plain full fine-tune: one jitted step over the whole dict."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(LEARNING_RATE, momentum=MOMENTUM))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, images, labels):
        def loss_fn(params):
            logits = vit.forward(params, images, structure)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = {"params": jax.device_put(params, device)}
    state["opt_state"] = jax.device_put(tx.init(state["params"]), device)

    def step(i: int) -> jax.Array:
        images, labels = batches[i % len(batches)]
        state["params"], state["opt_state"], loss = train_step(state["params"], state["opt_state"], images, labels)
        return loss

    return Variant("baseline", "plain jit, all trainable", count(params), step)


def engine_variant(name, description, structure, trainable, frozen, batches, device, total_steps) -> Variant:
    """(b)-(f) The engine's step, fed exactly as evolve.train.loop feeds it.
    It is compiled here, as `steps.train_step` compiles it on a cache miss
    (`lower().compile()` of the same function), so that one compile gives
    both the executable timed and its memory analysis."""
    trainable = jax.device_put(trainable, device)
    frozen = jax.device_put(frozen, device)
    opt_state = jax.device_put(optimizer.make_optimizer(False, structure.momentum_dtype).init(trainable), device)
    hparams = {"learning_rate": LEARNING_RATE, "warmup": 0.0, "schedule": "constant"}
    # The loop passes numpy float32 scalars: one per-step learning rate and the momentum.
    learning_rates = optimizer.learning_rates(hparams, total_steps, 1)
    momentum = np.float32(MOMENTUM)
    state = {"trainable": trainable, "opt_state": opt_state}
    images, labels = batches[0]
    started = time.perf_counter()
    compiled = steps.train_step.jitted.lower(
        trainable, frozen, opt_state, images, labels, learning_rates[0], momentum, structure=structure,
        nesterov=False).compile()
    compile_seconds = time.perf_counter() - started

    def step(i: int) -> jax.Array:
        images, labels = batches[i % len(batches)]
        state["trainable"], state["opt_state"], loss = compiled(
            state["trainable"], frozen, state["opt_state"], images, labels, learning_rates[i % total_steps], momentum)
        return loss

    return Variant(name, description, count(trainable), step, compile_seconds, memory=compiled_memory(compiled))


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled program, in bytes; None where the
    backend gives none."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    fields = {"arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
              "temporaries": "temp_size_in_bytes", "aliased": "alias_size_in_bytes"}
    return {name: int(getattr(analysis, attribute, 0) or 0) for name, attribute in fields.items()}


def split_trainable(params: dict, structure: PathStructure, trainable_blocks: int) -> tuple[dict, dict]:
    last = structure.num_layers
    names = {"head", "encoder_norm"} | {f"encoderblock_{i}" for i in range(last - trainable_blocks, last)}
    trainable = {k: v for k, v in params.items() if k in names}
    frozen = {k: v for k, v in params.items() if k not in names}
    return trainable, frozen


def compile_variant(variant: Variant) -> None:
    """First call (trace + compile + one step), then one more to time a step;
    a variant compiled ahead of time keeps the compile time it measured."""
    started = time.perf_counter()
    jax.block_until_ready(variant.step(0))
    first = time.perf_counter() - started
    started = time.perf_counter()
    jax.block_until_ready(variant.step(1))
    if not variant.compile_seconds:
        variant.compile_seconds = max(first - (time.perf_counter() - started), 0.0)


def time_round(variant: Variant, num_steps: int, offset: int) -> None:
    loss = None
    started = time.perf_counter()
    for i in range(num_steps):
        loss = variant.step(offset + i)
    jax.block_until_ready(loss)
    variant.round_seconds.append(time.perf_counter() - started)
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"{variant.name}: loss is not finite")


def host_input_rate(args: argparse.Namespace, device: jax.Device, min_seconds: float = 2.0) -> float:
    """images/s of the loop's host input path: numpy preprocessing + transfer."""
    rng = np.random.default_rng(args.seed)
    source = rng.integers(0, 256, size=(args.batch, args.source_size, args.source_size, 3), dtype=np.uint8)
    jax.block_until_ready(jax.device_put(preprocess_eval(source, args.image_size), device))
    batches, started = 0, time.perf_counter()
    while batches < 3 or time.perf_counter() - started < min_seconds:
        jax.block_until_ready(jax.device_put(preprocess_eval(source, args.image_size), device))
        batches += 1
    return args.batch * batches / (time.perf_counter() - started)


def run(args: argparse.Namespace) -> dict:
    device = jax.devices()[0]
    size = VIT_SIZES[args.size]
    structure = PathStructure(
        size=size, num_layers=size.num_layers, image_size=args.image_size, num_classes=args.num_classes
    )
    params = vit.init_path_params(structure, jax.random.key(args.seed))
    # A zero head (the engine's default) gives zero gradients to everything
    # below it on the first step; random heads make every step full work.
    head_rng = np.random.default_rng(args.seed + 1)
    params["head"]["kernel"] = head_rng.normal(0, 0.02, params["head"]["kernel"].shape).astype(np.float32)
    batches = make_batches(args, device)
    total_steps = 2 + args.warmup + args.rounds * args.steps
    trainable, frozen = split_trainable(params, structure, args.trainable_blocks)
    variants = [
        baseline_variant(structure, params, batches, device),
        engine_variant("engine", "engine step, all trainable", structure, params, {}, batches, device, total_steps),
        engine_variant(
            "partial",
            f"engine step, head+encoder_norm+last {args.trainable_blocks} block(s) trainable",
            structure, trainable, frozen, batches, device, total_steps,
        ),
        engine_variant("bf16", "engine step, all trainable, bfloat16 compute (float32 params)",
                       dataclasses.replace(structure, compute_dtype="bfloat16"), params, {}, batches, device,
                       total_steps),
        engine_variant("remat", "engine step, all trainable, each layer rematerialised in the backward pass",
                       dataclasses.replace(structure, remat=True), params, {}, batches, device, total_steps),
        engine_variant("bf16-mom", "engine step, all trainable, bfloat16 momentum trace",
                       dataclasses.replace(structure, momentum_dtype="bfloat16"), params, {}, batches, device,
                       total_steps),
    ]
    for variant in variants:
        compile_variant(variant)
        for i in range(args.warmup):
            variant.step(2 + i)
        jax.block_until_ready(variant.step(2 + args.warmup))
    for r in range(args.rounds):
        # Short rounds in alternating order: drifts in machine load hit every variant alike.
        for variant in variants if r % 2 == 0 else variants[::-1]:
            time_round(variant, args.steps, 3 + args.warmup + r * args.steps)

    results = {
        "benchmark": "train_step",
        "device": f"{device.platform}:{device.device_kind}",
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "size": args.size,
        "image_size": args.image_size,
        "batch": args.batch,
        "steps": args.steps,
        "rounds": args.rounds,
        "params": count(params),
        "variants": {},
        "tensorflow_imported": "tensorflow" in sys.modules,
    }
    baseline = variants[0]
    for variant in variants:
        best, median = min(variant.round_seconds), statistics.median(variant.round_seconds)
        results["variants"][variant.name] = {
            "description": variant.description,
            "trainable_params": variant.trainable_params,
            "compile_s": round(variant.compile_seconds, 3),
            "step_ms": round(1000 * best / args.steps, 3),
            "median_step_ms": round(1000 * median / args.steps, 3),
            "images_per_s": round(args.batch * args.steps / best, 1),
            "median_images_per_s": round(args.batch * args.steps / median, 1),
            "ratio_to_baseline": round(min(baseline.round_seconds) / best, 3),
            "median_ratio_to_baseline": round(statistics.median(baseline.round_seconds) / median, 3),
            "memory_bytes": variant.memory,
        }
    host_ips = host_input_rate(args, device)
    results["host_input"] = {
        "description": f"preprocess_eval {args.source_size}px uint8 -> {args.image_size}px + device_put",
        "images_per_s": round(host_ips, 1),
        "ratio_to_baseline": round(host_ips / results["variants"]["baseline"]["images_per_s"], 3),
    }
    results["ratio_engine"] = results["variants"]["engine"]["ratio_to_baseline"]
    results["ratio_partial"] = results["variants"]["partial"]["ratio_to_baseline"]
    engine = results["variants"]["engine"]
    for name in ("bf16", "remat", "bf16-mom"):
        key = name.replace("-", "_")
        results[f"ratio_{key}_over_engine"] = round(results["variants"][name]["images_per_s"] / engine["images_per_s"], 3)
        memory, reference = results["variants"][name]["memory_bytes"], engine["memory_bytes"]
        if memory and reference:
            results[f"temporaries_{key}_over_engine"] = round(memory["temporaries"] / max(reference["temporaries"], 1), 3)
            results[f"arguments_{key}_over_engine"] = round(memory["arguments"] / max(reference["arguments"], 1), 3)
    return results


def print_table(results: dict) -> None:
    print(f"device      {results['device']} (x{results['num_devices']}), jax {results['jax']}")
    print(f"model       ViT {results['size']}, {results['image_size']}px, {results['params']:,} params, "
          f"batch {results['batch']}, {results['rounds']} interleaved rounds of {results['steps']} steps")
    print("step ms / images/s / ratio: the best round (least disturbed by other load); median in brackets")
    header = f"{'variant':<9} {'trainable':>12} {'compile s':>10} {'step ms':>16} {'images/s':>19} {'ratio':>14}  what"
    print(header)
    print("-" * len(header))
    for name, v in results["variants"].items():
        print(f"{name:<9} {v['trainable_params']:>12,} {v['compile_s']:>10.2f} "
              f"{v['step_ms']:>7.2f} [{v['median_step_ms']:>7.2f}] {v['images_per_s']:>8.1f} [{v['median_images_per_s']:>8.1f}] "
              f"{v['ratio_to_baseline']:>5.3f} [{v['median_ratio_to_baseline']:>5.3f}]  {v['description']}")
    host = results["host_input"]
    print(f"{'host in':<9} {'':>12} {'':>10} {'':>16} {host['images_per_s']:>8.1f} {'':>10} {host['ratio_to_baseline']:>5.3f} "
          f"{'':>7}  {host['description']} (not a train step)")
    print("compiled step memory (XLA memory analysis), MB: arguments / temporaries")
    for name, v in results["variants"].items():
        if v["memory_bytes"]:
            print(f"{name:<9} {v['memory_bytes']['arguments'] / 1e6:>9.2f} / {v['memory_bytes']['temporaries'] / 1e6:>9.2f}")
    goal = "meets" if results["ratio_engine"] >= 0.95 else "BELOW"
    print(f"engine/baseline = {results['ratio_engine']:.3f} ({goal} the 0.95 goal); "
          f"partial/baseline = {results['ratio_partial']:.3f}; "
          f"bf16/engine (float32) = {results['ratio_bf16_over_engine']:.3f}; "
          f"remat/engine = {results['ratio_remat_over_engine']:.3f}; "
          f"bf16-mom/engine = {results['ratio_bf16_mom_over_engine']:.3f}")
    for name in ("remat", "bf16_mom"):
        if f"temporaries_{name}_over_engine" in results:
            print(f"{name}: temporaries x{results[f'temporaries_{name}_over_engine']:.3f}, "
                  f"arguments x{results[f'arguments_{name}_over_engine']:.3f} of the engine step's")


def main(argv: list[str] | None = None) -> int:
    return benchmain.run_main(parse_args, run, print_table, argv)


if __name__ == "__main__":
    sys.exit(main())
