"""The container image and the Kubernetes manifests, checked without Docker or
a cluster: the Dockerfile's entrypoint is an installed console script, its
health check works against a real gRPC health service, it runs as non-root
with the state directory as a volume; the manifests agree with the image
(port, state directory, uid) and use gRPC health probes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from concurrent import futures
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
DISTRIBUTION = "evolve-service"


# ---- the Dockerfile ------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def instruction(name: str) -> list[str]:
    return [arguments for keyword, arguments in dockerfile_instructions() if keyword == name]


def environment() -> dict[str, str]:
    """The image's ENV, in the `KEY=VALUE ...` form the Dockerfile uses."""
    values = {}
    for arguments in instruction("ENV"):
        for pair in shlex.split(arguments):
            key, _, value = pair.partition("=")
            values[key] = value
    return values


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def healthcheck_code() -> str:
    (arguments,) = instruction("HEALTHCHECK")
    _, _, command = arguments.partition(" CMD ")
    argv = exec_form(command.strip())
    assert argv[:2] == ["python", "-c"], argv
    return argv[2]


def test_base_image_and_jax_flavours():
    assert instruction("FROM") == ["python:3.11-slim"]
    assert "JAX_FLAVOR=cpu" in instruction("ARG")
    (run,) = [r for r in instruction("RUN") if "pip install" in r]
    assert "pip install ." in run and "jax[cuda12]" in run


def test_entrypoint_is_the_projects_console_script():
    entrypoint = exec_form(instruction("ENTRYPOINT")[-1])
    assert entrypoint == ["evolve", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts[entrypoint[0]].partition(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{module} does not exist"
    assert function


def test_serve_help_through_the_cli_module():
    """What the entrypoint runs, from the source tree (needs service/server.py)."""
    result = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for flag in ("--host", "--port", "--state-dir"):
        assert flag in result.stdout


def test_installed_console_script_serves_help():
    try:
        importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DISTRIBUTION} is not installed in this interpreter (make installs it)")
    script = Path(sys.executable).parent / "evolve"
    assert script.is_file(), f"no console script at {script}"
    result = subprocess.run([str(script), "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_wheel_holds_what_the_console_script_imports(tmp_path):
    """`pip install .` in the image is not editable: every module must be packaged."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    for package in ("evolve", "service"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("service/__init__.py", "service/cli.py", "service/client.py", "service/server.py",
                   "evolve/engine.py", "service/gen/evolve/v1/evolve_pb2.py"):
        assert module in names, f"{module} is missing from the wheel"


def test_runs_as_non_root_with_the_state_directory_as_volume():
    (user,) = instruction("USER")
    uid = user.split(":")[0]
    assert uid not in ("root", "0") and uid.isdigit(), "a numeric non-root uid lets Kubernetes verify runAsNonRoot"
    env = environment()
    assert env["EVOLVE_STATE_DIR"] == "/var/lib/evolve"
    assert env["EVOLVE_HOST"] == "0.0.0.0"
    volumes = [v for arguments in instruction("VOLUME") for v in exec_form(arguments)]
    assert env["EVOLVE_STATE_DIR"] in volumes
    assert instruction("EXPOSE") == [env["EVOLVE_PORT"]]


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "state", ".git"} <= ignored
    assert any("__pycache__" in line for line in ignored)
    for needed in ("pyproject.toml", "evolve", "service"):
        assert needed not in ignored


def test_healthcheck_code_compiles():
    compile(healthcheck_code(), "<HEALTHCHECK>", "exec")


def test_healthcheck_follows_the_grpc_health_service():
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        env = dict(os.environ, EVOLVE_PORT=str(port))

        def check() -> int:
            command = [sys.executable, "-c", healthcheck_code()]
            return subprocess.run(command, env=env, capture_output=True, timeout=60).returncode

        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check() == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check() == 0
    finally:
        server.stop(None)


# ---- the Kubernetes manifests ----------------------------------------------------


def manifests(folder: Path = K8S) -> list[dict]:
    documents = []
    for path in sorted(folder.rglob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return documents


def base_resource(kind: str, name: str | None = None) -> dict:
    found = [doc for doc in manifests(K8S / "base") if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert found, f"no {kind} {name or ''} in deploy/k8s/base"
    return found[0]


def server_container(statefulset: dict) -> dict:
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container["env"]}


def test_every_manifest_parses_and_names_its_kind():
    documents = manifests()
    assert documents
    for doc in documents:
        assert doc.get("apiVersion") and doc.get("kind"), doc


def test_kustomizations_reference_existing_files():
    kustomizations = sorted(K8S.rglob("kustomization.yaml"))
    assert K8S / "kustomization.yaml" in kustomizations
    for path in kustomizations:
        kustomization = yaml.safe_load(path.read_text())
        assert kustomization["kind"] == "Kustomization"
        references = list(kustomization.get("resources", []))
        references += [patch["path"] for patch in kustomization.get("patches", []) if "path" in patch]
        for reference in references:
            assert (path.parent / reference).exists(), f"{path}: {reference} does not exist"


def test_statefulset_probes_port_and_state_directory():
    statefulset = base_resource("StatefulSet")
    spec = statefulset["spec"]
    assert spec["replicas"] == 1
    container = server_container(statefulset)
    (port,) = [p for p in container["ports"] if p["name"] == "grpc"]
    assert port["containerPort"] == 8500 == int(environment()["EVOLVE_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"], probe
    env = env_of(container)
    assert env["EVOLVE_PORT"]["value"] == str(port["containerPort"])
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert env["EVOLVE_STATE_DIR"]["value"] == mounts[claim["metadata"]["name"]] == environment()["EVOLVE_STATE_DIR"]


def test_statefulset_security_token_and_shutdown():
    statefulset = base_resource("StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    docker_uid = instruction("USER")[0].split(":")[0]
    assert str(pod["securityContext"]["runAsUser"]) == docker_uid
    assert pod["terminationGracePeriodSeconds"] >= 120  # the checkpoint drain
    container = server_container(statefulset)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False


def test_token_comes_from_a_secret_file_not_the_environment():
    """Issue 9: the deploy must set a token the secure-by-default server reads, and no secret in env vars."""
    statefulset = base_resource("StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    container = server_container(statefulset)
    env = env_of(container)
    assert not any("secretKeyRef" in entry.get("valueFrom", {}) for entry in env.values()), "secret in an env var"
    assert not any("secretRef" in source for source in container.get("envFrom", []))
    assert "EVOLVE_TOKEN" not in env and "EVOLVE_OPEN_READS" not in env  # every RPC but health needs the token
    token_path = env["EVOLVE_TOKEN_FILE"]["value"]
    secrets = {volume["name"]: volume["secret"] for volume in pod["volumes"] if "secret" in volume}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] in secrets]
    assert mount.get("readOnly") is True
    directory, _, key = token_path.rpartition("/")
    assert directory == mount["mountPath"].rstrip("/")
    secret = secrets[mount["name"]]
    assert secret["secretName"]
    items = {item["path"]: item["key"] for item in secret.get("items", [])}
    key = items.get(key, key)  # without items, every key of the Secret is a file of that name
    assert secret["defaultMode"] & 0o007 == 0, "the token file must not be world-readable"
    assert f"--from-literal={key}=" in (ROOT / "deploy" / "README.md").read_text()


def test_manifest_and_image_variables_are_server_settings():
    """Every EVOLVE_* variable the image and the manifests set is one the server reads (see `--help`)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "service.server", "--help"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, check=True, env=dict(os.environ, COLUMNS="200"),
    ).stdout
    names = {name for name in environment() if name.startswith("EVOLVE_")}
    for doc in manifests():
        if doc["kind"] == "StatefulSet":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                names |= {entry["name"] for entry in container.get("env", []) if entry["name"].startswith("EVOLVE_")}
    assert "EVOLVE_TOKEN_FILE" in names
    for name in sorted(names):
        assert re.search(rf"\b{name}\b", help_text), f"{name} is not a server setting"


def test_service_exposes_grpc_to_the_server_pods():
    statefulset = base_resource("StatefulSet")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    service = base_resource("Service", "evolve")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == "grpc" and port["port"] == 8500
    assert port["targetPort"] in ("grpc", 8500)
    governing = base_resource("Service", statefulset["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"


def test_gpu_overlay_requests_one_gpu():
    patches = [doc for doc in manifests(K8S / "overlays" / "gpu") if doc["kind"] == "StatefulSet"]
    assert patches
    (container,) = patches[0]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
