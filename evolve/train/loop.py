"""Training of a generation's candidates, in lockstep, one per device.

Every candidate's arrays are committed to its own device; the loop dispatches
step k of every candidate before waiting on any, so JAX's asynchronous
dispatch runs the per-structure executables concurrently (DESIGN.md §4).
All candidates of a generation see the same input batches.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Hashable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evolve.config import AUGMENTATION_OFF, LATENT_CACHE_BYTES, RESIDENT_FROZEN_BYTES
from evolve.data import ImageSet, TaskData, batch_indices, preprocess_device
from evolve.data.preprocess import jpeg_jitter
from evolve.data.preprocess_device import Augmentation
from evolve.errors import CancelledError
from evolve.models import vit
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
    # Latent replay: device bytes for cached frozen-prefix features (0: off).
    latent_cache_bytes: int = LATENT_CACHE_BYTES

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


# How strictly the step loop guards against implicit host <-> device
# transfers (jax.transfer_guard): "allow" in production; the tests run it at
# "disallow", which proves that images, parameters and per-step values reach
# the device only through the explicit uploads of the prefetch thread.
STEP_LOOP_TRANSFER_GUARD = "allow"


class Batch(NamedTuple):
    """One training step's shared batch: uint8 images (None when every
    candidate reads cached features), labels, the raw key of the step's device
    augmentation, and the examples' indices in the training split."""

    images: Any
    labels: Any
    key_data: Any
    indices: Any


def jpeg_quality(data_hparams: Mapping[str, HyperValue]) -> float:
    """The generation's JPEG jitter (0: none); it runs on the host, in `_Batches`."""
    return float(data_hparams.get("jpeg_quality", AUGMENTATION_OFF["jpeg_quality"]))


class _Batches:
    """The generation's shared training batches, as the host makes them (JPEG
    jitter is applied here when asked: that needs a codec)."""

    def __init__(self, train: ImageSet, batch_size: int, data_hparams: Mapping[str, HyperValue], seed: int,
                 *, with_images: bool = True):
        # Independent streams for the shuffle, the JPEG jitter and the device keys.
        shuffle_seed, jpeg_seed, key_seed = np.random.SeedSequence(seed).spawn(3)
        self._train = train
        self._indices = batch_indices(len(train), batch_size, int(shuffle_seed.generate_state(1)[0]))
        self._with_images = with_images
        self._jpeg_quality = jpeg_quality(data_hparams)
        self._jpeg_rng = np.random.default_rng(jpeg_seed)
        self._key_rng = np.random.default_rng(key_seed)

    def next(self) -> Batch:
        indices = next(self._indices)
        images = self._train.images[indices] if self._with_images else None
        if images is not None and self._jpeg_quality > 0:
            images = jpeg_jitter(images, self._jpeg_quality, self._jpeg_rng)
        key_data = self._key_rng.integers(0, 2**32, (2,), dtype=np.uint32)
        return Batch(images, self._train.labels[indices], key_data, indices.astype(np.int32))


class _Prefetched:
    """Makes the next `depth` training batches in a background thread and
    uploads them (uint8) to every device the candidates train on, while the
    devices run the current step: the host's shuffle, gather and upload leave
    the critical path. Batches come in the order they were made, so training
    is deterministic as without it."""

    def __init__(self, batches: _Batches, devices: Sequence[jax.Device], count: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(batches, list(devices), count), name="batch-prefetch", daemon=True
        )
        self._thread.start()

    def _produce(self, batches: _Batches, devices: list[jax.Device], count: int) -> None:
        for _ in range(count):
            try:
                batch = batches.next()
                item: Any = {device: jax.device_put(batch, device) for device in devices}
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

    def next(self) -> dict[jax.Device, Batch]:
        """The next batch on every device."""
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


class _TrainInputs:
    """The generation's device preprocessing: one jitted function (which
    augmentations run is static, their magnitudes live on each device), run
    once per step, device and image size, whatever the number of candidates."""

    def __init__(self, data_hparams: Mapping[str, HyperValue], devices: Sequence[jax.Device]):
        self.augmentation = Augmentation.of(data_hparams)
        self._jpeg = jpeg_quality(data_hparams) > 0
        values = preprocess_device.magnitudes(data_hparams)
        self._values = {device: jax.device_put(values, device) for device in devices}

    def make(self, batch: Batch, device: jax.Device, image_size: int) -> jax.Array:
        return steps.train_inputs(batch.images, batch.key_data, self._values[device], image_size=image_size,
                                  augmentation=self.augmentation)

    @property
    def deterministic(self) -> bool:
        """Whether a training example's model input is the same every step
        (no augmentation runs): its prefix features may then be cached."""
        return self.augmentation.off and not self._jpeg


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
    """Accuracy of a path's parameters on a whole image set, streamed: each
    uint8 batch is uploaded, preprocessed on the device and counted; one host
    sync at the end."""
    device = device or jax.local_devices()[0]
    counts = []
    for x, y, mask in _padded_eval_batches(image_set.images, image_set.labels, eval_batch_size):
        x, y, mask = jax.device_put((x, y, mask), device)
        inputs = steps.eval_inputs(x, image_size=structure.image_size)
        counts.append(steps.count_correct(trainable, frozen, inputs, y, mask, structure=structure))
    return accuracy_of(counts, len(image_set))


def accuracy_of(counts: Sequence[jax.Array], examples: int) -> float:
    """The accuracy from dispatched counts: one host sync for all of them."""
    correct = sum(int(c) for c in jax.device_get(list(counts)))
    return correct / max(examples, 1)


class ResidentParams:
    """Device copies of frozen components, kept across generations and
    searches so that a component shared by many candidates is uploaded once
    per device (DESIGN §4). Components are immutable: an entry is keyed by
    the identity of the component's host parameter tree and holds a
    reference to it, so a key cannot be reused by another tree while the
    entry lives. The least recently used entries go beyond `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: collections.OrderedDict[tuple[int, jax.Device], tuple[Any, Any, int]] = (
            collections.OrderedDict())
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def get(self, params: Params, device: jax.Device) -> Any:
        """`params` on `device`: the resident copy, or a new upload (kept when it fits)."""
        key = (id(params), device)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
            self.misses += 1
        on_device = jax.device_put(params, device)
        size = sum(leaf.nbytes for leaf in jax.tree.leaves(on_device))
        with self._lock:
            if size <= self.max_bytes and key not in self._entries:
                self._entries[key] = (params, on_device, size)
                self.bytes += size
                while self.bytes > self.max_bytes:
                    _, (_, _, dropped) = self._entries.popitem(last=False)
                    self.bytes -= dropped
        return on_device

    def retain(self, live: Iterable[Params]) -> None:
        """Drops the copies of every parameter tree not in `live` (the
        components a system still has), freeing them and their host trees."""
        keep = {id(params) for params in live}
        with self._lock:
            for key in [k for k in self._entries if k[0] not in keep]:
                self.bytes -= self._entries.pop(key)[2]

    def __len__(self) -> int:
        return len(self._entries)


RESIDENT = ResidentParams(RESIDENT_FROZEN_BYTES)


def _frozen_on_device(plan: CandidatePlan, names: Sequence[str], device: jax.Device) -> dict[str, Any]:
    """The plan's frozen components `names` on `device`: those of the system
    (with a component id) from RESIDENT, the others uploaded."""
    return {name: RESIDENT.get(plan.frozen[name], device) if name in plan.frozen_ids
            else jax.device_put(plan.frozen[name], device) for name in names}


@dataclasses.dataclass(frozen=True)
class _Prefix:
    """A candidate's frozen prefix (DESIGN §4): the stem and the leading
    encoder layers it never trains. Candidates with equal keys (same prefix
    structure and component ids) compute equal features and share them."""

    structure: PathStructure
    key: Hashable

    @staticmethod
    def of(plan: CandidatePlan) -> _Prefix | None:
        layers = vit.frozen_prefix_layers(plan.structure, plan.frozen)
        if layers is None:
            return None
        structure = vit.prefix_structure(plan.structure, layers)
        ids = tuple(plan.frozen_ids.get(name) for name in vit.prefix_names(structure))
        # Without component ids (a plan made outside a search) it shares with nothing.
        return _Prefix(structure, (structure, ids) if None not in ids else (structure, "plan", id(plan)))

    @property
    def layers(self) -> int:
        return self.structure.num_layers

    @property
    def names(self) -> tuple[str, ...]:
        return vit.prefix_names(self.structure)

    def feature_bytes(self, examples: int) -> int:
        """Device bytes of `examples` examples' features (tokens in the compute dtype)."""
        size = self.structure.size
        itemsize = np.dtype(vit.compute_dtype(self.structure) or np.float32).itemsize
        return examples * vit.num_tokens(size, self.structure.image_size) * size.hidden_size * itemsize


def _like(tree: Params, reference: Params) -> Params:
    """`tree` (an inherited momentum trace, float32) in the dtypes of `reference`."""
    return jax.tree.map(lambda value, ref: np.asarray(value, dtype=ref.dtype), tree, reference)


def _float32(tree: Params) -> Params:
    """A momentum trace as components keep it: float32 whatever it trained in."""
    return jax.tree.map(lambda value: value.astype(jnp.float32), tree)


class _CandidateState:
    """Device-resident training state of one candidate. Its frozen prefix, if
    it has one, runs forward only and apart (`prefix_features`), so that
    candidates sharing it compute it once; the step starts after it."""

    def __init__(self, plan: CandidatePlan, device: jax.Device, total_steps: int, rounds: int):
        self.plan = plan
        self.device = device
        self.nesterov = bool(plan.hparams.get("nesterov", False))
        self.trainable = jax.device_put(plan.trainable, device)
        self.prefix = _Prefix.of(plan)
        prefix_names = set(self.prefix.names) if self.prefix is not None else set()
        self.prefix_params = _frozen_on_device(plan, sorted(prefix_names), device)
        self.start_layer = self.prefix.layers if self.prefix is not None else None
        self.frozen = _frozen_on_device(plan, [n for n in plan.frozen if n not in prefix_names], device)
        opt_state = optimizer.make_optimizer(self.nesterov, plan.structure.momentum_dtype).init(self.trainable)
        trace = optimizer.momentum_trace(opt_state)
        inherited = {name: _like(plan.momentum[name], trace[name]) if name in plan.momentum else trace[name]
                     for name in trace}
        self.opt_state = jax.device_put(optimizer.with_momentum_trace(opt_state, inherited), device)
        # Per-step values go to the device up front: the step loop transfers nothing.
        self.learning_rates = jax.device_put(list(optimizer.learning_rates(plan.hparams, total_steps, rounds)), device)
        self.momentum = jax.device_put(np.float32(plan.hparams.get("momentum", 0.9)), device)
        self.best_score = plan.start_score
        self.best_quality = -math.inf
        self.own_best = -math.inf  # its best validation score, whatever the bar
        self.steps = 0
        self.best: tuple[dict, dict] | None = None
        self.compile_seconds = 0.0
        self.started = time.perf_counter()

    @property
    def sharing_key(self) -> Hashable:
        """Candidates (of one device and image size) with equal keys share
        the features their step starts from."""
        return self.prefix.key if self.prefix is not None else ("own", id(self))

    def features(self, inputs: jax.Array) -> jax.Array:
        """What this candidate's step starts from: the model inputs, or its
        frozen prefix's features of them."""
        if self.prefix is None:
            return inputs
        return _charging_compile(self, "prefix_features", steps.prefix_features, self.prefix_params, inputs,
                                 prefix=self.prefix.structure)

    def step(self, step_index: int, features: jax.Array, labels: jax.Array) -> jax.Array:
        """Dispatches one training step on device-resident features (see
        `features`); returns its loss (not waited on)."""
        self.trainable, self.opt_state, loss = _charging_compile(
            self, "train_step", steps.train_step, self.trainable, self.frozen, self.opt_state, features, labels,
            self.learning_rates[step_index], self.momentum, structure=self.plan.structure, nesterov=self.nesterov,
            start_layer=self.start_layer)
        self.steps += 1
        return loss

    def count_correct(self, features: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
        """Dispatches the correct-count of one validation batch."""
        return _charging_compile(self, "count_correct", steps.count_correct, self.trainable, self.frozen, features,
                                 labels, mask, structure=self.plan.structure, start_layer=self.start_layer)

    def validated(self, quality: float) -> None:
        """Records a validation accuracy; keeps a snapshot when it reaches the best score."""
        score = self.plan.score_of_quality(quality)
        self.own_best = max(self.own_best, score)
        self.best_quality = max(self.best_quality, quality)
        if score >= self.best_score:  # ties accepted, as the reference (DESIGN §3.5)
            self.best_score = score
            self.best_quality = quality
            self.best = jax.device_get((self.trainable, _float32(optimizer.momentum_trace(self.opt_state))))

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


def _charging_compile(state: _CandidateState, kind: str, dispatch: Callable[..., Any], *args: Any,
                      **kwargs: Any) -> Any:
    """Calls `dispatch(*args, **kwargs)`; when it traced (compiled) a `kind`
    program, its time counts as that candidate's compile time, not its
    training time."""
    traces_before = steps.TRACE_COUNTS[kind]
    started = time.perf_counter()
    out = dispatch(*args, **kwargs)
    if steps.TRACE_COUNTS[kind] != traces_before:
        state.compile_seconds += time.perf_counter() - started
    return out


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
    used = list(dict.fromkeys(state.device for state in states))
    inputs = _TrainInputs(data_hparams, used)
    latent = LatentCache.build(states, data, settings, inputs.deterministic)
    batches = _Batches(data.train, settings.batch_size, data_hparams, seed,
                       with_images=not latent.serves_training(states))
    with _Prefetched(batches, used, total_steps) as prefetched, jax.transfer_guard(STEP_LOOP_TRANSFER_GUARD):
        _train_rounds(states, prefetched, inputs, latent, data.validation, settings, rounds, halving_round, cancel,
                      on_step, priority)
    return [state.result() for state in states]


Groups = dict[tuple[jax.Device, int], dict[Hashable, list[_CandidateState]]]


def _sharing(states: Sequence[_CandidateState]) -> Groups:
    """The candidates grouped by what their inputs share (device and image
    size), and within that by the features their steps start from."""
    groups: Groups = {}
    for state in states:
        by_features = groups.setdefault((state.device, state.plan.structure.image_size), {})
        by_features.setdefault(state.sharing_key, []).append(state)
    return groups


class LatentCache:
    """Latent replay (DESIGN §4): when no augmentation runs, a frozen prefix's
    features of every training and validation example are the same each step,
    so they are computed once per generation, kept on the device and read by
    index. Bounded by `TrainSettings.latent_cache_bytes`; prefixes that do not
    fit compute their features per step as without it."""

    def __init__(self) -> None:
        self.train: dict[tuple[jax.Device, Hashable], jax.Array] = {}  # [examples, tokens, hidden]
        self.validation: dict[tuple[jax.Device, Hashable], list[jax.Array]] = {}  # per padded eval batch
        self.bytes = 0

    @classmethod
    def build(cls, states: Sequence[_CandidateState], data: TaskData, settings: TrainSettings,
              deterministic: bool) -> LatentCache:
        cache = cls()
        if not deterministic or settings.latent_cache_bytes <= 0:
            return cache
        for (device, size), by_features in _sharing(states).items():
            for key, members in by_features.items():
                lead = members[0]
                if lead.prefix is None:
                    continue
                need = lead.prefix.feature_bytes(len(data.train) + len(data.validation))
                if cache.bytes + need > settings.latent_cache_bytes:
                    continue
                cache.bytes += need
                train = _prefix_batches(lead, data.train, size, settings.eval_batch_size)
                cache.train[(device, key)] = jnp.concatenate(train)[: len(data.train)]
                cache.validation[(device, key)] = _prefix_batches(lead, data.validation, size,
                                                                  settings.eval_batch_size)
        return cache

    def serves_training(self, states: Sequence[_CandidateState]) -> bool:
        """Whether every candidate's training features come from the cache."""
        return all((s.device, s.sharing_key) in self.train for s in states)


def _prefix_batches(state: _CandidateState, image_set: ImageSet, image_size: int, batch: int) -> list[jax.Array]:
    """A candidate's prefix features of a whole image set, in padded batches."""
    features = []
    for x, _, _ in _padded_eval_batches(image_set.images, image_set.labels, batch):
        inputs = _charging_compile(state, "eval_inputs", steps.eval_inputs, jax.device_put(x, state.device),
                                   image_size=image_size)
        features.append(state.features(inputs))
    return features


def _train_rounds(
    states: Sequence[_CandidateState],
    prefetched: _Prefetched,
    inputs: _TrainInputs,
    latent: LatentCache,
    validation: ImageSet,
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
        groups = _sharing(active)
        for _ in range(steps_per_round):
            if cancel is not None and cancel.is_set():
                raise CancelledError("search cancelled")
            batch = prefetched.next()
            priority.yield_to_serving()
            # Inputs once per device and size, features once per shared
            # prefix; all candidates dispatched before waiting on any; then a
            # wait on the previous step, so at most two steps per candidate are queued.
            losses = []
            for (device, size), by_features in groups.items():
                on_device = batch[device]
                step_inputs = None
                for key, group in by_features.items():
                    cached = latent.train.get((device, key))
                    if cached is not None:
                        features = _charging_compile(group[0], "gather_rows", steps.gather_rows, cached,
                                                     on_device.indices)
                    else:
                        if step_inputs is None:
                            step_inputs = _charging_compile(group[0], "train_inputs", inputs.make, on_device, device,
                                                            size)
                        features = group[0].features(step_inputs)
                    losses.extend(state.step(step_index, features, on_device.labels) for state in group)
            jax.block_until_ready(in_flight)
            in_flight = losses
            step_index += 1
            examples += settings.batch_size * len(active)
            if on_step is not None:
                on_step(step_index, total_steps, examples)
        qualities = _validate(groups, latent, validation, settings.eval_batch_size)
        for state in active:
            state.validated(qualities[id(state)])
        if round_index + 1 == halving_round:
            active = survivors(active)


def _validate(groups: Groups, latent: LatentCache, validation: ImageSet, eval_batch_size: int) -> dict[int, float]:
    """Every candidate's validation accuracy by id(candidate), streamed: each
    uint8 batch is uploaded once per device, preprocessed once per device and
    size, and run through each shared prefix once (or read from the latent
    cache); every count is dispatched before any is read, and one host sync
    reads them all."""
    ordered = [state for by_features in groups.values() for group in by_features.values() for state in group]
    totals: dict[int, list[jax.Array]] = {id(state): [] for state in ordered}
    # Images go only to the devices where some candidate computes from them.
    needs_images = {device: False for device, _ in groups}
    for (device, _), by_features in groups.items():
        needs_images[device] |= any((device, key) not in latent.validation for key in by_features)
    batches = _padded_eval_batches(validation.images, validation.labels, eval_batch_size)
    for index, (x, y, mask) in enumerate(batches):
        on_device = {device: jax.device_put((x if images else None, y, mask), device)
                     for device, images in needs_images.items()}
        for (device, size), by_features in groups.items():
            images, labels, valid = on_device[device]
            batch_inputs = None
            for key, group in by_features.items():
                cached = latent.validation.get((device, key))
                if cached is not None:
                    features = cached[index]
                else:
                    if batch_inputs is None:
                        batch_inputs = _charging_compile(group[0], "eval_inputs", steps.eval_inputs, images,
                                                         image_size=size)
                    features = group[0].features(batch_inputs)
                for state in group:
                    totals[id(state)].append(state.count_correct(features, labels, valid))
    sums = [functools.reduce(jnp.add, totals[id(state)]) for state in ordered]
    correct = jax.device_get(sums)
    return {id(state): int(c) / max(len(validation), 1) for state, c in zip(ordered, correct)}


def survivors(states: Sequence[_CandidateState]) -> list[_CandidateState]:
    """The better half (rounded up) by own best validation score, in their
    order; ties keep the earlier candidate."""
    kept = math.ceil(len(states) / 2)
    ranked = sorted(range(len(states)), key=lambda i: (-states[i].own_best, i))[:kept]
    return [states[i] for i in sorted(ranked)]
