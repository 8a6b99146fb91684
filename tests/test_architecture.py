"""The layout rules of the house, checked on the source (CI runs these with the suite):

- ``umair`` is the library: no module of it imports ``pipelines``, ``ray`` or ``mlflow``
  (not even inside a function), so it works without a cluster or a tracking server;
- job modules (one per ``umair`` subcommand) import the library and the shared
  ``pipelines`` modules, never another job; only the dispatchers (the CLI and the demo,
  which runs every stage) reach the jobs;
- small modules: no source file over 500 lines, the train and extract jobs under 400;
- importing the library's model, image, text and contract modules loads neither Ray nor
  MLflow (``python -X importtime`` lists every module a process imports).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_LIBRARY = ("pipelines", "ray", "mlflow")
SHARED = {"pipelines.runtime", "pipelines.fusion_training", "pipelines.serving"}  # Ray code used by more than one job
DISPATCHERS = {"pipelines.cli", "pipelines.demo"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "pipelines"]
    return out


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_library_imports_neither_pipelines_nor_ray_nor_mlflow():
    found = [
        f"{p.relative_to(ROOT)}:{line}: imports {mod}"
        for p in _sources("umair")
        for line, mod in _imports(p)
        if mod.split(".")[0] in FORBIDDEN_IN_LIBRARY
    ]
    assert found == [], "\n".join(found)


def test_job_modules_never_import_each_other():
    from pipelines.cli import JOB_MODULES

    jobs = set(JOB_MODULES)
    found = []
    for p in _sources("pipelines"):
        me = _module_name(p)
        if me in DISPATCHERS:
            continue
        for line, mod in _imports(p):
            target = next((j for j in jobs if mod == j or mod.startswith(j + ".")), None)
            if target is not None and target != me:
                found.append(f"{p.relative_to(ROOT)}:{line}: imports the job {target}")
    assert found == [], "\n".join(found)


def test_shared_pipeline_modules_import_no_job():
    from pipelines.cli import JOB_MODULES

    for name in SHARED:
        path = ROOT / (name.replace(".", "/") + ".py")
        assert path.is_file(), name
        bad = [mod for _, mod in _imports(path) if any(mod == j or mod.startswith(j + ".") for j in JOB_MODULES)]
        assert bad == [], f"{name} imports jobs {bad}"


@pytest.mark.parametrize("package", ["umair", "pipelines"])
def test_no_source_file_is_over_500_lines(package):
    long = {str(p.relative_to(ROOT)): n for p in _sources(package) if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}, long


def test_the_train_and_extract_jobs_are_thin():
    for job in ("pipelines/train.py", "pipelines/extract.py"):
        n = len((ROOT / job).read_text().splitlines())
        assert n < 400, f"{job}: {n} lines"


def test_importing_the_library_loads_neither_ray_nor_mlflow():
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            "import umair.model, umair.image, umair.text, umair.contracts, "
            "umair.modalities, umair.training.inputs, umair.feature_store, umair.tuning",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "umair.contracts" in modules  # the importtime report was read
    loaded = sorted(m for m in modules if m.split(".")[0] in ("ray", "mlflow"))
    assert loaded == [], loaded[:20]
