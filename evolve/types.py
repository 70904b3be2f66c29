"""Pure data of the system: components, paths, task specs (DESIGN.md §2).

Nothing here imports JAX; parameters are nested dicts of numpy arrays on the
host. The engine puts them on devices when it trains or predicts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Mapping, Union

import numpy as np

from evolve.errors import InvalidArgumentError

# A component's parameters: a nested dict of numpy arrays, e.g.
# {"kernel": array, "bias": array}.
Params = Mapping[str, Any]
HyperValue = Union[int, float, bool, str]

ROOT_TASK = "__root__"

# Task names double as model names of the inference API: short and URL-safe.
TASK_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def validate_task_name(name: object, field: str = "name") -> str:
    """Returns the name, or raises InvalidArgumentError naming `field`."""
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(field, "a task name is required")
    if not TASK_NAME_PATTERN.fullmatch(name):  # fullmatch: "$" would admit a final newline
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidArgumentError(
            field, f"{shown!r} is not a valid task name: use 1-63 of a-z 0-9 _ . - starting with a letter or digit"
        )
    return name


def adapter_index(name: str) -> int:
    """The block index of a `residual_adapter_<i>` component name."""
    return int(name.rsplit("_", 1)[1])


@dataclasses.dataclass(frozen=True)
class ViTSize:
    """Architecture of a root ViT (vit_jax naming of its widths)."""

    name: str
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int


@dataclasses.dataclass(frozen=True)
class PathStructure:
    """Everything static about a path's forward pass.

    Two paths with equal structures run the same compiled programs; this is the
    key of every compile cache.
    """

    size: ViTSize
    num_layers: int
    image_size: int
    num_classes: int
    adapter_layers: tuple[int, ...] = ()
    adapter_dim: int = 32
    # The dtype the forward pass computes in ("float32" or "bfloat16", from
    # SearchConfig.compute_dtype); parameters and optimizer state stay float32.
    compute_dtype: str = "float32"
    # Training memory for compute (SearchConfig.remat, momentum_dtype): each
    # encoder layer's activations recomputed in the backward pass instead of
    # kept; the SGD momentum trace held in this dtype (kept float32 on disk).
    remat: bool = False
    momentum_dtype: str = "float32"

    def component_names(self) -> tuple[str, ...]:
        """Component names in forward order."""
        names = ["embedding", "cls", "posembed_input"]
        for i in range(self.num_layers):
            if i in self.adapter_layers:
                names.append(f"residual_adapter_{i}")
            names.append(f"encoderblock_{i}")
        names += ["encoder_norm", "head"]
        return tuple(names)


def params_hash(params: Params) -> str:
    """A content hash of a parameter tree (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()

    def visit(prefix: str, tree: Any) -> None:
        if isinstance(tree, Mapping):
            for key in sorted(tree):
                visit(f"{prefix}/{key}", tree[key])
        else:
            array = np.ascontiguousarray(np.asarray(tree))
            digest.update(f"{prefix}:{array.dtype.str}:{array.shape}".encode())
            digest.update(array.tobytes())

    visit("", params)
    return digest.hexdigest()


def count_params(params: Params) -> int:
    if isinstance(params, Mapping):
        return sum(count_params(v) for v in params.values())
    return int(np.size(params))


@dataclasses.dataclass
class Component:
    """One module with its own parameters. Immutable once created.

    Training never changes a component in place: a trained copy is a new
    component with a new id. `locked_by` holds the tasks whose served path
    uses it (and ROOT_TASK for the root's trained layers); a locked component
    is never trained again.
    """

    id: str
    name: str
    params: Params
    origin: str
    trained: bool = True
    locked_by: frozenset[str] = frozenset()
    # SGD momentum trace from the training that produced it; inherited by
    # trainable clones (DESIGN §3.4).
    momentum: Params | None = None
    content_hash: str = ""

    def __post_init__(self) -> None:
        if not self.content_hash:
            self.content_hash = params_hash(self.params)

    @property
    def num_params(self) -> int:
        return count_params(self.params)


@dataclasses.dataclass
class Path:
    """One task's model: ordered components and the hyperparameters."""

    id: str
    task: str
    components: dict[str, str]  # component name -> component id, forward order
    hparams: dict[str, HyperValue]
    parent_id: str | None = None
    score: float | None = None
    quality: float | None = None
    accounted_params: float | None = None
    flops: float | None = None
    children: int = 0  # k of the 0.5^k parent-acceptance rule
    mutations: tuple[str, ...] = ()
    generation: int = 0
    test_accuracy: float | None = None
    version: int = 0
    # Blocks past this path's depth, resolved along its lineage when it was
    # made (name -> component id); a child that grows deeper takes them.
    inherited: dict[str, str] = dataclasses.field(default_factory=dict)

    def num_layers(self) -> int:
        return sum(1 for n in self.components if n.startswith("encoderblock_"))

    def adapter_layers(self) -> tuple[int, ...]:
        return tuple(sorted(adapter_index(n) for n in self.components if n.startswith("residual_adapter_")))


@dataclasses.dataclass(frozen=True)
class ParentProbe:
    """One path's probe on the new task, and whether it seeds a parent."""

    path_id: str
    task: str
    accuracy: float
    seconds: float
    chosen: int = 0  # first-generation candidates seeded from this path
    reason: str = ""


# ---- task sources ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    name: str
    data_dir: str | None = None
    train_split: str = "train"
    validation_split: str | None = None  # None: a slice of train
    test_split: str | None = "test"
    image_key: str = "image"
    label_key: str = "label"


@dataclasses.dataclass(frozen=True)
class NpzSource:
    path: str


@dataclasses.dataclass(frozen=True)
class ImageFolderSource:
    path: str
    validation_fraction: float = 0.1
    test_fraction: float = 0.1


@dataclasses.dataclass(frozen=True)
class BundledSource:
    """A demo task built from data shipped inside an installed package."""

    name: str


TaskSource = Union[TfdsSource, NpzSource, ImageFolderSource, BundledSource]


@dataclasses.dataclass(frozen=True)
class SearchBudget:
    """Overrides of the configuration's search size for one task."""

    generations: int | None = None
    candidates_per_generation: int | None = None
    train_rounds: int | None = None
    examples_per_round: int | None = None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    source: TaskSource
    budget: SearchBudget = SearchBudget()


_SOURCE_KINDS = {
    "tfds": TfdsSource,
    "npz": NpzSource,
    "image_folder": ImageFolderSource,
    "bundled": BundledSource,
}


def spec_to_dict(spec: TaskSpec) -> dict[str, Any]:
    """A JSON-ready dict of a task spec (the source tagged with its kind)."""
    kind = next(k for k, cls in _SOURCE_KINDS.items() if isinstance(spec.source, cls))
    return {
        "name": spec.name,
        "source": {"kind": kind, **dataclasses.asdict(spec.source)},
        "budget": dataclasses.asdict(spec.budget),
    }


def spec_from_dict(data: Mapping[str, Any]) -> TaskSpec:
    source = dict(data["source"])
    source_cls = _SOURCE_KINDS[source.pop("kind")]
    return TaskSpec(name=data["name"], source=source_cls(**source), budget=SearchBudget(**data.get("budget", {})))
