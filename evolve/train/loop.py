"""Training of a generation's candidates, in lockstep, one per device.

Every candidate's arrays are committed to its own device; the loop dispatches
step k of every candidate before waiting on any, so JAX's asynchronous
dispatch runs the per-structure executables concurrently (DESIGN.md §4).
All candidates of a generation see the same input batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from evolve.data import ImageSet, TaskData, batch_iterator, preprocess_eval, preprocess_train
from evolve.errors import CancelledError
from evolve.train import optimizer, steps
from evolve.train.priority import NO_PRIORITY, ServingPriority
from evolve.types import HyperValue, Params, PathStructure

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CandidatePlan:
    """What to train: initial values of the trainable components, frozen rest."""

    structure: PathStructure
    trainable: dict[str, Params]
    frozen: dict[str, Params]
    momentum: dict[str, Params]  # inherited traces; names missing here start at zero
    hparams: Mapping[str, HyperValue]
    start_score: float  # parent's score for a same-task parent, else -inf
    score_of_quality: Callable[[float], float]
    frozen_ids: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> component id


@dataclasses.dataclass
class TrainResult:
    trainable: dict[str, Params] | None  # best snapshot; None when nothing beat start_score
    momentum: dict[str, Params] | None
    quality: float
    score: float
    steps: int
    train_seconds: float
    compile_seconds: float


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    batch_size: int
    rounds: int
    examples_per_round: int
    eval_batch_size: int
    # Successive halving (0: off): after this many rounds only the better half
    # of the candidates trains on, taking over the rounds the others give up.
    halving_round: int = 0

    def halving(self, candidates: int) -> tuple[int, int]:
        return halving_rounds(self.rounds, self.halving_round, candidates)

    @property
    def steps_per_round(self) -> int:
        """A round is examples_per_round training examples (several epochs of a
        small task), not one epoch (DESIGN §3b)."""
        return math.ceil(self.examples_per_round / self.batch_size)


def halving_rounds(rounds: int, halving_round: int, candidates: int) -> tuple[int, int]:
    """Successive halving of `candidates` that would each train `rounds`
    rounds: (the round after which the worse half stops, or 0 when there is
    no halving; the rounds a survivor trains). The survivors share the rounds
    the others give up, in whole rounds each."""
    if candidates < 2 or not 0 < halving_round < rounds:
        return 0, rounds
    kept = math.ceil(candidates / 2)
    return halving_round, halving_round + (rounds - halving_round) * candidates // kept


_AUGMENTATION_OFF = {"crop_area": 1.0, "flip": False, "brightness": 0.0, "contrast": 0.0,
                     "saturation": 0.0, "hue": 0.0, "jpeg_quality": 0.0}


def augmentation_is_off(data_hparams: Mapping[str, HyperValue]) -> bool:
    return all(data_hparams.get(k, off) == off for k, off in _AUGMENTATION_OFF.items())


class _Batches:
    """The generation's shared training batches, preprocessed per image size."""

    def __init__(self, train: ImageSet, batch_size: int, data_hparams: Mapping[str, HyperValue], seed: int):
        shuffle_seed, augment_seed = np.random.SeedSequence(seed).spawn(2)  # independent streams
        self._iterator = batch_iterator(train, batch_size, int(shuffle_seed.generate_state(1)[0]))
        self._hparams = data_hparams
        self._rng = np.random.default_rng(augment_seed)
        self._static = augmentation_is_off(data_hparams)

    def next(self, image_sizes: Sequence[int]) -> tuple[dict[int, np.ndarray], np.ndarray]:
        images, labels = next(self._iterator)
        by_size = {}
        for size in image_sizes:
            if self._static:
                by_size[size] = preprocess_eval(images, size)
            else:
                by_size[size] = preprocess_train(images, size, self._hparams, self._rng)
        return by_size, labels


class _Prefetched:
    """Prepares the next `depth` training batches in a background thread while
    the device runs the current step (the host's shuffle, gather and
    preprocessing leave the critical path). Batches come in the order they
    were made, so training is deterministic as without it."""

    def __init__(self, batches: _Batches, image_sizes: Sequence[int], count: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(batches, list(image_sizes), count), name="batch-prefetch", daemon=True
        )
        self._thread.start()

    def _produce(self, batches: _Batches, image_sizes: list[int], count: int) -> None:
        for _ in range(count):
            try:
                item: Any = batches.next(image_sizes)
            except BaseException as error:  # handed to the consumer, raised there
                item = error
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, BaseException):
                return

    def next(self) -> tuple[dict[int, np.ndarray], np.ndarray]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> _Prefetched:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _padded_eval_batches(images: np.ndarray, labels: np.ndarray, batch: int):
    for start in range(0, len(images), batch):
        x, y = images[start : start + batch], labels[start : start + batch]
        mask = np.ones(batch, bool)
        if len(x) < batch:
            mask[len(x) :] = False
            pad = batch - len(x)
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros((pad,), y.dtype)])
        yield x, y, mask


def evaluate_accuracy(
    trainable: Mapping[str, Params],
    frozen: Mapping[str, Params],
    image_set: ImageSet,
    structure: PathStructure,
    eval_batch_size: int,
    device: jax.Device | None = None,
) -> float:
    """Accuracy of a path's parameters on a whole image set (eval preprocessing)."""
    images = preprocess_eval(image_set.images, structure.image_size)
    return accuracy_on(trainable, frozen, images, image_set.labels, structure, eval_batch_size, device)


def accuracy_on(
    trainable: Mapping[str, Params],
    frozen: Mapping[str, Params],
    images: np.ndarray,
    labels: np.ndarray,
    structure: PathStructure,
    eval_batch_size: int,
    device: jax.Device | None = None,
) -> float:
    """Accuracy on already preprocessed images."""
    return accuracy_of(dispatch_counts(trainable, frozen, images, labels, structure, eval_batch_size, device),
                       len(labels))


def dispatch_counts(
    trainable: Mapping[str, Params],
    frozen: Mapping[str, Params],
    images: np.ndarray,
    labels: np.ndarray,
    structure: PathStructure,
    eval_batch_size: int,
    device: jax.Device | None = None,
) -> list[jax.Array]:
    """Dispatches the correct-counts of every eval batch without waiting on any."""
    counts = []
    for x, y, mask in _padded_eval_batches(images, labels, eval_batch_size):
        x, y, mask = jax.device_put((x, y, mask), device)
        counts.append(steps.count_correct(trainable, frozen, x, y, mask, structure=structure))
    return counts


def accuracy_of(counts: Sequence[jax.Array], examples: int) -> float:
    """The accuracy from dispatched counts: one host sync for all of them."""
    correct = sum(int(c) for c in jax.device_get(list(counts)))
    return correct / max(examples, 1)


class _CandidateState:
    """Device-resident training state of one candidate."""

    def __init__(self, plan: CandidatePlan, device: jax.Device, total_steps: int, rounds: int):
        self.plan = plan
        self.device = device
        self.nesterov = bool(plan.hparams.get("nesterov", False))
        self.trainable = jax.device_put(plan.trainable, device)
        self.frozen = jax.device_put(plan.frozen, device)
        opt_state = optimizer.make_optimizer(self.nesterov).init(self.trainable)
        trace = optimizer.momentum_trace(opt_state)
        inherited = {name: plan.momentum.get(name, trace[name]) for name in trace}
        self.opt_state = jax.device_put(optimizer.with_momentum_trace(opt_state, inherited), device)
        self.learning_rates = optimizer.learning_rates(plan.hparams, total_steps, rounds)
        self.momentum = np.float32(plan.hparams.get("momentum", 0.9))
        self.best_score = plan.start_score
        self.best_quality = -math.inf
        self.own_best = -math.inf  # its best validation score, whatever the bar
        self.steps = 0
        self.best: tuple[dict, dict] | None = None
        self.compile_seconds = 0.0
        self.started = time.perf_counter()

    def step(self, step_index: int, images: np.ndarray, labels: np.ndarray) -> jax.Array:
        """Dispatches one training step; returns its loss (not waited on)."""
        traces_before = steps.TRACE_COUNTS["train_step"]
        started = time.perf_counter()
        images, labels = jax.device_put((images, labels), self.device)
        self.trainable, self.opt_state, loss = steps.train_step(
            self.trainable,
            self.frozen,
            self.opt_state,
            images,
            labels,
            self.learning_rates[step_index],
            self.momentum,
            structure=self.plan.structure,
            nesterov=self.nesterov,
        )
        self.steps += 1
        if steps.TRACE_COUNTS["train_step"] != traces_before:
            self.compile_seconds += time.perf_counter() - started
        return loss

    def dispatch_validation(self, images: np.ndarray, labels: np.ndarray, eval_batch_size: int) -> list[jax.Array]:
        """Dispatches one validation; the eval step's compile, when this call
        compiles it, counts as compile time too."""
        traces_before = steps.TRACE_COUNTS["count_correct"]
        started = time.perf_counter()
        counts = dispatch_counts(self.trainable, self.frozen, images, labels, self.plan.structure, eval_batch_size,
                                 self.device)
        if steps.TRACE_COUNTS["count_correct"] != traces_before:
            self.compile_seconds += time.perf_counter() - started
        return counts

    def validated(self, quality: float) -> None:
        """Records a validation accuracy; keeps a snapshot when it reaches the best score."""
        score = self.plan.score_of_quality(quality)
        self.own_best = max(self.own_best, score)
        self.best_quality = max(self.best_quality, quality)
        if score >= self.best_score:  # ties accepted, as the reference (DESIGN §3.5)
            self.best_score = score
            self.best_quality = quality
            self.best = jax.device_get((self.trainable, optimizer.momentum_trace(self.opt_state)))

    def result(self) -> TrainResult:
        trainable, momentum = self.best if self.best is not None else (None, None)
        return TrainResult(
            trainable=trainable,
            momentum=momentum,
            quality=self.best_quality,
            score=self.best_score,
            steps=self.steps,
            train_seconds=time.perf_counter() - self.started - self.compile_seconds,
            compile_seconds=self.compile_seconds,
        )


def train_candidates(
    plans: Sequence[CandidatePlan],
    data: TaskData,
    settings: TrainSettings,
    data_hparams: Mapping[str, HyperValue],
    *,
    seed: int,
    devices: Sequence[jax.Device] | None = None,
    cancel: threading.Event | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    priority: ServingPriority = NO_PRIORITY,
) -> list[TrainResult]:
    """Trains every plan for settings.rounds rounds, validating after each;
    with successive halving (`settings.halving_round`) the better half by
    validation score then trains on for the rounds the others give up.

    `on_step(steps done, total steps, examples)` is called after every step
    has been dispatched to every training candidate, with the examples all
    candidates have trained on so far (fewer per step once halving stopped
    some); it must be cheap and never waits on a device.

    At most two steps per candidate are in flight, and every step first
    yields to Predict calls in flight (`priority`, see train.priority)."""
    devices = list(devices or jax.local_devices())
    steps_per_round = settings.steps_per_round
    halving_round, rounds = settings.halving(len(plans))
    total_steps = steps_per_round * rounds  # a survivor's schedule
    states = [
        _CandidateState(plan, devices[i % len(devices)], total_steps, rounds)
        for i, plan in enumerate(plans)
    ]
    image_sizes = sorted({plan.structure.image_size for plan in plans})
    batches = _Batches(data.train, settings.batch_size, data_hparams, seed)
    # Validation images are preprocessed once per image size, not per candidate and round.
    validation = {size: preprocess_eval(data.validation.images, size) for size in image_sizes}
    with _Prefetched(batches, image_sizes, total_steps) as prefetched:
        _train_rounds(states, prefetched, validation, data.validation.labels, settings, rounds, halving_round,
                      cancel, on_step, priority)
    return [state.result() for state in states]


def _train_rounds(
    states: Sequence[_CandidateState],
    prefetched: _Prefetched,
    validation: Mapping[int, np.ndarray],
    validation_labels: np.ndarray,
    settings: TrainSettings,
    rounds: int,
    halving_round: int,
    cancel: threading.Event | None,
    on_step: Callable[[int, int, int], None] | None,
    priority: ServingPriority = NO_PRIORITY,
) -> None:
    steps_per_round = settings.steps_per_round
    total_steps = steps_per_round * rounds
    step_index = examples = 0
    active = list(states)
    for round_index in range(rounds):
        in_flight: list[jax.Array] = []
        for _ in range(steps_per_round):
            if cancel is not None and cancel.is_set():
                raise CancelledError("search cancelled")
            by_size, labels = prefetched.next()
            priority.yield_to_serving()
            # Dispatch all candidates before waiting on any; then wait on the
            # previous step, so at most two steps per candidate are queued.
            losses = [state.step(step_index, by_size[state.plan.structure.image_size], labels) for state in active]
            jax.block_until_ready(in_flight)
            in_flight = losses
            step_index += 1
            examples += settings.batch_size * len(active)
            if on_step is not None:
                on_step(step_index, total_steps, examples)
        # Every candidate's validation is dispatched before any result is read.
        pending = [
            state.dispatch_validation(validation[state.plan.structure.image_size], validation_labels,
                                      settings.eval_batch_size)
            for state in active
        ]
        for state, counts in zip(active, pending):
            state.validated(accuracy_of(counts, len(validation_labels)))
        if round_index + 1 == halving_round:
            active = survivors(active)


def survivors(states: Sequence[_CandidateState]) -> list[_CandidateState]:
    """The better half (rounded up) by own best validation score, in their
    order; ties keep the earlier candidate."""
    kept = math.ceil(len(states) / 2)
    ranked = sorted(range(len(states)), key=lambda i: (-states[i].own_best, i))[:kept]
    return [states[i] for i in sorted(ranked)]
