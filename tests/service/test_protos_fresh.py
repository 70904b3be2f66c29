"""The committed generated code in service/gen/ matches protos/.

Fails when a .proto was edited without running `python scripts/gen_protos.py`.
Skipped when grpcio-tools is missing or not the pinned version: another
version generates different (not wrong) code, so staleness cannot be judged.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_protos.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gen_protos_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_protos = _load_script()


def _require_pinned_tools() -> None:
    installed = gen_protos.installed_tools_version()
    if installed is None:
        pytest.skip(f"grpcio-tools not installed (pinned: {gen_protos.GRPCIO_TOOLS_PIN})")
    if installed != gen_protos.GRPCIO_TOOLS_PIN:
        pytest.skip(f"grpcio-tools {installed} installed, generator pinned to {gen_protos.GRPCIO_TOOLS_PIN}")


def test_generated_code_is_fresh() -> None:
    _require_pinned_tools()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        "service/gen/ is stale; run `python scripts/gen_protos.py` and commit the result.\n"
        + result.stdout
        + result.stderr
    )


def test_check_detects_stale_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check really compares: an edited, a missing and an extra file all count."""
    _require_pinned_tools()
    copy = tmp_path / "gen"
    shutil.copytree(gen_protos.OUT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(gen_protos, "OUT_DIR", copy)
    assert gen_protos.check(verbose=False) == []

    stub = copy / "evolve" / "v1" / "evolve_pb2.pyi"
    stub.write_text(stub.read_text() + "# edited\n")
    (copy / "inference" / "grpc_predict_v2_pb2_grpc.py").unlink()
    (copy / "inference" / "old_pb2.py").write_text("")
    problems = gen_protos.check(verbose=False)
    assert problems == [
        "missing: service/gen/inference/grpc_predict_v2_pb2_grpc.py",
        "not generated (stale): service/gen/inference/old_pb2.py",
        "differs: service/gen/evolve/v1/evolve_pb2.pyi",
    ]


def test_generated_modules_import_as_service_gen() -> None:
    """Generated modules import each other under service.gen, never the `evolve` library."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    names = [
        "service.gen.evolve.v1.evolve_pb2",
        "service.gen.evolve.v1.evolve_pb2_grpc",
        "service.gen.inference.grpc_predict_v2_pb2",
        "service.gen.inference.grpc_predict_v2_pb2_grpc",
    ]
    modules = [importlib.import_module(name) for name in names]
    evolve_pb2, _, inference_pb2, _ = modules
    assert evolve_pb2.Operation.__module__ == "service.gen.evolve.v1.evolve_pb2"
    assert inference_pb2.ModelInferRequest.__module__ == "service.gen.inference.grpc_predict_v2_pb2"
    assert "evolve.v1" not in sys.modules
    assert "inference" not in sys.modules
    # Descriptor file names stay those of protos/ (what reflection shows).
    assert evolve_pb2.DESCRIPTOR.name == "evolve/v1/evolve.proto"
    assert inference_pb2.DESCRIPTOR.name == "inference/grpc_predict_v2.proto"
    for source in (ROOT / "service" / "gen").rglob("*.py*"):
        for line in source.read_text().splitlines():
            assert not line.startswith(("from evolve", "import evolve", "from inference", "import inference")), (
                f"{source}: {line}"
            )
