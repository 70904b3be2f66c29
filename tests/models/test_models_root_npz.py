"""A fake pretrained checkpoint in the real `.npz` layout, read by the real loader."""

import dataclasses

import jax
import numpy as np
import pytest

from evolve.config import VIT_SIZES
from evolve.models import cost, root, vit
from evolve.types import PathStructure, ViTSize

TINY = VIT_SIZES["tiny"]


def vit_jax_checkpoint(size: ViTSize, image_size: int, *, seed=0, num_classes=1000, pre_logits=False):
    """Random values under exactly the keys of a vit_jax / AugReg `.npz` file."""
    rng = np.random.default_rng(seed)
    hidden, heads, mlp = size.hidden_size, size.num_heads, size.mlp_dim
    head_dim = hidden // heads
    side = image_size // size.patch_size

    def random(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    flat = {
        "embedding/kernel": random(size.patch_size, size.patch_size, 3, hidden),
        "embedding/bias": random(hidden),
        "cls": random(1, 1, hidden),
        "Transformer/posembed_input/pos_embedding": random(1, 1 + side * side, hidden),
        "Transformer/encoder_norm/scale": random(hidden),
        "Transformer/encoder_norm/bias": random(hidden),
        "head/kernel": random(hidden, num_classes),
        "head/bias": random(num_classes),
    }
    if pre_logits:
        flat["pre_logits/kernel"] = random(hidden, hidden)
        flat["pre_logits/bias"] = random(hidden)
    for i in range(size.num_layers):
        block = f"Transformer/encoderblock_{i}"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            flat[f"{block}/{norm}/scale"] = random(hidden)
            flat[f"{block}/{norm}/bias"] = random(hidden)
        for projection in ("query", "key", "value"):
            flat[f"{block}/MultiHeadDotProductAttention_1/{projection}/kernel"] = random(hidden, heads, head_dim)
            flat[f"{block}/MultiHeadDotProductAttention_1/{projection}/bias"] = random(heads, head_dim)
        flat[f"{block}/MultiHeadDotProductAttention_1/out/kernel"] = random(heads, head_dim, hidden)
        flat[f"{block}/MultiHeadDotProductAttention_1/out/bias"] = random(hidden)
        flat[f"{block}/MlpBlock_3/Dense_0/kernel"] = random(hidden, mlp)
        flat[f"{block}/MlpBlock_3/Dense_0/bias"] = random(mlp)
        flat[f"{block}/MlpBlock_3/Dense_1/kernel"] = random(mlp, hidden)
        flat[f"{block}/MlpBlock_3/Dense_1/bias"] = random(hidden)
    return flat


def write(path, flat):
    with open(path, "wb") as file:
        np.savez(file, **flat)
    return str(path)


def expected_location(name: str, inner: tuple[str, ...]) -> str:
    """Where vit_jax keeps a parameter, written out independently of the loader."""
    if name == "cls":
        return "cls"
    if name == "embedding":
        return "embedding/" + "/".join(inner)
    return f"Transformer/{name}/" + "/".join(inner)


def leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def assert_root_matches(params, flat, size):
    assert tuple(params) == root.root_component_names(size.num_layers)
    used = set()
    for name, component in params.items():
        for inner, array in leaves(component):
            key = expected_location(name, inner)
            assert array.dtype == np.float32
            np.testing.assert_array_equal(array, flat[key], err_msg=key)
            used.add(key)
    assert used == {k for k in flat if not k.startswith(("head/", "pre_logits/"))}


@pytest.mark.parametrize(
    "size, image_size",
    [(TINY, 16), (VIT_SIZES["Ti/16"], 32)],
    ids=["tiny", "Ti16"],
)
def test_load_puts_every_parameter_in_place(tmp_path, size, image_size):
    flat = vit_jax_checkpoint(size, image_size, pre_logits=True)
    loaded_size, params = root.load_vit_npz(write(tmp_path / "ckpt.npz", flat))
    assert loaded_size == size
    assert_root_matches(params, flat, size)
    # The components are those vit.py builds, shape for shape.
    structure = PathStructure(size, size.num_layers, image_size, num_classes=1)
    abstract = cost.abstract_params(structure)
    for name, component in params.items():
        assert jax.tree.map(np.shape, component) == jax.tree.map(lambda a: a.shape, abstract[name]), name
    structure = dataclasses.replace(structure, num_classes=3)
    params["head"] = vit.init_component(
        "head", size=size, image_size=image_size, num_classes=3, adapter_dim=1, rng=jax.random.key(0)
    )
    images = np.zeros((1, image_size, image_size, 3), np.float32)
    assert jax.jit(vit.forward, static_argnums=2)(params, images, structure).shape == (1, 3)


def test_load_resizes_position_embeddings(tmp_path):
    flat = vit_jax_checkpoint(TINY, 8)  # a 2x2 grid
    path = write(tmp_path / "ckpt.npz", flat)
    _, same = root.load_vit_npz(path, image_size=8)
    original = flat["Transformer/posembed_input/pos_embedding"]
    np.testing.assert_array_equal(same["posembed_input"]["pos_embedding"], original)
    _, params = root.load_vit_npz(path, image_size=16)
    posembed = params["posembed_input"]["pos_embedding"]
    assert posembed.shape == (1, 17, TINY.hidden_size)
    np.testing.assert_array_equal(posembed[:, 0], original[:, 0])
    np.testing.assert_array_equal(posembed, vit.resize_posembed(original, 17))
    # Everything else is untouched.
    scale = params["encoderblock_2"]["LayerNorm_2"]["scale"]
    np.testing.assert_array_equal(scale, flat["Transformer/encoderblock_2/LayerNorm_2/scale"])
    with pytest.raises(ValueError, match="patch size"):
        root.load_vit_npz(path, image_size=18)


def test_size_is_named_custom_when_no_known_size_matches(tmp_path):
    shallow = dataclasses.replace(TINY, name="whatever", num_layers=2)
    size, params = root.load_vit_npz(write(tmp_path / "ckpt.npz", vit_jax_checkpoint(shallow, 16)))
    assert size == dataclasses.replace(shallow, name="custom")
    assert "encoderblock_1" in params and "encoderblock_2" not in params


def test_save_then_load_round_trip(tmp_path):
    params = root.random_root(TINY, image_size=16, rng=jax.random.key(0))
    path = tmp_path / "exported"  # written at exactly this name, no ".npz" added
    root.save_vit_npz(path, TINY, params, num_classes=10)
    with np.load(path) as archive:
        keys = set(archive.files)
        assert archive["head/kernel"].shape == (TINY.hidden_size, 10)
    assert keys == set(vit_jax_checkpoint(TINY, 16))
    size, loaded = root.load_vit_npz(path)
    assert size == TINY
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)


def test_save_refuses_adapters_and_incomplete_roots(tmp_path):
    params = root.random_root(TINY, image_size=16, rng=jax.random.key(0))
    adapter = vit.init_component(
        "residual_adapter_0", size=TINY, image_size=16, num_classes=1, adapter_dim=8, rng=jax.random.key(1)
    )
    with pytest.raises(ValueError, match="residual_adapter_0"):
        root.save_vit_npz(tmp_path / "a.npz", TINY, {**params, "residual_adapter_0": adapter})
    del params["encoderblock_1"]
    with pytest.raises(ValueError, match="encoderblock_1"):
        root.save_vit_npz(tmp_path / "b.npz", TINY, params)
    assert not list(tmp_path.iterdir())


def big_vision_layout(flat, *, scanned: bool):
    """The same parameters as big_vision writes them (see the loader's docstring)."""
    renames = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    out, stacked = {}, {}
    for key, value in flat.items():
        if key == "Transformer/posembed_input/pos_embedding":
            out["params/pos_embedding"] = value[:, 1:]  # no class-token entry
            continue
        parts = key.split("/")
        if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = renames.get(parts[2], parts[2])
            if scanned:
                rest = "/".join(parts[2:])
                stacked.setdefault(rest, {})[int(parts[1].rsplit("_", 1)[1])] = value
                continue
        out["params/" + "/".join(parts)] = value
    for rest, by_index in stacked.items():
        out[f"params/Transformer/encoderblock/{rest}"] = np.stack([by_index[i] for i in sorted(by_index)])
    return out


@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned"])
def test_load_big_vision_layout(tmp_path, scanned):
    flat = vit_jax_checkpoint(TINY, 16)
    flat["Transformer/posembed_input/pos_embedding"][:, 0] = 0.0  # big_vision has no class-token entry
    size, params = root.load_vit_npz(write(tmp_path / "bv.npz", big_vision_layout(flat, scanned=scanned)))
    assert size == TINY
    assert_root_matches(params, flat, TINY)


def test_missing_key_is_named(tmp_path):
    flat = vit_jax_checkpoint(TINY, 16)
    del flat["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    with pytest.raises(ValueError, match="Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"):
        root.load_vit_npz(write(tmp_path / "ckpt.npz", flat))


@pytest.mark.parametrize(
    "key", ["cls", "embedding/kernel", "Transformer/encoder_norm/scale", "Transformer/posembed_input/pos_embedding"]
)
def test_missing_top_level_key_is_named(tmp_path, key):
    flat = vit_jax_checkpoint(TINY, 16)
    del flat[key]
    with pytest.raises(ValueError, match=key):
        root.load_vit_npz(write(tmp_path / "ckpt.npz", flat))


def test_missing_block_is_named(tmp_path):
    flat = {k: v for k, v in vit_jax_checkpoint(TINY, 16).items() if "encoderblock_1/" not in k}
    with pytest.raises(ValueError, match="encoderblock_1"):
        root.load_vit_npz(write(tmp_path / "ckpt.npz", flat))


def test_inconsistent_shape_is_named(tmp_path):
    flat = vit_jax_checkpoint(TINY, 16)
    key = "Transformer/encoderblock_2/MultiHeadDotProductAttention_1/value/kernel"
    flat[key] = flat[key][:, :2]
    with pytest.raises(ValueError, match=key):
        root.load_vit_npz(write(tmp_path / "ckpt.npz", flat))
    flat = vit_jax_checkpoint(TINY, 16)
    key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    flat[key] = flat[key].reshape(TINY.hidden_size, -1)
    with pytest.raises(ValueError, match=key):
        root.load_vit_npz(write(tmp_path / "ckpt.npz", flat))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="junk.npz"):
        root.load_vit_npz(path)
    with pytest.raises(ValueError, match="embedding/kernel"):
        root.load_vit_npz(write(tmp_path / "other.npz", {"weights": np.zeros(3, np.float32)}))
