"""Packaging as pip and Flower see it: the Python versions flwr supports, every imported package
declared, nothing for uv to install when Flower installs the app's dependencies at run time
(tests/server/test_flower_app.py runs `flwr run .`), and a wheel install that submits the same
app bundle as a checkout."""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import metadata, packages_distributions
from io import BytesIO
from pathlib import Path

import pytest
import tomllib
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Imports that need a distribution other than the one providing the imported top-level module.
IMPLIED = {"torch.utils.tensorboard": "tensorboard"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> set[str]:
    deps = PROJECT["project"]["dependencies"]
    extras = [d for group in PROJECT["project"]["optional-dependencies"].values() for d in group]
    return {_name(d) for d in [*deps, *extras]}


def test_requires_python_admits_only_versions_flwr_supports():
    ours = SpecifierSet(PROJECT["project"]["requires-python"])
    flwr = SpecifierSet(metadata("flwr")["Requires-Python"])
    versions = [f"3.{minor}" for minor in range(8, 16)]
    assert [v for v in versions if v in ours and v not in flwr] == []
    assert "3.11" in ours


def test_every_third_party_import_of_the_packages_is_a_declared_dependency():
    imported: set[str] = set()
    for package in ("client", "server", "hmgdm_core"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module)
    providers = packages_distributions()
    needed = {IMPLIED[m] for m in imported if m in IMPLIED}
    for module in {m.split(".")[0] for m in imported}:
        if module in sys.stdlib_module_names or module in ("client", "server", "hmgdm_core"):
            continue
        dists = providers.get(module)
        assert dists, f"{module} is imported but no installed distribution provides it"
        needed.add(_name(dists[0]))
    needed.discard("pydantic-core")  # pydantic's own compiled half, pinned by pydantic
    assert needed - _declared() == set(), "imported but not in pyproject.toml dependencies"


def test_uv_resolves_nothing_when_flower_installs_the_app_dependencies():
    overrides = PROJECT["tool"]["uv"]["override-dependencies"]
    assert all(o.endswith("; python_version < '3'") for o in overrides)
    assert {_name(o) for o in overrides} == _declared()


def _fab_files(fab: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(BytesIO(fab)) as z:
        return {n: z.read(n) for n in z.namelist() if not n.startswith(".info/")}


@pytest.mark.slow
def test_an_installed_wheel_submits_the_same_app_bundle_as_a_checkout(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    # The sources a clean clone has (building in the checkout would leave build/ behind).
    src = tmp_path / "src"
    for part in ("client", "server", "hmgdm_core", "configs"):
        shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path, src],
                   check=True, timeout=300)  # fmt: skip
    (wheel,) = tmp_path.glob("hmgdm-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index",
                    "--ignore-installed", wheel],
                   check=True, timeout=300)  # fmt: skip
    # Dependencies from this environment, without its editable install of the checkout.
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", purelib], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = (
        "import hashlib, server; from pathlib import Path\n"
        "from flwr.cli.build import build_fab_from_disk\n"
        "from server.flwr_cli import app_dir\n"
        f"app = app_dir(Path({str(tmp_path / 'work')!r}))\n"
        "print(server.__file__); print(app)\n"
        f"Path({str(tmp_path / 'wheel.fab')!r}).write_bytes(build_fab_from_disk(app))\n"
    )
    # Only what is installed: no PYTHONPATH pointing into a checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    installed, app = out.stdout.split()
    assert installed.startswith(site) and Path(app) == tmp_path / "work" / "app"
    from_wheel = _fab_files((tmp_path / "wheel.fab").read_bytes())
    from_checkout = _fab_files(build_fab_from_disk(src))
    assert sorted(from_wheel) == sorted(from_checkout)
    differ = [n for n in from_wheel if from_wheel[n] != from_checkout[n]]
    assert differ == [], differ
    assert (
        hashlib.sha256((tmp_path / "wheel.fab").read_bytes()).hexdigest()
        == hashlib.sha256(build_fab_from_disk(src)).hexdigest()
    )
    version = subprocess.run([venv / "bin" / "hmgdm-server", "--version"], capture_output=True,
                             text=True, env=env, timeout=120)  # fmt: skip
    assert version.returncode == 0 and version.stdout.strip().endswith(
        PROJECT["project"]["version"]
    )
