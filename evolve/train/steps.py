"""Jitted train / eval / predict steps, with their executables in bounded caches.

The model structure is static; trainable and frozen parameters are separate
arguments, so one executable serves every candidate of a (structure,
trainable set) and a second candidate of the same structure never recompiles.

Executables are kept in two least-recently-used caches (`TRAINING` for the
train and eval steps, `SERVING` for predict) of bounded size, set by
`set_compiled_bounds`: every structure a search tries compiles its own
(megabytes each on CPU, 2.5 for the tiny test model), and a long-running
server must not keep them all.
The persistent compilation cache makes compiling an evicted one again cheap.
`TRACE_COUNTS` counts traces per step kind (one per compile), for tests and
for telling compile time from step time.
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from evolve.config import SERVING_EXECUTABLES, TRAINING_EXECUTABLES
from evolve.data import preprocess_device
from evolve.data.preprocess_device import Augmentation
from evolve.models import vit
from evolve.train import optimizer
from evolve.types import Params, PathStructure

TRACE_COUNTS: collections.Counter[str] = collections.Counter()


class CompiledCache:
    """At most `max_entries` compiled executables, the least recently used
    evicted first. Thread-safe: Predict runs on RPC threads while a search
    trains. Holds the only reference the process keeps to an executable, so an
    evicted one is freed once no call is running it."""

    def __init__(self, name: str, max_entries: int):
        self.name = name
        self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._max_entries = _checked_bound(name, max_entries)
        self.hits = self.misses = self.evictions = 0

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def set_max_entries(self, max_entries: int) -> None:
        with self._lock:
            self._max_entries = _checked_bound(self.name, max_entries)
            self._evict()

    def get(self, key: Hashable) -> Any | None:
        """The executable of `key` (now the most recently used), or None."""
        with self._lock:
            executable = self._entries.get(key)
            if executable is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return executable

    def put(self, key: Hashable, executable: Any) -> Any:
        """Stores an executable as the most recently used; returns the one
        stored under `key` (another thread's, if it compiled the same first)."""
        with self._lock:
            executable = self._entries.setdefault(key, executable)
            self._entries.move_to_end(key)
            self._evict()
            return executable

    def keys(self) -> list[Hashable]:
        """Keys from the least to the most recently used."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def _evict(self) -> None:
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1


def _checked_bound(name: str, max_entries: int) -> int:
    if int(max_entries) < 1:
        raise ValueError(f"the {name} executable bound must be at least 1, got {max_entries}")
    return int(max_entries)


TRAINING = CompiledCache("training", TRAINING_EXECUTABLES)
SERVING = CompiledCache("serving", SERVING_EXECUTABLES)


def set_compiled_bounds(*, training: int | None = None, serving: int | None = None) -> None:
    """Bounds (in executables) of the train + eval steps and of predict."""
    if training is not None:
        TRAINING.set_max_entries(training)
    if serving is not None:
        SERVING.set_max_entries(serving)


class BoundedJit:
    """A `jax.jit`ted function whose executables live in a CompiledCache.

    Called with concrete arrays it looks its executable up by a cheap key: the
    static arguments, the component names of each parameter tree
    (`tree_argnums`), the shape and dtype of the other arguments except those
    whose structure follows from the trees (`derived_argnums`: the optimizer
    state), and the placement of the images and of one parameter. Parameter
    shapes and dtypes follow from (structure, component name): models.vit
    makes them and loading a root checks against it. Were that ever broken,
    the executable refuses the call (TypeError) before it donates anything; it
    never computes with the wrong program.

    On a miss it traces and compiles ahead of time through a jit of its own.
    Not through `self.jitted`: jax's trace and lowering caches, keyed on the
    function, would keep the compiled program of every key alive (up to 2048
    per cache); keyed on a function of its own they drop it with that
    function, once evicted here. The jit dispatch cache stays empty, and the
    persistent compilation cache still applies (same program, same name).
    Under a trace (jax.export of predict) it is the plain jitted function.
    """

    def __init__(self, fun: Callable, cache: CompiledCache, *, static_argnames: Sequence[str],
                 tree_argnums: Sequence[int], derived_argnums: Sequence[int] = (), donate_argnums: Sequence[int] = (),
                 images_argnum: int):
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._name = fun.__name__
        self._cache = cache
        self._jit_options = {"static_argnames": tuple(static_argnames), "donate_argnums": tuple(donate_argnums)}
        self._tree_argnums = tuple(tree_argnums)
        self._skipped = frozenset(tree_argnums) | frozenset(derived_argnums)
        self._images_argnum = images_argnum
        self.jitted = jax.jit(fun, **self._jit_options)

    def _key(self, args: Sequence[Any], static: Mapping[str, Any]) -> Hashable:
        return (
            self._name,
            tuple(sorted(static.items())),
            tuple(tuple(sorted(args[i])) for i in self._tree_argnums),
            tuple(_aval_key(arg) for i, arg in enumerate(args) if i not in self._skipped),
            _placement(args[self._images_argnum]),
            _placement(self._some_param(args)),
        )

    def _some_param(self, args: Sequence[Any]) -> Any:
        return _first_leaf(args[self._tree_argnums[0]]) if self._tree_argnums else None

    def is_compiled(self, *args, **static) -> bool:
        """Whether a call with these arguments would find its executable in
        the cache now (it may be evicted later); neither a hit nor a miss.
        An array argument may be a `jax.ShapeDtypeStruct` with its sharding."""
        return self._key(args, static) in self._cache

    def __call__(self, *args, **static):
        images = args[self._images_argnum]
        some_param = self._some_param(args)
        if isinstance(images, jax.core.Tracer) or isinstance(some_param, jax.core.Tracer):
            return self.jitted(*args, **static)
        key = self._key(args, static)
        executable = self._cache.get(key)
        if executable is None:
            own_jit = jax.jit(functools.partial(self._fun), **self._jit_options)
            executable = self._cache.put(key, own_jit.lower(*args, **static).compile())
        return executable(*args)


def _first_leaf(tree: Mapping[str, Any]) -> Any:
    while isinstance(tree, Mapping) and tree:
        tree = next(iter(tree.values()))
    return tree


def _aval_key(value: Any) -> Hashable:
    dtype = getattr(value, "dtype", None)
    return (value.shape, dtype) if dtype is not None else type(value)


def _placement(value: Any) -> Hashable:
    """A device array's (or ShapeDtypeStruct's) sharding; None for host values."""
    return getattr(value, "sharding", None)


def bounded_jit(cache: CompiledCache, **options) -> Callable[[Callable], BoundedJit]:
    """Decorator: `BoundedJit(fun, cache, **options)`."""
    return lambda fun: BoundedJit(fun, cache, **options)


# The inputs of a step, made on the device from uint8 images (evolve.data.preprocess_device).
@bounded_jit(TRAINING, static_argnames=("image_size", "augmentation"), tree_argnums=(), images_argnum=0)
def train_inputs(images: jax.Array, key_data: jax.Array, values: jax.Array, *, image_size: int,
                 augmentation: Augmentation) -> jax.Array:
    """A training batch's model inputs: augmented as `augmentation` says."""
    TRACE_COUNTS["train_inputs"] += 1
    return preprocess_device.train_inputs(images, key_data, values, image_size=image_size, augmentation=augmentation)


@bounded_jit(TRAINING, static_argnames=("image_size",), tree_argnums=(), images_argnum=0)
def eval_inputs(images: jax.Array, *, image_size: int) -> jax.Array:
    """An evaluation batch's model inputs (resize and scale)."""
    TRACE_COUNTS["eval_inputs"] += 1
    return preprocess_device.eval_inputs(images, image_size)


@bounded_jit(TRAINING, static_argnames=("prefix",), tree_argnums=(0,), images_argnum=1)
def prefix_features(params: dict[str, Params], inputs: jax.Array, *, prefix: PathStructure) -> jax.Array:
    """A frozen prefix's tokens for a batch of model inputs, forward only: one
    program per prefix structure, shared by every candidate that has it."""
    TRACE_COUNTS["prefix_features"] += 1
    return vit.prefix_tokens(params, inputs, prefix)


@bounded_jit(TRAINING, static_argnames=(), tree_argnums=(), images_argnum=0)
def gather_rows(table: jax.Array, indices: jax.Array) -> jax.Array:
    """table[indices]: a training batch's rows of a cached feature table."""
    TRACE_COUNTS["gather_rows"] += 1
    return jnp.take(table, indices, axis=0)


def _merge(trainable: Mapping[str, Params], frozen: Mapping[str, Params]) -> dict[str, Params]:
    return {**frozen, **trainable}


# The optimizer state's tree and shapes follow from the trainable names and nesterov.
# `start_layer` (static): None when the inputs are images; k when they are the
# tokens of a frozen prefix of k layers (prefix_features), which the step then
# never differentiates nor recomputes.
@bounded_jit(TRAINING, static_argnames=("structure", "nesterov", "start_layer"), tree_argnums=(0, 1),
             derived_argnums=(2,), donate_argnums=(0, 2), images_argnum=3)
def train_step(
    trainable: dict[str, Params],
    frozen: dict[str, Params],
    opt_state,
    images: jax.Array,
    labels: jax.Array,
    learning_rate: jax.Array,
    momentum: jax.Array,
    *,
    structure: PathStructure,
    nesterov: bool,
    start_layer: int | None = None,
):
    """One SGD step on the trainable components; returns (trainable, opt_state, loss)."""
    TRACE_COUNTS["train_step"] += 1

    def loss_fn(params: dict[str, Params]) -> jax.Array:
        logits = vit.forward_from(_merge(params, frozen), images, structure, start_layer)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    opt = optimizer.make_optimizer(nesterov, structure.momentum_dtype)
    opt_state = optimizer.with_hyperparams(opt_state, learning_rate, momentum)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


@bounded_jit(TRAINING, static_argnames=("structure", "start_layer"), tree_argnums=(0, 1), images_argnum=2)
def count_correct(
    trainable: dict[str, Params],
    frozen: dict[str, Params],
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    structure: PathStructure,
    start_layer: int | None = None,
) -> jax.Array:
    """Number of correctly classified examples where mask is true (inputs as in train_step)."""
    TRACE_COUNTS["count_correct"] += 1
    logits = vit.forward_from(_merge(trainable, frozen), images, structure, start_layer)
    correct = (jnp.argmax(logits, axis=-1) == labels) & mask
    return jnp.sum(correct)


@bounded_jit(SERVING, static_argnames=("structure",), tree_argnums=(0,), images_argnum=1)
def predict_probabilities(params: dict[str, Params], images: jax.Array, *, structure: PathStructure) -> jax.Array:
    """Class probabilities of a served path."""
    TRACE_COUNTS["predict"] += 1
    return jax.nn.softmax(vit.forward(params, images, structure), axis=-1)

