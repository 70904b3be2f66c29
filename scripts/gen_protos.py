#!/usr/bin/env python
"""Generate the Python code of protos/ into service/gen/ (and check it).

    python scripts/gen_protos.py           # regenerate service/gen/
    python scripts/gen_protos.py --check   # exit 1 if service/gen/ is stale

Generator pin: grpcio-tools==1.66.2 (GRPCIO_TOOLS_PIN below).
  Generated code refuses runtimes older than its generator at import time:
  *_pb2_grpc.py requires grpcio >= the grpcio-tools version, and *_pb2.py
  requires a protobuf runtime >= the protoc bundled with grpcio-tools. The
  output of 1.66.2 (protobuf gencode 5.27.2) was checked to import with
      grpcio 1.66.2 / protobuf 5.28.0   (protobuf prints a UserWarning)
      grpcio 1.75.1 / protobuf 6.33.5
      grpcio 1.84.0 / protobuf 7.35.0
      grpcio 1.85.1 / protobuf 7.36.2
  i.e. it needs grpcio >= 1.66.2 and protobuf >= 5.27.2 (up to 7.x).
  The output of grpcio-tools >= 1.82, the first to install next to protobuf 7,
  would need grpcio >= 1.82 and protobuf >= 7.35.

  Installing: grpcio-tools 1.66.2 declares protobuf < 6, while the rest of the
  stack wants newer (tensorflow-cpu 2.21: >= 6.31; grpcio-health-checking and
  grpcio-reflection >= 1.82: >= 7.35).
  Only protoc (bundled, native) shapes the output, and grpcio-tools 1.66.2
  runs fine on protobuf 7, so install it without its dependencies:
      pip install --no-deps grpcio-tools==1.66.2
  Change the pin only together with the runtime floors in pyproject.toml, then
  regenerate and commit service/gen/.

Layout: protos/<dir>/<file>.proto becomes service/gen/<dir>/<file>_pb2.py,
_pb2.pyi and _pb2_grpc.py, with an __init__.py in each package. protoc writes
imports of generated modules relative to the proto root ("from evolve.v1 import
evolve_pb2"), which would resolve to the `evolve` library package; they are
rewritten to "service.gen.…", as is the module name the classes report. The
.proto file names inside the descriptors stay as in protos/ (what reflection
clients see).

The Open Inference Protocol module is built in a private descriptor pool
instead of the process-wide default one, because other packages
(tritonclient, KServe) register their own, different definitions of the same
`inference.*` symbols in the default pool, and the default pool refuses
duplicates: with a private pool our module and theirs can share a process (a
server test that queries it with tritonclient, for one). Messages still
serialise to the same bytes; only server reflection has to be given a pool that
holds it (service.gen.reflection_pool).
"""

from __future__ import annotations

import argparse
import difflib
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

GRPCIO_TOOLS_PIN = "1.66.2"

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
OUT_DIR = ROOT / "service" / "gen"
OUT_PACKAGE = "service.gen"

# Protos whose generated module registers its descriptors in a private pool
# (see the module docstring).
PRIVATE_POOL_PROTOS = frozenset({"inference/grpc_predict_v2.proto"})

ROOT_INIT = '''\
"""Generated gRPC / protobuf code of protos/. Do not edit.

Regenerate with `python scripts/gen_protos.py` (grpcio-tools=={pin}).

    from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
    from service.gen.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

The inference module keeps its descriptors in a private pool so that it can
share a process with other definitions of the `inference` package (e.g.
tritonclient's); server reflection therefore needs reflection_pool().
"""

from __future__ import annotations

from google.protobuf import descriptor as _descriptor
from google.protobuf import descriptor_pool as _descriptor_pool


def reflection_pool(*files: _descriptor.FileDescriptor) -> _descriptor_pool.DescriptorPool:
    """A new descriptor pool holding `files` and, first, their dependencies.

    For server reflection over services whose descriptors live in different
    pools, e.g.

        pool = reflection_pool(evolve_pb2.DESCRIPTOR, grpc_predict_v2_pb2.DESCRIPTOR,
                               health_pb2.DESCRIPTOR)
        reflection.enable_server_reflection(names, server, pool=pool)
    """
    pool = _descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: _descriptor.FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in files:
        add(file)
    return pool
'''

PACKAGE_INIT = '"""Generated from protos/{path}/. Do not edit."""\n'

PRIVATE_POOL_FROM = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL_TO = (
    "# scripts/gen_protos.py: a private pool, so that other definitions of this\n"
    "# package (e.g. tritonclient's) can be imported in the same process.\n"
    "DESCRIPTOR_POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = DESCRIPTOR_POOL.AddSerializedFile("
)


class GenerationError(RuntimeError):
    pass


def _proto_files() -> list[str]:
    """Proto files under protos/, as paths relative to it, sorted."""
    return sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))


def _module_of(proto: str) -> str:
    """'evolve/v1/evolve.proto' -> 'evolve.v1.evolve_pb2'."""
    return proto[: -len(".proto")].replace("/", ".") + "_pb2"


def _run_protoc(protos: list[str], raw: Path) -> None:
    """Runs grpc_tools' protoc in a child process.

    Never in-process: its bundled libprotoc crashes (SIGSEGV) when loaded
    into a process that already holds TensorFlow's protobuf symbols, as the
    test run does.
    """
    args = [
        sys.executable,
        "-c",
        "import sys; from importlib.resources import files; from grpc_tools import protoc; "
        "sys.exit(protoc.main(['grpc_tools.protoc', '--proto_path=' + str(files('grpc_tools') / '_proto')]"
        " + sys.argv[1:]))",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={raw}",
        f"--pyi_out={raw}",
        f"--grpc_python_out={raw}",
        *(str(PROTO_ROOT / proto) for proto in protos),
    ]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise GenerationError(f"protoc failed with status {result.returncode}: {result.stderr.strip()}")


def _rewrite(text: str, modules: list[str], private_pool: bool, where: str) -> str:
    """Points imports of our generated modules into service.gen."""
    for module in modules:
        package, _, name = module.rpartition(".")
        if package:
            pattern = rf"^from {re.escape(package)} import {re.escape(name)}\b"
            replacement = f"from {OUT_PACKAGE}.{package} import {name}"
        else:
            pattern = rf"^import {re.escape(name)}\b"
            replacement = f"from {OUT_PACKAGE} import {name}"
        text = re.sub(pattern, replacement, text, flags=re.MULTILINE)
        text = text.replace(
            f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{module}',",
            f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{OUT_PACKAGE}.{module}',",
        )
    if private_pool:
        if text.count(PRIVATE_POOL_FROM) != 1:
            raise GenerationError(f"{where}: unexpected protoc output, cannot move it to a private pool")
        text = text.replace(PRIVATE_POOL_FROM, PRIVATE_POOL_TO)
    # Any import of a top-level package of ours left now would import the
    # wrong thing (e.g. the `evolve` library): refuse to write it.
    tops = sorted({module.split(".")[0] for module in modules})
    leftover = re.search(rf"^(from|import) ({'|'.join(map(re.escape, tops))})\b.*$", text, flags=re.MULTILINE)
    if leftover:
        raise GenerationError(f"{where}: import not rewritten: {leftover.group(0)!r}")
    return text


def generate(dest: Path) -> list[Path]:
    """Generates the whole of service/gen/ into `dest`; returns the files written."""
    protos = _proto_files()
    if not protos:
        raise GenerationError(f"no .proto files under {PROTO_ROOT}")
    modules = [_module_of(proto) for proto in protos]
    written: list[Path] = []

    def write(relative: str, text: str) -> None:
        path = dest / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)

    with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
        raw = Path(tmp)
        _run_protoc(protos, raw)
        private = {_module_of(proto) for proto in PRIVATE_POOL_PROTOS}
        for path in sorted(raw.rglob("*")):
            if not path.is_file():
                continue
            relative = path.relative_to(raw).as_posix()
            module = relative.rsplit(".", 1)[0].replace("/", ".")
            private_pool = relative.endswith("_pb2.py") and module in private
            text = _rewrite(path.read_text(encoding="utf-8"), modules, private_pool, relative)
            write(relative, text)

    write("__init__.py", ROOT_INIT.format(pin=GRPCIO_TOOLS_PIN))
    packages = {Path(proto).parent.as_posix() for proto in protos}
    for package in sorted(packages):
        parts = Path(package).parts
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            if not (dest / sub / "__init__.py").exists():
                write(f"{sub}/__init__.py", PACKAGE_INIT.format(path=sub))
    return written


def _tree(directory: Path) -> dict[str, Path]:
    if not directory.exists():
        return {}
    return {
        p.relative_to(directory).as_posix(): p
        for p in directory.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def check(verbose: bool = True) -> list[str]:
    """Problems that make service/gen/ differ from a fresh generation."""
    with tempfile.TemporaryDirectory(prefix="gen_protos_check_") as tmp:
        fresh_dir = Path(tmp)
        generate(fresh_dir)
        fresh, current = _tree(fresh_dir), _tree(OUT_DIR)
        problems = []
        for name in sorted(fresh.keys() - current.keys()):
            problems.append(f"missing: service/gen/{name}")
        for name in sorted(current.keys() - fresh.keys()):
            problems.append(f"not generated (stale): service/gen/{name}")
        for name in sorted(fresh.keys() & current.keys()):
            if not filecmp.cmp(fresh[name], current[name], shallow=False):
                problems.append(f"differs: service/gen/{name}")
                if verbose:
                    diff = difflib.unified_diff(
                        current[name].read_text(encoding="utf-8", errors="replace").splitlines(),
                        fresh[name].read_text(encoding="utf-8", errors="replace").splitlines(),
                        f"service/gen/{name} (committed)",
                        f"service/gen/{name} (fresh)",
                        lineterm="",
                        n=1,
                    )
                    problems.extend("    " + line for line in list(diff)[:40])
        return problems


def sync() -> None:
    """Regenerates service/gen/ in place, removing files no longer generated."""
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
        fresh_dir = Path(tmp)
        generate(fresh_dir)
        fresh, current = _tree(fresh_dir), _tree(OUT_DIR)
        for name in sorted(current.keys() - fresh.keys()):
            current[name].unlink()
            print(f"removed service/gen/{name}")
        for name, path in sorted(fresh.items()):
            target = OUT_DIR / name
            if name in current and filecmp.cmp(path, target, shallow=False):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            print(f"wrote service/gen/{name}")
        # Drop directories left empty (apart from caches).
        for directory in sorted((p for p in OUT_DIR.rglob("*") if p.is_dir()), reverse=True):
            if directory.name == "__pycache__":
                continue
            if not any(c for c in directory.iterdir() if c.name != "__pycache__"):
                shutil.rmtree(directory)


def installed_tools_version() -> str | None:
    try:
        return metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if service/gen/ is stale; write nothing")
    parser.add_argument(
        "--any-tools-version",
        action="store_true",
        help=f"run with an installed grpcio-tools other than {GRPCIO_TOOLS_PIN} (output will differ)",
    )
    args = parser.parse_args(argv)

    version = installed_tools_version()
    if version is None:
        print(
            f"grpcio-tools is not installed; pip install --no-deps grpcio-tools=={GRPCIO_TOOLS_PIN}",
            file=sys.stderr,
        )
        return 2
    if version != GRPCIO_TOOLS_PIN and not args.any_tools_version:
        print(
            f"grpcio-tools {version} is installed but the generator is pinned to {GRPCIO_TOOLS_PIN}; "
            f"pip install --no-deps grpcio-tools=={GRPCIO_TOOLS_PIN} (or pass --any-tools-version)",
            file=sys.stderr,
        )
        return 2

    try:
        if args.check:
            problems = check()
            if problems:
                print("service/gen/ is stale; run `python scripts/gen_protos.py`:", file=sys.stderr)
                for problem in problems:
                    print(f"  {problem}", file=sys.stderr)
                return 1
            print("service/gen/ is up to date")
            return 0
        sync()
        return 0
    except GenerationError as error:
        print(f"gen_protos: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
