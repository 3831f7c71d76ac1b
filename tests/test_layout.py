"""The package's shape, beyond what the import-linter contracts (pyproject.toml) can say: the
balancer loads nothing but itself, modules stay small, no import cycle, the app's state is
touched only where the app is made and run, and the README's Layout names every package."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"
MAX_LINES = 400


def service_files() -> list[Path]:
    return sorted(SERVICE.rglob("*.py"))


def test_balancer_imports_nothing_but_itself() -> None:
    script = "import sys, service.proxy.balancer; print('\\n'.join(sorted(sys.modules)))"
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    modules = run.stdout.split()
    assert "service.proxy.balancer" in modules
    heavy = sorted(
        {name.split(".")[0] for name in modules} & {"redis", "starlette", "httpx", "uvicorn"}
    )
    assert heavy == [], f"importing the balancer loads {heavy}"
    ours = {name for name in modules if name == "service" or name.startswith("service.")}
    extra = sorted(ours - {"service", "service.proxy", "service.proxy.balancer"})
    assert extra == [], f"importing the balancer loads {extra}"


def test_no_module_over_the_line_limit() -> None:
    sizes = {path: len(path.read_text().splitlines()) for path in service_files()}
    assert len(sizes) > 40
    over = [
        f"{path.relative_to(ROOT)}: {lines} lines"
        for path, lines in sizes.items()
        if lines > MAX_LINES
    ]
    assert over == [], f"over {MAX_LINES} lines: {over}"


def test_no_import_cycle() -> None:
    # Every import grimp sees counts: top-level, inside functions, under TYPE_CHECKING.
    graph = grimp.build_graph("service", cache_dir=None)
    assert {"service.app", "service.core.errors", "service.proxy.balancer"} <= graph.modules
    cycles: dict[frozenset[str], str] = {}
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                cycle = (importer, *back)
                cycles.setdefault(frozenset(cycle), " -> ".join(cycle))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles.values()))


APP_STATE_OWNERS = {SERVICE / "app.py", SERVICE / "server.py"}


def _is_app(node: ast.expr) -> bool:
    """``app``, ``self._app``, ``request.app``, ``web_app``, ``scope["app"]``..."""
    if isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Attribute):
        name = node.attr
    elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        name = str(node.slice.value)
    else:
        return False
    return re.fullmatch(r"_?(\w+_)?app", name) is not None


def app_state_uses(path: Path) -> list[str]:
    """Each place in ``path`` that reads or writes the app's ``state``, as ``file:line``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        touches = (
            isinstance(node, ast.Attribute) and node.attr == "state" and _is_app(node.value)
        ) or (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "setattr", "hasattr", "delattr"}
            and len(node.args) >= 2
            and _is_app(node.args[0])
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == "state"
        )
        if touches:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_only_app_and_server_touch_the_app_state() -> None:
    # The scan finds the real uses where they are allowed, so it is not blind.
    assert app_state_uses(SERVICE / "app.py")
    assert app_state_uses(SERVICE / "server.py")
    elsewhere = [
        use
        for path in service_files()
        if path not in APP_STATE_OWNERS
        for use in app_state_uses(path)
    ]
    assert elsewhere == [], f"app.state is touched outside app.py/server.py: {elsewhere}"


def readme_layout() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert section is not None, 'README.md has no "## Layout" section'
    return section.group(1).splitlines()


def test_readme_layout_lists_every_package() -> None:
    packages = sorted(p.parent.name for p in SERVICE.glob("*/__init__.py"))
    assert {"core", "settings", "auth", "api_keys", "accounts", "proxy", "ops"} <= set(packages)
    lines = [line.strip(" `-*") for line in readme_layout()]
    wrong = {
        name: count
        for name in packages
        if (count := sum(line.startswith(f"{name}/") for line in lines)) != 1
    }
    assert wrong == {}, (
        f"README Layout should give each package one line; lines per package: {wrong}"
    )
