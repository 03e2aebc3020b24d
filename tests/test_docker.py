"""The cluster files in docker/: the worker image, the KubeRay manifest and the `ray up` config.

Docker cannot build the image here (no network to pull the CUDA base image) and no Kubernetes or
AWS is reachable. So the image's build steps that can run here do run, against this checkout: its
`make install` line (dry run: make -n), the command that pins ray's extras, the tiny model's build
step, and the commands it links to. The rest is checked against what it must agree with: the
Makefile's torch pin, the installed ray, one image for head and workers. `cluster.yaml` goes
through Ray's own config validation, the check `ray up` runs before it calls AWS.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_the_images_make_install_line_installs_the_pinned_torch_then_the_project(tmp_path):
    """The Dockerfile's `make install` line, run as `make -n` (print, do not run) on this Makefile in
    an empty folder: the pin it passes reaches pip before the project's own install, into the venv
    under WORKDIR, after the whole checkout was copied there."""
    instructions = dockerfile_instructions()
    workdir = next(a for k, a in instructions if k == "WORKDIR")
    install = first_run(r"\bmake install\b")
    assert instructions.index(("COPY", ". .")) < instructions.index(("RUN", runs()[install]))
    pin = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)["TORCH"]
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    argv = shlex.split(runs()[install].replace("$TORCH", pin))
    proc = subprocess.run([*argv, "-n"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    torch = next(i for i, line in enumerate(lines) if f'pip install -q "{pin}"' in line)
    project = next(i for i, line in enumerate(lines) if 'pip install -q -e ".[test]"' in line)
    assert torch < project and lines[project].startswith(".venv/bin/python")  # the Makefile's own .venv, under WORKDIR
    assert f"{workdir}/.venv/bin" in env()["PATH"].split(":")  # its ray and peftsweep are what runs


def test_the_images_ray_extras_are_pinned_to_the_installed_ray_as_the_manifest_says(ray_cluster):
    """The command in the ray[default] line that picks the version, run with this venv's python: the
    ray `make install` chose, so the line adds extras and changes no version; KubeRay's rayVersion too."""
    import ray

    base = next(a for k, a in dockerfile_instructions() if k == "FROM")
    assert base.startswith("nvidia/cuda:")  # the NVIDIA container runtime's settings come with it
    line = runs()[first_run(r"ray\[default\]")]
    assert first_run(r"\bmake install\b") < first_run(r"ray\[default\]")
    picks = shlex.split(re.search(r'==\$\((.*)\)"', line).group(1))  # the command substitution in "ray[default]==$(...)"
    assert picks[0] == ".venv/bin/python"
    version = subprocess.run([sys.executable, *picks[1:]], capture_output=True, text=True, timeout=120).stdout.strip()
    assert version == ray.__version__ == ray_cluster["spec"]["rayVersion"]


def test_the_images_model_step_runs_and_keeps_the_tiny_model_in_its_cache(tiny_model_dir, model_cache):
    """The image's tiny-model step, run here against this session's cache: it finds the model built, and keeps it."""
    assert env().get("PEFTSWEEP_CACHE")
    step = first_run(r"ensure_tiny_model\(\)")
    assert step > first_run(r"\bmake install\b")
    argv = shlex.split(runs()[step])
    assert argv[0] == "python"  # the venv's, first on PATH
    weights = tiny_model_dir / "model.safetensors"
    built = weights.stat().st_mtime_ns
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert weights.stat().st_mtime_ns == built


def test_the_images_links_name_commands_that_make_install_installs():
    """`ray` and `peftsweep` in /usr/local/bin link to the venv's: that venv (here, this one) has them."""
    workdir = next(a for k, a in dockerfile_instructions() if k == "WORKDIR")
    [link] = [shlex.split(c) for c in runs() if c.startswith("ln -s ")]
    targets = link[2:-1]
    assert {Path(t).name for t in targets} == {"ray", "peftsweep"}
    for target in targets:
        assert Path(target).parent == Path(workdir) / ".venv" / "bin"
        assert (Path(sys.executable).parent / Path(target).name).is_file()


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


def test_ray_up_config_syncs_the_checkout_and_installs_it_with_make(ray_up_config, tmp_path):
    """Every node's setup command, in the folder the checkout is synced to, run as `make -n` on this
    Makefile: it installs the project into the image's venv, the one on the image's PATH."""
    (remote,) = [path for path, local in ray_up_config["file_mounts"].items() if local == "."]
    setup = ray_up_config["setup_commands"]  # run on the head and on every worker
    [install] = [c for c in setup if c.startswith(f"cd {remote} && make ")]
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    argv = shlex.split(install.split("&&", 1)[1])
    proc = subprocess.run([*argv, "-n"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    venv = next(a.split("=", 1)[1] for a in argv if a.startswith("VENV="))
    assert f'{venv}/bin/python -m pip install -q -e ".[test]"' in proc.stdout
    assert f"{venv}/bin" in env()["PATH"].split(":")  # the Dockerfile's venv
    assert ray_up_config["docker"]["image"]  # the image from docker/Dockerfile holds torch and the venv
