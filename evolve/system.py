"""The System: live components, paths, populations and tasks (DESIGN.md §2).

Pure data plus small bookkeeping methods; no JAX arrays, no I/O. The engine
mutates it under its lock; the checkpoint module saves and restores it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

from evolve.config import SearchConfig
from evolve.types import Component, ParentProbe, Path, TaskSpec


class TaskStatus(str, enum.Enum):
    PENDING = "PENDING"
    SEARCHING = "SEARCHING"
    READY = "READY"
    FAILED = "FAILED"
    DAMAGED = "DAMAGED"  # restored with a missing or corrupt component; `improve` rebuilds it


@dataclasses.dataclass
class TaskRecord:
    spec: TaskSpec
    status: TaskStatus = TaskStatus.PENDING
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    message: str = ""
    # The probes of the task's extension search: why its first parents were chosen.
    probes: tuple[ParentProbe, ...] = ()
    # (train, validation) examples, known once its data has loaded.
    examples: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class DamagedComponent:
    meta: Mapping[str, Any]  # the component's manifest entry
    reason: str


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The bookkeeping of a System at one moment, to undo a change whose
    checkpoint could not be written (see System.snapshot)."""

    components: dict[str, Component]
    locked_by: dict[str, frozenset[str]]
    paths: dict[str, Path]
    best: dict[str, str]
    populations: dict[str, list[str]]
    tasks: dict[str, TaskRecord]
    damaged: dict[str, DamagedComponent]
    damaged_best: dict[str, str]


@dataclasses.dataclass
class System:
    config: SearchConfig
    components: dict[str, Component]
    paths: dict[str, Path]
    root_path_id: str
    root_description: str
    best: dict[str, str] = dataclasses.field(default_factory=dict)  # task -> path id
    populations: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    tasks: dict[str, TaskRecord] = dataclasses.field(default_factory=dict)
    next_id: int = 0
    id_prefix: str = ""  # namespaces ids per worker (mu3Net agents)
    # Restored with missing or corrupt files: component id -> its manifest
    # entry and the reason. Their metadata is saved on, so repairing the
    # files and restarting brings their tasks back.
    damaged: dict[str, DamagedComponent] = dataclasses.field(default_factory=dict)
    # Damaged tasks' last paths (task -> path id): never served nor parents,
    # kept until a rebuild replaces them.
    damaged_best: dict[str, str] = dataclasses.field(default_factory=dict)

    # ---- ids -------------------------------------------------------------

    def new_id(self, kind: str) -> str:
        self.next_id += 1
        return f"{self.id_prefix}{kind}{self.next_id:06d}"

    # ---- paths -----------------------------------------------------------

    @property
    def root_path(self) -> Path:
        return self.paths[self.root_path_id]

    def best_path(self, task: str) -> Path | None:
        path_id = self.best.get(task)
        return self.paths[path_id] if path_id else None

    def population(self, task: str) -> list[Path]:
        return [self.paths[i] for i in self.populations.get(task, [])]

    def selectable_paths(self, task: str | None = None) -> list[Path]:
        """The root, every served path, and task's own live population
        (the uniform fallback of parent selection, DESIGN §3.1)."""
        ids = [self.root_path_id, *self.best.values()]
        if task is not None:
            ids += self.populations.get(task, [])
        return [self.paths[i] for i in dict.fromkeys(ids)]

    def lineage(self, path: Path) -> list[Path]:
        """The path, its live ancestors (closest first), then the root path."""
        chain, seen = [], set()
        current: Path | None = path
        while current is not None and current.id not in seen:
            chain.append(current)
            seen.add(current.id)
            current = self.paths.get(current.parent_id) if current.parent_id else None
        if self.root_path_id not in seen:
            chain.append(self.root_path)
        return chain

    def path_components(self, path: Path) -> list[Component]:
        return [self.components[i] for i in path.components.values()]

    # ---- locks and garbage collection ------------------------------------

    def lock(self, task: str, path: Path) -> None:
        for component in self.path_components(path):
            component.locked_by = component.locked_by | {task}

    def unlock(self, task: str, keep: Path | None) -> None:
        """Lifts task's locks on components outside `keep`."""
        keep_ids = set(keep.components.values()) if keep else set()
        for component in self.components.values():
            if task in component.locked_by and component.id not in keep_ids:
                component.locked_by = component.locked_by - {task}

    def snapshot(self) -> Snapshot:
        """What `revert` needs to undo changes to paths, locks, tasks and GC."""
        return Snapshot(
            components=dict(self.components), locked_by={i: c.locked_by for i, c in self.components.items()},
            paths=dict(self.paths), best=dict(self.best),
            populations={t: list(ids) for t, ids in self.populations.items()},
            tasks={t: dataclasses.replace(r) for t, r in self.tasks.items()},
            damaged=dict(self.damaged), damaged_best=dict(self.damaged_best),
        )

    def revert(self, snapshot: Snapshot) -> None:
        self.components = dict(snapshot.components)
        for component_id, locked_by in snapshot.locked_by.items():
            self.components[component_id].locked_by = locked_by
        self.paths, self.best = dict(snapshot.paths), dict(snapshot.best)
        self.populations = {t: list(ids) for t, ids in snapshot.populations.items()}
        self.tasks = {t: dataclasses.replace(r) for t, r in snapshot.tasks.items()}
        self.damaged, self.damaged_best = dict(snapshot.damaged), dict(snapshot.damaged_best)

    def uses_damaged(self, path: Path) -> list[str]:
        """The damaged component ids among a path's components."""
        return [cid for cid in path.components.values() if cid in self.damaged]

    def referenced_path_ids(self) -> set[str]:
        ids = {self.root_path_id, *self.best.values(), *self.damaged_best.values()}
        for members in self.populations.values():
            ids.update(members)
        return ids

    def collect_garbage(self) -> tuple[list[str], list[str]]:
        """Drops paths no one references, then components no live path uses.

        Ancestors only matter for name resolution, and every path carries the
        blocks it inherited from them (`Path.inherited`), so dropping an
        ancestor loses nothing. Returns the dropped (path ids, component ids).
        """
        live_paths = self.referenced_path_ids()
        dropped_paths = [i for i in self.paths if i not in live_paths]
        for path_id in dropped_paths:
            del self.paths[path_id]
        used = {
            cid for path in self.paths.values() for cid in (*path.components.values(), *path.inherited.values())
        }
        dropped_components = [i for i in self.components if i not in used]
        for component_id in dropped_components:
            del self.components[component_id]
        self.damaged = {i: d for i, d in self.damaged.items() if i in used}
        return dropped_paths, dropped_components

    def tasks_sharing(self, task: str) -> list[str]:
        """Other tasks (or the root) that lock a component of task's path."""
        path = self.best_path(task)
        if path is None:
            return []
        others: set[str] = set()
        for component in self.path_components(path):
            others |= component.locked_by
        others.discard(task)
        return sorted(others)

