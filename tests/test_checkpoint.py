"""Checkpoints: incremental component writes, atomic manifests, integrity
checks (damaged components make their tasks DAMAGED; unreadable manifests
fall back to the previous step), retention, and file GC."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from evolve import checkpoint
from evolve.engine import Engine
from evolve.errors import CorruptCheckpointError
from evolve.types import BundledSource, TaskSpec
from tests.conftest import tiny_config


def _component_dirs(state_dir) -> set[str]:
    return set(os.listdir(os.path.join(state_dir, "components")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    state_dir = str(tmp_path_factory.mktemp("ckpt"))
    engine = Engine.create(tiny_config(generations=1), state_dir=state_dir)
    engine.save()
    engine.add_task(TaskSpec("digits", BundledSource("digits")))
    engine.run_search("digits")
    return engine, state_dir


def test_only_new_components_are_written(trained):
    engine, state_dir = trained
    before = {d: os.path.getmtime(os.path.join(state_dir, "components", d)) for d in _component_dirs(state_dir)}
    written = checkpoint.save(engine.system, state_dir)
    assert written.new_components == 0
    after = {d: os.path.getmtime(os.path.join(state_dir, "components", d)) for d in _component_dirs(state_dir)}
    assert before == after


def test_roundtrip_restores_everything(trained):
    engine, state_dir = trained
    restored = checkpoint.restore(state_dir).system
    assert restored.best == engine.system.best
    assert restored.tasks.keys() == engine.system.tasks.keys()
    assert set(restored.components) == set(engine.system.components)
    for cid, component in engine.system.components.items():
        assert restored.components[cid].content_hash == component.content_hash
        assert restored.components[cid].locked_by == component.locked_by
    path = engine.system.best_path("digits")
    assert restored.paths[path.id].hparams == path.hparams  # learned mu values included
    assert restored.config == engine.system.config
    assert restored.paths == engine.system.paths  # every field of every path


def test_a_path_record_is_what_asdict_would_store(trained):
    engine, _ = trained
    for path in engine.system.paths.values():
        assert json.loads(json.dumps(checkpoint.path_record(path))) == json.loads(
            json.dumps(dataclasses.asdict(path)))


def _damage(path: str) -> None:
    """Flips bytes in every data file under a component directory."""
    for directory, _, files in os.walk(path):
        for name in files:
            if name.startswith("_") or name.endswith(".json"):
                continue
            with open(os.path.join(directory, name), "r+b") as handle:
                data = bytearray(handle.read())
                for i in range(0, len(data), 7):
                    data[i] ^= 0xFF
                handle.seek(0)
                handle.write(data)


@pytest.mark.parametrize("how", ["deleted", "corrupt"])
def test_a_damaged_component_marks_its_task_damaged_in_the_newest_step(trained, tmp_path, how):
    """No silent rollback to an older step: the newest manifest is restored,
    the task whose path uses the component is DAMAGED and serves nothing,
    the damage survives a save, and repairing the files brings it back."""
    engine, state_dir = trained
    import shutil

    from evolve.system import TaskStatus

    copy = str(tmp_path / "copy")
    shutil.copytree(state_dir, copy)
    latest = checkpoint.restore(copy).step
    head_id = engine.system.best_path("digits").components["head"]
    head_dir = checkpoint.component_directory(copy, head_id)  # its pack: what the search's save wrote
    pack_members = set(checkpoint.pack_members(head_dir))
    backup = str(tmp_path / "backup")
    shutil.copytree(head_dir, backup)
    if how == "deleted":
        shutil.rmtree(head_dir)
    else:
        _damage(head_dir)
    restored = checkpoint.restore(copy)
    assert restored.step == latest
    system = restored.system
    assert system.tasks["digits"].status == TaskStatus.DAMAGED
    assert head_id in system.tasks["digits"].message or "damaged" in system.tasks["digits"].message
    assert "digits" not in system.best and system.damaged_best["digits"] == engine.system.best["digits"]
    assert head_id in system.damaged and set(system.damaged) <= pack_members
    assert all(task == "digits" for c in system.damaged.values() for task in c.meta["locked_by"])
    assert system.uses_damaged(system.root_path) == []
    # A save keeps the damaged entry (and the task's path) for a later repair.
    checkpoint.save(system, copy)
    if how == "corrupt":
        shutil.rmtree(head_dir)
    shutil.copytree(backup, head_dir)
    repaired = checkpoint.restore(copy).system
    assert repaired.tasks["digits"].status == TaskStatus.READY
    assert repaired.best == engine.system.best and not repaired.damaged


def test_unreadable_manifests_fall_back_then_fail_clearly(trained, tmp_path):
    engine, state_dir = trained
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(state_dir, copy)
    manifests = os.path.join(copy, "manifest")
    steps = sorted((int(s) for s in os.listdir(manifests) if s.isdigit()), reverse=True)
    assert len(steps) >= 2
    for directory, _, files in os.walk(os.path.join(manifests, str(steps[0]))):
        for name in files:
            with open(os.path.join(directory, name), "w") as handle:
                handle.write("{not json")
    assert checkpoint.restore(copy).step == steps[1]
    for step in steps[1:]:
        shutil.rmtree(os.path.join(manifests, str(step), "manifest"))
    with pytest.raises(CorruptCheckpointError):
        checkpoint.restore(copy)


def test_every_component_gone_restores_damaged_and_refuses_searches(trained, tmp_path):
    engine, state_dir = trained
    import shutil

    from evolve.errors import FailedPreconditionError

    copy = str(tmp_path / "copy")
    shutil.copytree(state_dir, copy)
    for name in os.listdir(os.path.join(copy, "components")):
        shutil.rmtree(os.path.join(copy, "components", name))
    restored = Engine.restore(copy)
    assert restored.system.tasks["digits"].status.value == "DAMAGED"
    with pytest.raises(FailedPreconditionError, match="root"):
        restored.run_search("digits")


def test_retention_and_file_gc(tmp_path):
    state_dir = str(tmp_path)
    engine = Engine.create(tiny_config(generations=1, candidates_per_generation=1), state_dir=state_dir)
    engine.add_task(TaskSpec("digits", BundledSource("digits")))
    engine.run_search("digits")
    first_path = engine.system.best_path("digits")
    replaced = {cid for name, cid in first_path.components.items()}
    for _ in range(checkpoint.KEEP_MANIFESTS + 1):
        engine.save()
    steps = sorted(int(s) for s in os.listdir(os.path.join(state_dir, "manifest")) if s.isdigit())
    assert len(steps) == checkpoint.KEEP_MANIFESTS
    # Every pack a retained manifest references is on disk, nothing else.
    live = set(engine.system.components)
    assert _component_dirs(state_dir) == _packs_of(engine, live)
    assert replaced & live  # still referenced: still stored
    # Drop the task's path from memory as a replacement would, then save enough steps.
    engine.system.best.pop("digits")
    engine.system.populations.pop("digits")
    engine.system.unlock("digits", keep=None)
    engine.system.collect_garbage()
    for _ in range(checkpoint.KEEP_MANIFESTS):
        engine.save()
    live = set(engine.system.components)
    assert replaced - live
    assert _component_dirs(state_dir) == _packs_of(engine, live)
    # No pack on disk is mostly dead components (compaction), and the survivors restore.
    for pack in _component_dirs(state_dir):
        members = set(checkpoint.pack_members(os.path.join(state_dir, "components", pack)))
        assert 2 * len(members & live) >= len(members), (pack, len(members), len(members & live))
    restored = checkpoint.restore(state_dir).system
    assert set(restored.components) == live and not restored.damaged


def _packs_of(engine, component_ids) -> set[str]:
    return {engine._store.packs[cid] for cid in component_ids}


def test_component_dir_left_by_a_crash_under_a_reused_id_is_replaced(tmp_path):
    """A killed process may leave a complete component pack that no manifest
    references; ids restart from the last manifest, so a new component can
    get that id with other contents. Its pack has another name, and a
    directory under the new pack's name that holds anything else (a write
    killed halfway) is rewritten, never taken for the new component."""
    import shutil

    from evolve.types import Component

    state_dir = str(tmp_path)
    stale = Component("c999999", "head", {"kernel": np.zeros((2, 2), np.float32)}, origin="t")
    fresh = Component("c999999", "head", {"kernel": np.ones((2, 2), np.float32)}, origin="t")
    stale_pack, wrote = checkpoint.write_pack(state_dir, [stale])
    assert wrote and checkpoint.pack_name([fresh]) != stale_pack
    shutil.copytree(os.path.join(state_dir, "components", stale_pack),
                    os.path.join(state_dir, "components", checkpoint.pack_name([fresh])))
    assert checkpoint.write_pack(state_dir, [fresh]) == (checkpoint.pack_name([fresh]), True)  # other contents
    assert checkpoint.write_pack(state_dir, [fresh])[1] is False  # the same contents: kept
    meta = {"name": "head", "origin": "t", "trained": True, "locked_by": [], "content_hash": fresh.content_hash}
    trees = checkpoint.read_pack(state_dir, checkpoint.pack_name([fresh]))
    restored = checkpoint.component_from(trees["c999999"], meta, "c999999")
    np.testing.assert_array_equal(restored.params["kernel"], np.ones((2, 2), np.float32))
    with pytest.raises(CorruptCheckpointError, match="content hash"):
        checkpoint.component_from(checkpoint.read_pack(state_dir, stale_pack)["c999999"], meta, "c999999")


def _spy(monkeypatch, name: str) -> list:
    """Counts calls to checkpoint.<name> (the real function still runs)."""
    calls: list = []
    real = getattr(checkpoint, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, name, counted)
    return calls


def test_saves_after_restore_cost_what_changed(trained, tmp_path, monkeypatch):
    """Issue 12: restore verifies every component once; the saves that follow
    look at no component they know and read each old manifest at most once."""
    import shutil

    from evolve.types import Component

    engine, state_dir = trained
    copy = str(tmp_path / "state")
    shutil.copytree(state_dir, copy)
    restored = Engine.restore(copy)
    stored_hash, manifests = _spy(monkeypatch, "pack_members"), _spy(monkeypatch, "_read_manifest")
    restored.save()
    assert stored_hash == []
    retained = len([s for s in os.listdir(os.path.join(copy, "manifest")) if s.isdigit()])
    assert len(manifests) <= retained - 2  # neither the restored step nor the new one
    manifests.clear()
    restored.save()
    assert stored_hash == [] and manifests == []
    new = Component(restored.system.new_id("c"), "head", {"kernel": np.ones((2, 3), np.float32)}, origin="x")
    restored.system.components[new.id] = new
    written = checkpoint.save(restored.system, copy, store=restored._store)
    assert written.component_ids == (new.id,) and stored_hash == [] and manifests == []
    # What a store trusts is still verified on the next restore.
    assert set(checkpoint.restore(copy).system.components) == set(restored.system.components)


def test_a_failed_saves_components_are_collected_by_the_next_save(tmp_path, monkeypatch):
    """Components written by a save whose manifest never committed, and then
    dropped (the engine undoes a failed save), leave no directory behind."""
    import orbax.checkpoint as ocp

    from evolve.errors import StorageError
    from evolve.types import Component

    state_dir = str(tmp_path)
    engine = Engine.create(tiny_config(generations=1), state_dir=state_dir)
    engine.save()
    orphan = Component(engine.system.new_id("c"), "head", {"kernel": np.ones((2, 3), np.float32)}, origin="x")
    engine.system.components[orphan.id] = orphan
    real_save = ocp.CheckpointManager.save

    def failing_save(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    with pytest.raises(StorageError):
        engine.save()
    assert checkpoint.pack_name([orphan]) in _component_dirs(state_dir)  # written before the commit failed
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    del engine.system.components[orphan.id]
    engine.save()
    assert checkpoint.pack_name([orphan]) not in _component_dirs(state_dir)
    assert _component_dirs(state_dir) == {engine._store.packs[cid] for cid in engine.system.components}


def test_a_failing_checkpoint_listener_never_fails_or_undoes_a_save(tmp_path):
    """Engine.on_checkpoint (the metrics) is told of every write; when it
    raises, the committed step stands and the save returns it."""
    engine = Engine.create(tiny_config(generations=1), state_dir=str(tmp_path))
    told = []

    def listener(written, seconds):
        told.append(written.step)
        raise RuntimeError("metrics broke")

    engine.on_checkpoint = listener
    step = engine.save()
    assert told == [step] and engine.checkpoint_step == step
    assert checkpoint.restore(str(tmp_path)).step == step
