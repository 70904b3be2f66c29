"""Orbax save/restore of the whole System (DESIGN.md §7).

Layout under the state directory:
  components/<pack>/ one orbax checkpoint per save that created components
                     (a pack): {component id: {params, momentum}}, written
                     once and named by the hash of its members' ids and
                     content hashes; components never change after they are
                     created. A pack whose live members fall below half of
                     what it holds is compacted: the next save writes the
                     live ones into its own pack and retention drops the
                     old one. (Format 2 wrote one directory per component,
                     components/<id>/; those are still read.)
  records/<sha>.json one JSON file per task, written once and named by the
                     SHA-256 of its contents: the task's record (spec,
                     status, classes, probes), its paths (components,
                     hyperparameters with the learned mu values, scores) and
                     the entries of the components it created (content hash,
                     pack); the root has a record of its own, and so do the
                     components of a deleted task that others still use.
                     Locks are not stored: they follow from the served paths;
  manifest/<step>/   an orbax CheckpointManager step holding a JSON manifest
                     (populations, served paths, configuration, the packs in
                     use, each task's record file, and the caller's `extra`
                     state): a few dozen bytes a task.
A save writes the records of the tasks that changed, and a manifest that
names every record (issue 12: a save costs what changed, not the system).
The manifest is committed last and atomically, so a step is complete or
absent; a record it names that is missing or fails its hash makes the step
unusable, as an unreadable manifest does. Manifests of formats 1
(everything in the manifest) and 2 (a directory per component) are still
restored. Restore takes the newest step whose
manifest reads, and checks every component against its content hash. A missing or corrupt component takes down
only the tasks whose served path uses it: they are restored DAMAGED (never
silently rolled back to an older step), everything else serves, and the
damaged component's entry is saved on, so repairing its files and restarting
brings the task back; `improve` rebuilds it instead. Only an unreadable
manifest makes restore fall back to the previous step.

A save that cannot write (disk full, quota, file size limit, I/O error) raises
StorageError naming the state directory, and commits nothing.

Each pack records its members' content hashes (orbax custom metadata). A
process killed after writing a pack but before committing its manifest leaves
a directory that no step references, and the restarted process hands out the
same ids again (they continue from the last committed step) to components
with other contents: their pack has another name, and the first save of the
restarted process deletes the stale one. A pack is only taken as written when
its metadata names exactly the members and hashes being saved.
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
from typing import Any, Mapping, Sequence

import numpy as np
import orbax.checkpoint as ocp

from evolve.config import SearchConfig
from evolve import statedir
from evolve.errors import CorruptCheckpointError, StorageError
from evolve.system import DamagedComponent, System, TaskRecord, TaskStatus
from evolve.types import (
    ROOT_TASK, Component, ParentProbe, Path, TaskSpec, ViTSize, params_hash, spec_from_dict, spec_to_dict,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 1: tasks and paths in the manifest; 2: a directory per component (both still restored)
RESTORABLE_FORMATS = (1, 2, 3)
KEEP_MANIFESTS = 5
RECORDS = "records"
HASH_KEY = "content_hash"  # in a format-2 component directory's orbax custom metadata
PACK_HASHES_KEY = "content_hashes"  # in a pack's: {component id: content hash}


@dataclasses.dataclass(frozen=True)
class Written:
    step: int
    new_components: int
    component_ids: tuple[str, ...] = ()  # the components this save wrote (new, or moved by compaction)
    packs: tuple[str, ...] = ()  # the component directories (under components/) it wrote
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


def pack_members(directory: str) -> dict[str, str] | None:
    """What a complete pack directory holds (component id -> content hash);
    None when it is incomplete, unreadable or not a pack."""
    try:
        with open(os.path.join(directory, "_CHECKPOINT_METADATA"), encoding="utf-8") as handle:
            custom = json.load(handle).get("custom_metadata") or {}
    except (OSError, ValueError, AttributeError):
        return None
    hashes = custom.get(PACK_HASHES_KEY) if isinstance(custom, dict) else None
    return {str(k): str(v) for k, v in hashes.items()} if isinstance(hashes, dict) else None


def pack_name(components: Sequence[Component]) -> str:
    """A pack's directory name: the hash of its members' ids and contents, so
    that a directory left under that name by a killed process holds exactly
    these components."""
    members = "\n".join(sorted(f"{c.id}:{c.content_hash}" for c in components))
    return "p" + hashlib.sha256(members.encode("utf-8")).hexdigest()[:16]


def write_pack(state_dir: str, components: Sequence[Component]) -> tuple[str, bool]:
    """Writes one orbax checkpoint holding `components`, unless its directory
    already holds exactly them; returns (its name, whether it wrote)."""
    name = pack_name(components)
    directory = os.path.join(_components_dir(state_dir), name)
    expected = {c.id: c.content_hash for c in components}
    if os.path.isdir(directory) and pack_members(directory) == expected:
        return name, False
    if os.path.exists(directory):  # a write killed halfway
        logger.info("replacing component pack %s left by an interrupted checkpoint", name)
        shutil.rmtree(directory)
    tree = {}
    for component in components:
        tree[component.id] = {"params": component.params}
        if component.momentum is not None:
            tree[component.id]["momentum"] = component.momentum
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, tree, custom_metadata={PACK_HASHES_KEY: expected})
    checkpointer.wait_until_finished()
    return name, True


def read_pack(state_dir: str, pack: str) -> dict[str, Any]:
    """Every member's tree ({"params", "momentum"?}) of a component directory,
    by component id: a pack, or a format-2 directory of one component (named
    by its id). Raises CorruptCheckpointError when it cannot be read."""
    directory = os.path.join(_components_dir(state_dir), pack)
    if not _is_complete(directory):
        raise CorruptCheckpointError(f"is missing from {directory}")
    try:
        tree = ocp.StandardCheckpointer().restore(directory)
    except Exception as error:  # orbax raises many kinds on damaged files
        raise CorruptCheckpointError(f"cannot be read from {pack}: {error}") from error
    return {pack: tree} if "params" in tree else dict(tree)


def component_from(tree: Mapping[str, Any] | None, meta: Mapping[str, Any], component_id: str) -> Component:
    """A component from its stored tree (None: absent from its pack), its
    contents checked against the manifest's hash."""
    if tree is None:
        raise CorruptCheckpointError(f"component {component_id} is missing from its pack {location(component_id, meta)}")
    params = _to_numpy(tree["params"])
    if params_hash(params) != meta["content_hash"]:
        raise CorruptCheckpointError(f"component {component_id} fails its content hash")
    momentum = _to_numpy(tree["momentum"]) if "momentum" in tree else None
    return Component(
        id=component_id, name=meta["name"], params=params, origin=meta["origin"], trained=meta["trained"],
        locked_by=frozenset(meta["locked_by"]), momentum=momentum, content_hash=meta["content_hash"],
    )


def location(component_id: str, meta: Mapping[str, Any]) -> str:
    """The directory under components/ that holds a component: its pack, or
    (format 2) its own."""
    return str(meta.get("pack") or component_id)


def read_manifest(state_dir: str, step: int | None = None) -> dict[str, Any]:
    """A committed step's manifest as stored (the newest by default), read
    without writing anything."""
    manager = _manager(state_dir, read_only=True)
    try:
        return _read_manifest(manager, manager.latest_step() if step is None else step)
    finally:
        manager.close()


def component_directory(state_dir: str, component_id: str) -> str:
    """Where the newest committed step keeps a component (for operators and
    tests that inspect or damage it on purpose)."""
    manifest, _ = _expanded(state_dir, read_manifest(state_dir))
    return os.path.join(_components_dir(state_dir), location(component_id, manifest["components"][component_id]))


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


def _component_entries(system: System, packs: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Each component's stored entry (a damaged one's as restored). Locks
    are not stored: they follow from the served paths (`derived_locks`)."""
    entries = {cid: {k: v for k, v in d.meta.items() if k != "locked_by"} for cid, d in system.damaged.items()}
    for c in system.components.values():
        entries[c.id] = {"name": c.name, "origin": c.origin, "trained": c.trained,
                         "content_hash": c.content_hash, "pack": packs[c.id]}
    return entries


def _records(system: System, packs: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Each record file's contents, by group: a task's name (its record, its
    paths and the entries of the components it created), or a name without
    a task record (the root, or a deleted task whose components live on in
    other tasks' paths)."""
    paths: dict[str, dict[str, Any]] = {}
    for path in system.paths.values():
        paths.setdefault(path.task, {})[path.id] = path_record(path)
    components: dict[str, dict[str, Any]] = {}
    for cid, entry in _component_entries(system, packs).items():
        components.setdefault(entry["origin"], {})[cid] = entry
    return {
        group: {"task": _task_record(system.tasks[group]) if group in system.tasks else None,
                "paths": paths.get(group, {}), "components": components.get(group, {})}
        for group in system.tasks.keys() | paths.keys() | components.keys()
    }


def derived_locks(best: Mapping[str, str], paths: Mapping[str, Mapping[str, Any]], root_path_id: str,
                  ) -> dict[str, set[str]]:
    """component id -> the tasks whose served (or damaged) path uses it, and
    ROOT_TASK for the root's: what `System.lock`/`unlock` maintain, rebuilt
    on restore instead of stored (a stored lock list grows with every task
    that shares a component, and would make a save O(tasks))."""
    locks: dict[str, set[str]] = {}
    for cid in paths[root_path_id]["components"].values():
        locks.setdefault(cid, set()).add(ROOT_TASK)
    for task, path_id in best.items():
        for cid in paths[path_id]["components"].values():
            locks.setdefault(cid, set()).add(task)
    return locks


def _manifest(
    system: System, extra: Mapping[str, Any], records: Mapping[str, str], packs: Mapping[str, str],
) -> dict[str, Any]:
    """The manifest: everything but what the record files and packs hold,
    with the component directories its components are in (for retention)."""
    return {
        "format": FORMAT_VERSION,
        "config": dataclasses.asdict(system.config),
        "root_path_id": system.root_path_id,
        "root_description": system.root_description,
        "next_id": system.next_id,
        "id_prefix": system.id_prefix,
        "packs": sorted({packs[c] for c in system.components}
                        | {location(cid, d.meta) for cid, d in system.damaged.items()}),
        "best": {**system.damaged_best, **system.best},
        "populations": {t: list(ids) for t, ids in system.populations.items()},
        "records": dict(records),
        "extra": dict(extra),
    }


class Store:
    """What one process knows of a state directory's checkpoints, so that a
    save costs what changed rather than the whole system (issue 12):

    - the components on disk it wrote or verified on restore (id -> content
      hash, and the pack holding each), trusted from then on: their
      directories are not read again;
    - what each pack it wrote or read holds, to compact packs most of whose
      members are gone;
    - the packs each retained manifest step references, so that retention
      reads an old manifest at most once per process;
    - whether it has swept the components directory once for directories no
      step references (left by a killed process); after that sweep, only the
      components of steps that retention drops and of saves that failed are
      candidates for deletion.

    Integrity is checked where it matters, on restore (`component_from`)."""

    def __init__(self, state_dir: str):
        self.state_dir = os.path.abspath(state_dir)
        self.written: dict[str, str] = {}
        self.packs: dict[str, str] = {}  # component id -> the directory under components/ holding it
        self.members: dict[str, frozenset[str]] = {}  # pack -> every component id it holds
        self.referenced: dict[int, frozenset[str]] = {}  # step -> the packs its manifest names
        self.uncommitted: set[str] = set()  # packs written by a save that has not committed
        self.adopted = False  # whether the packs already on disk were looked at (restore does it)
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
        if not store.adopted:
            _adopt(store, system)
        pending = _to_pack(system, store)
        pack, wrote = None, False
        if pending:
            store.uncommitted.add(pack_name(pending))  # collected unless a manifest names it, even half-written
            pack, wrote = write_pack(state_dir, pending)
            store.members[pack] = frozenset(c.id for c in pending)
        for component in pending:
            store.written[component.id] = component.content_hash
            store.packs[component.id] = pack
        packs = {cid: store.packs.get(cid, cid) for cid in system.components}
        hashes, new_records = _write_records(system, state_dir, store, packs)
        manifest = _manifest(system, extra or {}, hashes, packs)
        manager = _manager(state_dir)
        step = (manager.latest_step() or 0) + 1
        manager.save(step, args=ocp.args.Composite(manifest=ocp.args.JsonSave(manifest)))
        manager.wait_until_finished()
        store.referenced[step] = _packs_named(manifest)
        store.referenced_records[step] = frozenset(manifest["records"].values())
        _collect_component_files(store, manager)
        manager.close()
    except Exception as error:
        if not isinstance(error, (OSError, ValueError, RuntimeError)) and not statedir.is_disk_full(error):
            raise
        raise storage_error(state_dir, error) from error
    moved = tuple(c.id for c in pending)
    return Written(step, len(moved), moved, (pack,) if wrote else (), tuple(f"{sha}.json" for sha in new_records))


def _adopt(store: Store, system: System) -> None:
    """A store that did not come from restore takes the components the
    directories on disk already hold with the same contents (by their
    recorded hashes) as written: one metadata read per directory, once."""
    store.adopted = True
    root = _components_dir(store.state_dir)
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        directory = os.path.join(root, name)
        members = pack_members(directory)
        if members is None:  # a format-2 directory of one component
            component = system.components.get(name)
            if component is None or _stored_hash(directory) not in ("", component.content_hash):
                continue
            members = {name: component.content_hash}
        store.members[name] = frozenset(members)
        for cid, content_hash in members.items():
            component = system.components.get(cid)
            if component is not None and component.content_hash == content_hash and cid not in store.written:
                store.written[cid], store.packs[cid] = content_hash, name


def _stored_hash(directory: str) -> str | None:
    """The content hash a format-2 component directory was written with
    ("" when written before hashes were recorded; None when unreadable)."""
    try:
        with open(os.path.join(directory, "_CHECKPOINT_METADATA"), encoding="utf-8") as handle:
            custom = json.load(handle).get("custom_metadata") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return str(custom.get(HASH_KEY, "")) if isinstance(custom, dict) else None


def _to_pack(system: System, store: Store) -> list[Component]:
    """The components the next pack holds: those the store has not seen
    written with this content, and the live members of packs that hold more
    dead members than live ones (compaction, so that dead components do not
    keep their disk space for ever)."""
    pending = {c.id: c for c in system.components.values() if store.written.get(c.id) != c.content_hash}
    live_by_pack: dict[str, list[str]] = {}
    for cid in system.components:
        if cid not in pending and cid in store.packs:
            live_by_pack.setdefault(store.packs[cid], []).append(cid)
    for pack, live in live_by_pack.items():
        members = store.members.get(pack)
        if members is not None and 2 * len(live) < len(members):
            pending.update((cid, system.components[cid]) for cid in live)
    return list(pending.values())


def _packs_named(manifest: Mapping[str, Any]) -> frozenset[str]:
    """The component directories a manifest references (damaged ones too)."""
    if "packs" in manifest:
        return frozenset(manifest["packs"])
    return frozenset(location(cid, meta) for cid, meta in manifest["components"].items())


def _write_records(
    system: System, state_dir: str, store: Store, packs: Mapping[str, str],
) -> tuple[dict[str, str], list[str]]:
    """Writes the record files of the groups whose record changed since the
    store last saw them; returns every group's record hash, and the hashes
    of the files it wrote."""
    hashes, written = {}, []
    for group, record in _records(system, packs).items():
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
            store.referenced[step] = _packs_named(old)
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
        for cid in store.members.pop(name, None) or (name,):  # a format-2 directory is named by its component
            if store.packs.get(cid) == name:
                del store.packs[cid]
                store.written.pop(cid, None)
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
    if manifest.get("format") not in RESTORABLE_FORMATS:
        raise CorruptCheckpointError(f"unknown manifest format {manifest.get('format')!r}")
    records = {group: (_read_record(state_dir, sha), sha) for group, sha in manifest["records"].items()}
    tasks = {group: record["task"] for group, (record, _) in records.items() if record["task"] is not None}
    paths = {pid: data for record, _ in records.values() for pid, data in record["paths"].items()}
    components = dict(manifest.get("components", {}))  # format 2's place for them
    for record, _ in records.values():
        components.update(record.get("components", {}))
    return {**manifest, "tasks": tasks, "paths": paths, "components": components}, records


def _read_components(
    state_dir: str, metas: Mapping[str, Mapping[str, Any]], known: Mapping[str, Component],
) -> tuple[dict[str, Component], dict[str, DamagedComponent], dict[str, frozenset[str]]]:
    """(the components, the damaged ones, what each pack read holds): each
    pack that holds a component not in `known` is read once; a pack that
    cannot be read damages every component it holds."""
    components, damaged, members = {}, {}, {}
    by_pack: dict[str, list[str]] = {}
    for cid, meta in metas.items():
        reused = _reused(known, meta, cid)
        if reused is not None:
            components[cid] = reused
        else:
            by_pack.setdefault(location(cid, meta), []).append(cid)
    for pack, cids in by_pack.items():
        try:
            trees = read_pack(state_dir, pack)
        except CorruptCheckpointError as error:
            trees, failure = None, error
        else:
            members[pack] = frozenset(trees)
        for cid in cids:
            try:
                if trees is None:
                    raise CorruptCheckpointError(f"component {cid} {failure}")
                components[cid] = component_from(trees.get(cid), metas[cid], cid)
            except CorruptCheckpointError as error:
                logger.error("%s", error)
                damaged[cid] = DamagedComponent(dict(metas[cid]), str(error))
        del trees  # the pack's dead members go with it
    return components, damaged, members


def _system_from_manifest(
    state_dir: str, manifest: Mapping[str, Any], known: Mapping[str, Component] | None = None,
) -> tuple[System, dict[str, frozenset[str]]]:
    """The system a manifest describes, and what each pack read holds."""
    config_dict = dict(manifest["config"])
    config_dict["size"] = ViTSize(**config_dict["size"])
    config_dict["image_sizes"] = tuple(config_dict["image_sizes"])
    config = SearchConfig(**config_dict)
    locks = derived_locks(manifest["best"], manifest["paths"], manifest["root_path_id"])
    metas = {cid: meta if "locked_by" in meta else {**meta, "locked_by": sorted(locks.get(cid, ()))}
             for cid, meta in manifest["components"].items()}
    components, damaged, members = _read_components(state_dir, metas, known or {})
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
    return system, members


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
            system, members = _system_from_manifest(state_dir, manifest, known)
        except Exception as error:
            logger.error("checkpoint step %s is unusable (%s); trying the previous one", step, error)
            errors.append(f"step {step}: {error}")
            continue
        manager.close()
        if read_only:
            return Restored(system, step, dict(manifest.get("extra", {})))
        store = Store(state_dir)
        store.written = {cid: component.content_hash for cid, component in system.components.items()}
        store.packs = {cid: location(cid, manifest["components"][cid]) for cid in system.components}
        store.members = members
        store.adopted = True
        store.referenced[step] = _packs_named(manifest)
        store.records = records
        store.record_files = {sha for _, sha in records.values()}
        store.referenced_records[step] = frozenset(store.record_files)
        return Restored(system, step, dict(manifest.get("extra", {})), store)
    manager.close()
    if not steps:
        return None
    raise CorruptCheckpointError("no intact checkpoint step: " + "; ".join(errors))
