"""The control plane and the compute side are clients of the pageserver: they import its
client-facing modules only, never the storage engine or the server's own modules (which
would drag the engine into every `strata` command and into the compute's processes)."""

from __future__ import annotations

import ast
from pathlib import Path

import strata

SRC = Path(strata.__file__).parent
CLIENT_PACKAGES = ("control", "compute")
ALLOWED_PAGESERVER = {"strata.pageserver.api", "strata.pageserver.client",
                      "strata.pageserver.page_client", "strata.pageserver.pagestream"}
REFUSED_PREFIXES = ("strata.storage", "strata.pageserver")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports (also inside functions), with its line number."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in ("strata", "strata.pageserver", "strata.storage"):
                # `from strata.pageserver import server` names a module
                out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def violations(paths: list[Path]) -> list[str]:
    bad = []
    for path in paths:
        for line, module in imported_modules(path):
            if module.startswith(REFUSED_PREFIXES) and module not in ALLOWED_PAGESERVER:
                bad.append(f"{path.relative_to(SRC.parent)}:{line} imports {module}")
    return bad


def test_control_and_compute_import_only_the_pageserver_client_modules() -> None:
    paths = [p for pkg in CLIENT_PACKAGES for p in sorted((SRC / pkg).rglob("*.py"))]
    assert len(paths) > 10
    assert violations(paths) == []


def test_the_client_modules_import_no_server_code() -> None:
    paths = [SRC / (name.removeprefix("strata.").replace(".", "/") + ".py")
             for name in sorted(ALLOWED_PAGESERVER)]
    assert violations(paths) == []


def test_the_rule_catches_a_server_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from strata.storage.tenant import Tenant\n"
                     "from strata.pageserver import server\n"
                     "import strata.pageserver.config\n"
                     "from strata.pageserver.api import TenantConfig\n")
    found = [module for _, module in imported_modules(probe)
             if module.startswith(REFUSED_PREFIXES) and module not in ALLOWED_PAGESERVER]
    assert sorted(found) == ["strata.pageserver.config", "strata.pageserver.server",
                             "strata.storage.tenant"]
