"""`evolve export`: a task's served path as a standalone artefact (DESIGN §8).

A tiny real search trains `digits` in-process; `evolve export` (the CLI, in a
subprocess) writes it from the state directory; a fresh process loads it with
jax, numpy and orbax alone (first plain `jax.export.deserialize`, then
evolve.export_runtime, with neither the engine nor Flax imported) and its
probabilities must equal Engine.predict's bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evolve import export
from evolve.engine import Engine, EngineOptions
from evolve.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from evolve.types import BundledSource, TaskSpec
from service import cli
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: plain JAX first (no evolve module at all), then the loader.
LOADER_SCRIPT = r"""
import json, sys
import jax, numpy as np, orbax.checkpoint as ocp

out, inputs, results = sys.argv[1:4]
arrays = dict(np.load(inputs))
square = arrays["square"]
with open(out + "/predict.jax", "rb") as handle:
    exported = jax.export.deserialize(bytearray(handle.read()))
params = ocp.StandardCheckpointer().restore(out + "/params")
padded = np.zeros((16,) + square.shape[1:], np.uint8)  # the server pads 13 images to 16
padded[: len(square)] = square
plain = np.asarray(exported.call(params, padded))[: len(square)]
evolve_before_loader = sorted(m for m in sys.modules if m.split(".")[0] == "evolve")

from evolve.export_runtime import load_exported

model = load_exported(out)
np.savez(results, plain=plain, square=model.probabilities(square), small=model.probabilities(arrays["small"]),
         gray=model.probabilities(arrays["gray"]))
print(json.dumps({
    "evolve_before_loader": evolve_before_loader,
    "heavy": sorted(m for m in ("evolve.engine", "evolve.models.vit", "evolve.train.steps", "flax", "optax", "grpc")
                    if m in sys.modules),
    "task": model.task, "classes": list(model.class_names), "image_size": model.image_size,
}))
"""


def _tree(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory`: (size, mtime in ns)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOLVE_")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`digits` READY after a one-candidate search, `pending` added but never searched."""
    state = tmp_path_factory.mktemp("export") / "state"
    config = tiny_config(generations=1, candidates_per_generation=1, train_rounds=1, examples_per_round=256)
    engine = Engine.create(config, state_dir=str(state), options=EngineOptions(seed=5, max_train_examples=512))
    engine.add_task(TaskSpec("digits", BundledSource("digits")))
    engine.run_search("digits")
    engine.add_task(TaskSpec("pending", BundledSource("digits_parity")))
    engine.save()
    return engine, state


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """`evolve export digits --state-dir STATE --out DIR --json` in a subprocess."""
    _, state = trained
    out = tmp_path_factory.mktemp("artefact") / "digits"
    before = _tree(state)
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "export", "digits", "--state-dir", str(state), "--out", str(out),
         "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=_subprocess_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert _tree(state) == before, "export wrote into the state directory"
    return out, json.loads(result.stdout)


def test_export_writes_params_config_and_functions(trained, exported):
    engine, _ = trained
    out, summary = exported
    served = engine.system.best_path("digits")
    assert (summary["task"], summary["path_id"], summary["path_version"]) == ("digits", served.id, served.version)
    assert summary["checkpoint_step"] == engine.checkpoint_step
    assert {"config.json", "predict.jax", "predict_preprocessed.jax"} <= set(summary["files"])
    assert any(name.startswith("params/") for name in summary["files"])
    config = json.loads((out / "config.json").read_text())
    assert config["class_names"] == list(engine.task("digits").class_names)
    assert config["image_size"] == served.hparams["image_size"] == 16
    assert config["inputs"]["predict.jax"]["shape"] == [None, 16, 16, 3]
    assert config["inputs"]["predict.jax"]["dtype"] == "uint8"
    assert [c["name"] for c in config["model"]["components"]] == list(served.components)
    assert [c["id"] for c in config["model"]["components"]] == list(served.components.values())
    assert config["model"]["vit"]["hidden_size"] == 32 and config["batch"]["dimension"] == "symbolic"


def test_a_fresh_process_predicts_bit_identically(trained, exported, tmp_path):
    engine, _ = trained
    out, _ = exported
    rng = np.random.default_rng(11)
    square = rng.integers(0, 256, (13, 16, 16, 3), dtype=np.uint8)  # the model's size: predict.jax alone
    small = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)  # resized first, as Predict does
    gray = rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    inputs, results = tmp_path / "inputs.npz", tmp_path / "results.npz"
    np.savez(inputs, square=square, small=small, gray=gray)
    run = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, str(out), str(inputs), str(results)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=_subprocess_env())
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["evolve_before_loader"] == [], "plain jax.export needed evolve"
    assert report["heavy"] == [], f"the loader imported {report['heavy']}"
    assert (report["task"], report["image_size"]) == ("digits", 16)
    got = dict(np.load(results))
    expected_square = engine.predict("digits", square).probabilities
    assert expected_square.std(axis=0).max() > 1e-4, "the model predicts the same for every image"
    np.testing.assert_array_equal(got["square"], expected_square)
    np.testing.assert_array_equal(got["plain"], expected_square)
    np.testing.assert_array_equal(got["small"], engine.predict("digits", small).probabilities)
    np.testing.assert_array_equal(got["gray"], engine.predict("digits", gray).probabilities)


def test_only_a_ready_task_exports(trained, tmp_path):
    _, state = trained
    with pytest.raises(FailedPreconditionError, match="'pending' is PENDING") as refused:
        export.export_task(str(state), "pending", str(tmp_path / "pending"))
    assert refused.value.reason == "TASK_NOT_READY"
    with pytest.raises(NotFoundError):
        export.export_task(str(state), "nope", str(tmp_path / "nope"))
    with pytest.raises(FailedPreconditionError, match="holds no checkpoint"):
        export.export_task(str(tmp_path / "empty"), "digits", str(tmp_path / "x"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="not an empty directory"):
        export.export_task(str(state), "digits", str(occupied))
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "pending").exists() and not list(tmp_path.glob(".pending.*"))


def test_cli_export_refusal_is_one_json_error(trained, tmp_path, capsys):
    _, state = trained
    code = cli.main(["--json", "export", "pending", "--state-dir", str(state), "--out", str(tmp_path / "p")])
    captured = capsys.readouterr()
    assert (code, captured.out) == (1, "")
    error = json.loads(captured.err)["error"]
    assert error["status"] == "FAILED_PRECONDITION" and error["code"] == 9
    assert "'pending' is PENDING" in error["message"]
    assert error["details"][0]["reason"] == "TASK_NOT_READY"
    code = cli.main(["export", "pending", "--state-dir", str(state), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("FAILED_PRECONDITION: task 'pending' is PENDING")
    assert err.count("is PENDING") == 1
