"""ViT components with the vit_jax parameter names, and a path's forward pass.

Each component is a separate Flax module applied with its own parameters, so
a path can mix components from anywhere in the system. `forward` is a pure
function of (params by component name, images) with the structure static.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evolve.types import Params, PathStructure, ViTSize


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with vit_jax's query/key/value/out DenseGeneral layout."""

    num_heads: int
    dtype: Any = None  # compute dtype (None: that of the inputs and parameters)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = x.shape[-1]
        head_dim = hidden // self.num_heads

        def project(name: str) -> jax.Array:
            return nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)(x)

        query, key, value = project("query"), project("key"), project("value")
        # [batch, tokens, heads, head_dim] is the layout dot_product_attention expects.
        attended = jax.nn.dot_product_attention(query, key, value)
        return nn.DenseGeneral(hidden, axis=(-2, -1), dtype=self.dtype, name="out")(attended)


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = x.shape[-1]
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(hidden, dtype=self.dtype, name="Dense_1")(y)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; submodule names match vit_jax checkpoints."""

    num_heads: int
    mlp_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(x)
        y = MultiHeadDotProductAttention(self.num_heads, self.dtype, name="MultiHeadDotProductAttention_1")(y)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.dtype, name="MlpBlock_3")(y)
        return x + y


class ResidualAdapter(nn.Module):
    """LayerNorm -> Dense down -> GELU -> Dense up (zero-initialised up)."""

    adapter_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = x.shape[-1]
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(x)
        y = nn.Dense(self.adapter_dim, dtype=self.dtype, name="down")(y)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(hidden, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="up")(y)


def _embedding(size: ViTSize, dtype: Any = None) -> nn.Module:
    patch = (size.patch_size, size.patch_size)
    return nn.Conv(size.hidden_size, patch, strides=patch, padding="VALID", dtype=dtype)


def compute_dtype(structure: PathStructure) -> Any:
    """The dtype a structure computes in (config.COMPUTE_DTYPES), None for
    float32: flax's default, so float32 programs are as before. Parameters
    stay float32 whatever it is."""
    return None if structure.compute_dtype == "float32" else jnp.dtype(structure.compute_dtype)


def num_tokens(size: ViTSize, image_size: int) -> int:
    side = image_size // size.patch_size
    return side * side + 1


def _component_kind(name: str) -> str:
    return name.rsplit("_", 1)[0] if name[-1].isdigit() else name


def init_component(
    name: str,
    *,
    size: ViTSize,
    image_size: int,
    num_classes: int,
    adapter_dim: int,
    rng: jax.Array,
    as_numpy: bool = True,
) -> Params:
    """Random parameters of one component, as a nested dict of numpy arrays.

    `as_numpy=False` keeps JAX arrays, so the function can run under
    `jax.eval_shape` (shapes without allocating, e.g. for ViT-L).
    """
    kind = _component_kind(name)
    hidden = size.hidden_size
    tokens = jnp.zeros((1, num_tokens(size, image_size), hidden), jnp.float32)
    if kind == "embedding":
        params = _embedding(size).init(rng, jnp.zeros((1, image_size, image_size, 3)))["params"]
    elif kind == "cls":
        params = {"cls": np.zeros((1, 1, hidden), np.float32)}
    elif kind == "posembed_input":
        init = nn.initializers.normal(stddev=0.02)
        params = {"pos_embedding": init(rng, tokens.shape, jnp.float32)}
    elif kind == "encoderblock":
        params = EncoderBlock(size.num_heads, size.mlp_dim).init(rng, tokens)["params"]
    elif kind == "residual_adapter":
        params = ResidualAdapter(adapter_dim).init(rng, tokens)["params"]
    elif kind == "encoder_norm":
        params = nn.LayerNorm().init(rng, tokens)["params"]
    elif kind == "head":
        # Zero head, as vit_jax fine-tuning does: new tasks start from uniform logits.
        params = {"kernel": np.zeros((hidden, num_classes), np.float32), "bias": np.zeros((num_classes,), np.float32)}
    else:
        raise ValueError(f"unknown component name {name!r}")
    params = _unfreeze(params)
    return jax.tree.map(np.asarray, params) if as_numpy else params


def _unfreeze(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def resize_posembed(pos_embedding: np.ndarray, target_tokens: int) -> np.ndarray:
    """Resizes [1, 1 + g*g, D] position embeddings to a new grid, as vit_jax does.

    The class token's embedding is kept; the grid part is interpolated
    bilinearly in 2-D.
    """
    pos_embedding = np.asarray(pos_embedding)
    if pos_embedding.shape[1] == target_tokens:
        return pos_embedding
    cls_part, grid = pos_embedding[:, :1], pos_embedding[0, 1:]
    old_side = int(round(np.sqrt(grid.shape[0])))
    new_side = int(round(np.sqrt(target_tokens - 1)))
    if old_side * old_side != grid.shape[0] or new_side * new_side != target_tokens - 1:
        raise ValueError(f"cannot resize position embeddings {pos_embedding.shape} to {target_tokens} tokens")
    grid = grid.reshape(old_side, old_side, -1)
    resized = jax.image.resize(grid, (new_side, new_side, grid.shape[-1]), method="bilinear")
    resized = np.asarray(resized, dtype=pos_embedding.dtype).reshape(1, new_side * new_side, -1)
    return np.concatenate([cls_part, resized], axis=1)


def forward(params: Mapping[str, Params], images: jax.Array, structure: PathStructure) -> jax.Array:
    """Logits of a path for a batch of images in [-1, 1], shape [B, S, S, 3]."""
    return forward_from(params, images, structure, None)


def forward_from(params: Mapping[str, Params], inputs: jax.Array, structure: PathStructure,
                 start_layer: int | None) -> jax.Array:
    """Logits from images (`start_layer` None) or from the tokens that the
    first `start_layer` encoder layers made (`prefix_tokens`)."""
    tokens = embed(params, inputs, structure) if start_layer is None else inputs
    tokens = run_layers(params, tokens, structure, 0 if start_layer is None else start_layer, structure.num_layers)
    head = nn.Dense(structure.num_classes, dtype=compute_dtype(structure))
    return head.apply({"params": params["head"]}, readout(params, tokens, structure)).astype(jnp.float32)


def encode(params: Mapping[str, Params], images: jax.Array, structure: PathStructure) -> jax.Array:
    """The body's features (normalised class token, [B, hidden]): everything before `head`."""
    tokens = run_layers(params, embed(params, images, structure), structure, 0, structure.num_layers)
    return readout(params, tokens, structure).astype(jnp.float32)


def embed(params: Mapping[str, Params], images: jax.Array, structure: PathStructure) -> jax.Array:
    """Patch embedding, class token and position embeddings: [B, tokens, hidden]."""
    size, dtype = structure.size, compute_dtype(structure)
    if dtype is not None:
        images = images.astype(dtype)
    x = _embedding(size, dtype).apply({"params": params["embedding"]}, images)
    batch = x.shape[0]
    x = x.reshape(batch, -1, size.hidden_size)
    cls = jnp.broadcast_to(params["cls"]["cls"].astype(x.dtype), (batch, 1, size.hidden_size))
    x = jnp.concatenate([cls, x], axis=1)
    return x + params["posembed_input"]["pos_embedding"].astype(x.dtype)


def run_layers(params: Mapping[str, Params], x: jax.Array, structure: PathStructure, start: int, stop: int) -> jax.Array:
    """Encoder layers start..stop-1, each with its residual adapter first where it has one."""
    dtype = compute_dtype(structure)
    block = EncoderBlock(structure.size.num_heads, structure.size.mlp_dim, dtype)
    adapter = ResidualAdapter(structure.adapter_dim, dtype)

    def layer(layer_params: Mapping[str, Params], x: jax.Array) -> jax.Array:
        if "adapter" in layer_params:
            x = x + adapter.apply({"params": layer_params["adapter"]}, x)
        return block.apply({"params": layer_params["block"]}, x)

    if structure.remat:  # the backward pass recomputes a layer's activations from its input
        layer = jax.checkpoint(layer)
    for i in range(start, stop):
        layer_params = {"block": params[f"encoderblock_{i}"]}
        if i in structure.adapter_layers:
            layer_params["adapter"] = params[f"residual_adapter_{i}"]
        x = layer(layer_params, x)
    return x


def readout(params: Mapping[str, Params], tokens: jax.Array, structure: PathStructure) -> jax.Array:
    """The normalised class token."""
    return nn.LayerNorm(dtype=compute_dtype(structure)).apply({"params": params["encoder_norm"]}, tokens)[:, 0]


# ---- frozen prefixes (DESIGN §4, frozen-prefix economics) ---------------------

STEM = ("embedding", "cls", "posembed_input")


def frozen_prefix_layers(structure: PathStructure, frozen_names: Collection[str]) -> int | None:
    """How many leading encoder layers, after the stem, are frozen whole
    (block and adapter); None when some stem component trains, so that no
    prefix can be computed ahead of the trainable part."""
    if not all(name in frozen_names for name in STEM):
        return None
    layers = 0
    for i in range(structure.num_layers):
        layer = [f"encoderblock_{i}"] + ([f"residual_adapter_{i}"] if i in structure.adapter_layers else [])
        if not all(name in frozen_names for name in layer):
            break
        layers += 1
    return layers


def prefix_structure(structure: PathStructure, layers: int) -> PathStructure:
    """The structure of a path's first `layers` layers, with what does not
    change their computation normalised away (classes; the adapter size when
    no adapter is among them): equal prefixes compile one program."""
    adapters = tuple(i for i in structure.adapter_layers if i < layers)
    return dataclasses.replace(structure, num_layers=layers, num_classes=0, adapter_layers=adapters,
                               adapter_dim=structure.adapter_dim if adapters else 0)


def prefix_names(structure: PathStructure) -> tuple[str, ...]:
    """The components a prefix structure (`prefix_structure`) runs."""
    return structure.component_names()[:-2]


def prefix_tokens(params: Mapping[str, Params], images: jax.Array, prefix: PathStructure) -> jax.Array:
    """The tokens after a prefix structure's layers: what `forward_from`
    continues from with `start_layer = prefix.num_layers`."""
    return run_layers(params, embed(params, images, prefix), prefix, 0, prefix.num_layers)


def init_path_params(structure: PathStructure, rng: jax.Array, *, as_numpy: bool = True) -> dict[str, Params]:
    """Random parameters for every component of a structure (tests, roots).

    `as_numpy=False` keeps JAX arrays (traceable under `jax.eval_shape`).
    """
    names = structure.component_names()
    keys = jax.random.split(rng, len(names))
    return {
        name: init_component(
            name,
            size=structure.size,
            image_size=structure.image_size,
            num_classes=structure.num_classes,
            adapter_dim=structure.adapter_dim,
            rng=key,
            as_numpy=as_numpy,
        )
        for name, key in zip(names, keys)
    }
