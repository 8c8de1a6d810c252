"""The plan of the house, kept by a test: which room may import which, and no circles.

Every import counts, wherever it is written (module level, inside a function, under
``TYPE_CHECKING``): a function-level import that closes a circle is still a circle a
reader has to untangle. ``ROOMS`` is the table docs/architecture.md prints under "Where
things live"; a new room, or a new arrow between rooms, is a change to both.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "merlin_dp"

# room -> the rooms it may import (besides itself). Arrows only point down the list.
ROOMS: dict[str, set[str]] = {
    "common": set(),
    "protos": set(),
    "spec": {"common"},
    "runtime": {"spec", "common"},
    "servers": {"protos", "common"},
    "loadtest": {"protos", "common"},
    "gateway": {"spec", "protos", "common"},
    "autoscaler": {"spec", "runtime", "common"},
    "rollout": {"spec", "common"},
    "controller": {"rollout", "autoscaler", "runtime", "spec", "common"},
    "sdk": {"controller", "servers", "spec", "common"},
    "cli": {"sdk", "controller", "rollout", "autoscaler", "gateway", "runtime", "spec",
            "loadtest", "common", "servers", "protos"},
    # Not installed: the benchmarks and the tests may use anything below them.
    "loadtests": {PACKAGE},
    "tests": {PACKAGE, "loadtests"},
}  # fmt: skip
# Modules of the package's own top level (merlin_dp/__init__.py, __main__.py).
TOP_LEVEL = {PACKAGE, f"{PACKAGE}.__main__"}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in (PACKAGE, "loadtests", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" in path.parts or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path) -> Iterator[str]:
    """Every module name an import in ``path`` (the module ``name``) mentions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (the longest name that is a module)."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target in imported(name, path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(f"{target}."):
                edges[name].add(target)
    return edges


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return parts[0]
    if module in TOP_LEVEL:
        return PACKAGE
    return parts[1]


def test_every_room_is_in_the_table() -> None:
    rooms = {room(m) for m in modules()} - {PACKAGE}
    assert rooms == set(ROOMS), f"rooms without a row: {rooms - set(ROOMS)}"


def test_imports_run_only_down_the_table() -> None:
    wrong = []
    for module, targets in graph().items():
        here = room(module)
        for target in targets:
            there = room(target)
            if there == here or here == PACKAGE:
                continue
            allowed = ROOMS[here]
            if there in allowed or (PACKAGE in allowed and target.startswith(f"{PACKAGE}.")):
                continue
            wrong.append(f"{module} imports {target} ({here} -> {there})")
    assert not wrong, "\n".join(sorted(wrong))


# Inside the gateway: the two fronts meet only in what they share at the gateway's root
# (routing, pools, activation, metrics, mirror); HTTP/2 framing knows nothing of gRPC.
GATEWAY_APART = {
    "http": {"grpc", "h2"},
    "grpc": {"http"},
    "h2": {"grpc", "http"},
    "routing": {"grpc", "http", "h2"},
    "pool": {"grpc", "http"},
}


def test_the_gateways_fronts_import_only_what_they_share() -> None:
    prefix = f"{PACKAGE}.gateway."
    wrong = []
    for module, targets in graph().items():
        if not module.startswith(prefix):
            continue
        here = module.removeprefix(prefix).split(".")[0]
        for target in targets:
            there = target.removeprefix(prefix).split(".")[0]
            if target.startswith(prefix) and there in GATEWAY_APART.get(here, set()):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles() -> None:
    edges = graph()
    # Tarjan's strongly connected components: any with two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_walker_sees_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from merlin_dp.gateway import worker\n"
        "def f() -> None:\n    import merlin_dp.controller.api\n"
    )
    seen = set(imported("merlin_dp.spec.mod", source))
    assert {"merlin_dp.gateway.worker", "merlin_dp.controller.api"} <= seen
