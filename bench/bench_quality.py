"""Quality of the evolved multitask system against single-task baselines.

On the fixed task suite of `quality_suite.py` (the first task, then later
tasks similar or dissimilar to it), for each seed, in one run:

  evolved    the project's Engine on a random tiny root: every task added in
             order and searched with `--generations` generations (one fresh
             engine per generations setting); test accuracy from
             `engine.predict`, parameters charged (`accounted_params`, read at
             the END, when all sharing is known) as a fraction of a fresh ViT of
             the root's size, the engine's own validation / test accuracy, and a
             forgetting check (the first task's test probabilities right after
             its search and at the end must be bit-identical);
  scratch    a ViT of the same size trained from scratch per task;
  finetune   that ViT fine-tuned from the first task's scratch model (a new
             zero head; every other component copied);
  logreg     scikit-learn logistic regression on 16x16 grey pixels;
  svm        an RBF SVC on the same pixels, C in {1, 10} picked on validation.

scratch / finetune use a plain jitted optax loop (clip-by-global-norm 1.0 +
SGD momentum 0.9, warmup-cosine, softmax cross-entropy, no augmentation).
By default they train on as many examples per task as the evolved search
of the same row (e.g. 196,608 = 3,072 steps of 64 at 4 generations of the
tiny configuration), so every comparison is at equal training examples;
`--baseline-steps N` fixes their length instead.
The classical baselines are deterministic; they are computed once and shared
by the seeds. Progress goes to stderr (logging); the report to stdout, ending
with ONE JSON line.

    python bench/bench_quality.py --quick          # smoke run, a few minutes on CPU
    python bench/bench_quality.py                  # seeds 0 1, generations 4 8 (tens of minutes)
    python bench/bench_quality.py --tasks digits_jitter shapes --out /tmp/quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import quality_suite  # noqa: E402
from evolve.config import SearchConfig, get_config  # noqa: E402
from evolve.data import preprocess_eval  # noqa: E402
from evolve.engine import Engine, EngineOptions  # noqa: E402
from evolve.models import vit  # noqa: E402
from evolve.search.budget import EXTENSION, search_plan  # noqa: E402
from evolve.types import NpzSource, PathStructure, SearchBudget, TaskSpec, count_params  # noqa: E402

logger = logging.getLogger("bench_quality")

PIXEL_SIZE = 16  # side of the classical baselines' grey-pixel features
PREDICT_CHUNK = 1024  # the engine's max_predict_batch
EVAL_BATCH = 512
SCAN_STEPS = 100  # baseline train steps per jitted call (lax.scan)
SVM_CS = (1.0, 10.0)
LOGREG_MAX_ITER = 2000
QUICK = {"seeds": [0], "generations": [1], "baseline_steps": 200}
MATCHED = 0  # baseline_steps: as many examples as the evolved search it is compared with
QUICK_ENGINE_OVERRIDES = {"train_rounds": 2, "examples_per_round": 512}
METHODS = ("evolved", "scratch", "finetune", "logreg", "svm")


# ---- options -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    seeds: tuple[int, ...]
    generations: tuple[int, ...]
    tasks: tuple[str, ...] | None
    quick: bool
    baseline_steps: int
    baseline_batch: int
    baseline_lr: float
    out: str | None
    data_dir: str | None
    baseline_cache: str | None = None
    evolved_only: bool = False
    baselines_only: bool = False
    overrides: tuple[tuple[str, str], ...] = ()
    compilation_cache: str | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The scratch / fine-tune training recipe."""

    steps: int
    batch_size: int
    peak_lr: float
    warmup_fraction: float = 0.05
    momentum: float = 0.9
    clip_norm: float = 1.0


def parse_args(argv: Sequence[str] | None = None) -> BenchOptions:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (quick: 0)")
    parser.add_argument("--generations", type=int, nargs="+", default=None, help="default: 4 8 (quick: 1)")
    parser.add_argument("--tasks", nargs="+", default=None, help="subset of the suite's task names (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, 1 generation, 200 baseline steps, engine train_rounds=2 "
                             "examples_per_round=512 (explicit --seeds/--generations/--baseline-steps win)")
    parser.add_argument("--baseline-steps", type=int, default=None,
                        help="default: the evolved search's examples per task / --baseline-batch, per generations "
                             "setting (quick: 200)")
    parser.add_argument("--baseline-batch", type=int, default=64)
    parser.add_argument("--baseline-lr", type=float, default=0.05, help="peak learning rate")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    parser.add_argument("--data-dir", default=None, help="where to write the task .npz files (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the engine's tiny configuration (repeatable), e.g. default_mu=0.2")
    parser.add_argument("--evolved-only", action="store_true",
                        help="skip the ViT baselines unless --baseline-cache has them (for iterating on the engine)")
    parser.add_argument("--baselines-only", action="store_true",
                        help="train (and cache) the ViT and classical baselines, print them and stop: they can "
                             "then run in their own process beside an --evolved-only run")
    parser.add_argument("--baseline-cache", default=None,
                        help="directory caching the scratch / fine-tune results per seed and recipe (they do not "
                             "depend on the engine), so that engine changes can be measured without retraining them")
    parser.add_argument("--compilation-cache", default=None, metavar="DIR",
                        help="JAX persistent compilation cache for the engine and the baselines (e.g. "
                             "bench/.cache/xla): a rerun reads the programs an earlier run compiled; results are "
                             "the same, only faster (default: off)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"seeds": [0, 1], "generations": [4, 8], "baseline_steps": MATCHED}
    options = BenchOptions(
        seeds=tuple(args.seeds if args.seeds is not None else defaults["seeds"]),
        generations=tuple(sorted(set(args.generations if args.generations is not None else defaults["generations"]))),
        tasks=tuple(args.tasks) if args.tasks else None,
        quick=args.quick,
        baseline_steps=args.baseline_steps if args.baseline_steps is not None else defaults["baseline_steps"],
        baseline_batch=args.baseline_batch,
        baseline_lr=args.baseline_lr,
        out=args.out,
        data_dir=args.data_dir,
        baseline_cache=args.baseline_cache,
        evolved_only=args.evolved_only,
        baselines_only=args.baselines_only,
        overrides=tuple(tuple(item.split("=", 1)) for item in args.set),
        compilation_cache=args.compilation_cache,
    )
    if options.evolved_only and options.baselines_only:
        parser.error("--evolved-only and --baselines-only exclude each other")
    if options.baseline_steps < 0 or options.baseline_batch < 1 or min(options.generations) < 1:
        parser.error("--baseline-steps must not be negative; --baseline-batch and --generations must be positive")
    return options


def engine_config(quick: bool, overrides: Sequence[tuple[str, str]] = ()) -> SearchConfig:
    fields = {f.name: f.type for f in dataclasses.fields(SearchConfig)}
    parsed = {key: _parse_value(value) for key, value in overrides if key in fields}
    unknown = [key for key, _ in overrides if key not in fields]
    if unknown:
        raise SystemExit(f"unknown configuration fields: {unknown}")
    base = dict(QUICK_ENGINE_OVERRIDES) if quick else {}
    return get_config("tiny", **{**base, **parsed})


def evolved_examples(config: SearchConfig, generations: int) -> int:
    """Training examples the engine spends on one new task's search."""
    plan = search_plan(config, SearchBudget(generations=generations), kind=EXTENSION, train_examples=1,
                       validation_examples=1)
    return plan.candidates * plan.examples_per_candidate


def baseline_recipe(options: BenchOptions, config: SearchConfig, generations: int) -> Recipe:
    """The scratch / fine-tune recipe compared with the evolved search at `generations`."""
    steps = options.baseline_steps or math.ceil(evolved_examples(config, generations) / options.baseline_batch)
    return Recipe(steps=steps, batch_size=options.baseline_batch, peak_lr=options.baseline_lr)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---- prepared tasks ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedTask:
    """A suite task with its npz file and the arrays every method reuses."""

    task: quality_suite.SuiteTask
    npz_path: str
    train_inputs: np.ndarray  # float32 N x 16 x 16 x 3 in [-1, 1]
    test_inputs: np.ndarray
    train_pixels: np.ndarray  # float N x 256 grey in [0, 1]
    validation_pixels: np.ndarray
    test_pixels: np.ndarray

    @property
    def name(self) -> str:
        return self.task.name


def grey_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images -> N x 256 features: resized to 16x16, grey, in [0, 1]."""
    inputs = preprocess_eval(images, PIXEL_SIZE)
    return ((inputs[..., 0] + 1.0) / 2.0).reshape(len(images), -1).astype(np.float64)


def select_tasks(suite: list[quality_suite.SuiteTask], names: Sequence[str] | None) -> list[quality_suite.SuiteTask]:
    """The suite in order, restricted to `names` (which must exist)."""
    if not names:
        return suite
    known = [t.name for t in suite]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {known}")
    return [t for t in suite if t.name in set(names)]


def prepare(task: quality_suite.SuiteTask, directory: str, image_size: int) -> PreparedTask:
    """`image_size`: the side the ViT baselines see, the engine's default."""
    return PreparedTask(
        task=task,
        npz_path=quality_suite.write_npz(task, directory),
        train_inputs=preprocess_eval(task.train_images, image_size),
        test_inputs=preprocess_eval(task.test_images, image_size),
        train_pixels=grey_pixels(task.train_images),
        validation_pixels=grey_pixels(task.validation_images),
        test_pixels=grey_pixels(task.test_images),
    )


def structure_for(config: SearchConfig, num_classes: int) -> PathStructure:
    """The root's ViT at the configuration's default image size, with a K-class head."""
    size = config.size
    return PathStructure(size=size, num_layers=size.num_layers, image_size=config.default_image_size,
                         num_classes=num_classes)


@functools.cache
def fresh_vit_params(config: SearchConfig, num_classes: int) -> int:
    """Parameter count of a fresh ViT of the root's size with a K-class head."""
    return count_params(vit.init_path_params(structure_for(config, num_classes), jax.random.key(0)))


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predicted) == np.asarray(labels)))


# ---- (a) the evolved system ----------------------------------------------------------


@dataclasses.dataclass
class EvolvedTaskResult:
    test_accuracy: float
    engine_validation_accuracy: float | None
    engine_test_accuracy: float | None
    accounted_params: float
    fresh_params: int
    params_fraction: float
    search_seconds: float
    train_examples: int  # estimate: generations x candidates x rounds x steps_per_round x batch


@dataclasses.dataclass
class EvolvedRun:
    seed: int
    generations: int
    tasks: dict[str, EvolvedTaskResult]
    first_task: str
    forgetting_free: bool | None  # first task's test probabilities unchanged by later tasks; None: not run
    seconds: float


def skipped_evolved(tasks: Sequence[PreparedTask], seed: int, generations: int) -> EvolvedRun:
    """--baselines-only: an evolved run that did not happen (NaN accuracies, no forgetting verdict)."""
    nan = math.nan
    results = {p.name: EvolvedTaskResult(nan, None, None, nan, 0, nan, 0.0, 0) for p in tasks}
    return EvolvedRun(seed=seed, generations=generations, tasks=results, first_task=tasks[0].name,
                      forgetting_free=None, seconds=0.0)


def predict_probabilities(engine: Engine, name: str, images: np.ndarray) -> np.ndarray:
    """The engine's probabilities, in chunks of at most PREDICT_CHUNK images."""
    chunks = [engine.predict(name, images[i : i + PREDICT_CHUNK]).probabilities
              for i in range(0, len(images), PREDICT_CHUNK)]
    return np.concatenate(chunks)


def predict_classes(engine: Engine, name: str, images: np.ndarray) -> np.ndarray:
    chunks = [engine.predict(name, images[i : i + PREDICT_CHUNK]).classes
              for i in range(0, len(images), PREDICT_CHUNK)]
    return np.concatenate(chunks)


def run_evolved(tasks: Sequence[PreparedTask], config: SearchConfig, seed: int, generations: int) -> EvolvedRun:
    """One fresh in-memory engine; every task added and searched in order."""
    started = time.perf_counter()
    engine = Engine.create(config, options=EngineOptions(seed=seed))
    first = tasks[0]
    seconds: dict[str, float] = {}
    examples: dict[str, int] = {}
    first_probabilities = None
    for prepared in tasks:
        task_started = time.perf_counter()
        engine.add_task(TaskSpec(name=prepared.name, source=NpzSource(path=prepared.npz_path),
                                 budget=SearchBudget(generations=generations)))
        engine.run_search(prepared.name)
        plan = engine.search_plan(prepared.name)  # known once the search has loaded the data
        examples[prepared.name] = plan.candidates * plan.examples_per_candidate
        seconds[prepared.name] = time.perf_counter() - task_started
        info = engine.task(prepared.name)
        logger.info("seed %d gens %d: %s searched in %.1fs (engine validation %.4f, test %.4f, %.0f%% params "
                    "charged now); probes %s", seed, generations, prepared.name, seconds[prepared.name],
                    info.validation_accuracy or 0.0, info.test_accuracy or 0.0,
                    100 * info.accounted_params / fresh_vit_params(config, prepared.task.num_classes),
                    [(p.task, round(p.accuracy, 3), p.chosen) for p in info.probes])
        if prepared is first:
            first_probabilities = predict_probabilities(engine, first.name, first.task.test_images)
    results = {}
    for prepared in tasks:  # at the end: sharing as it stands with every task added
        info = engine.task(prepared.name)
        fresh = fresh_vit_params(config, prepared.task.num_classes)
        results[prepared.name] = EvolvedTaskResult(
            test_accuracy=accuracy(predict_classes(engine, prepared.name, prepared.task.test_images),
                                   prepared.task.test_labels),
            engine_validation_accuracy=info.validation_accuracy,
            engine_test_accuracy=info.test_accuracy,
            accounted_params=float(info.accounted_params),
            fresh_params=fresh,
            params_fraction=float(info.accounted_params) / fresh,
            search_seconds=seconds[prepared.name],
            train_examples=examples[prepared.name],
        )
    final_probabilities = predict_probabilities(engine, first.name, first.task.test_images)
    return EvolvedRun(
        seed=seed, generations=generations, tasks=results, first_task=first.name,
        forgetting_free=bool(np.array_equal(first_probabilities, final_probabilities)),
        seconds=time.perf_counter() - started,
    )


# ---- (b, c) scratch and fine-tuned ViTs ---------------------------------------------


def make_optimizer(recipe: Recipe) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=recipe.peak_lr,
        warmup_steps=max(1, round(recipe.warmup_fraction * recipe.steps)),
        decay_steps=recipe.steps, end_value=0.0,
    )
    return optax.chain(optax.clip_by_global_norm(recipe.clip_norm), optax.sgd(schedule, momentum=recipe.momentum))


def loss_fn(params: Mapping[str, Any], images: jax.Array, labels: jax.Array, structure: PathStructure) -> jax.Array:
    logits = vit.forward(params, images, structure)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.cache
def train_chunk_fn(structure: PathStructure, recipe: Recipe) -> Callable:
    """jit((params, opt_state, train_x, train_y, indices[S, B])) -> (params, opt_state, mean loss):
    S optimizer steps in one lax.scan; params and state donated."""
    optimizer = make_optimizer(recipe)

    def chunk(params, opt_state, train_x, train_y, indices):
        def step(carry, batch):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, train_x[batch], train_y[batch], structure)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), indices)
        return params, opt_state, losses.mean()

    return jax.jit(chunk, donate_argnums=(0, 1))


@functools.cache
def logits_fn(structure: PathStructure) -> Callable:
    return jax.jit(functools.partial(vit.forward, structure=structure))


def batch_indices(num_examples: int, steps: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """steps x batch indices: consecutive fresh permutations (every epoch visits each example once)."""
    needed = steps * batch_size
    epochs = [rng.permutation(num_examples) for _ in range(math.ceil(needed / num_examples))]
    return np.concatenate(epochs)[:needed].reshape(steps, batch_size).astype(np.int32)


def train_vit(
    params: Mapping[str, Any], structure: PathStructure, train_x: np.ndarray, train_y: np.ndarray,
    recipe: Recipe, rng: np.random.Generator,
) -> tuple[dict[str, Any], float]:
    """Trains every parameter with the recipe; returns (params, final chunk's mean loss)."""
    optimizer = make_optimizer(recipe)
    params = jax.tree.map(jnp.asarray, params)
    opt_state = optimizer.init(params)
    device_x, device_y = jnp.asarray(train_x), jnp.asarray(train_y, dtype=jnp.int32)
    indices = batch_indices(len(train_y), recipe.steps, recipe.batch_size, rng)
    chunk = train_chunk_fn(structure, recipe)
    loss = float("nan")
    for lo in range(0, recipe.steps, SCAN_STEPS):
        params, opt_state, mean_loss = chunk(params, opt_state, device_x, device_y, indices[lo : lo + SCAN_STEPS])
        loss = float(mean_loss)
    if not math.isfinite(loss):
        logger.warning("baseline training diverged (loss %s)", loss)
    return params, loss


def vit_predict(params: Mapping[str, Any], structure: PathStructure, inputs: np.ndarray) -> np.ndarray:
    """Argmax classes in fixed-size (padded) batches: one executable per structure."""
    forward = logits_fn(structure)
    out = []
    for lo in range(0, len(inputs), EVAL_BATCH):
        batch = inputs[lo : lo + EVAL_BATCH]
        padded = np.zeros((EVAL_BATCH,) + inputs.shape[1:], np.float32)
        padded[: len(batch)] = batch
        out.append(np.asarray(jnp.argmax(forward(params, padded), axis=-1))[: len(batch)])
    return np.concatenate(out)


@dataclasses.dataclass
class VitResult:
    test_accuracy: float
    final_loss: float
    seconds: float


def finetune_init(first_params: Mapping[str, Any], structure: PathStructure) -> dict[str, Any]:
    """The first task's trained components with a fresh (zero) head for this task."""
    params = {name: value for name, value in first_params.items() if name != "head"}
    params["head"] = vit.init_component(
        "head", size=structure.size, image_size=structure.image_size, num_classes=structure.num_classes,
        adapter_dim=structure.adapter_dim, rng=jax.random.key(0),
    )
    return params


def fit_and_score(
    init: Mapping[str, Any], structure: PathStructure, prepared: PreparedTask, recipe: Recipe,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], VitResult]:
    started = time.perf_counter()
    params, loss = train_vit(init, structure, prepared.train_inputs, prepared.task.train_labels, recipe, rng)
    predicted = vit_predict(params, structure, prepared.test_inputs)
    result = VitResult(accuracy(predicted, prepared.task.test_labels), loss, time.perf_counter() - started)
    return params, result


def run_vit_baselines(
    tasks: Sequence[PreparedTask], config: SearchConfig, seed: int, recipe: Recipe
) -> tuple[dict[str, VitResult], dict[str, VitResult]]:
    """(scratch, finetune) results per task. The first task's fine-tune is its scratch model."""
    scratch, finetune = {}, {}
    first_params = None
    for index, prepared in enumerate(tasks):
        structure = structure_for(config, prepared.task.num_classes)
        init = vit.init_path_params(structure, jax.random.key(seed * 1000 + index))
        params, scratch[prepared.name] = fit_and_score(
            init, structure, prepared, recipe, np.random.default_rng([seed, index, 0]))
        logger.info("seed %d: %s scratch test %.4f (loss %.3f) in %.1fs", seed, prepared.name,
                    scratch[prepared.name].test_accuracy, scratch[prepared.name].final_loss,
                    scratch[prepared.name].seconds)
        if index == 0:
            first_params = jax.tree.map(np.asarray, params)
            finetune[prepared.name] = scratch[prepared.name]
            continue
        _, finetune[prepared.name] = fit_and_score(
            finetune_init(first_params, structure), structure, prepared, recipe,
            np.random.default_rng([seed, index, 1]))
        logger.info("seed %d: %s finetune test %.4f (loss %.3f) in %.1fs", seed, prepared.name,
                    finetune[prepared.name].test_accuracy, finetune[prepared.name].final_loss,
                    finetune[prepared.name].seconds)
    return scratch, finetune


def cached_vit_baselines(
    cache: str | None, tasks: Sequence[PreparedTask], config: SearchConfig, seed: int, recipe: Recipe,
    skip: bool = False,
) -> tuple[dict[str, VitResult], dict[str, VitResult]]:
    """run_vit_baselines, read from / written to `cache` when one is given;
    with `skip`, results not in the cache are NaN instead of trained."""
    missing = {p.name: VitResult(math.nan, math.nan, 0.0) for p in tasks}
    if not cache:
        return (missing, dict(missing)) if skip else run_vit_baselines(tasks, config, seed, recipe)
    key = (f"seed{seed}-{recipe.steps}x{recipe.batch_size}-lr{recipe.peak_lr}-{config.size.name}-"
           f"{config.default_image_size}px-") + "-".join(
        p.name for p in tasks)
    path = os.path.join(cache, f"{key}.json")
    if os.path.exists(path):
        with open(path) as file:
            stored = json.load(file)
        logger.info("seed %d: ViT baselines read from %s", seed, path)
        return ({n: VitResult(**r) for n, r in stored["scratch"].items()},
                {n: VitResult(**r) for n, r in stored["finetune"].items()})
    if skip:
        return missing, dict(missing)
    scratch, finetune = run_vit_baselines(tasks, config, seed, recipe)
    os.makedirs(cache, exist_ok=True)
    with open(path, "w") as file:
        json.dump({"scratch": {n: dataclasses.asdict(r) for n, r in scratch.items()},
                   "finetune": {n: dataclasses.asdict(r) for n, r in finetune.items()}}, file)
    return scratch, finetune


# ---- (d) classical baselines ---------------------------------------------------------


@dataclasses.dataclass
class ClassicalResult:
    logreg: float
    svm: float
    svm_c: float
    seconds: float


def run_classical(prepared: PreparedTask) -> ClassicalResult:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    started = time.perf_counter()
    task = prepared.task
    logreg = LogisticRegression(max_iter=LOGREG_MAX_ITER).fit(prepared.train_pixels, task.train_labels)
    best_c, best_val, best_model = None, -1.0, None
    for c in SVM_CS:
        model = SVC(C=c, kernel="rbf").fit(prepared.train_pixels, task.train_labels)
        val = accuracy(model.predict(prepared.validation_pixels), task.validation_labels)
        if val > best_val:
            best_c, best_val, best_model = c, val, model
    result = ClassicalResult(
        logreg=accuracy(logreg.predict(prepared.test_pixels), task.test_labels),
        svm=accuracy(best_model.predict(prepared.test_pixels), task.test_labels),
        svm_c=best_c, seconds=time.perf_counter() - started,
    )
    logger.info("%s: logreg %.4f, svm %.4f (C=%g) in %.1fs", task.name, result.logreg, result.svm, best_c,
                result.seconds)
    return result


# ---- summaries ----------------------------------------------------------------------


def mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def seed_table(
    names: Sequence[str], evolved: EvolvedRun, scratch: Mapping[str, VitResult], finetune: Mapping[str, VitResult],
    classical: Mapping[str, ClassicalResult],
) -> dict[str, dict[str, float | None]]:
    """Per task: test accuracy of every method, params charged, engine accuracies."""
    rows = {}
    for name in names:
        e = evolved.tasks[name]
        rows[name] = {
            "evolved": e.test_accuracy, "scratch": scratch[name].test_accuracy,
            "finetune": finetune[name].test_accuracy, "logreg": classical[name].logreg,
            "svm": classical[name].svm, "params_fraction": e.params_fraction,
            "engine_validation": e.engine_validation_accuracy, "engine_test": e.engine_test_accuracy,
        }
    return rows


def evolved_extras(result: EvolvedTaskResult) -> dict[str, float | int]:
    """The evolved run's per-task numbers that the comparison table does not hold."""
    return {"accounted_params": result.accounted_params, "fresh_params": result.fresh_params,
            "search_seconds": result.search_seconds, "train_examples": result.train_examples}


def later_means(rows: Mapping[str, Mapping[str, float | None]], later: Sequence[str]) -> dict[str, float | None]:
    keys = METHODS + ("params_fraction", "engine_validation", "engine_test")
    return {key: mean([rows[name][key] for name in later]) for key in keys}


def comparisons(means: Mapping[str, float | None]) -> dict[str, float | None]:
    return {
        "evolved_over_finetune": ratio(means["evolved"], means["finetune"]),
        "evolved_over_scratch": ratio(means["evolved"], means["scratch"]),
        "evolved_minus_finetune": difference(means["evolved"], means["finetune"]),
        "evolved_minus_scratch": difference(means["evolved"], means["scratch"]),
    }


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(title: str, rows: Mapping[str, Mapping[str, float | None]], extra: Mapping[str, Any]) -> None:
    columns = ("evolved", "scratch", "finetune", "logreg", "svm", "params_fraction", "engine_validation")
    headers = ("evolved", "scratch", "finetune", "logreg", "svm", "params", "eng_val")
    print(f"\n{title}")
    print(f"  {'task':<24}" + "".join(f"{h:>10}" for h in headers) + f"{'search_s':>10}{'examples':>11}")
    for name, row in rows.items():
        cells = "".join(f"{fmt(row[c]):>10}" for c in columns)
        print(f"  {name:<24}{cells}{extra[name]['search_seconds']:>10.1f}{extra[name]['train_examples']:>11d}")


def print_means(title: str, means: Mapping[str, float | None]) -> None:
    print(f"  {title:<24}" + "".join(f"{fmt(means[c]):>10}" for c in
                                     ("evolved", "scratch", "finetune", "logreg", "svm", "params_fraction",
                                      "engine_validation")))


# ---- main -----------------------------------------------------------------------------


def run(options: BenchOptions) -> dict[str, Any]:
    started = time.perf_counter()
    config = engine_config(options.quick, options.overrides)
    recipes = {g: baseline_recipe(options, config, g) for g in options.generations}
    suite = select_tasks(quality_suite.build_suite(0), options.tasks)
    with tempfile.TemporaryDirectory(prefix="quality_suite_") as tmp:
        directory = options.data_dir or tmp
        prepared = [prepare(task, directory, config.default_image_size) for task in suite]
        logger.info("suite of %d tasks written to %s", len(prepared), directory)
        names = [p.name for p in prepared]
        later = names[1:]
        classical_started = time.perf_counter()
        classical = {p.name: run_classical(p) for p in prepared}
        classical_seconds = time.perf_counter() - classical_started
        per_seed: dict[str, Any] = {}
        for seed in options.seeds:
            baseline_seconds = 0.0
            by_generations = {}
            for generations in options.generations:
                baseline_started = time.perf_counter()
                scratch, finetune = cached_vit_baselines(options.baseline_cache, prepared, config, seed,
                                                         recipes[generations], skip=options.evolved_only)
                baseline_seconds += time.perf_counter() - baseline_started
                evolved = (skipped_evolved(prepared, seed, generations) if options.baselines_only
                           else run_evolved(prepared, config, seed, generations))
                rows = seed_table(names, evolved, scratch, finetune, classical)
                extra = {n: {"search_seconds": evolved.tasks[n].search_seconds,
                             "train_examples": evolved.tasks[n].train_examples} for n in names}
                means = later_means(rows, later) if later else None
                by_generations[str(generations)] = {
                    "tasks": {n: {**rows[n], **evolved_extras(evolved.tasks[n])} for n in names},
                    "later_means": means,
                    "comparisons": comparisons(means) if means else None,
                    "forgetting_free": evolved.forgetting_free,
                    "seconds": evolved.seconds,
                    "baseline_steps": recipes[generations].steps,
                    "scratch": {n: dataclasses.asdict(r) for n, r in scratch.items()},
                    "finetune": {n: dataclasses.asdict(r) for n, r in finetune.items()},
                }
                print_table(f"seed {seed}, generations {generations} (test accuracy; params = charged / fresh ViT)",
                            rows, extra)
                if means:
                    print_means("MEAN later tasks", means)
                print(f"  forgetting check ({names[0]} probabilities bit-identical after all tasks): "
                      f"{evolved.forgetting_free}; evolved run {evolved.seconds:.1f}s")
                recipe = recipes[generations]
                print(f"  scratch / finetune: {recipe.steps} steps x {recipe.batch_size} = "
                      f"{recipe.steps * recipe.batch_size} examples per task")
            per_seed[str(seed)] = {"generations": by_generations, "baseline_seconds": baseline_seconds}
    report = summarise(options, config, recipes, suite, classical, classical_seconds, per_seed, later)
    report["wall_seconds"] = time.perf_counter() - started
    return report


def generations_monotone(means_by_g: Mapping[int, float | None]) -> dict[str, bool | None]:
    """For consecutive generations settings a < b: is mean evolved accuracy at b >= at a?"""
    ordered = sorted(means_by_g)
    return {f"{b}_ge_{a}": (None if means_by_g[a] is None or means_by_g[b] is None else means_by_g[b] >= means_by_g[a])
            for a, b in itertools.pairwise(ordered)}


def summarise(
    options: BenchOptions, config: SearchConfig, recipes: Mapping[int, Recipe],
    suite: Sequence[quality_suite.SuiteTask],
    classical: Mapping[str, ClassicalResult], classical_seconds: float, per_seed: Mapping[str, Any],
    later: Sequence[str],
) -> dict[str, Any]:
    over_seeds: dict[str, Any] = {}
    per_seed_means: dict[str, Any] = {}
    if later:
        for g in options.generations:
            means = {key: mean([per_seed[str(s)]["generations"][str(g)]["later_means"][key] for s in options.seeds])
                     for key in per_seed[str(options.seeds[0])]["generations"][str(g)]["later_means"]}
            over_seeds[str(g)] = {"later_means": means, "comparisons": comparisons(means)}
        per_seed_means = {
            str(s): {"generations_monotone": generations_monotone(
                {g: per_seed[str(s)]["generations"][str(g)]["later_means"]["evolved"] for g in options.generations})}
            for s in options.seeds}
    monotone = generations_monotone({g: over_seeds[str(g)]["later_means"]["evolved"] for g in options.generations}) \
        if later else {}
    device = jax.devices()[0]
    return {
        "bench": "quality",
        "quick": options.quick,
        "seeds": list(options.seeds),
        "generations": list(options.generations),
        "suite": [{"name": t.name, "similarity": t.similarity, "num_classes": t.num_classes,
                   "train": t.sizes()[0], "validation": t.sizes()[1], "test": t.sizes()[2]} for t in suite],
        "engine_config": {"name": config.name, "size": dataclasses.asdict(config.size),
                          "image_sizes": list(config.image_sizes), "default_image_size": config.default_image_size,
                          "candidates_per_generation": config.candidates_per_generation,
                          "train_rounds": config.train_rounds, "examples_per_round": config.examples_per_round,
                          "batch_size": config.batch_size, "population_size": config.population_size},
        "baseline_recipes": {str(g): dataclasses.asdict(r) for g, r in recipes.items()},
        "classical": {n: dataclasses.asdict(r) for n, r in classical.items()},
        "classical_seconds": classical_seconds,
        "per_seed": dict(per_seed),
        "per_seed_generations_monotone": {s: v["generations_monotone"] for s, v in per_seed_means.items()},
        "over_seeds": over_seeds,
        "generations_monotone": monotone,
        "forgetting_free": forgetting_verdict([per_seed[str(s)]["generations"][str(g)]["forgetting_free"]
                                               for s in options.seeds for g in options.generations]),
        "jax": {"version": jax.__version__, "backend": jax.default_backend(), "platform": device.platform,
                "device_kind": device.device_kind, "devices": len(jax.devices())},
    }


def forgetting_verdict(checks: Sequence[bool | None]) -> bool | None:
    """True when every run was forgetting-free, None when no evolved run happened."""
    if any(check is None for check in checks):
        return None
    return all(checks)


def print_summary(report: Mapping[str, Any]) -> None:
    print("\nMEANS over later tasks, per seed")
    for g in report["generations"]:
        for s in report["seeds"]:
            print_means(f"seed {s}, gens {g}", report["per_seed"][str(s)]["generations"][str(g)]["later_means"])
    print("\nMEANS over seeds (later tasks)")
    for g, entry in report["over_seeds"].items():
        print_means(f"gens {g}", entry["later_means"])
        c = entry["comparisons"]
        print(f"    evolved/finetune {fmt(c['evolved_over_finetune'], 3)}  evolved/scratch "
              f"{fmt(c['evolved_over_scratch'], 3)}  evolved-finetune {fmt(c['evolved_minus_finetune'], 4)}  "
              f"evolved-scratch {fmt(c['evolved_minus_scratch'], 4)}")
    if not report["generations_monotone"]:
        print("  more generations >= fewer: n/a (one generations setting)")
    for key, value in report["generations_monotone"].items():
        a_ge_b = key.replace("_ge_", " gens >= ")
        per_seed = {s: v.get(key) for s, v in report["per_seed_generations_monotone"].items()}
        print(f"  {a_ge_b} gens (mean later evolved accuracy): {value}; per seed {per_seed}")
    print(f"  forgetting check, all seeds and settings: {report['forgetting_free']}")
    j = report["jax"]
    print(f"  jax {j['version']} backend {j['backend']} platform {j['platform']} device {j['device_kind']} "
          f"x{j['devices']}")
    for s in report["seeds"]:
        entry = report["per_seed"][str(s)]
        evolved_times = {g: round(v["seconds"], 1) for g, v in entry["generations"].items()}
        print(f"  seed {s}: baselines (scratch + finetune) {entry['baseline_seconds']:.1f}s, "
              f"evolved runs by generations {evolved_times}")
    print(f"  classical baselines {report['classical_seconds']:.1f}s; wall {report['wall_seconds']:.1f}s")
    print("  examples = candidates (all generations) x train_rounds x ceil(examples_per_round / batch) x batch")


def finite(value: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def main(argv: Sequence[str] | None = None) -> int:
    # force: an imported library (via evolve) already installed a WARNING-level root handler.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s", force=True)
    options = parse_args(argv)
    if options.compilation_cache:
        from evolve.engine import enable_compilation_cache  # noqa: PLC0415

        enable_compilation_cache(options.compilation_cache)
    report = run(options)
    print_summary(report)
    line = json.dumps(finite(report), sort_keys=True, allow_nan=False)
    if options.out:
        with open(options.out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
