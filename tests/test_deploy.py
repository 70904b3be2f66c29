"""The container image and the Kubernetes manifests, checked without Docker or
a cluster: the Dockerfile's entrypoint is an installed console script, its
health check works against a real gRPC health service, it runs as non-root
with the state directory as a volume. The manifests are rendered with a real
kustomize (kubectl), validated strictly against the Kubernetes schemas
(kubernetes-validate), and read as the server reads them: port, state
directory and token file agree with the image and the server's flags, probes
are gRPC health checks, resources are bounded, a NetworkPolicy selects the
pods, every resource is in the dedicated namespace.
"""

from __future__ import annotations

import argparse
import base64
import functools
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
                            check=False, capture_output=True, text=True, timeout=300)
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
    result = subprocess.run([str(script), "serve", "--help"], cwd=ROOT, check=False, capture_output=True, text=True,
                            timeout=300)
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
        cwd=source, check=False, capture_output=True, text=True, timeout=300,
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
            return subprocess.run(command, env=env, check=False, capture_output=True, timeout=60).returncode

        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check() == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check() == 0
    finally:
        server.stop(None)


# ---- the Kubernetes manifests ----------------------------------------------------
#
# Every kustomization under deploy/k8s is rendered with a real kustomize
# (`kustomize build`, or `kubectl kustomize`, which embeds it), and every
# rendered manifest is validated strictly (unknown fields are errors) against
# the Kubernetes OpenAPI schemas of the oldest supported and the newest known
# Kubernetes version (the kubernetes-validate package). The checks after that
# read the rendered objects, never the YAML text.

KUBERNETES_VERSIONS = ("1.27",)  # the oldest supported; the newest kubernetes-validate knows is added below
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "PriorityClass", "CustomResourceDefinition", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration"}
NAMESPACE_KUSTOMIZATION = "namespace"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PROBE_HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def kustomizations() -> list[str]:
    """Every folder under deploy/k8s with a kustomization, relative to it ("." is deploy/k8s)."""
    return sorted(str(path.parent.relative_to(K8S)) for path in K8S.rglob("kustomization.yaml"))


def workload_kustomizations() -> list[str]:
    return [name for name in kustomizations() if name != NAMESPACE_KUSTOMIZATION]


def kustomize_command() -> list[str] | None:
    if os.environ.get("KUSTOMIZE"):
        return [os.environ["KUSTOMIZE"], "build"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@functools.cache
def _render(name: str) -> str:
    command = kustomize_command()
    if command is None:
        message = "neither kustomize nor kubectl is installed (Debian: apt-get install kubectl)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must render the manifests, not skip them
        pytest.skip(message)
    result = subprocess.run([*command, str(K8S / name)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} deploy/k8s/{name}: {result.stderr}"
    return result.stdout


def kubernetes_validator():
    """The kubernetes_validate module (the `test` extra installs it); a skip outside CI, a failure in it."""
    try:
        import kubernetes_validate  # pylint: disable=import-outside-toplevel
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is not installed (pip install -e '.[test]')")
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')")
    return kubernetes_validate


def rendered(name: str) -> list[dict]:
    """The objects `kubectl apply -k deploy/k8s/NAME` would apply (a fresh copy per call)."""
    documents = [doc for doc in yaml.safe_load_all(_render(name)) if doc is not None]
    assert documents, f"deploy/k8s/{name} renders nothing"
    return documents


def one(documents: list[dict], kind: str, name: str | None = None) -> dict:
    found = [doc for doc in documents if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


SERVER_KINDS = ("StatefulSet", "Deployment")


def servers(documents: list[dict]) -> list[dict]:
    """The workloads that run the server: the writer's StatefulSet, and the
    read-only replicas' Deployment where an overlay has them."""
    found = [doc for doc in documents if doc["kind"] in SERVER_KINDS]
    assert [doc["kind"] for doc in found].count("StatefulSet") == 1, "one writing server"
    return found


def is_replica(workload: dict) -> bool:
    return env_of(server_container(workload)).get("EVOLVE_READ_ONLY", {}).get("value") == "true"


def state_claim(documents: list[dict], workload: dict) -> tuple[dict, dict]:
    """(the claim's spec, the container's mount) of the state volume: the
    StatefulSet's own claim template, or a PersistentVolumeClaim it mounts."""
    container = server_container(workload)
    mount = mounts_of(container)["state"]
    templates = {t["metadata"]["name"]: t["spec"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    if "state" in templates:
        return templates["state"], mount
    claim = volumes_of(workload)["state"]["persistentVolumeClaim"]["claimName"]
    return one(documents, "PersistentVolumeClaim", claim)["spec"], mount


def server_container(statefulset: dict) -> dict:
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "evolve"
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def container_ports(container: dict) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def resolve_port(container: dict, port: int | str) -> int:
    """A port number, or a container port's name, as its number."""
    if isinstance(port, int):
        return port
    ports = container_ports(container)
    assert port in ports, f"no container port named {port!r}"
    return ports[port]


def mounts_of(container: dict) -> dict[str, dict]:
    return {mount["name"]: mount for mount in container["volumeMounts"]}


def volumes_of(statefulset: dict) -> dict[str, dict]:
    return {volume["name"]: volume for volume in statefulset["spec"]["template"]["spec"]["volumes"]}


def token_secret(statefulset: dict) -> tuple[dict, dict]:
    """(the Secret volume, its mount) of the server's token."""
    container = server_container(statefulset)
    secrets = {name: volume for name, volume in volumes_of(statefulset).items() if "secret" in volume}
    (mount,) = [mount for name, mount in mounts_of(container).items() if name in secrets]
    return secrets[mount["name"]], mount


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")
_SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def quantity(value: str | float) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match[1]) * _SUFFIX[match[2]]


@pytest.fixture
def server_settings(monkeypatch, tmp_path):
    """How `evolve serve` (the image's ENTRYPOINT) reads a container: its env over the image's ENV, its args."""
    from service import server

    def settings(container: dict) -> tuple[argparse.Namespace, str]:
        assert "command" not in container, "the container must run the image's ENTRYPOINT (evolve serve)"
        for name in list(os.environ):
            if name.startswith("EVOLVE_"):
                monkeypatch.delenv(name)
        env = environment()
        for name, entry in env_of(container).items():
            assert set(entry) == {"name", "value"}, f"{name}: only literal values (no secret in an env var)"
            env[name] = entry["value"]
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        parser = argparse.ArgumentParser(prog="evolve serve")
        server.add_serve_arguments(parser)
        args = parser.parse_args(container.get("args", []))
        # The server's own checks of the whole configuration, with the token
        # file (a Secret in the pod) replaced by a local one.
        checked = argparse.Namespace(**vars(args))
        if checked.token_file:
            token = tmp_path / "token"
            token.write_text("0123456789abcdef0123456789abcdef\n")
            checked.token_file = str(token)
        server.options_from_args(checked)
        return args, parser.format_help()

    return settings


def test_every_manifest_parses_and_names_its_kind():
    for path in sorted(K8S.rglob("*.yaml")):
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert documents, path
        for doc in documents:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: {doc}"


def test_kustomizations_reference_existing_files():
    names = kustomizations()
    assert {".", "base", NAMESPACE_KUSTOMIZATION, "overlays/gpu"} <= set(names)
    for name in names:
        path = K8S / name / "kustomization.yaml"
        kustomization = yaml.safe_load(path.read_text())
        assert kustomization["kind"] == "Kustomization"
        references = list(kustomization.get("resources", []))
        references += [patch["path"] for patch in kustomization.get("patches", []) if "path" in patch]
        for reference in references:
            assert (path.parent / reference).exists(), f"{path}: {reference} does not exist"


@pytest.mark.parametrize("name", kustomizations())
def test_rendered_manifests_pass_strict_schema_validation(name):
    kubernetes_validate = kubernetes_validator()
    versions = (*KUBERNETES_VERSIONS, kubernetes_validate.latest_version())
    for doc in rendered(name):
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"deploy/k8s/{name}: {doc['kind']} {doc['metadata']['name']} "
                            f"(Kubernetes {version}): {error.message} at {list(error.path)}")


def test_schema_validation_is_strict():
    """The validator the test above relies on rejects unknown fields and wrong types."""
    kubernetes_validate = kubernetes_validator()
    statefulset = one(rendered("base"), "StatefulSet")
    server_container(statefulset)["readinessprobe"] = {"grpc": {"port": 8500}}  # a typo: wrong case
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSIONS[0], strict=True)
    statefulset = one(rendered("base"), "StatefulSet")
    statefulset["spec"]["replicas"] = "1"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSIONS[0], strict=True)


def test_a_dedicated_namespace_on_every_namespaced_resource():
    namespace = one(rendered(NAMESPACE_KUSTOMIZATION), "Namespace")
    name = namespace["metadata"]["name"]
    assert name not in ("default", "kube-system", "kube-public")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for kustomization in workload_kustomizations():
        documents = rendered(kustomization)
        # Not in the workload: `kubectl delete -k` must not take the PVC (the grown system) with it.
        assert not [doc for doc in documents if doc["kind"] == "Namespace"], kustomization
        for doc in documents:
            if doc["kind"] not in CLUSTER_SCOPED:
                assert doc["metadata"].get("namespace") == name, f"{kustomization}: {doc['kind']} {doc['metadata']}"
    # The base sets it for every resource, and the plain files name it too
    # (`kubectl apply -f`, checkov on the sources).
    assert yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["namespace"] == name
    for path in sorted((K8S / "base").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] not in CLUSTER_SCOPED | {"Kustomization"}:
                assert doc["metadata"].get("namespace") == name, path


@pytest.mark.parametrize("name", workload_kustomizations())
def test_the_server_reads_port_state_directory_and_token_file_from_the_manifest(name, server_settings):
    documents = rendered(name)
    for statefulset in servers(documents):
        _check_server_settings(documents, statefulset, server_settings)


def _check_server_settings(documents: list[dict], statefulset: dict, server_settings) -> None:
    replica = is_replica(statefulset)
    if not replica:
        assert statefulset["kind"] == "StatefulSet" and statefulset["spec"]["replicas"] == 1  # one writer
    container = server_container(statefulset)
    args, help_text = server_settings(container)
    assert (str(args.read_only).lower() == "true") is replica  # EVOLVE_READ_ONLY=true, as the server reads it
    ports = container_ports(container)
    assert args.host == "0.0.0.0"
    assert args.port == ports["grpc"] == int(environment()["EVOLVE_PORT"]) == 8500
    assert args.metrics_port == ports["metrics"]
    # The state directory: a PVC (the writer's own, or one shared with the
    # replicas), where the image keeps it; read-only in a replica.
    claim, state_mount = state_claim(documents, statefulset)
    assert bool(state_mount.get("readOnly")) is replica
    volumes = [v for arguments in instruction("VOLUME") for v in exec_form(arguments)]
    assert args.state_dir == state_mount["mountPath"] == environment()["EVOLVE_STATE_DIR"]
    assert args.state_dir in volumes
    assert {"ReadWriteOnce", "ReadWriteMany"} & set(claim["accessModes"])
    assert quantity(claim["resources"]["requests"]["storage"]) >= 2**30
    # The token: a file of the mounted Secret, given as --token-file (EVOLVE_TOKEN_FILE).
    secret, mount = token_secret(statefulset)
    directory, _, key = args.token_file.rpartition("/")
    assert directory == mount["mountPath"].rstrip("/") and mount.get("readOnly") is True
    items = {item["path"]: item["key"] for item in secret["secret"].get("items", [])}
    assert items.get(key, key) == "token"  # without items each key of the Secret is a file of its name
    assert args.token is None and not args.open_reads  # every RPC but health needs the token
    assert re.search(r"--token-file\b[^\[]*\[EVOLVE_TOKEN_FILE\]", help_text)
    # Every EVOLVE_* variable the image and the manifest set is a server setting.
    names = {n for n in environment() if n.startswith("EVOLVE_")}
    names |= {n for n in env_of(container) if n.startswith("EVOLVE_")}
    for variable in sorted(names):
        assert re.search(rf"\[{variable}\b", help_text), f"{variable} is not a server setting"
    for variable in env_of(container):
        assert variable.startswith("EVOLVE_") or variable in {"XLA_PYTHON_CLIENT_MEM_FRACTION"}, variable


@pytest.mark.parametrize("name", workload_kustomizations())
def test_probes_are_native_grpc_health_checks(name):
    for statefulset in servers(rendered(name)):
        _check_probes(statefulset)


def _check_probes(statefulset: dict) -> None:
    container = server_container(statefulset)
    for probe in PROBES:
        handlers = [handler for handler in PROBE_HANDLERS if handler in container[probe]]
        assert handlers == ["grpc"], f"{probe}: {handlers}"
        grpc = container[probe]["grpc"]
        assert grpc["port"] == container_ports(container)["grpc"], probe
        assert grpc.get("service", "") == "", f"{probe}: the server reports its overall health under ''"
    # Slow restores must not trip the liveness probe: the startup probe allows minutes.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    pod = statefulset["spec"]["template"]["spec"]
    # The writer's checkpoint drain on SIGTERM; a replica only finishes its calls.
    assert pod["terminationGracePeriodSeconds"] >= (30 if is_replica(statefulset) else 120)


@pytest.mark.parametrize("name", workload_kustomizations())
def test_token_is_a_secret_file_never_an_environment_variable(name):
    for statefulset in servers(rendered(name)):
        _check_token_secret(statefulset)


def _check_token_secret(statefulset: dict) -> None:
    pod = statefulset["spec"]["template"]["spec"]
    container = server_container(statefulset)
    for entry in env_of(container).values():
        assert "valueFrom" not in entry, f"{entry['name']}: no secret (or anything else) from an env reference"
    assert not container.get("envFrom")
    assert "EVOLVE_TOKEN" not in env_of(container) and "EVOLVE_OPEN_READS" not in env_of(container)
    secret, _ = token_secret(statefulset)
    assert secret["secret"]["secretName"] == "evolve-token"
    assert secret["secret"].get("optional") is not True  # no Secret, no pod: never an open server
    mode = secret["secret"]["defaultMode"]
    assert mode & 0o007 == 0, "the token file must not be world-readable"
    assert mode & 0o040 and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"], \
        "the file belongs to the fsGroup: readable by the server's group"


def readme_secret_commands() -> list[str]:
    text = (ROOT / "deploy" / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", text, re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [re.sub(r"\s+#\s.*$", "", line) for line in lines if "kubectl" in line and "create secret" in line]


def test_readme_creates_the_secret_the_statefulset_mounts():
    """Runs deploy/README.md's `kubectl create secret` lines with --dry-run=client (no cluster needed)."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed")
    kubernetes_validate = kubernetes_validator()
    statefulset = one(rendered("."), "StatefulSet")
    secret, _ = token_secret(statefulset)
    commands = readme_secret_commands()
    assert commands, "deploy/README.md does not say how to create the token Secret"
    for command in commands:
        assert "--from-literal" not in command, "a token in kubectl's arguments shows in `ps`: --from-file"
        result = subprocess.run(["bash", "-c", command + " --dry-run=client -o yaml"], check=False, capture_output=True,
                                text=True, timeout=60, env=dict(os.environ, KUBECONFIG=os.devnull))
        assert result.returncode == 0, command + "\n" + result.stderr
        made = yaml.safe_load(result.stdout)
        made["metadata"].pop("creationTimestamp", None)
        kubernetes_validate.validate(made, KUBERNETES_VERSIONS[0], strict=True)
        assert made["kind"] == "Secret"
        assert made["metadata"]["name"] == secret["secret"]["secretName"]
        assert made["metadata"]["namespace"] == statefulset["metadata"]["namespace"]
        token = base64.b64decode(made["data"]["token"]).decode()
        assert len(token.strip()) >= 32 and token.strip().isalnum(), "a random token"


@pytest.mark.parametrize("name", workload_kustomizations())
def test_non_root_read_only_and_no_privileges(name):
    for statefulset in servers(rendered(name)):
        _check_no_privileges(statefulset)


def _check_no_privileges(statefulset: dict) -> None:
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False  # the server never calls the Kubernetes API
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    security = pod["securityContext"]
    uid, _, gid = instruction("USER")[0].partition(":")
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == uid and str(security["runAsGroup"]) == gid
    assert int(uid) >= 10000  # above host uids
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context.get("privileged", False) is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add")
        assert not any("hostPort" in port for port in container["ports"])
    # Read-only root: every place the server writes is a volume (state, /tmp,
    # $HOME of the image); a replica does not write its state directory.
    container = server_container(statefulset)
    mounted = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    writes = ("/tmp", environment()["HOME"]) + (() if is_replica(statefulset) else (environment()["EVOLVE_STATE_DIR"],))
    for path in writes:
        assert path in mounted and not mounted[path].get("readOnly"), f"{path} is not writable"
    allowed = {"secret", "emptyDir", "persistentVolumeClaim", "configMap", "projected", "ephemeral", "name"}
    for volume in volumes_of(statefulset).values():  # the Pod Security "restricted" volume types
        assert set(volume) <= allowed, volume


@pytest.mark.parametrize("name", workload_kustomizations())
def test_cpu_memory_and_scratch_space_are_bounded(name):
    for statefulset in servers(rendered(name)):
        _check_bounded(statefulset)


def _check_bounded(statefulset: dict) -> None:
    for container in statefulset["spec"]["template"]["spec"]["containers"]:
        resources = container["resources"]
        for resource in ("cpu", "memory", "ephemeral-storage"):
            request = quantity(resources["requests"][resource])
            limit = quantity(resources["limits"][resource])
            assert 0 < request <= limit, f"{container['name']}: {resource} {request} > {limit}"
    scratch = 0.0
    for volume in volumes_of(statefulset).values():
        if "emptyDir" in volume:
            assert "sizeLimit" in volume["emptyDir"], f"emptyDir {volume['name']} has no sizeLimit"
            scratch += quantity(volume["emptyDir"]["sizeLimit"])
    limits = server_container(statefulset)["resources"]["limits"]
    assert scratch < quantity(limits["ephemeral-storage"]), "the emptyDirs must fit the ephemeral-storage limit"


@pytest.mark.parametrize("name", workload_kustomizations())
def test_network_policy_selects_the_pods_and_opens_only_their_ports(name):
    documents = rendered(name)
    for statefulset in servers(documents):
        _check_network_policy(documents, statefulset)


def _check_network_policy(documents: list[dict], statefulset: dict) -> None:
    container = server_container(statefulset)
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    policies = [doc for doc in documents if doc["kind"] == "NetworkPolicy"
                and doc["metadata"]["namespace"] == statefulset["metadata"]["namespace"]
                and doc["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
                and not doc["spec"]["podSelector"].get("matchExpressions")]
    assert policies, "no NetworkPolicy selects the server's pods"
    allowed: dict[int, list[dict]] = {}
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule without ports opens every port"
            for port in rule["ports"]:
                assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port
                allowed.setdefault(resolve_port(container, port["port"]), []).append(rule)
    ports = container_ports(container)
    assert set(allowed) == set(ports.values()), f"allowed {sorted(allowed)}, container ports {ports}"
    # Metrics are plain HTTP without a token: never open to everyone.
    for rule in allowed[ports["metrics"]]:
        assert rule.get("from"), "the metrics port is open to any source"
    # What the Service sends to is allowed.
    service = one(documents, "Service", "evolve-read" if is_replica(statefulset) else "evolve")
    for port in service["spec"]["ports"]:
        assert resolve_port(container, port["targetPort"]) in allowed


@pytest.mark.parametrize("name", workload_kustomizations())
def test_services_reach_the_grpc_port_of_the_server_pods(name):
    documents = rendered(name)
    for statefulset in servers(documents):
        _check_services(documents, statefulset)


def _check_services(documents: list[dict], statefulset: dict) -> None:
    container = server_container(statefulset)
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Changes go to the writer's Service, never to a replica; reads may use evolve-read.
    service = one(documents, "Service", "evolve-read" if is_replica(statefulset) else "evolve")
    selecting = [doc["metadata"]["name"] for doc in documents if doc["kind"] == "Service"
                 and doc["spec"]["selector"].items() <= labels.items()]
    assert (is_replica(statefulset) and "evolve" not in selecting) or not is_replica(statefulset), selecting
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == "grpc" and port["port"] == 8500 and port.get("appProtocol") == "grpc"
    assert resolve_port(container, port["targetPort"]) == container_ports(container)["grpc"]
    if statefulset["kind"] != "StatefulSet":
        return
    governing = one(documents, "Service", statefulset["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["selector"].items() <= labels.items()


def test_images_carry_the_project_version_and_the_jax_flavour():
    flavours = {".": "", "base": "", "overlays/gpu": "-cuda12", "overlays/serving": ""}
    assert set(flavours) == set(workload_kustomizations()), "a new overlay: say which image it runs"
    for name, suffix in flavours.items():
        for workload in servers(rendered(name)):
            assert server_container(workload)["image"] == f"evolve:{PROJECT_VERSION}{suffix}", name


def test_gpu_overlay_requests_one_gpu():
    documents = rendered("overlays/gpu")
    statefulset = one(documents, "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    container = server_container(statefulset)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in server_container(one(rendered("."), "StatefulSet"))["resources"]["limits"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert float(env_of(container)["XLA_PYTHON_CLIENT_MEM_FRACTION"]["value"]) <= 0.95
    # The patch keeps what the base sets: the same resources but the GPU, probes, security, volumes.
    base = one(rendered("."), "StatefulSet")
    base_limits = set(server_container(base)["resources"]["limits"])
    assert set(container["resources"]["limits"]) == base_limits | {"nvidia.com/gpu"}
    for key in (*PROBES, "securityContext", "volumeMounts", "ports"):
        assert container[key] == server_container(base)[key], key
    assert pod["volumes"] == base["spec"]["template"]["spec"]["volumes"]


def test_serving_overlay_runs_read_only_replicas_of_the_writer_s_store():
    documents = rendered("overlays/serving")
    writer = one(documents, "StatefulSet")
    replicas = one(documents, "Deployment", "evolve-replica")
    assert not is_replica(writer) and is_replica(replicas)
    assert "volumeClaimTemplates" not in writer["spec"]
    # Both mount the one ReadWriteMany claim at the state directory: the writer read-write, replicas read-only.
    writer_claim, writer_mount = state_claim(documents, writer)
    replica_claim, replica_mount = state_claim(documents, replicas)
    assert writer_claim is replica_claim or writer_claim == replica_claim
    assert volumes_of(writer)["state"]["persistentVolumeClaim"]["claimName"] == \
        volumes_of(replicas)["state"]["persistentVolumeClaim"]["claimName"]
    assert writer_claim["accessModes"] == ["ReadWriteMany"]
    assert writer_mount["mountPath"] == replica_mount["mountPath"]
    assert not writer_mount.get("readOnly") and replica_mount["readOnly"] is True
    assert volumes_of(replicas)["state"]["persistentVolumeClaim"]["readOnly"] is True
    # The autoscaler scales the replicas, never the writer.
    autoscaler = one(documents, "HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "evolve-replica")
    assert 1 <= autoscaler["spec"]["minReplicas"] < autoscaler["spec"]["maxReplicas"]
    # The writer's Service reaches the writer only; evolve-read the replicas only.
    writer_labels = writer["spec"]["template"]["metadata"]["labels"]
    replica_labels = replicas["spec"]["template"]["metadata"]["labels"]
    assert one(documents, "Service", "evolve")["spec"]["selector"].items() <= writer_labels.items()
    assert not one(documents, "Service", "evolve-read")["spec"]["selector"].items() <= writer_labels.items()
    assert one(documents, "Service", "evolve-read")["spec"]["selector"].items() <= replica_labels.items()
    # In everything else the replicas run as the writer does.
    writer_container, replica_container = server_container(writer), server_container(replicas)
    for key in (*PROBES, "securityContext", "ports", "image"):
        assert replica_container[key] == writer_container[key], key
    assert replicas["spec"]["template"]["spec"]["securityContext"] == writer["spec"]["template"]["spec"]["securityContext"]


def checkov_skips(documents: list[dict]) -> dict[str, str]:
    skips = {}
    for doc in documents:
        for key, value in doc["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                match = re.fullmatch(r"(CKV2?_K8S_\d+)=(.+)", value, re.DOTALL)
                assert match, f"{key}: {value!r} is not CKV_K8S_<n>=<reason>"
                assert len(match[2].split()) >= 8, f"{key}: give the reason"
                skips[match[1]] = match[2]
    return skips


def test_checkov_skips_are_justified_and_documented():
    readme = (ROOT / "deploy" / "README.md").read_text()
    for name in workload_kustomizations():
        skips = checkov_skips(rendered(name))
        assert set(skips) <= {"CKV_K8S_43", "CKV_K8S_15"}, f"{name}: new skips {sorted(skips)}: fix them, or justify"
        for check in skips:
            assert check in readme, f"{check} is skipped but deploy/README.md does not say why"


def test_checkov_passes():
    """Only where checkov is installed (it is heavy, so not in CI): `pip install checkov` in its own venv
    and put it on PATH, or set CHECKOV to its path."""
    checkov = os.environ.get("CHECKOV") or shutil.which("checkov")
    if not checkov:
        pytest.skip("checkov is not installed (see deploy/README.md)")
    # kustomize: the rendered kustomizations; kubernetes: the plain files, as `kubectl apply -f` would read them.
    result = subprocess.run([checkov, "-d", str(K8S), "--framework", "kustomize", "kubernetes", "--compact",
                             "--quiet", "--skip-download"], check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "kustomize scan results" in result.stdout and "kubernetes scan results" in result.stdout
