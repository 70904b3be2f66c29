"""Component packs (checkpoint format 3, issue 12): a save writes the
components it creates as one orbax checkpoint, restore reads each pack once,
packs mostly dead are compacted, and state directories of formats 1 and 2
(one directory per component) restore and carry on."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from evolve import checkpoint
from evolve.engine import Engine
from tests.conftest import tiny_config
from tests.test_engine_device_sharing import _add_task_with_own_head


def _dirs(state_dir: str) -> set[str]:
    return set(os.listdir(os.path.join(state_dir, "components")))


@pytest.fixture
def engine(tmp_path):
    engine = Engine.create(tiny_config(), state_dir=str(tmp_path / "state"))
    engine.save()
    for seed, name in enumerate(("a", "b", "c")):
        _add_task_with_own_head(engine, name, seed)
        engine.refresh_views()
        engine.save()  # a pack per task
    return engine


def test_a_save_writes_its_new_components_as_one_pack_and_restore_reads_each_pack_once(engine, monkeypatch):
    state_dir = engine.state_dir
    before = _dirs(state_dir)
    _add_task_with_own_head(engine, "d", 7)
    engine.refresh_views()
    new = set(engine.system.components) - set(engine._store.packs)
    written = checkpoint.save(engine.system, state_dir, store=engine._store)
    assert set(written.component_ids) == new and len(written.packs) == 1
    assert _dirs(state_dir) == before | set(written.packs)
    members = checkpoint.pack_members(os.path.join(state_dir, "components", written.packs[0]))
    assert members == {cid: engine.system.components[cid].content_hash for cid in new}
    reads: list = []
    real = checkpoint.read_pack
    monkeypatch.setattr(checkpoint, "read_pack", lambda *a: reads.append(a[1]) or real(*a))
    restored = checkpoint.restore(state_dir).system
    assert sorted(reads) == sorted(_dirs(state_dir))  # one read per pack, not per component
    for cid, component in engine.system.components.items():
        assert restored.components[cid].content_hash == component.content_hash
        for got, want in zip(jax.tree_util.tree_leaves(restored.components[cid].params),
                             jax.tree_util.tree_leaves(component.params), strict=True):
            np.testing.assert_array_equal(got, want)


def _write_old_layout(state_dir: str, system, fmt: int) -> None:
    """The state directory the code of format `fmt` wrote: a directory per
    component (its hash in orbax's custom metadata), no packs in the manifest."""
    shutil.rmtree(os.path.join(state_dir, "components"))
    for component in system.components.values():
        tree = {"params": component.params}
        if component.momentum is not None:
            tree["momentum"] = component.momentum
        writer = ocp.StandardCheckpointer()
        writer.save(os.path.join(state_dir, "components", component.id), tree,
                    custom_metadata={checkpoint.HASH_KEY: component.content_hash})
        writer.wait_until_finished()
    old = checkpoint._manifest(system, {"note": f"format {fmt}"}, {}, {c: c for c in system.components})
    del old["packs"]
    old["components"] = {
        c.id: {"name": c.name, "origin": c.origin, "trained": c.trained, "locked_by": sorted(c.locked_by),
               "content_hash": c.content_hash} for c in system.components.values()}
    if fmt == 2:  # records of tasks and paths only
        for group, record in checkpoint._records(system, {c: c for c in system.components}).items():
            del record["components"]
            text, sha = checkpoint._record_text(record)
            checkpoint._write_record(state_dir, sha, text)
            old["records"][group] = sha
    old["format"] = fmt
    if fmt == 1:
        del old["records"]
        old.update(tasks={n: checkpoint._task_record(r) for n, r in system.tasks.items()},
                   paths={p.id: checkpoint.path_record(p) for p in system.paths.values()})
    manager = checkpoint._manager(state_dir)
    manager.save(manager.latest_step() + 1, args=ocp.args.Composite(manifest=ocp.args.JsonSave(old)))
    manager.wait_until_finished()
    manager.close()


@pytest.mark.parametrize("fmt", [1, 2])
def test_an_older_state_directory_restores_and_its_directories_are_kept_until_dropped(engine, fmt):
    state_dir, system = engine.state_dir, engine.system
    _write_old_layout(state_dir, system, fmt)
    old_dirs = _dirs(state_dir)
    assert old_dirs == set(system.components)
    restored = Engine.restore(state_dir)
    assert restored.restored_extra == {"note": f"format {fmt}"} and restored.tasks() == engine.tasks()
    assert not restored.system.damaged
    written = checkpoint.save(restored.system, state_dir, store=restored._store)
    assert written.packs == () and _dirs(state_dir) == old_dirs  # nothing rewritten
    assert checkpoint.read_manifest(state_dir, written.step)["format"] == checkpoint.FORMAT_VERSION
    again = Engine.restore(state_dir)
    assert again.tasks() == engine.tasks() and not again.system.damaged
    # A storeless save (a fresh process that did not restore) adopts them too.
    assert checkpoint.save(again.system, state_dir).packs == ()
    # Deleting a task drops its own directories once no kept step names them.
    head = again.system.best_path("a").components["head"]
    again.delete_task("a")
    for _ in range(checkpoint.KEEP_MANIFESTS):
        again.save()
    assert head not in _dirs(state_dir) and _dirs(state_dir) <= old_dirs
    assert Engine.restore(state_dir).tasks() == again.tasks()


def test_a_new_task_that_shares_the_root_writes_its_own_record_only_and_locks_are_rebuilt(engine):
    """Component entries live in the record of the task that created them,
    and locks are not stored: a task sharing the root's components changes
    no other record, and the manifest holds no component entries."""
    state_dir = engine.state_dir
    before = checkpoint.read_manifest(state_dir, engine.checkpoint_step)
    assert "components" not in before and set(before["packs"]) == _dirs(state_dir)
    _add_task_with_own_head(engine, "d", 7)
    engine.refresh_views()
    written = checkpoint.save(engine.system, state_dir, store=engine._store)
    after = checkpoint.read_manifest(state_dir, written.step)
    assert written.record_files == (f"{after['records']['d']}.json",)
    assert {g: after["records"][g] for g in before["records"]} == before["records"]
    shared = [cid for cid in engine.system.best_path("d").components.values()
              if cid in engine.system.root_path.components.values()]
    assert shared and all(engine.system.components[cid].locked_by >= {"d", "a"} for cid in shared)
    restored = checkpoint.restore(state_dir).system
    assert {cid: c.locked_by for cid, c in restored.components.items()} == {
        cid: c.locked_by for cid, c in engine.system.components.items()}
