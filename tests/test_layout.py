"""The package layout rules the design fixes: science free of Flower, one direction of imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(package: str) -> set[tuple[str, str]]:
    """(file, imported module) for every absolute import under `package`."""
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(str(path), a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add((str(path), node.module))
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def test_core_never_imports_flower_or_the_apps():
    bad = {(p, m) for p, m in _imports("hmgdm_core") if _top(m) in {"flwr", "client", "server"}}
    assert not bad, f"hmgdm_core must not import Flower or the apps: {sorted(bad)}"


def test_client_never_imports_server_and_server_only_the_wire_format():
    # The message layout (client/records.py) is what a site agrees to send; the server reads
    # it with the same helpers. Both sides also start Flower processes the same way
    # (client/flower_env.py). Those two modules are shared and nothing else is.
    shared = {"client.records", "client.flower_env"}
    assert not {(p, m) for p, m in _imports("client") if _top(m) == "server"}
    bad = {(p, m) for p, m in _imports("server") if _top(m) == "client" and m not in shared}
    assert not bad, f"server may import only {sorted(shared)} from the client: {sorted(bad)}"


def test_every_module_starts_with_a_docstring():
    missing = [
        str(p.relative_to(REPO))
        for pkg in ("hmgdm_core", "client", "server")
        for p in (REPO / pkg).rglob("*.py")
        if ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert not missing, f"modules without a docstring: {missing}"


@pytest.mark.parametrize("cli", ["client.cli", "server.cli"])
def test_cli_version_and_help(cli):
    from hmgdm_core import __version__

    run = [sys.executable, "-c", f"from {cli} import app; app()"]
    out = subprocess.run([*run, "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().endswith(__version__)
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=REPO)
    assert helped.returncode == 0 and "--verbose" in helped.stdout and "--version" in helped.stdout


def _module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, lazy (function-level) imports included."""
    files = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for pkg in ("hmgdm_core", "client", "server")
        for p in (REPO / pkg).rglob("*.py")
    }
    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports the module pkg.mod
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def test_no_import_circles():
    graph = _module_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert not circles, f"import circles (lazy imports count): {circles}"


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 60


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body after its docstring (a typer command's options not counted)."""
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:] or body
    return node.end_lineno - body[0].lineno + 1


def test_app_layers_keep_modules_and_functions_small():
    too_long = []
    for pkg in ("client", "server"):
        for path in (REPO / pkg).rglob("*.py"):
            text = path.read_text()
            name = str(path.relative_to(REPO))
            if len(text.splitlines()) > MAX_MODULE_LINES:
                too_long.append(f"{name}: {len(text.splitlines())} lines")
            too_long += [
                f"{name}:{node.lineno} {node.name}: {_body_lines(node)} lines"
                for node in ast.walk(ast.parse(text))
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and _body_lines(node) > MAX_FUNCTION_LINES
            ]
    assert not too_long, f"split these (modules <= 300 lines, functions <= 60): {too_long}"
