"""The package's layering: a light launch package, the daemon above it, no import cycles.

* Every module of :mod:`supervisor.launch`, imported in a fresh interpreter,
  loads nothing but the standard library and :mod:`supervisor.launch` (plus
  the bare :mod:`supervisor` package).  Some actions' paths are lighter still
  than that rule (``delete`` reads JSON without :mod:`json`; ``start`` speaks
  msgpack without the msgpack package): the same helper checks them.
* No module of ``supervisor.launch`` imports one outside it (the daemon side
  imports from launch, never the reverse).
* No import cycle among all of ``supervisor``'s modules, counting imports inside
  functions and ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import supervisor
from supervisor.launch._pbwire import field_bytes

PACKAGE = Path(supervisor.__file__).parent
LAUNCH = "supervisor.launch"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


#: Standard modules no launch module loads at import time (each costs `start` milliseconds).
HEAVY_STDLIB = {"typing", "logging", "dataclasses", "json", "re", "socket", "subprocess",
                "argparse", "hashlib"}
LAUNCH_MODULES = sorted(m for m in all_modules() if m == LAUNCH or m.startswith(LAUNCH + "."))


# --- what a fresh interpreter loads ---------------------------------------------


def loaded_by(code: str) -> set[str]:
    """Modules that running ``code`` in a fresh interpreter added to sys.modules."""
    script = ("import sys\nbefore = set(sys.modules)\n" + code
              + "\nsys.stdout.write('\\n'.join(sorted(set(sys.modules) - before)))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def outside_stdlib_and_launch(modules: Iterable[str], allowed: Iterable[str] = ()) -> set[str]:
    ours = {"supervisor", LAUNCH, *allowed}
    return {m for m in modules
            if m.partition(".")[0] not in sys.stdlib_module_names
            and m not in ours and not m.startswith(LAUNCH + ".")}


def test_launch_modules_load_only_the_standard_library() -> None:
    assert len(LAUNCH_MODULES) > 10
    loaded = loaded_by("\n".join(f"import {m}" for m in LAUNCH_MODULES))
    assert set(LAUNCH_MODULES) <= loaded
    assert outside_stdlib_and_launch(loaded) == set()
    assert loaded & HEAVY_STDLIB == set()


# (what the action runs, packages it must not load beyond HEAVY_STDLIB); supervisor.shim,
# the binary's entry point, dispatches to launch.  "msgpack" is the package the fork
# server's codec replaces, "json" on delete's path the C scanner does.
ACTION_PATHS: dict[str, tuple[str, set[str]]] = {
    "start": (
        "import supervisor.shim, supervisor.launch.start, supervisor.launch._spawn",
        set(),
    ),
    "start, asking the fork server": (
        "import supervisor.launch.start, supervisor.launch.forkclient as f\n"
        "from supervisor.launch import _msgpack\n"
        "_msgpack.unpackb(_msgpack.packb(f.Request.of_this_process("
        "namespace='n', id='i', address='a', debug=False, argv=['x'],"
        " code=f.code_identity()).to_wire()))",
        {"msgpack"},
    ),
    "start, finding no fork server (it would spawn one)": (
        "import supervisor.launch.start, supervisor.launch.forkclient as f, fcntl\n"
        "import supervisor.launch._spawn\n"
        "try:\n    f.status('/nonexistent/fs.sock')\nexcept f.NoServer:\n    pass",
        set(),
    ),
    "start, from containerd 2.3 (BootstrapParams)": (
        "import supervisor.shim, supervisor.launch.start, supervisor.launch.bootstrap as b\n"
        "b.read_stdin(b'\\n\\x01i\\x12\\x01n\\x18\\x04', 'i', 'n')",
        set(),
    ),
    "-info": (
        "import supervisor.shim, supervisor.launch.info as i\n"
        "i.encode_runtime_info(name='n', version='v', revision='r', options=b'', "
        "features=b'{}', annotations={'a': 'b'})",
        set(),
    ),
    "start, with runtime options (CRI's for a non-runc runtime, runc's)": (
        "import supervisor.shim as s\n"
        "s.decode_options(b'\\n\\x19runtimeoptions.v1.Options')\n"
        "s.decode_options(b'\\n\\x1acontainerd.runc.v1.Options\\x12\\x062\\x04crun')",
        {"tomllib"},  # only for a config_path (below)
    ),
    "start, joining a group's shim": (
        "import supervisor.launch.start, supervisor.launch._join",
        set(),
    ),
    "delete": (
        "import supervisor.shim, supervisor.launch.delete as d\n"
        "d.cleanup('ns', 'id', '/nonexistent/bundle')\n"
        "d.last_status('/nonexistent/bundle', 'id', 0)\n"
        "from supervisor.launch.settings import Settings\n"
        "Settings.from_json('{\"root\": \"/r\"}')",
        {"json"},
    ),
}


@pytest.mark.parametrize("action", sorted(ACTION_PATHS))
def test_action_paths_stay_light(action: str) -> None:
    code, forbidden = ACTION_PATHS[action]
    loaded = loaded_by(code)
    assert outside_stdlib_and_launch(loaded, allowed={"supervisor.shim"}) == set()
    assert loaded & (HEAVY_STDLIB | forbidden) == set()


def test_options_naming_a_settings_file_load_only_the_standard_library(tmp_path: Path) -> None:
    """The CRI plugin's ``config_path``: :mod:`tomllib` (stdlib), still no protobuf or site."""
    config = tmp_path / "shim.toml"
    config.write_text('ShimGroup = "namespace"\n')
    cri_options = field_bytes(2, str(config).encode())  # runtimeoptions.v1.Options.config_path
    data = field_bytes(1, b"runtimeoptions.v1.Options") + field_bytes(2, cri_options)
    loaded = loaded_by("import supervisor.shim as s\n"
                       f"assert s.decode_options({data!r}).shim_group == 'namespace'")
    assert "tomllib" in loaded
    assert outside_stdlib_and_launch(loaded, allowed={"supervisor.shim"}) == set()


# --- the import graph -------------------------------------------------------------


def imports_of(name: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """The supervisor modules ``name`` imports anywhere in its source (functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` only mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != "supervisor")
    return found


def import_graph() -> dict[str, set[str]]:
    known = all_modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every strongly connected component that is a cycle, each as a sorted list (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_find_cycles_names_them() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert sorted(find_cycles(graph)) == [["a", "b", "c"], ["e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    graph = import_graph()
    assert "supervisor.launch.forkclient" in graph["supervisor.launch.start"]  # in a function
    assert "supervisor.ttrpc._client" in graph["supervisor.ttrpc"]  # relative
    assert "supervisor.daemon" in graph["supervisor.shim"]


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_launch_imports_nothing_of_the_daemon_side() -> None:
    graph = import_graph()
    wrong = {f"{m} imports {t}" for m in LAUNCH_MODULES for t in graph[m]
             if not (t == LAUNCH or t.startswith(LAUNCH + "."))}
    assert wrong == set()


def test_ttrpc_imports_nothing_else_of_ours() -> None:
    graph = import_graph()
    wrong = {f"{m} imports {t}" for m, targets in graph.items()
             if m.startswith("supervisor.ttrpc") for t in targets
             if not t.startswith("supervisor.ttrpc")}
    assert wrong == set()


def test_the_light_interpreter_check_knows_every_standard_module_the_light_path_imports(
        ) -> None:
    """The launcher accepts a light interpreter only if it imports all of
    :data:`~supervisor.launch.launcher.LIGHT_STDLIB`: imports inside functions included,
    since a split standard library fails them only when that branch runs."""
    from supervisor.launch.launcher import LIGHT_STDLIB  # noqa: PLC0415

    paths = [PACKAGE / "shim.py", *sorted((PACKAGE / "launch").glob("*.py"))]
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.partition(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    stdlib = {m for m in found if m in sys.stdlib_module_names} - {"_sha2", "_sha256"}
    assert stdlib <= set(LIGHT_STDLIB), sorted(stdlib - set(LIGHT_STDLIB))
    assert set(LIGHT_STDLIB) <= sys.stdlib_module_names
