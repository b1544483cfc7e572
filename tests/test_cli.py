"""The luasched command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from luasched.cli import main
from luasched.render import manifest, render_all


def test_render_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "slots.keyslot"]) == 0
    assert capsys.readouterr().out == render_all()["slots.keyslot"].text


def test_render_unknown_script_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["render", "no.such"])
    assert stop.value.code == 2
    assert "no script named 'no.such'" in capsys.readouterr().err


def test_export_writes_scripts_and_manifest(tmp_path: Path) -> None:
    assert main(["export", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data == manifest()
    for entry in data["scripts"].values():
        assert (tmp_path / "out" / entry["file"]).read_text().startswith("--@script")


def test_configuration_flows_into_the_scripts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--max-batch", "50", "manifest"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["max_batch"] == 50
    assert data["scripts"]["slots.keyslot"]["argv"][0]["repeat"]["max"] == 50
    with pytest.raises(SystemExit):
        main(["--max-batch", "0", "list"])


def test_list_names_every_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(render_all())


def test_script_reference_is_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/scripts.md is generated from the manifest: regenerate it with `make snapshots`."""
    assert main(["reference"]) == 0
    generated = capsys.readouterr().out
    committed = (Path(__file__).resolve().parents[1] / "docs" / "scripts.md").read_text()
    assert generated == committed, "docs/scripts.md is stale: run `make snapshots`"
    for name in render_all():
        assert f"### {name}\n" in generated


def test_readme_lists_every_script() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [name for name in render_all() if f"`{name}`" not in readme]
    assert not missing, f"README's script table lacks {missing}"


@pytest.mark.standalone_only
def test_readme_python_example_runs(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    server.flush()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme[readme.index("## From Python") :].split("```python\n", 1)[1].split("```")[0]
    assert "redis.Redis()" in example
    code = example.replace("redis.Redis()", f"redis.Redis(port={server.port})")
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "1"  # the first fencing token of the lock
