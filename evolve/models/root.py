"""Root models: a random ViT, or one read from a vit_jax / big_vision `.npz`.

A root is a dict component name -> parameters (nested dicts of numpy arrays,
the inner names vit.py's modules use): `embedding`, `cls`, `posembed_input`,
`encoderblock_{i}`, `encoder_norm`. It has no head: every task gets its own.

The file format is the one of the AugReg checkpoints (gs://vit_models/augreg):
flat keys joined by "/" such as `embedding/kernel`, `cls`,
`Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`,
`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`,
`Transformer/encoder_norm/scale`, `head/kernel`. The loader also reads the
layout big_vision writes: keys under a `params/` (or `opt/target/`) prefix,
linen-numbered block members (`MultiHeadDotProductAttention_0`,
`LayerNorm_1`, `MlpBlock_0`), a top-level `pos_embedding` without a class
token entry, and blocks stacked by `nn.scan` under `Transformer/encoderblock`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import tempfile
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from evolve.config import VIT_SIZES
from evolve.models import vit
from evolve.types import Params, ViTSize

logger = logging.getLogger(__name__)

# Where each root component lives in a vit_jax checkpoint (the `cls` leaf is
# the whole key `cls`; every other component is a key prefix).
_POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
_IGNORED_PREFIXES = ("head/", "pre_logits/")
# Linen numbering (big_vision) -> pre-linen numbering (vit_jax files, vit.py).
_BLOCK_MEMBER_ALIASES = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_BLOCK_KEY = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_SCANNED_BLOCK_PREFIX = "Transformer/encoderblock/"
# Prefixes under which training checkpoints keep the model parameters.
_CONTAINER_PREFIXES = ("", "params/", "opt/target/", "target/")


def root_component_names(num_layers: int) -> tuple[str, ...]:
    """The components of a root (no head, no adapters), in forward order."""
    blocks = tuple(f"encoderblock_{i}" for i in range(num_layers))
    return ("embedding", "cls", "posembed_input", *blocks, "encoder_norm")


def random_root(size: ViTSize, *, image_size: int, rng: jax.Array) -> dict[str, Params]:
    """A randomly initialised root of the given size (no head)."""
    _check_image_size(size, image_size)
    names = root_component_names(size.num_layers)
    keys = jax.random.split(rng, len(names))
    return {
        name: jax.tree.map(np.asarray, _compiled_init(_kind(name), size, image_size)(key))
        for name, key in zip(names, keys)
    }


def load_vit_npz(path: str | os.PathLike, *, image_size: int | None = None) -> tuple[ViTSize, dict[str, Params]]:
    """Reads a ViT `.npz` checkpoint into root components.

    The size is inferred from the shapes and named after the matching entry of
    `VIT_SIZES` ("custom" when none matches). Position embeddings are resized
    to `image_size` (class token kept); with `image_size=None` they keep the
    checkpoint's resolution. The head and pre-logits are ignored.

    Raises ValueError naming the key for a missing parameter or a shape that
    does not fit the inferred architecture.
    """
    where = os.fspath(path)
    flat = _canonical_keys(_read_npz(where), where)
    size, native_image_size = _infer_size(flat, where)
    if image_size is not None:
        _check_image_size(size, image_size)

    used: set[str] = set()
    root: dict[str, Params] = {}
    expected_by_kind: dict[str, Any] = {}
    for name in root_component_names(size.num_layers):
        kind = _kind(name)
        if kind not in expected_by_kind:
            expected_by_kind[kind] = _expected_shapes(name, size, native_image_size)
        prefix = _checkpoint_prefix(name)
        component: dict[str, Any] = {}
        for inner, expected in _leaves(expected_by_kind[kind]):
            key = _checkpoint_key(prefix, inner)
            if key not in flat:
                hint = " (models pooled without a class token are not supported)" if name == "cls" else ""
                raise ValueError(f"{where}: missing key {key!r} for {name} of a {_describe(size)}{hint}")
            array = flat[key]
            if array.shape != expected.shape:
                raise ValueError(
                    f"{where}: key {key!r} has shape {array.shape}, expected {expected.shape} for a {_describe(size)}"
                )
            _set(component, inner, _as_float(array, expected.dtype, key, where))
            used.add(key)
        root[name] = component

    if image_size is not None and image_size != native_image_size:
        tokens = vit.num_tokens(size, image_size)
        posembed = root["posembed_input"]["pos_embedding"]
        root["posembed_input"] = {"pos_embedding": vit.resize_posembed(posembed, tokens)}

    unused = sorted(k for k in flat if k not in used and not k.startswith(_IGNORED_PREFIXES))
    if unused:
        logger.warning("%s: ignoring %d unknown keys, e.g. %s", where, len(unused), unused[:5])
    logger.info(
        "loaded %s root from %s (%d blocks, native %dpx%s)",
        size.name,
        where,
        size.num_layers,
        native_image_size,
        f", position embeddings resized to {image_size}px" if image_size not in (None, native_image_size) else "",
    )
    return size, root


def save_vit_npz(
    path: str | os.PathLike,
    size: ViTSize,
    params_by_name: Mapping[str, Params],
    *,
    num_classes: int | None = None,
) -> None:
    """Writes root components (and a head, if any) in the vit_jax `.npz` layout.

    `params_by_name` needs every root component of `size`; a `head` entry is
    written as `head/...`. Without one, `num_classes` writes a zero head of that
    many classes (vit_jax's fine-tuning loader expects a head), and None writes
    none. Residual adapters have no place in this format and are refused. The
    file is written atomically at exactly `path`.
    """
    where = os.fspath(path)
    required = root_component_names(size.num_layers)
    missing = [name for name in required if name not in params_by_name]
    extra = sorted(set(params_by_name) - set(required) - {"head"})
    if missing:
        raise ValueError(f"cannot save a {_describe(size)}: missing components {missing}")
    if extra:
        raise ValueError(f"the vit_jax .npz layout has no place for components {extra}")

    posembed = np.asarray(params_by_name["posembed_input"]["pos_embedding"])
    image_size = _image_size_of_posembed(posembed.shape, size, where="posembed_input/pos_embedding")
    flat: dict[str, np.ndarray] = {}
    expected_by_kind: dict[str, dict[tuple[str, ...], Any]] = {}
    for name in required:
        kind = _kind(name)
        if kind not in expected_by_kind:
            expected_by_kind[kind] = dict(_leaves(_expected_shapes(name, size, image_size)))
        expected = expected_by_kind[kind]
        prefix = _checkpoint_prefix(name)
        given = dict(_leaves(params_by_name[name]))
        if set(given) != set(expected):
            raise ValueError(f"component {name}: parameters {sorted(given)}, expected {sorted(expected)}")
        for inner, array in given.items():
            array = np.asarray(array)
            if array.shape != expected[inner].shape:
                raise ValueError(
                    f"component {name}: {'/'.join(inner)} has shape {array.shape}, "
                    f"expected {expected[inner].shape} for a {_describe(size)}"
                )
            flat[_checkpoint_key(prefix, inner)] = array

    hidden = size.hidden_size
    if "head" in params_by_name:
        flat["head/kernel"] = np.asarray(params_by_name["head"]["kernel"])
        flat["head/bias"] = np.asarray(params_by_name["head"]["bias"])
    elif num_classes is not None:
        flat["head/kernel"] = np.zeros((hidden, num_classes), np.float32)
        flat["head/bias"] = np.zeros((num_classes,), np.float32)

    directory = os.path.dirname(os.path.abspath(where))
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **flat)
        os.replace(temporary, where)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


@functools.lru_cache(maxsize=64)
def _compiled_init(kind: str, size: ViTSize, image_size: int) -> Callable[[jax.Array], Params]:
    # One compiled initialiser per kind: all blocks of a root share it, which
    # is several times faster than running flax's init op by op.
    name = f"{kind}_0" if kind == "encoderblock" else kind
    return jax.jit(
        lambda rng: vit.init_component(
            name, size=size, image_size=image_size, num_classes=1, adapter_dim=1, rng=rng, as_numpy=False
        )
    )


def _kind(name: str) -> str:
    return name.rsplit("_", 1)[0] if name.startswith("encoderblock_") else name


# ---- reading and normalising the file ---------------------------------------


def _read_npz(where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(where, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: not a readable .npz checkpoint ({error})") from error


def _canonical_keys(flat: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Maps the big_vision variants of the layout onto the vit_jax keys."""
    flat = _strip_container_prefix(flat, where)
    flat = _unstack_scanned_blocks(flat, where)

    renamed: dict[str, np.ndarray] = {}
    for key, array in flat.items():
        match = _BLOCK_KEY.match(key)
        if match:
            member, _, rest = match.group(2).partition("/")
            member = _BLOCK_MEMBER_ALIASES.get(member, member)
            key = f"Transformer/encoderblock_{match.group(1)}/{member}" + (f"/{rest}" if rest else "")
            if key in renamed:
                raise ValueError(f"{where}: key {key!r} appears under both the vit_jax and the big_vision name")
        renamed[key] = array

    # vit_jax: Transformer/posembed_input/pos_embedding; big_vision before 2022:
    # Transformer/pos_embedding; big_vision since: a top-level pos_embedding
    # added to the patches before the class token is prepended.
    candidates = [k for k in (_POSEMB_KEY, "Transformer/pos_embedding", "pos_embedding") if k in renamed]
    if len(candidates) > 1:
        raise ValueError(f"{where}: several position embeddings {candidates}")
    if candidates:
        posembed = renamed.pop(candidates[0])
        if posembed.ndim == 3 and posembed.shape[1] > 1 and math.isqrt(posembed.shape[1]) ** 2 == posembed.shape[1]:
            # No entry for the class token: it was added without one, which a
            # zero entry reproduces exactly.
            zero = np.zeros((posembed.shape[0], 1, posembed.shape[2]), posembed.dtype)
            posembed = np.concatenate([zero, posembed], axis=1)
        renamed[_POSEMB_KEY] = posembed
    return renamed


def _strip_container_prefix(flat: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    for prefix in _CONTAINER_PREFIXES:
        if f"{prefix}embedding/kernel" in flat:
            if not prefix:
                return flat
            return {key[len(prefix) :]: value for key, value in flat.items() if key.startswith(prefix)}
    raise ValueError(
        f"{where}: missing key 'embedding/kernel' (not a ViT checkpoint in the vit_jax / big_vision layout?)"
    )


def _unstack_scanned_blocks(flat: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    scanned = {k: v for k, v in flat.items() if k.startswith(_SCANNED_BLOCK_PREFIX)}
    if not scanned:
        return flat
    depths = {v.shape[0] if v.ndim else None for v in scanned.values()}
    if len(depths) != 1 or None in depths:
        found = sorted(map(str, depths))
        raise ValueError(f"{where}: stacked blocks under {_SCANNED_BLOCK_PREFIX!r} disagree on depth: {found}")
    (depth,) = depths
    result = {k: v for k, v in flat.items() if k not in scanned}
    for key, stacked in scanned.items():
        rest = key[len(_SCANNED_BLOCK_PREFIX) :]
        for i in range(depth):
            unrolled = f"Transformer/encoderblock_{i}/{rest}"
            if unrolled in result:
                raise ValueError(f"{where}: key {unrolled!r} is given both stacked and unrolled")
            result[unrolled] = stacked[i]
    return result


def _infer_size(flat: Mapping[str, np.ndarray], where: str) -> tuple[ViTSize, int]:
    """The architecture, and the image size the position embeddings were made for."""
    kernel = _get(flat, "embedding/kernel", where)
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 3:
        raise ValueError(
            f"{where}: key 'embedding/kernel' has shape {kernel.shape}, expected [patch, patch, 3, hidden]"
        )
    patch_size, hidden = int(kernel.shape[0]), int(kernel.shape[3])

    indices = sorted({int(m.group(1)) for m in map(_BLOCK_KEY.match, flat) if m})
    if not indices:
        raise ValueError(f"{where}: missing key 'Transformer/encoderblock_0/...' (no encoder blocks)")
    if indices != list(range(len(indices))):
        absent = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise ValueError(f"{where}: missing key 'Transformer/encoderblock_{absent[0]}/...' (blocks {indices})")
    num_layers = len(indices)

    query_key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    query = _get(flat, query_key, where)
    if query.ndim != 3 or query.shape[0] != hidden or query.shape[1] * query.shape[2] != hidden:
        raise ValueError(
            f"{where}: key {query_key!r} has shape {query.shape}, expected [{hidden}, heads, {hidden} // heads]"
        )
    num_heads = int(query.shape[1])

    mlp_key = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
    mlp = _get(flat, mlp_key, where)
    if mlp.ndim != 2 or mlp.shape[0] != hidden:
        raise ValueError(f"{where}: key {mlp_key!r} has shape {mlp.shape}, expected [{hidden}, mlp_dim]")
    mlp_dim = int(mlp.shape[1])

    shape = dict(patch_size=patch_size, hidden_size=hidden, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim)
    name = next((known.name for known in VIT_SIZES.values() if _same_architecture(known, shape)), "custom")
    size = ViTSize(name, **shape)
    posembed = _get(flat, _POSEMB_KEY, where)
    return size, _image_size_of_posembed(posembed.shape, size, where=f"{where}: key {_POSEMB_KEY!r}")


def _same_architecture(size: ViTSize, shape: Mapping[str, int]) -> bool:
    return all(getattr(size, field) == value for field, value in shape.items())


def _image_size_of_posembed(shape: tuple[int, ...], size: ViTSize, *, where: str) -> int:
    if len(shape) == 3 and shape[0] == 1 and shape[2] == size.hidden_size and shape[1] > 1:
        side = math.isqrt(shape[1] - 1)
        if side * side == shape[1] - 1:
            return side * size.patch_size
    raise ValueError(f"{where} has shape {tuple(shape)}, expected [1, 1 + side * side, {size.hidden_size}]")


def _check_image_size(size: ViTSize, image_size: int) -> None:
    if image_size <= 0 or image_size % size.patch_size:
        raise ValueError(f"image size {image_size} is not a positive multiple of the patch size {size.patch_size}")


# ---- component <-> checkpoint keys ------------------------------------------


def _checkpoint_prefix(name: str) -> str:
    if name == "embedding":
        return "embedding"
    if name == "cls":
        return ""  # the class token's only leaf, `cls`, is the whole key
    return f"Transformer/{name}"


def _checkpoint_key(prefix: str, inner: tuple[str, ...]) -> str:
    return "/".join((prefix, *inner) if prefix else inner)


def _expected_shapes(name: str, size: ViTSize, image_size: int) -> Any:
    """Shapes and dtypes of a component's parameters, without allocating them."""
    # The key is made inside the trace, so not even it is allocated.
    return jax.eval_shape(
        lambda: vit.init_component(
            name, size=size, image_size=image_size, num_classes=1, adapter_dim=1, rng=jax.random.key(0), as_numpy=False
        )
    )


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        for key in sorted(tree):
            yield from _leaves(tree[key], (*prefix, key))
    else:
        yield prefix, tree


def _set(tree: dict[str, Any], inner: tuple[str, ...], value: np.ndarray) -> None:
    for key in inner[:-1]:
        tree = tree.setdefault(key, {})
    tree[inner[-1]] = value


def _get(flat: Mapping[str, np.ndarray], key: str, where: str) -> np.ndarray:
    if key not in flat:
        raise ValueError(f"{where}: missing key {key!r}")
    return flat[key]


def _as_float(array: np.ndarray, dtype: np.dtype, key: str, where: str) -> np.ndarray:
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        # bfloat16 saved by numpy without ml_dtypes reads back as raw 2-byte voids.
        array = array.view(jnp.bfloat16)
    if array.dtype.kind != "f" and array.dtype != jnp.bfloat16:
        raise ValueError(f"{where}: key {key!r} has dtype {array.dtype}, expected floating point")
    return np.asarray(array, dtype=dtype)


def _describe(size: ViTSize) -> str:
    return (
        f"ViT {size.name} (patch {size.patch_size}, hidden {size.hidden_size}, {size.num_layers} blocks, "
        f"{size.num_heads} heads, mlp {size.mlp_dim})"
    )
