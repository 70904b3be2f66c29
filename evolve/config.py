"""Configuration as code: named search configurations (DESIGN.md §3).

`get_config(name)` returns a frozen dataclass; variants come from arguments
(`dataclasses.replace`), never from copies.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from evolve.types import HyperValue, ViTSize

# Compiled executables a process keeps in memory by default, the least
# recently used evicted beyond (train.steps; the engine's and the server's
# options). A tiny model's train step holds several MB of native heap on CPU:
# a server's RSS levelled off over 25 sequential tasks with 16 train + eval
# executables, and grew by 20+ MB a task with 64 (bench/RESULTS.md).
TRAINING_EXECUTABLES = 16
SERVING_EXECUTABLES = 256
# Predict before training (train.priority): a search's next step waits while a
# Predict call is in flight, at most this long per step (0: never waits).
SERVING_MAX_YIELD_SECONDS = 0.05
# Latent replay (train.loop): with augmentation off, the frozen prefix features
# of the training and validation examples are computed once per generation and
# kept on the device, up to this many bytes in all (the rest recompute per step).
LATENT_CACHE_BYTES = 2 << 30
# Frozen components stay on the device across generations and searches (train.
# loop.RESIDENT), the least recently used dropped beyond this many bytes.
RESIDENT_FROZEN_BYTES = 2 << 30

VIT_SIZES: dict[str, ViTSize] = {
    # A CPU size for tests and the demo: patch 4 on 16x16 images.
    "tiny": ViTSize("tiny", patch_size=4, hidden_size=64, num_layers=3, num_heads=4, mlp_dim=128),
    "Ti/16": ViTSize("Ti/16", patch_size=16, hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768),
    "S/16": ViTSize("S/16", patch_size=16, hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "B/16": ViTSize("B/16", patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "L/16": ViTSize("L/16", patch_size=16, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
}

COMPUTE_DTYPES = ("float32", "bfloat16")

# Discrete grids; a mutation moves one step (DESIGN §3.3).
LEARNING_RATES = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
WARMUP_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
MOMENTUMS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
SCHEDULES = ("constant", "cosine", "restarts", "linear")
ADAPTER_DIMS = (8, 16, 32, 64, 128)
MU_VALUES = tuple(round(0.02 * i, 2) for i in range(1, 16))  # 0.02 ... 0.30
CROP_AREAS = (0.05, 0.5, 0.95, 1.0)
CROP_ASPECTS = (0.5, 0.75, 1.0)
JITTER_DELTAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)

# Learned mutation probabilities live in a path's hyperparameters (DESIGN §3.2):
# GLOBAL_MU, the rate at which the others move, and mu_key(action) per action.
GLOBAL_MU = "_mu_"


def mu_key(action: str) -> str:
    return f"{GLOBAL_MU}|{action}"


def is_learned_mu(key: str) -> bool:
    return key == GLOBAL_MU or key.startswith(GLOBAL_MU + "|")


# Every data hyperparameter's value that turns its augmentation off: the one
# place the defaults live (config, the host and device preprocessing, the loop).
AUGMENTATION_OFF: Mapping[str, HyperValue] = {
    "crop_area": 1.0,
    "crop_aspect": 1.0,
    "flip": False,
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
    "hue": 0.0,
    "jpeg_quality": 0.0,
}
# Hyperparameters that feed the data pipeline; sampled once per generation.
DATA_HPARAMS = tuple(AUGMENTATION_OFF)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """One named configuration: root size, grids in use and search budget."""

    name: str
    size: ViTSize
    image_sizes: tuple[int, ...]
    default_image_size: int
    population_size: int = 16
    generations: int = 4
    candidates_per_generation: int = 2
    train_rounds: int = 4
    examples_per_round: int = 51_200
    batch_size: int = 128
    eval_batch_size: int = 256
    scale_factor: float = 1.0  # s of the score; 1.0 = no size penalty
    params_ref: float = 2.2e9
    flops_ref: float = 3.8e12
    adapters: bool = True
    max_layers: int | None = None  # > size.num_layers allows growth
    default_mu: float = 0.1
    default_learning_rate: float = 0.01
    default_warmup: float = 0.1
    default_adapter_dim: int = 32
    # Random-crop area of a new path (1.0: no crop; the search moves it).
    default_crop_area: float = 1.0
    # Validation (DESIGN §3b): a source without a validation split gives up
    # this fraction of train, and at least min_validation_examples (never more
    # than 30% of train); candidates are ranked on at most validation_examples.
    validation_fraction: float = 0.2
    min_validation_examples: int = 200
    validation_examples: int = 10_000
    # Transfer-aware first parents: probe on this many training images; the
    # first generation's parents are the paths within probe_tolerance of the best.
    probe_examples: int = 1024
    probe_tolerance: float = 0.02
    # The first generation's last candidate trains a copy of every component of
    # its (best-probing) parent, as a plain fine-tune would: the search then
    # always weighs sharing against a full fine-tune of the closest model.
    finetune_first_candidate: bool = True
    # Successive halving inside a generation (0: off): after this many rounds
    # the better half of the candidates trains on with the others' rounds.
    halving_round: int = 0
    # The path a search ends with (one-standard-error rule, 0: off): the one
    # charged the fewest parameters among those whose validation accuracy is
    # within parsimony_z binomial standard errors of the best's.
    parsimony_z: float = 0.0
    # The dtype of the forward and backward passes: "float32", or "bfloat16"
    # (parameters, gradients and optimizer state stay float32). float32 is the
    # default: bfloat16 is slower on the CPU (bench/bench_train.py, variant bf16).
    compute_dtype: str = "float32"
    # Training memory (DESIGN §4, mixed precision), both off by default, as
    # neither pays on the CPU (bench/bench_train.py, variants remat and
    # bf16-momentum): recompute each encoder layer's activations in the
    # backward pass (jax.checkpoint) instead of keeping them, and hold the
    # SGD momentum trace in bfloat16 (halving the optimizer state; it is
    # saved, and inherited by children, as float32).
    remat: bool = False
    momentum_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("compute_dtype", "momentum_dtype"):
            value = getattr(self, name)
            if value not in COMPUTE_DTYPES:
                raise ValueError(f"{name} must be one of {', '.join(COMPUTE_DTYPES)}, got {value!r}")
        for field in dataclasses.fields(self):  # "False" from a flag would be a truthy string
            if field.type == "bool" and not isinstance(getattr(self, field.name), bool):
                raise ValueError(f"{field.name} must be true or false, got {getattr(self, field.name)!r}")
        if self.default_image_size not in self.image_sizes:
            raise ValueError(f"default_image_size {self.default_image_size} is not one of image_sizes "
                             f"{tuple(self.image_sizes)}")

    @property
    def layer_limit(self) -> int:
        return self.max_layers or self.size.num_layers

    def default_hparams(self) -> dict[str, HyperValue]:
        hparams: dict[str, HyperValue] = {
            "learning_rate": self.default_learning_rate,
            "schedule": "cosine",
            "warmup": self.default_warmup,
            "momentum": 0.9,
            "nesterov": False,
            "image_size": self.default_image_size,
            "adapter_dim": self.default_adapter_dim,
            GLOBAL_MU: self.default_mu,
            # data augmentation, off by default
            **AUGMENTATION_OFF,
            "crop_area": self.default_crop_area,
        }
        return hparams

    def hparam_grids(self) -> Mapping[str, tuple]:
        grids: dict[str, tuple] = {
            "learning_rate": LEARNING_RATES,
            "warmup": WARMUP_FRACTIONS,
            "momentum": MOMENTUMS,
            "nesterov": (False, True),
            "image_size": self.image_sizes,
            GLOBAL_MU: MU_VALUES,
            "crop_area": CROP_AREAS,
            "crop_aspect": CROP_ASPECTS,
            "flip": (False, True),
            "brightness": JITTER_DELTAS,
            "contrast": JITTER_DELTAS,
            "saturation": JITTER_DELTAS,
            "hue": JITTER_DELTAS,
            "jpeg_quality": JITTER_DELTAS,
        }
        if self.adapters:
            grids["adapter_dim"] = ADAPTER_DIMS
        return grids


def get_config(name: str = "tiny", **overrides) -> SearchConfig:
    """Returns the named configuration, with keyword overrides applied."""
    if name == "tiny":
        config = SearchConfig(
            name="tiny",
            size=VIT_SIZES["tiny"],
            # Patch 4 at 32 px (8 x 8 tokens) rather than at 16 px (4 x 4): on
            # the quality suite's hard tasks a scratch ViT gains 0.05-0.15 test
            # accuracy for 4x the step time (bench/RESULTS.md, "Resolution").
            image_sizes=(16, 24, 32),
            default_image_size=32,
            population_size=8,
            generations=4,
            candidates_per_generation=2,
            train_rounds=6,
            examples_per_round=4096,
            batch_size=32,
            eval_batch_size=512,
            default_learning_rate=0.05,
            default_warmup=0.05,
            max_layers=4,
            default_adapter_dim=16,
        )
    elif name in ("Ti/16", "S/16", "B/16", "L/16"):
        large = name == "L/16"  # the mu3Net ViT-L agent: one candidate per generation, higher mu
        config = SearchConfig(
            name=name,
            size=VIT_SIZES[name],
            image_sizes=tuple(range(224, 385, 16)),
            default_image_size=384,
            generations=16,
            candidates_per_generation=1 if large else 2,
            scale_factor=0.99 if name in ("B/16", "L/16") else 1.0,
            params_ref=2.2e9,
            flops_ref=3.8e12,
            default_mu=0.2 if large else 0.1,
            default_warmup=0.05 if large else 0.1,
        )
    else:
        raise ValueError(f"unknown configuration {name!r}; known: tiny, Ti/16, S/16, B/16, L/16")
    return dataclasses.replace(config, **overrides) if overrides else config
