"""The core (``oscar/``) does no I/O: no asyncio, sockets, processes, databases, files or clock.

Two views of the same rule, both without starting a process:

- the sources, read as syntax trees: every ``import`` anywhere in a module (at the top or inside a
  function) is of an allowed module, and no call reads the clock, the environment or a file, or
  makes randomness, except the one documented key generator;
- the modules, imported afresh in this process with the forbidden modules made unimportable:
  importing every module of the package must not need one of them.

This complements the import-linter contract in ``pyproject.toml`` (which also sees imports through
other packages) with the clock, file and randomness calls that a contract cannot see.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

import oscar
import oscar.errors

CORE = Path(oscar.__file__).parent
SOURCES = sorted(CORE.glob("*.py"))

#: Modules the core must never import: I/O, processes, the clock, randomness, and every layer above
#: it (the runtime, the roles, and what stands on them).
FORBIDDEN = frozenset(
    {
        "aiocoap",
        "aiosqlite",
        "asyncio",
        "io",
        "logging",
        "os",
        "pathlib",
        "random",
        "secrets",
        "selectors",
        "shutil",
        "socket",
        "sqlite3",
        "ssl",
        "subprocess",
        "sys",
        "tempfile",
        "threading",
        "time",
        # the layers above
        "authz_server",
        "bench",
        "consumer",
        "demo",
        "fuzz",
        "oscar_io",
        "producer",
        "proxy",
        "tests",
    }
)

#: Everything the core imports today. A new entry is a decision: it must not do I/O of its own.
ALLOWED = frozenset(
    {
        "__future__",
        "collections",
        "cryptography",
        "dataclasses",
        "datetime",  # conversions of the caller's timestamps only (no now/today: see below)
        "hashlib",
        "hmac",
        "json",  # CBOR diagnostic notation of text strings
        "re",
        "typing",
    }
)

#: Calls that read the clock, the environment, a file or a terminal, or make randomness, by the
#: last part of their name (``datetime.datetime.now`` is ``now``).
IMPURE_CALLS = frozenset(
    {
        "getenv",
        "input",
        "monotonic",
        "now",
        "open",
        "perf_counter",
        "print",
        "time",
        "time_ns",
        "today",
        "token_bytes",
        "urandom",
        "utcnow",
        # key generation takes randomness from the operating system
        "generate",
        "generate_private_key",
    }
)

#: The one place the core makes randomness (certs.generate_signing_key, for the AS's CA, the
#: operator tool and the tests): (file, enclosing function, call).
ALLOWED_IMPURE = frozenset(
    {
        ("certs.py", "generate_signing_key", "generate_private_key"),
        ("certs.py", "generate_signing_key", "generate"),
    }
)


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in ``tree``, nested ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _defined_functions(tree: ast.Module) -> set[str]:
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }


def _calls(tree: ast.Module) -> list[tuple[int, str, str]]:
    """(line, enclosing top-level function, called name) of every call in ``tree``.

    A bare name the module defines itself (``oscar.opening.open``) is the module's own function,
    not the builtin."""
    own = _defined_functions(tree)
    found = []
    for top in tree.body:
        enclosing = top.name if isinstance(top, (ast.FunctionDef, ast.ClassDef)) else ""
        for node in ast.walk(top):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Name) and node.func.id not in own:
                found.append((node.lineno, enclosing, node.func.id))
            elif isinstance(node.func, ast.Attribute):
                found.append((node.lineno, enclosing, node.func.attr))
    return found


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_the_core_modules_are_all_scanned() -> None:
    names = {module.name for module in pkgutil.iter_modules(oscar.__path__)}
    assert names == {path.stem for path in SOURCES if path.stem != "__init__"}
    assert not [p for p in CORE.iterdir() if p.is_dir() and p.name != "__pycache__"], (
        "a subpackage of oscar/ is not scanned by this test"
    )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_core_module_imports_io_clock_randomness_or_a_higher_layer(path: Path) -> None:
    imports = _imports(_parse(path))
    forbidden = [(line, name) for line, name in imports if name in FORBIDDEN]
    assert not forbidden, f"{path.name} imports {forbidden}"
    unknown = [(line, name) for line, name in imports if name not in ALLOWED | {"oscar"}]
    assert not unknown, f"{path.name} imports {unknown}: allow it here only if it does no I/O"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_core_module_reads_the_clock_a_file_or_makes_randomness(path: Path) -> None:
    impure = [
        (line, function, name)
        for line, function, name in _calls(_parse(path))
        if name in IMPURE_CALLS and (path.name, function, name) not in ALLOWED_IMPURE
    ]
    assert not impure, f"{path.name}: {impure}"


def test_the_one_key_generator_is_still_where_the_allowance_says() -> None:
    """The allowance above must not outlive the code it allows."""
    calls = {(function, name) for _, function, name in _calls(_parse(CORE / "certs.py"))}
    for file, function, name in ALLOWED_IMPURE:
        assert file == "certs.py" and (function, name) in calls


def test_importing_the_core_needs_no_forbidden_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Import every core module afresh, with the forbidden modules made unimportable.

    The original modules are put back afterwards (monkeypatch restores ``sys.modules``), so the
    rest of the session keeps the same classes."""
    for name in [n for n in sys.modules if n == "oscar" or n.startswith("oscar.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in FORBIDDEN:
        # None in sys.modules makes ``import name`` raise ImportError, even for a loaded module.
        monkeypatch.setitem(sys.modules, name, None)
    try:
        core = importlib.import_module("oscar")
        fresh = [
            importlib.import_module(f"oscar.{module.name}")
            for module in pkgutil.iter_modules(core.__path__)
        ]
    finally:
        # Forget the fresh copies before monkeypatch puts the originals back.
        for name in [n for n in sys.modules if n == "oscar" or n.startswith("oscar.")]:
            del sys.modules[name]
    assert core is not oscar
    assert len(fresh) == len(SOURCES) - 1


def _core_modules() -> list[ModuleType]:
    return [oscar] + [
        importlib.import_module(f"oscar.{module.name}")
        for module in pkgutil.iter_modules(oscar.__path__)
    ]


def test_every_core_exception_is_in_the_one_tree_drawn_in_the_docstrings() -> None:
    """Each exception class of the core is defined once, in oscar.errors, and drawn in the tree of
    both oscar.errors and oscar (a private control-flow exception may stay in its module)."""
    defined: dict[str, list[str]] = {}
    for module in _core_modules():
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                defined.setdefault(name, []).append(module.__name__)
    assert all(len(modules) == 1 for modules in defined.values()), defined
    public = {name for name, (module,) in defined.items() if not name.startswith("_")}
    assert {name for name in public if defined[name] != ["oscar.errors"]} == set()
    assert public == set(oscar.errors.__all__)
    for name in public:
        assert f"── {name} " in (oscar.errors.__doc__ or ""), name
        assert f"── {name} " in (oscar.__doc__ or ""), name
