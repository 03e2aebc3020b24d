"""Nothing from a sweep file or a data file is ever executed: YAML is read with safe_load only,
and no module of peftsweep calls eval or exec (checked on the source, so a new call fails here)."""

from __future__ import annotations

import ast

import pytest

from hpo.errors import SweepError
from hpo.spec import load_sweep
from tests.conftest import REPO

PACKAGES = ("hpo", "trainers", "analysis")


def _calls(tree: ast.AST) -> set[str]:
    """Called names: `eval` for a bare call, `yaml.load` for an attribute of a module name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                names.add(func.id)
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                names.add(f"{func.value.id}.{func.attr}")
    return names


def _yaml_loaders(tree: ast.AST) -> list[str]:
    """The Loader= of every yaml.load call."""
    loaders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "yaml":
                loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
                loaders.append(loader.id if isinstance(loader, ast.Name) else "?")
    return loaders


def test_no_module_calls_eval_or_exec_or_unsafe_yaml():
    import yaml

    from hpo import spec

    sources = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    assert len(sources) > 10
    forbidden = {"eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec", "pickle.loads"}
    forbidden |= {"yaml.unsafe_load", "yaml.full_load", "yaml.load_all"}
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        assert not _calls(tree) & forbidden, path
        for loader in _yaml_loaders(tree):  # yaml.load only with the safe loader
            assert loader == "_Loader" and path.name == "spec.py", path
    assert issubclass(spec._Loader, yaml.SafeLoader)


def test_a_python_object_tag_in_a_sweep_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    sweep = tmp_path / "evil.yaml"
    sweep.write_text(f"description: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SweepError):
        load_sweep(str(sweep), [])
    assert not marker.exists()
