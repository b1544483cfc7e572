"""Scripts rendered once per version, not per process: the package's shipped scripts are loaded
(never stale), the first load or render happens once under a lock, and asyncio never renders on
its event loop. Fresh processes (subprocesses) stand for the cold start each test is about."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from luasched import render
from luasched.render import SHIPPED_DIR, ScriptConfig, templates_dir

EDIT = "-- an edit made after the shipped scripts were rendered"


def _run(code: str, *args: str) -> list[str]:
    """Run ``code`` in a fresh interpreter (cold caches); its stdout lines."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _edited_templates(target: Path) -> Path:
    """A copy of the templates with one comment line added to slots/keyslot.lua.j2."""
    shutil.copytree(templates_dir(), target)
    template = target / "slots" / "keyslot.lua.j2"
    lines = template.read_text().split("\n")
    first_body_line = next(n for n, line in enumerate(lines) if not line.startswith("--@"))
    lines.insert(first_body_line, EDIT)
    template.write_text("\n".join(lines))
    return target


def test_the_shipped_scripts_are_those_a_fresh_render_gives() -> None:
    loaded = render._load_shipped(ScriptConfig(), templates_dir(), SHIPPED_DIR)
    assert loaded is not None, "the shipped scripts are stale: run `make snapshots`"
    fresh = render._render(ScriptConfig(), templates_dir())
    assert list(loaded) == list(fresh)  # same names, same order
    assert dict(loaded) == dict(fresh)  # same texts, SHA1s and contracts


def test_a_fresh_process_loads_the_default_scripts_without_rendering(server: Any) -> None:
    client = "RedisCluster" if server.is_cluster else "redis.Redis"
    out = _run(
        f"""
        import sys
        import redis
        from redis.cluster import RedisCluster
        import luasched
        from luasched.render import render_count
        s = luasched.Scheduler({client}.from_url(sys.argv[1]), "coldstart")
        print(s.slots.keyslot("foo"), render_count(), "jinja2" in sys.modules)
        """,
        server.url,
    )
    assert out == ["12182", "0", "False"]


def test_a_template_changed_since_the_shipped_render_is_rendered_afresh(tmp_path: Path) -> None:
    edited = _edited_templates(tmp_path / "lua")
    assert render._load_shipped(ScriptConfig(), edited, SHIPPED_DIR) is None
    out = _run(
        f"""
        import sys
        from pathlib import Path
        import luasched.render as r
        r.templates_dir = lambda: Path(sys.argv[1])  # as in a checkout whose lua/ was edited
        scripts = r.render_all()
        print(r.render_count(), {EDIT!r} in scripts["slots.keyslot"].text)
        """,
        str(edited),
    )
    assert out == ["1", "True"]


def test_a_shipped_file_that_is_not_its_manifest_entry_is_not_served(tmp_path: Path) -> None:
    shipped = tmp_path / "rendered"
    shutil.copytree(SHIPPED_DIR, shipped)
    assert render._load_shipped(ScriptConfig(), templates_dir(), shipped) is not None
    script = shipped / "slots.keyslot.lua"
    script.write_text(script.read_text() + "-- changed by hand\n")
    assert render._load_shipped(ScriptConfig(), templates_dir(), shipped) is None


def test_only_the_default_configuration_is_shipped() -> None:
    custom = ScriptConfig(max_batch=17)
    assert render._load_shipped(custom, templates_dir(), SHIPPED_DIR) is None


THREADS = """
import sys
import threading
import redis
import luasched
from luasched.render import ScriptConfig, render_count
config = ScriptConfig(max_batch=int(sys.argv[1])) if sys.argv[1] != "default" else None
barrier = threading.Barrier(8)
seen = []
def first_scheduler():
    barrier.wait()
    seen.append(luasched.Scheduler(redis.Redis(), "coldstart", config=config).scripts)
threads = [threading.Thread(target=first_scheduler) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(len(seen), len({id(scripts) for scripts in seen}), render_count())
"""


@pytest.mark.parametrize(("config", "renders"), [("default", "0"), ("17", "1")])
def test_eight_threads_first_schedulers_share_one_load_or_render(config: str, renders: str) -> None:
    assert _run(THREADS, config) == ["8", "1", renders]


ASYNC = """
import asyncio
import sys
import threading
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
import luasched.asyncio
import luasched.render as r
from luasched.render import ScriptConfig
threads = set()
for name in ("_render", "_load_shipped"):
    original = getattr(r, name)
    def recorded(*args, original=original):
        threads.add(threading.get_ident())
        return original(*args)
    setattr(r, name, recorded)
async def main():
    client = {client}.from_url(sys.argv[1])
    default = luasched.asyncio.Scheduler(client, "coldstart")
    custom = luasched.asyncio.Scheduler(client, "coldstart", config=ScriptConfig(max_batch=17))
    made = len(threads)
    slots = [await default.slots.keyslot("foo"), await custom.slots.keyslot("foo")]
    await client.aclose()
    print(made, *slots, r.render_count(), len(threads), threading.get_ident() in threads)
asyncio.run(main())
"""


def test_asyncio_never_loads_or_renders_on_the_event_loop(server: Any) -> None:
    client = "RedisCluster" if server.is_cluster else "redis.asyncio.Redis"
    out = _run(ASYNC.replace("{client}", client), server.url)
    # Nothing at construction; one load (default) and one render (custom) afterwards, neither
    # on the thread that runs the event loop.
    made, default_slot, custom_slot, renders, workers, on_loop = out
    assert (made, default_slot, custom_slot, renders, on_loop) == (
        "0",
        "12182",
        "12182",
        "1",
        "False",
    )
    assert int(workers) >= 1


def test_luasched_export_imports_neither_redis_nor_jinja2(tmp_path: Path) -> None:
    out = _run(
        """
        import sys
        from luasched.cli import main
        assert main(["export", sys.argv[1]]) == 0
        print(*(name in sys.modules for name in ("redis", "jinja2", "luasched.scheduler")))
        """,
        str(tmp_path),
    )
    assert out[-3:] == ["False", "False", "False"]
    assert (tmp_path / "manifest.json").is_file()


def test_every_public_name_resolves_lazily() -> None:
    import luasched

    lazy: dict[str, str] = luasched._LAZY
    assert set(lazy) | {"__version__"} == set(luasched.__all__)
    for name, module in lazy.items():
        value = getattr(luasched, name)
        assert value is getattr(sys.modules[module], name), name
    with pytest.raises(AttributeError):
        luasched.NoSuchName  # type: ignore[attr-defined]  # noqa: B018
