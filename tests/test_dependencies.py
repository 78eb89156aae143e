"""Every third-party module the code imports is provided by a requirement the installed distribution declares.

A package that arrives only as a transitive dependency of another one works on the developer's
machine and disappears on a user's (or with that package's next release). These tests read the
*installed* metadata (``importlib.metadata.requires("fedtune")``), so they check what ``pip install``
really installs, and walk every import (lazy ones inside functions too) with ``ast``.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("common", "envelope", "server", "client", "simulations", "cli")
OWN = {"fedtune", "tests", "benchmarks"} | {
    f.stem for d in ("tests", "benchmarks") for f in (ROOT / d).glob("*.py")}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imports_in(paths: list[Path]) -> dict[str, str]:
    """Top-level module -> first place it is imported (absolute imports only; relative ones are our own)."""
    found: dict[str, str] = {}
    for path in paths:
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            tree = ast.parse(f.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    found.setdefault(m.split(".")[0], f"{f.relative_to(ROOT)}:{node.lineno}")
    return found


def declared(extras: tuple[str, ...] = ()) -> set[str]:
    """Distribution names fedtune's installed metadata requires (plus those of ``extras``)."""
    out = {"fedtune"}
    for req in md.requires("fedtune") or []:
        name, _, marker = req.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if extra and extra.group(1) not in extras:
            continue
        out.add(_norm(re.split(r"[\s\[<>=!~(]", name.strip(), maxsplit=1)[0]))
    return out


def undeclared(imports: dict[str, str], allowed: set[str]) -> list[str]:
    dist_of = md.packages_distributions()
    problems = []
    for mod, where in sorted(imports.items()):
        if mod in OWN or mod in sys.stdlib_module_names or mod == "__future__":
            continue
        dists = {_norm(d) for d in dist_of.get(mod, [])}
        if not dists:
            problems.append(f"{mod} (imported at {where}) is not installed by any declared requirement")
        elif not dists & allowed:
            problems.append(f"{mod} (imported at {where}) comes from {', '.join(sorted(dists))}, "
                            "which pyproject.toml does not declare")
    return problems


# the one module that imports an optional extra's packages (lazily, when a job turns tracking on)
TRACKING = ROOT / "common" / "operations" / "tracking.py"


def test_product_code_imports_only_declared_requirements():
    imports = imports_in([f for d in PRODUCT_DIRS for f in sorted((ROOT / d).rglob("*.py")) if f != TRACKING])
    assert "torch" in imports and "flwr" in imports  # the walk really sees the product's imports
    problems = undeclared(imports, declared())
    assert not problems, "declare these in [project].dependencies:\n" + "\n".join(problems)


def test_the_tracking_module_imports_only_its_extra():
    """MLflow and TensorBoard are the optional extra ``tracking``: only tracking.py imports them, and nothing else
    undeclared (every other module is held to the required dependencies above)."""
    imports = imports_in([TRACKING])
    assert {"mlflow", "tensorboard"} <= set(imports)
    problems = undeclared(imports, declared(("tracking",)))
    assert not problems, "declare these in [project.optional-dependencies].tracking:\n" + "\n".join(problems)


def test_tests_and_benchmarks_import_only_declared_or_test_requirements():
    paths = [ROOT / "tests", ROOT / "benchmarks"]
    problems = undeclared(imports_in(paths), declared(("test",)))
    assert not problems, "declare these in [project.optional-dependencies].test:\n" + "\n".join(problems)


def test_the_check_catches_a_missing_requirement():
    # the same check against the declared set minus one real requirement must flag it
    imports = imports_in([ROOT / d for d in PRODUCT_DIRS])
    problems = undeclared(imports, declared() - {"scipy"})
    assert any(p.startswith("scipy ") for p in problems)
