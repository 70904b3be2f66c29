"""What a path costs: parameters and inference FLOPs per example (DESIGN §3.5).

Nothing here allocates parameters: shapes come from `jax.eval_shape`, so the
cost of a ViT-L path is known without a gigabyte of host memory. Results are
cached per `PathStructure` (hashable, and the key of every compile cache).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from evolve.models import vit
from evolve.types import Params, PathStructure, ViTSize

logger = logging.getLogger(__name__)


def abstract_params(structure: PathStructure) -> dict[str, Params]:
    """Every component's parameters as `jax.ShapeDtypeStruct`s (no allocation)."""
    # Fresh dicts around the cached (immutable) leaves: callers may edit them.
    return {
        name: jax.tree.map(lambda leaf: leaf, _abstract_component(name, structure))
        for name in structure.component_names()
    }


def component_param_counts(structure: PathStructure) -> dict[str, int]:
    """Parameters per component name, in forward order."""
    return {
        name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(_abstract_component(name, structure)))
        for name in structure.component_names()
    }


@functools.lru_cache(maxsize=1024)
def param_count(structure: PathStructure) -> int:
    """Total parameters of a path of this structure, head and adapters included."""
    return sum(component_param_counts(structure).values())


@functools.lru_cache(maxsize=256)
def forward_flops(structure: PathStructure) -> float:
    """Inference FLOPs per example, from XLA's cost analysis of the compiled forward.

    The program is compiled for one example on the host CPU when the CPU
    backend is present, so a score does not depend on which accelerator
    computed it; otherwise on the default backend.
    """
    sharding = _analysis_sharding()

    def abstract(leaf: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    params = jax.tree.map(abstract, abstract_params(structure))
    side = structure.image_size
    images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32, sharding=sharding)
    # A function of its own, not vit.forward: jax's trace and lowering caches are
    # keyed on the function, and would keep every structure's program alive.
    forward = functools.partial(vit.forward)
    compiled = jax.jit(forward, static_argnums=2).lower(params, images, structure).compile()
    flops = _flops_of(compiled.cost_analysis())
    if flops is None:
        fallback = analytic_flops(structure)
        logger.warning("XLA cost analysis reported no FLOPs for %s; using the analytic count %.4g", structure, fallback)
        return fallback
    return flops


def analytic_flops(structure: PathStructure) -> float:
    """Textbook inference FLOPs per example: 2 x the multiply-adds of every matmul.

    Counts the patch embedding, query/key/value/output projections, attention
    scores and their weighted sum, the MLPs, adapters and the head; ignores
    normalisation, activations, softmax and additions.
    """
    size: ViTSize = structure.size
    hidden, mlp = size.hidden_size, size.mlp_dim
    patches = (structure.image_size // size.patch_size) ** 2
    tokens = patches + 1
    macs = patches * size.patch_size**2 * 3 * hidden  # patch embedding
    per_block = (
        4 * tokens * hidden * hidden  # query, key, value, out projections
        + 2 * tokens * tokens * hidden  # scores q.k and the weighted sum of values, all heads
        + 2 * tokens * hidden * mlp  # MLP
    )
    macs += structure.num_layers * per_block
    macs += len(structure.adapter_layers) * 2 * tokens * hidden * structure.adapter_dim
    macs += hidden * structure.num_classes  # head on the class token
    return float(2 * macs)


# ---- helpers ---------------------------------------------------------------


def _abstract_component(name: str, structure: PathStructure) -> Params:
    kind = name.rsplit("_", 1)[0] if name[-1].isdigit() else name
    # Only what changes a component's shapes is part of the key, so the blocks
    # of all depths (and all structures of one size) share one trace.
    image_size = structure.image_size if kind == "posembed_input" else 0
    num_classes = structure.num_classes if kind == "head" else 0
    adapter_dim = structure.adapter_dim if kind == "residual_adapter" else 0
    return _abstract_kind(kind, structure.size, image_size, num_classes, adapter_dim)


@functools.lru_cache(maxsize=512)
def _abstract_kind(kind: str, size: ViTSize, image_size: int, num_classes: int, adapter_dim: int) -> Params:
    # A representative name of the kind (the index does not change shapes).
    name = f"{kind}_0" if kind in ("encoderblock", "residual_adapter") else kind
    # The key is made inside the trace, so not even it is allocated.
    return jax.eval_shape(
        lambda: vit.init_component(
            name,
            size=size,
            image_size=image_size or size.patch_size,
            num_classes=num_classes or 1,
            adapter_dim=adapter_dim or 1,
            rng=jax.random.key(0),
            as_numpy=False,
        )
    )


def _analysis_sharding() -> jax.sharding.Sharding | None:
    try:
        return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    except RuntimeError:  # the CPU backend is disabled (e.g. JAX_PLATFORMS=cuda)
        return None


def _flops_of(analysis: Any) -> float | None:
    # A dict in current JAX; a list with one dict per computation in older ones.
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not isinstance(analysis, Mapping):
        return None
    flops = analysis.get("flops")
    if flops is None or flops <= 0:
        return None
    return float(flops)
