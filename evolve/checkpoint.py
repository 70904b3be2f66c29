"""Orbax save/restore of the whole System (DESIGN.md §7).

Layout under the state directory:
  components/<id>/   one orbax checkpoint per component, written once: a
                     component never changes after it is created;
  records/<sha>.json one JSON file per task, written once and named by the
                     SHA-256 of its contents: the task's record (spec,
                     status, classes, probes) and its paths (components,
                     hyperparameters with the learned mu values, scores);
                     the root's paths have a record of their own;
  manifest/<step>/   an orbax CheckpointManager step holding a JSON manifest
                     (populations, served paths, configuration, component ids
                     with content hashes, each task's record file, and the
                     caller's `extra` state).
A save writes the records of the tasks that changed, and a manifest that
names every record (issue 12: a save costs what changed, not the system).
The manifest is committed last and atomically, so a step is complete or
absent; a record it names that is missing or fails its hash makes the step
unusable, as an unreadable manifest does. Manifests of format 1 (everything
in the manifest) are still restored. Restore takes the newest step whose
manifest reads, and checks every component against its content hash. A missing or corrupt component takes down
only the tasks whose served path uses it: they are restored DAMAGED (never
silently rolled back to an older step), everything else serves, and the
damaged component's entry is saved on, so repairing its files and restarting
brings the task back; `improve` rebuilds it instead. Only an unreadable
manifest makes restore fall back to the previous step.

A save that cannot write (disk full, quota, file size limit, I/O error) raises
StorageError naming the state directory, and commits nothing.

Each component directory records the content hash it was written with (orbax
custom metadata). A process killed after writing components but before
committing their manifest leaves directories that no step references, and the
restarted process hands out the same ids again (they continue from the last
committed step) to components with other contents; such a directory is
replaced, never taken for the new component.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Mapping

import numpy as np
import orbax.checkpoint as ocp

from evolve.config import SearchConfig
from evolve import statedir
from evolve.errors import CorruptCheckpointError, StorageError
from evolve.system import DamagedComponent, System, TaskRecord, TaskStatus
from evolve.types import (
    Component, ParentProbe, Path, TaskSpec, ViTSize, params_hash, spec_from_dict, spec_to_dict,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: tasks and paths inside the manifest (still restored)
KEEP_MANIFESTS = 5
RECORDS = "records"
HASH_KEY = "content_hash"  # in each component's orbax custom metadata


@dataclasses.dataclass(frozen=True)
class Written:
    step: int
    new_components: int
    component_ids: tuple[str, ...] = ()  # the component directories this save wrote
    record_files: tuple[str, ...] = ()  # the record files (under records/) this save wrote


@dataclasses.dataclass(frozen=True)
class Restored:
    system: System
    step: int
    extra: dict[str, Any]
    store: Store | None = None  # what restore verified, for the saves that follow


def _components_dir(state_dir: str) -> str:
    return os.path.join(os.path.abspath(state_dir), "components")


def _records_dir(state_dir: str) -> str:
    return os.path.join(os.path.abspath(state_dir), RECORDS)


def _record_text(record: Mapping[str, Any]) -> tuple[str, str]:
    """(the JSON a record file holds, its SHA-256). Keys keep their order: a
    path's components are in forward order."""
    text = json.dumps(record, separators=(",", ":"), allow_nan=True)
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_record(state_dir: str, sha: str, text: str) -> bool:
    """Writes a record file unless it exists (its name is its content's hash);
    durable before it returns. Returns whether it wrote."""
    directory = _records_dir(state_dir)
    path = os.path.join(directory, f"{sha}.json")
    if os.path.exists(path):
        return False
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself is durable before the manifest commits
    finally:
        os.close(descriptor)
    return True


def _read_record(state_dir: str, sha: str) -> dict[str, Any]:
    path = os.path.join(_records_dir(state_dir), f"{sha}.json")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise CorruptCheckpointError(f"record {sha[:12]} cannot be read: {error}") from error
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != sha:
        raise CorruptCheckpointError(f"record {sha[:12]} fails its content hash")
    return json.loads(text)


def _manager(state_dir: str, *, read_only: bool = False) -> ocp.CheckpointManager:
    """The manifest steps' manager; `read_only` (a serving replica's) neither
    creates, cleans up nor deletes anything."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=KEEP_MANIFESTS, enable_async_checkpointing=False, create=not read_only, read_only=read_only,
    )
    return ocp.CheckpointManager(os.path.join(os.path.abspath(state_dir), "manifest"), options=options)


def _is_complete(directory: str) -> bool:
    return os.path.isdir(directory) and os.path.exists(os.path.join(directory, "_CHECKPOINT_METADATA"))


def _stored_hash(directory: str) -> str | None:
    """The content hash a complete component directory was written with: None
    when it is incomplete or unreadable, "" when written before hashes were
    recorded (trusted, as before)."""
    try:
        with open(os.path.join(directory, "_CHECKPOINT_METADATA"), encoding="utf-8") as handle:
            custom = json.load(handle).get("custom_metadata") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return str(custom.get(HASH_KEY, "")) if isinstance(custom, dict) else None


def write_component(state_dir: str, component: Component) -> bool:
    """Writes a component unless its directory already holds this very
    content; returns whether it wrote."""
    directory = os.path.join(_components_dir(state_dir), component.id)
    stored = _stored_hash(directory) if os.path.isdir(directory) else None
    if stored == "" or stored == component.content_hash:
        return False
    if os.path.exists(directory):  # a write killed halfway, or other contents under a reused id
        logger.info("replacing component directory %s left by an interrupted checkpoint", component.id)
        shutil.rmtree(directory)
    tree = {"params": component.params}
    if component.momentum is not None:
        tree["momentum"] = component.momentum
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, tree, custom_metadata={HASH_KEY: component.content_hash})
    checkpointer.wait_until_finished()
    return True


def read_component(state_dir: str, meta: Mapping[str, Any], component_id: str) -> Component:
    directory = os.path.join(_components_dir(state_dir), component_id)
    if not _is_complete(directory):
        raise CorruptCheckpointError(f"component {component_id} is missing from {directory}")
    try:
        tree = ocp.StandardCheckpointer().restore(directory)
    except Exception as error:  # orbax raises many kinds on damaged files
        raise CorruptCheckpointError(f"component {component_id} cannot be read: {error}") from error
    params = _to_numpy(tree["params"])
    if params_hash(params) != meta["content_hash"]:
        raise CorruptCheckpointError(f"component {component_id} fails its content hash")
    momentum = _to_numpy(tree["momentum"]) if "momentum" in tree else None
    return Component(
        id=component_id, name=meta["name"], params=params, origin=meta["origin"], trained=meta["trained"],
        locked_by=frozenset(meta["locked_by"]), momentum=momentum, content_hash=meta["content_hash"],
    )


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


_PATH_FIELDS = tuple(field.name for field in dataclasses.fields(Path))


def path_record(path: Path) -> dict[str, Any]:
    """A path as the manifest stores it: what `dataclasses.asdict` gives (its
    fields hold only primitives, flat dicts and tuples), at a tenth of the
    cost, which a save pays for every path in the system."""
    record = {name: getattr(path, name) for name in _PATH_FIELDS}
    for name, value in record.items():
        if isinstance(value, dict):
            record[name] = dict(value)
        elif isinstance(value, tuple):
            record[name] = list(value)
    return record


@functools.lru_cache(maxsize=8192)
def _spec_record(spec: TaskSpec) -> dict[str, Any]:
    """`spec_to_dict` of a (frozen, hashable) spec, made once per spec: a save
    stores every task's spec. Callers must not change the dict."""
    return spec_to_dict(spec)


def _task_record(record: TaskRecord) -> dict[str, Any]:
    return {
        "spec": _spec_record(record.spec), "status": record.status.value, "num_classes": record.num_classes,
        "class_names": list(record.class_names), "message": record.message,
        "probes": [dataclasses.asdict(p) for p in record.probes],
        "examples": list(record.examples) if record.examples else None,
    }


def _records(system: System) -> dict[str, dict[str, Any]]:
    """Each record file's contents, by group: a task's name (its record and
    its paths), or the task a path belongs to that has no record (the root)."""
    paths: dict[str, dict[str, Any]] = {}
    for path in system.paths.values():
        paths.setdefault(path.task, {})[path.id] = path_record(path)
    return {
        group: {"task": _task_record(system.tasks[group]) if group in system.tasks else None,
                "paths": paths.get(group, {})}
        for group in system.tasks.keys() | paths.keys()
    }


def _manifest(system: System, extra: Mapping[str, Any], records: Mapping[str, str]) -> dict[str, Any]:
    """The manifest of format 2: everything but what the record files hold."""
    return {
        "format": FORMAT_VERSION,
        "config": dataclasses.asdict(system.config),
        "root_path_id": system.root_path_id,
        "root_description": system.root_description,
        "next_id": system.next_id,
        "id_prefix": system.id_prefix,
        "components": {
            **{cid: dict(d.meta) for cid, d in system.damaged.items()},
            **{
                c.id: {
                    "name": c.name, "origin": c.origin, "trained": c.trained, "locked_by": sorted(c.locked_by),
                    "content_hash": c.content_hash,
                }
                for c in system.components.values()
            },
        },
        "best": {**system.damaged_best, **system.best},
        "populations": {t: list(ids) for t, ids in system.populations.items()},
        "records": dict(records),
        "extra": dict(extra),
    }


class Store:
    """What one process knows of a state directory's checkpoints, so that a
    save costs what changed rather than the whole system (issue 12):

    - the components on disk it wrote or verified on restore (id -> content
      hash), trusted from then on: their directories are not read again;
    - the component ids each retained manifest step references, so that
      retention reads an old manifest at most once per process;
    - whether it has swept the components directory once for directories no
      step references (left by a killed process); after that sweep, only the
      components of steps that retention drops and of saves that failed are
      candidates for deletion.

    Integrity is checked where it matters, on restore (`read_component`)."""

    def __init__(self, state_dir: str):
        self.state_dir = os.path.abspath(state_dir)
        self.written: dict[str, str] = {}
        self.referenced: dict[int, frozenset[str]] = {}
        self.uncommitted: set[str] = set()  # written by a save that has not committed
        self.swept = False
        # Record files: each group's last record and its hash (a save writes
        # the groups whose record changed), the hashes known on disk, those
        # each retained step names, and those written but not committed.
        self.records: dict[str, tuple[dict[str, Any], str]] = {}
        self.record_files: set[str] = set()
        self.referenced_records: dict[int, frozenset[str]] = {}
        self.uncommitted_records: set[str] = set()


def save(
    system: System, state_dir: str, *, extra: Mapping[str, Any] | None = None, store: Store | None = None
) -> Written:
    """Writes new components, then commits a manifest step; returns the step.

    With a `store` (one per state directory and process, e.g. the engine's),
    components it already knows are not looked at again. Raises StorageError
    when the state directory cannot be written; the previous step then stays
    the newest."""
    store = store or Store(state_dir)
    try:
        new = []
        for component in system.components.values():
            if store.written.get(component.id) == component.content_hash:
                continue
            store.written.pop(component.id, None)
            if write_component(state_dir, component):
                new.append(component.id)
                store.uncommitted.add(component.id)
            store.written[component.id] = component.content_hash
        hashes, new_records = _write_records(system, state_dir, store)
        manifest = _manifest(system, extra or {}, hashes)
        manager = _manager(state_dir)
        step = (manager.latest_step() or 0) + 1
        manager.save(step, args=ocp.args.Composite(manifest=ocp.args.JsonSave(manifest)))
        manager.wait_until_finished()
        store.referenced[step] = frozenset(manifest["components"])
        store.referenced_records[step] = frozenset(manifest["records"].values())
        _collect_component_files(store, manager)
        manager.close()
    except Exception as error:
        if not isinstance(error, (OSError, ValueError, RuntimeError)) and not statedir.is_disk_full(error):
            raise
        raise storage_error(state_dir, error) from error
    return Written(step, len(new), tuple(new), tuple(f"{sha}.json" for sha in new_records))


def _write_records(system: System, state_dir: str, store: Store) -> tuple[dict[str, str], list[str]]:
    """Writes the record files of the groups whose record changed since the
    store last saw them; returns every group's record hash, and the hashes
    of the files it wrote."""
    hashes, written = {}, []
    for group, record in _records(system).items():
        known = store.records.get(group)
        if known is not None and known[0] == record and known[1] in store.record_files:
            hashes[group] = known[1]
            continue
        text, sha = _record_text(record)
        if sha not in store.record_files:
            if _write_record(state_dir, sha, text):
                store.uncommitted_records.add(sha)
                written.append(sha)
            store.record_files.add(sha)
        store.records[group] = (record, sha)
        hashes[group] = sha
    for group in store.records.keys() - hashes.keys():
        del store.records[group]
    return hashes, written


def storage_error(state_dir: str, error: BaseException) -> StorageError:
    """A StorageError with a short reason (orbax's own messages run to kilobytes)."""
    full = statedir.is_disk_full(error)
    reason = "the disk is full (no space, quota or file size limit)" if full else f"{type(error).__name__}"
    detail = str(error).split(" [", 1)[0][:200]
    return StorageError(os.path.abspath(state_dir), f"cannot write the checkpoint: {reason}: {detail}",
                        disk_full=full)


def _collect_component_files(store: Store, manager: ocp.CheckpointManager) -> None:
    """Deletes component directories and record files that no retained
    manifest references: after the first sweep of a process, only those of
    dropped steps and of failed saves are looked at."""
    retained = set(manager.all_steps())
    dropped: set[str] = set()
    dropped_records: set[str] = set()
    for step in list(store.referenced):
        if step not in retained:
            dropped |= store.referenced.pop(step)
            dropped_records |= store.referenced_records.pop(step, frozenset())
    for step in retained - store.referenced.keys():
        try:
            old = _read_manifest(manager, step)
            store.referenced[step] = frozenset(old["components"])
            store.referenced_records[step] = frozenset(old.get("records", {}).values())
        except Exception:  # an unreadable old step protects nothing
            logger.warning("manifest step %s unreadable while collecting garbage", step)
            store.referenced[step] = store.referenced_records[step] = frozenset()
    referenced = frozenset().union(*store.referenced.values())
    referenced_records = frozenset().union(*store.referenced_records.values())
    root, records = _components_dir(store.state_dir), _records_dir(store.state_dir)
    if store.swept:
        candidates = dropped | store.uncommitted
        record_candidates = {f"{sha}.json" for sha in dropped_records | store.uncommitted_records}
    else:
        candidates = set(os.listdir(root)) if os.path.isdir(root) else set()
        record_candidates = set(os.listdir(records)) if os.path.isdir(records) else set()
        store.swept = True
    store.uncommitted.clear()
    store.uncommitted_records.clear()
    for name in candidates - referenced:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        store.written.pop(name, None)
    kept = {f"{sha}.json" for sha in referenced_records}
    for name in record_candidates - kept:  # a killed write's temporary file included
        with contextlib.suppress(OSError):
            os.remove(os.path.join(records, name))
        store.record_files.discard(name.removesuffix(".json"))


def _read_manifest(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    restored = manager.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))
    return restored["manifest"]


def _reused(known: Mapping[str, Component], meta: Mapping[str, Any], component_id: str) -> Component | None:
    """A component this process already holds with the manifest's content
    (components never change), with the manifest's current locks; else None."""
    component = known.get(component_id)
    if component is None or component.content_hash != meta["content_hash"]:
        return None
    return dataclasses.replace(component, locked_by=frozenset(meta["locked_by"]), trained=meta["trained"])


def _expanded(state_dir: str, manifest: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[dict, str]]]:
    """A manifest with its tasks and paths in it (format 1's shape), and each
    group's record and hash as read (none for format 1)."""
    if manifest.get("format") == 1:
        return dict(manifest), {}
    if manifest.get("format") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"unknown manifest format {manifest.get('format')!r}")
    records = {group: (_read_record(state_dir, sha), sha) for group, sha in manifest["records"].items()}
    tasks = {group: record["task"] for group, (record, _) in records.items() if record["task"] is not None}
    paths = {pid: data for record, _ in records.values() for pid, data in record["paths"].items()}
    return {**manifest, "tasks": tasks, "paths": paths}, records


def _system_from_manifest(
    state_dir: str, manifest: Mapping[str, Any], known: Mapping[str, Component] | None = None,
) -> System:
    config_dict = dict(manifest["config"])
    config_dict["size"] = ViTSize(**config_dict["size"])
    config_dict["image_sizes"] = tuple(config_dict["image_sizes"])
    config = SearchConfig(**config_dict)
    components, damaged = {}, {}
    for cid, meta in manifest["components"].items():
        reused = _reused(known or {}, meta, cid)
        if reused is not None:
            components[cid] = reused
            continue
        try:
            components[cid] = read_component(state_dir, meta, cid)
        except CorruptCheckpointError as error:
            logger.error("%s", error)
            damaged[cid] = DamagedComponent(dict(meta), str(error))
    paths = {}
    for pid, data in manifest["paths"].items():
        data = dict(data)
        data["mutations"] = tuple(data["mutations"])
        paths[pid] = Path(**data)
    tasks = {
        name: TaskRecord(
            spec=spec_from_dict(r["spec"]), status=TaskStatus(r["status"]), num_classes=r["num_classes"],
            class_names=tuple(r["class_names"]), message=r["message"],
            probes=tuple(ParentProbe(**p) for p in r.get("probes", ())),
            examples=tuple(r["examples"]) if r.get("examples") else None,
        )
        for name, r in manifest["tasks"].items()
    }
    system = System(
        config=config, components=components, paths=paths, root_path_id=manifest["root_path_id"],
        root_description=manifest["root_description"], best=dict(manifest["best"]),
        populations={t: list(ids) for t, ids in manifest["populations"].items()}, tasks=tasks,
        next_id=manifest["next_id"], id_prefix=manifest["id_prefix"], damaged=damaged,
    )
    _set_damage(system)
    return system


def _set_damage(system: System) -> None:
    """Tasks whose served path uses a damaged component become DAMAGED (their
    path is kept aside, never served); populations lose damaged paths; a task
    restored DAMAGED whose files were repaired is READY again."""
    for task, path_id in list(system.best.items()):
        record = system.tasks[task]
        bad = system.uses_damaged(system.paths[path_id])
        if bad:
            del system.best[task]
            system.damaged_best[task] = path_id
            reason = system.damaged[bad[0]].reason
            record.status = TaskStatus.DAMAGED
            record.message = (f"{len(bad)} component(s) of its model are damaged ({reason}); "
                              "`improve` rebuilds the task, or restore the files and restart")
            logger.error("task %s is DAMAGED: %s", task, record.message)
        elif record.status == TaskStatus.DAMAGED:
            record.status, record.message = TaskStatus.READY, ""
    for task, ids in system.populations.items():
        system.populations[task] = [i for i in ids if not system.uses_damaged(system.paths[i])]
    for path in system.paths.values():
        path.inherited = {n: i for n, i in path.inherited.items() if i not in system.damaged}


def latest_step(state_dir: str) -> int | None:
    """The newest committed manifest step, read without writing anything;
    None when there is none."""
    if not os.path.isdir(os.path.join(state_dir, "manifest")):
        return None
    manager = _manager(state_dir, read_only=True)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def restore(
    state_dir: str, *, read_only: bool = False, known: Mapping[str, Component] | None = None,
) -> Restored | None:
    """The newest complete, intact step; None when there is none at all.

    `read_only` (a serving replica following another process's saves)
    writes nothing under the state directory. Components in `known` (by id,
    with equal content hashes) are taken as they are instead of read again.
    Raises CorruptCheckpointError when steps exist but none is intact.
    """
    if not os.path.isdir(os.path.join(state_dir, "manifest")):
        return None
    manager = _manager(state_dir, read_only=read_only)
    steps = sorted(manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
        try:
            manifest, records = _expanded(state_dir, _read_manifest(manager, step))
            system = _system_from_manifest(state_dir, manifest, known)
        except Exception as error:
            logger.error("checkpoint step %s is unusable (%s); trying the previous one", step, error)
            errors.append(f"step {step}: {error}")
            continue
        manager.close()
        if read_only:
            return Restored(system, step, dict(manifest.get("extra", {})))
        store = Store(state_dir)
        store.written = {cid: component.content_hash for cid, component in system.components.items()}
        store.referenced[step] = frozenset(manifest["components"])
        store.records = records
        store.record_files = {sha for _, sha in records.values()}
        store.referenced_records[step] = frozenset(store.record_files)
        return Restored(system, step, dict(manifest.get("extra", {})), store)
    manager.close()
    if not steps:
        return None
    raise CorruptCheckpointError("no intact checkpoint step: " + "; ".join(errors))
