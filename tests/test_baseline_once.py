"""The base model answers the judged prompts once per sweep, not once per trial or epoch.

Generation happens in Ray's worker processes, so the test counts it there: a `sitecustomize`
module on PYTHONPATH (every Python process of the sweep, Ray workers included, runs it at start)
wraps `trainers.evaluate.generate_answers` when that module is imported, and appends one line per
call to a file: whether the answering model carried an adapter.
"""

from __future__ import annotations

import os

from tests.conftest import peftsweep

SITECUSTOMIZE = '''
import importlib.abc
import importlib.machinery
import os
import sys


class _CountGenerations(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "trainers.evaluate":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            real = module.generate_answers

            def counted(model, *args, **kwargs):
                with open(os.environ["GENERATIONS_LOG"], "a") as log:
                    log.write(("trial" if hasattr(model, "peft_config") else "base") + "\\n")
                return real(model, *args, **kwargs)

            module.generate_answers = counted

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _CountGenerations())
'''


def test_the_base_model_answers_once_per_sweep(tmp_path, tiny_model_dir):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "generations.log"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]), "GENERATIONS_LOG": str(log)}
    proc = peftsweep("run", "smoke", "--runs-dir", str(tmp_path / "runs"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = log.read_text().split()
    assert calls.count("base") == 1  # the baseline task, once
    assert calls.count("trial") == 2 * 2  # each of 2 trials after each of its 2 epochs (8 prompts: one batch)
