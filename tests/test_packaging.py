"""The distribution installs one namespace, ``maskmill.*``: from outside the checkout,
``import maskmill.model`` works and ``import model`` does not, for the editable install the suite
runs in and for a wheel built from this tree and installed into a fresh virtual environment."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("maskmill.model", "maskmill.storage", "maskmill.engine", "maskmill.flows")

# Run in a fresh interpreter from a folder outside the checkout: every maskmill package imports
# from where it is installed, the shipped weights and the page are there, and no bare top-level
# name of ours exists.
CHECK = f"""
import importlib, json, sys
PACKAGES = {PACKAGES!r}
found = {{}}
for name in PACKAGES:
    module = importlib.import_module(name)
    found[name] = module.__file__
bare = {{}}
for name in ("model", "engine", "storage", "flows"):
    try:
        importlib.import_module(name)
        bare[name] = "imported"
    except ModuleNotFoundError as error:
        bare[name] = type(error).__name__
from maskmill.model import has_default, load_default, generator_presets
from maskmill.engine.web.app import page_html
print(json.dumps({{
    "files": found,
    "bare": bare,
    "default": has_default() and sorted(generator_presets(load_default())),
    "page": "<canvas" in page_html(),
}}))
"""


def _check(python: str, cwd: Path) -> dict:
    import json

    result = subprocess.run(
        [python, "-c", CHECK], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_declared_packages_are_every_package_folder():
    """pyproject lists the packages by hand (package-dir mapping): a new sub-package must be
    listed, or a wheel silently leaves it out."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    roots = {name: REPO / folder for name, folder in config["package-dir"].items()}
    found = set()
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found.add(".".join((name, *relative)))
    assert declared == found


def test_editable_install_imports_only_the_namespace(tmp_path):
    info = _check(sys.executable, tmp_path)
    assert set(info["files"]) == set(PACKAGES)
    assert all(Path(f).is_relative_to(REPO) for f in info["files"].values())
    assert info["bare"] == dict.fromkeys(
        ("model", "engine", "storage", "flows"), "ModuleNotFoundError"
    )
    assert info["default"] == ["auto", "semi"] and info["page"]


@pytest.mark.timeout(900)
def test_wheel_installs_into_a_fresh_venv(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "out", "build", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("maskmill-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("maskmill-")}
    assert tops == {"maskmill"}, tops
    assert "maskmill/model/weights/default.pt" in names
    for page in ("annotate.html", "review.html", "masks.js"):  # the server's static files
        assert f"maskmill/engine/web/static/{page}" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # The dependencies (torch, ray, ...) come from the suite's environment, added as a plain
    # path: its .pth files, the editable install's finder among them, are not run.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    info = _check(python, tmp_path)
    assert all(Path(f).is_relative_to(venv) for f in info["files"].values()), info["files"]
    assert info["bare"] == dict.fromkeys(
        ("model", "engine", "storage", "flows"), "ModuleNotFoundError"
    )
    assert info["default"] == ["auto", "semi"] and info["page"]
