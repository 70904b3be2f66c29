"""The forward pass of a path: shapes, adapters at init, position-embedding resize."""

import jax
import numpy as np
import pytest

from evolve.config import VIT_SIZES
from evolve.models import root, vit
from evolve.types import PathStructure

TINY = VIT_SIZES["tiny"]
forward = jax.jit(vit.forward, static_argnums=2)  # op by op, the tests would be slow


def _params(structure: PathStructure, seed: int = 0) -> dict:
    params = vit.init_path_params(structure, jax.random.key(seed))
    # A non-zero head, so that logits depend on the features.
    rng = np.random.default_rng(seed)
    params["head"] = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params["head"].items()}
    return params


def _component(name: str, *, image_size: int = 16, num_classes: int = 1, seed: int = 0):
    return vit.init_component(
        name, size=TINY, image_size=image_size, num_classes=num_classes, adapter_dim=8, rng=jax.random.key(seed)
    )


def _images(batch: int, side: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, side, side, 3)).astype(np.float32)


@pytest.mark.parametrize("num_layers", [0, 1, 3])
def test_forward_shapes(num_layers):
    structure = PathStructure(TINY, num_layers, image_size=16, num_classes=7)
    logits = forward(_params(structure), _images(5, 16), structure)
    assert logits.shape == (5, 7)
    assert np.all(np.isfinite(logits))


def test_forward_of_a_random_root_with_a_new_head():
    params = root.random_root(TINY, image_size=16, rng=jax.random.key(3))
    structure = PathStructure(TINY, TINY.num_layers, image_size=16, num_classes=4)
    params["head"] = _component("head", num_classes=4)
    logits = forward(params, _images(2, 16), structure)
    # A new head is zero: uniform logits until it is trained.
    np.testing.assert_array_equal(logits, np.zeros((2, 4), np.float32))


def test_residual_adapter_is_a_no_op_at_init():
    plain = PathStructure(TINY, 3, image_size=16, num_classes=5)
    adapted = PathStructure(TINY, 3, image_size=16, num_classes=5, adapter_layers=(0, 2), adapter_dim=8)
    params = _params(plain)
    for i in adapted.adapter_layers:
        params[f"residual_adapter_{i}"] = _component(f"residual_adapter_{i}", seed=10 + i)
        assert not np.any(params[f"residual_adapter_{i}"]["up"]["kernel"])
        assert np.any(params[f"residual_adapter_{i}"]["down"]["kernel"])
    tokens = np.random.default_rng(2).normal(size=(3, 17, TINY.hidden_size)).astype(np.float32)
    residual = vit.ResidualAdapter(8).apply({"params": params["residual_adapter_0"]}, tokens)
    np.testing.assert_array_equal(residual, np.zeros_like(tokens))
    images = _images(3, 16)
    # Two compiled programs; equal up to how XLA happens to fuse them.
    np.testing.assert_allclose(forward(params, images, adapted), forward(params, images, plain), rtol=0, atol=1e-6)


def test_a_trained_adapter_changes_the_output():
    plain = PathStructure(TINY, 3, image_size=16, num_classes=5)
    adapted = PathStructure(TINY, 3, image_size=16, num_classes=5, adapter_layers=(1,), adapter_dim=8)
    params = _params(plain)
    adapter = _component("residual_adapter_1", seed=2)
    # Random, not constant: a shift equal on every feature would vanish in the
    # LayerNorms that follow.
    adapter["up"]["kernel"] = np.random.default_rng(0).normal(size=adapter["up"]["kernel"].shape).astype(np.float32)
    params["residual_adapter_1"] = adapter
    images = _images(3, 16)
    assert not np.allclose(forward(params, images, adapted), forward(params, images, plain))


def test_posembed_resize_is_identity_at_the_same_size():
    posembed = np.random.default_rng(0).normal(size=(1, 17, 8)).astype(np.float32)
    np.testing.assert_array_equal(vit.resize_posembed(posembed, 17), posembed)


def test_posembed_resize_keeps_the_class_token():
    rng = np.random.default_rng(0)
    posembed = rng.normal(size=(1, 1 + 4 * 4, 8)).astype(np.float32)
    resized = vit.resize_posembed(posembed, 1 + 8 * 8)
    assert resized.shape == (1, 65, 8)
    assert resized.dtype == posembed.dtype
    np.testing.assert_array_equal(resized[:, 0], posembed[:, 0])
    # A constant grid stays constant under interpolation.
    flat = np.concatenate([posembed[:, :1], np.full((1, 16, 8), 0.5, np.float32)], axis=1)
    np.testing.assert_allclose(vit.resize_posembed(flat, 1 + 3 * 3)[:, 1:], 0.5, rtol=1e-6)


def test_forward_at_a_resized_image_size():
    params = root.random_root(TINY, image_size=16, rng=jax.random.key(0))
    tokens = vit.num_tokens(TINY, 32)
    params["posembed_input"] = {"pos_embedding": vit.resize_posembed(params["posembed_input"]["pos_embedding"], tokens)}
    params["head"] = _component("head", image_size=32, num_classes=3)
    structure = PathStructure(TINY, TINY.num_layers, image_size=32, num_classes=3)
    assert forward(params, _images(2, 32), structure).shape == (2, 3)
