"""The wheel carries the templates and the rendered scripts: install it in a fresh venv outside the
repo, then export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from luasched.render import manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_then_export_outside_the_repository(tmp_path: Path) -> None:
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    env = {
        key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "VIRTUAL_ENV"}
    }
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO)],
        check=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    out = tmp_path / "exported"
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    listing = subprocess.run(
        [str(environment / "bin" / "luasched"), "export", str(out)],
        check=True,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "manifest.json" in listing.stdout
    exported = json.loads((out / "manifest.json").read_text())
    assert exported == manifest()
    for name, entry in exported["scripts"].items():
        assert (out / entry["file"]).is_file(), name
    # The installed package has its own copy of the templates (not this checkout's), and its
    # rendered scripts match them: they are loaded, nothing is rendered.
    code = (
        "import luasched.render as r; r.render_all(); "
        "print(r.templates_dir(), r.SHIPPED_DIR, r.render_count())"
    )
    where, shipped, renders = subprocess.run(
        [str(python), "-c", code],
        check=True,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert where.startswith(str(environment)), where
    assert not where.startswith(str(REPO))
    assert shipped.startswith(str(environment)), shipped
    assert renders == "0"
    assert sys.prefix != str(environment)
