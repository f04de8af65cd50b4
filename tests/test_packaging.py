"""The package as a user installs it: every package and the recipes in the wheel, which installs into a
fresh virtual environment and runs ``hybrid recipes`` and ``hybrid info`` from outside the repository;
``hybrid --version`` and ``python -m hybrid``; the licence; the Python version that pyproject.toml
and the README state."""

import os
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from setuptools import find_packages

import hybrid
from hybrid.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_listed_and_recipes_map_into_the_package():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(ROOT), include=["blocks*", "hybrid*", "convert*"]))
    assert listed == found | {"hybrid.recipes"}, "pyproject.toml [tool.setuptools] packages must name every package"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"hybrid.recipes": "recipes"}


def test_version_licence_and_python(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"hybrid {hybrid.__version__}"
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert "Python 3.11 or newer" in (ROOT / "README.md").read_text()


def test_recipes_fails_loudly_without_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("hybrid.cli.models.RECIPES_DIR", tmp_path)
    assert main(["recipes"]) == 2
    assert f"no recipes in {tmp_path}" in capsys.readouterr().err


@pytest.mark.wheel  # builds the wheel and installs it with torch into a new environment (minutes): make test runs it
def test_the_wheel_installs_into_a_fresh_environment_and_finds_its_recipes(tmp_path):
    """A plain virtual environment (no system site-packages) gets torch (the CPU wheel, from the local
    wheel folder or pip's cache) and the wheel with its dependencies from the package index (pip's
    cache makes later runs quick); then the commands run from a folder outside the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                    str(ROOT)], check=True, env=env, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("kvm_hybrid-*.whl")
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True,
                           check=True).stdout
    assert "hybrid/recipes/tiny/gla_kvm.yaml" in names and "blocks/native/" in names
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    for requirement in ("torch==2.13.0", str(wheel)):
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", requirement], env=env, timeout=900,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=outside, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    hybrid_command = str(tmp_path / "venv" / "bin" / "hybrid")
    listed = run(hybrid_command, "recipes")
    assert "tiny/gla_kvm" in listed and "paper/120m/kvm_fixed256" in listed
    info = run(hybrid_command, "info", "tiny/gla_kvm")
    assert "parameters:" in info and re.search(r"\bkvm\b", info)
    assert run(str(python), "-m", "hybrid", "--version").strip() == f"hybrid {hybrid.__version__}"
    where = run(str(python), "-c", "import hybrid.model.recipe as r; print(r.RECIPES_DIR)")
    assert where.strip().startswith(str(tmp_path / "venv"))  # the installed copy, not the repository
