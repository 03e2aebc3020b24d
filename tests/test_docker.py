"""The cluster files in docker/: the worker image, the KubeRay manifest and the `ray up` config.

Docker cannot build the image here (no network to pull the CUDA base image) and no Kubernetes or
AWS is reachable, so these tests read the files and check what a cluster needs from them: the
image installs peftsweep exactly as the Makefile does, the manifests ask for GPU workers running
that image. `cluster.yaml` also goes through Ray's own config validation, the check `ray up` runs
before it calls AWS.
"""

from __future__ import annotations

import copy
import re
import shlex

import pytest
import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*\??=\s*(.+?)\s*$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile sets no {name}"
    return match.group(1)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def runs() -> list[str]:
    return [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]


def env() -> dict[str, str]:
    values = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            values.update(item.split("=", 1) for item in shlex.split(args))
    return values


def first_run(pattern: str) -> int:
    """Index in runs() of the first RUN matching `pattern`."""
    index = next((i for i, command in enumerate(runs()) if re.search(pattern, command)), None)
    assert index is not None, f"no RUN in docker/Dockerfile matches {pattern!r}"
    return index


# --- the image ------------------------------------------------------------------------------------


def test_image_pins_torch_like_the_makefile():
    pin = makefile_variable("TORCH")
    args = dict(a.split("=", 1) for k, a in dockerfile_instructions() if k == "ARG" and "=" in a)
    assert args.get("TORCH") == pin, f"docker/Dockerfile ARG TORCH={args.get('TORCH')}, Makefile TORCH={pin}"
    torch_first = first_run(r'pip install (-q )?"\$TORCH"')
    assert torch_first < first_run(r"\bmake install\b")  # torch first, as the Makefile's install does


def test_image_installs_the_project_with_the_makefiles_own_install():
    instructions = dockerfile_instructions()
    workdir = next(a for k, a in instructions if k == "WORKDIR")
    copy_all = instructions.index(("COPY", ". ."))  # the whole repository into WORKDIR
    install = next(i for i, (k, a) in enumerate(instructions) if k == "RUN" and re.search(r"\bmake install\b", a))
    assert copy_all < install
    command = instructions[install][1]
    assert 'TORCH="$TORCH"' in command  # the same pin reaches the Makefile's recipe
    assert "VENV=" not in command  # the Makefile's own .venv, under WORKDIR
    assert f"{workdir}/.venv/bin" in env()["PATH"].split(":")  # its ray and peftsweep are what runs


def test_image_is_a_cuda_image_with_rays_cluster_extras_at_the_installed_version():
    base = next(a for k, a in dockerfile_instructions() if k == "FROM")
    assert base.startswith("nvidia/cuda:")
    ray_default = runs()[first_run(r"ray\[default\]")]
    assert "ray.__version__" in ray_default  # pinned to the ray `make install` chose: extras only
    assert first_run(r"\bmake install\b") < first_run(r"ray\[default\]")


def test_image_holds_the_tiny_model_in_its_cache():
    assert env().get("PEFTSWEEP_CACHE")
    assert first_run(r"ensure_tiny_model\(\)") > first_run(r"\bmake install\b")


# --- KubeRay ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> dict:
    documents = [d for d in yaml.safe_load_all((DOCKER / "kuberay.yaml").read_text()) if d]
    found = [d for d in documents if d.get("kind") in ("RayCluster", "RayJob")]
    assert len(found) == 1, "docker/kuberay.yaml: expected one RayCluster or RayJob"
    return found[0]


def _cluster_spec(resource: dict) -> dict:
    return resource["spec"]["rayClusterSpec"] if resource["kind"] == "RayJob" else resource["spec"]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_kuberay_manifest_is_a_ray_io_v1_cluster(ray_cluster):
    assert ray_cluster["apiVersion"] == "ray.io/v1"
    assert ray_cluster["metadata"]["name"]


def test_kuberay_head_runs_the_image_and_keeps_the_runs_folder(ray_cluster):
    head = _cluster_spec(ray_cluster)["headGroupSpec"]
    (container,) = _containers(head)
    assert container["image"]
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    workdir = next(a for k, a in dockerfile_instructions() if k == "WORKDIR")
    assert f"{workdir}/runs" in mounts  # runs/ of `peftsweep run` in WORKDIR: the store and report land on a volume
    assert str(head["rayStartParams"].get("num-cpus")) == "0"  # trials go to the GPU workers


def test_kuberay_has_a_gpu_worker_group_on_the_heads_image(ray_cluster):
    spec = _cluster_spec(ray_cluster)
    (head,) = _containers(spec["headGroupSpec"])
    gpu_groups = [
        g for g in spec["workerGroupSpecs"]
        if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in _containers(g))
    ]
    assert gpu_groups, "no worker group limits nvidia.com/gpu"
    for group in gpu_groups:
        assert int(group["replicas"]) >= 1
        assert {c["image"] for c in _containers(group)} == {head["image"]}  # driver and trials: one code version


# --- ray up ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_up_config() -> dict:
    return yaml.safe_load((DOCKER / "cluster.yaml").read_text())


def test_ray_up_config_passes_rays_own_validation(ray_up_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(ray_up_config)))


def test_ray_up_config_has_a_head_and_a_gpu_worker_type(ray_up_config):
    types = ray_up_config["available_node_types"]
    head = ray_up_config["head_node_type"]
    assert head in types
    workers = {name: t for name, t in types.items() if name != head}
    gpu = [t for t in workers.values() if re.match(r"^(g|p)\d", t["node_config"]["InstanceType"])]  # AWS GPU families
    assert gpu, f"no GPU instance type among the workers: {[t['node_config']['InstanceType'] for t in workers.values()]}"
    assert all(t.get("max_workers", 0) >= 1 for t in gpu)


def test_ray_up_config_syncs_the_checkout_and_installs_it_with_make(ray_up_config):
    (remote,) = [path for path, local in ray_up_config["file_mounts"].items() if local == "."]
    setup = ray_up_config["setup_commands"]  # run on the head and on every worker
    assert any(re.search(rf"cd {re.escape(remote)} && make (-B )?install\b", c) for c in setup), setup
    assert ray_up_config["docker"]["image"]  # the image from docker/Dockerfile holds torch and the venv
