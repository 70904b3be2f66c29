"""The manifest split (issue 12): each task's record and paths live in a
record file named by its content's hash, written once; a save writes the
records of the tasks that changed and a manifest naming them all; retention
deletes the records no kept step names; a damaged record makes its step
unusable. (Older formats: tests/test_checkpoint_packs.py.)"""

from __future__ import annotations

import os

import pytest

from evolve import checkpoint
from evolve.engine import Engine
from tests.conftest import tiny_config
from tests.test_engine_device_sharing import _add_task_with_own_head


def _records(state_dir: str) -> set[str]:
    directory = os.path.join(state_dir, checkpoint.RECORDS)
    return set(os.listdir(directory)) if os.path.isdir(directory) else set()


@pytest.fixture
def engine(tmp_path):
    engine = Engine.create(tiny_config(), state_dir=str(tmp_path / "state"))
    for seed, name in enumerate(("a", "b", "c")):
        _add_task_with_own_head(engine, name, seed)
    engine.refresh_views()
    engine.save()
    return engine


def test_a_save_writes_the_records_of_changed_tasks_only(engine, monkeypatch):
    state_dir = engine.state_dir
    serialised = []
    real_text = checkpoint._record_text
    monkeypatch.setattr(checkpoint, "_record_text", lambda record: serialised.append(record) or real_text(record))
    manifest = checkpoint.read_manifest(state_dir, engine.checkpoint_step)
    assert manifest["format"] == checkpoint.FORMAT_VERSION
    assert set(manifest["records"]) == {"a", "b", "c", "__root__"}
    assert "tasks" not in manifest and "paths" not in manifest
    assert _records(state_dir) == {f"{sha}.json" for sha in manifest["records"].values()}

    before = _records(state_dir)
    engine.save()  # nothing changed: no record serialised, none written
    assert _records(state_dir) == before and serialised == []
    engine.system.tasks["b"].message = "changed"
    engine.save()
    assert [record["task"]["message"] for record in serialised] == ["changed"]
    new = _records(state_dir) - before
    assert len(new) == 1
    latest = checkpoint.read_manifest(state_dir, engine.checkpoint_step)
    assert new == {f"{latest['records']['b']}.json"}
    assert {g: latest["records"][g] for g in "ac"} == {g: manifest["records"][g] for g in "ac"}

    restored = checkpoint.restore(state_dir).system
    assert restored.tasks["b"].message == "changed"
    assert set(restored.paths) == set(engine.system.paths)
    for path_id, path in engine.system.paths.items():  # forward order of components kept
        assert list(restored.paths[path_id].components.items()) == list(path.components.items())


def test_retention_deletes_records_no_kept_step_names(engine):
    state_dir = engine.state_dir
    first = checkpoint.read_manifest(state_dir, engine.checkpoint_step)["records"]["a"]
    for i in range(checkpoint.KEEP_MANIFESTS + 1):
        engine.system.tasks["a"].message = f"version {i}"
        engine.save()
    steps = [int(s) for s in os.listdir(os.path.join(state_dir, "manifest")) if s.isdigit()]
    assert len(steps) == checkpoint.KEEP_MANIFESTS
    named = {f"{sha}.json" for step in steps for sha in checkpoint.read_manifest(state_dir, step)["records"].values()}
    assert _records(state_dir) == named
    assert f"{first}.json" not in named
    # A fresh process sweeps what a killed write left once: a temporary file, an unnamed record.
    records = os.path.join(state_dir, checkpoint.RECORDS)
    for leftover in ("0" * 64 + ".json", "f" * 64 + ".json.123.tmp"):
        with open(os.path.join(records, leftover), "w") as handle:
            handle.write("{}")
    restored = Engine.restore(state_dir)
    restored.save()
    assert _records(state_dir) == {f"{sha}.json" for step in
                                   [int(s) for s in os.listdir(os.path.join(state_dir, "manifest")) if s.isdigit()]
                                   for sha in checkpoint.read_manifest(state_dir, step)["records"].values()}


def test_a_damaged_record_makes_its_step_unusable(engine):
    state_dir = engine.state_dir
    engine.system.tasks["c"].message = "newest"
    engine.save()
    newest = checkpoint.read_manifest(state_dir, engine.checkpoint_step)["records"]["c"]
    with open(os.path.join(state_dir, checkpoint.RECORDS, f"{newest}.json"), "a") as handle:
        handle.write(" ")  # one byte more: fails its hash
    restored = checkpoint.restore(state_dir)
    assert restored.step == engine.checkpoint_step - 1
    assert restored.system.tasks["c"].message == ""
    os.remove(os.path.join(state_dir, checkpoint.RECORDS, f"{newest}.json"))
    assert checkpoint.restore(state_dir).step == engine.checkpoint_step - 1
