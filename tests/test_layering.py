"""The package's layering, checked from its source with ``ast`` (nothing is imported).

The picture is in ``deebert_cli/core/__init__.py``: leaves (errors < files, device, metrics, data <
launch, config) < model < runtime < analysis < train, with serve and ray_data over runtime beside
analysis, and cli over all of them. :func:`check` takes module sources and returns what breaks the rules:

* an upward import: a module imports a part of ``deebert_cli.core`` that is not its own and not strictly
  lower in :data:`RANKS` (cli may import anything; core never typer, rich or click);
* an import circle between modules of deebert_cli (every import counts, module level or inside a
  function, relative or absolute);
* a module over :data:`MAX_MODULE_LINES` lines;
* a function or method over :data:`MAX_FUNCTION_LINES` lines whose docstring does not say why
  (it must contain :data:`LONG_MARKER`).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "deebert_cli"
CORE = f"{PACKAGE}.core"

# rank of each part of deebert_cli.core: a module may import its own part or a part of strictly lower rank
RANKS = {
    "errors": 0,
    "files": 1, "device": 1, "metrics": 1, "data": 1,
    "launch": 2, "config": 2,
    "model": 3,
    "runtime": 4,
    "analysis": 5, "serve": 5, "ray_data": 5,
    "train": 6,
}
TOP = max(RANKS.values()) + 1  # deebert_cli.cli, deebert_cli/__init__.py, __main__.py: over everything
NEVER_IN_CORE = ("typer", "rich", "click")  # the CLI's libraries: core returns data, the CLI renders it
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
LONG_MARKER = "Long because"


@dataclass
class Problem:
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


def module_of(path: str) -> tuple:
    """'deebert_cli/core/model/__init__.py' -> ('deebert_cli.core.model', True); modules -> (name, False)."""
    parts = path[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def part_of(module: str) -> str | None:
    """The layer a module of deebert_cli belongs to: a part of core ('model', 'errors', ...), 'cli' for the
    CLI and the package's own top modules, '' for deebert_cli.core itself, None outside deebert_cli."""
    if module == CORE:
        return ""
    if module.startswith(CORE + "."):
        return module[len(CORE) + 1:].split(".")[0]
    if module == PACKAGE or module.startswith(PACKAGE + "."):
        return "cli"
    return None


def rank_of(part: str) -> int | None:
    if part == "cli":
        return TOP
    if part == "":
        return -1  # deebert_cli.core's own __init__ (a docstring): anyone may import it
    return RANKS.get(part)


def imports_of(path: str, source: str, known: set) -> list:
    """Every import of a module, module level or not: [(line, imported module, the import as written)].
    ``from pkg import name`` names the submodule pkg.name when that is a module of ``known``, else pkg;
    ``importlib.import_module("literal")`` counts as an import too."""
    name, is_package = module_of(path)
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, f"import {a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            by_target: dict = {}  # names that are submodules are imports of those modules
            for a in node.names:
                sub = f"{mod}.{a.name}"
                by_target.setdefault(sub if sub in known else mod, []).append(a.name)
            for target, names in by_target.items():
                out.append((node.lineno, target, f"from {'.' * node.level}{node.module or ''} import {', '.join(names)}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and not node.args[0].value.startswith(".")):
            out.append((node.lineno, node.args[0].value, f"import_module({node.args[0].value!r})"))
    return out


def _order() -> str:
    by_rank: dict = {}
    for part, r in RANKS.items():
        by_rank.setdefault(r, []).append(part)
    return " < ".join(", ".join(by_rank[r]) for r in sorted(by_rank)) + " < cli"


def _layer_problems(path: str, imports: list) -> list:
    module, _ = module_of(path)
    part = part_of(module)
    if part is None or part == "cli":
        return []  # cli may import anything
    rank = rank_of(part)
    if rank is None:
        return [Problem(path, 1, "unknown part", f"'{part}' is not in the layer map of tests/test_layering.py "
                                                 f"(RANKS); give it a place there and in {CORE}'s docstring")]
    problems = []
    for line, target, written in imports:
        top = target.split(".")[0]
        if top in NEVER_IN_CORE:
            problems.append(Problem(path, line, "core imports the CLI's libraries",
                                    f"{module} imports {target} ({written}): core never imports {', '.join(NEVER_IN_CORE)}"))
            continue
        tpart = part_of(target)
        if tpart is None or tpart == part:
            continue
        trank = rank_of(tpart)
        if trank is None or trank >= rank:
            where = f"'{tpart}'" + ("" if trank is None else f", rank {trank}")
            problems.append(Problem(path, line, "upward import",
                                    f"{module} ('{part}', rank {rank}) imports {target} ({where}): `{written}`"))
    return problems


def _circles(graph: dict, lines: dict, paths: dict) -> list:
    """Strongly connected components of size > 1 (Tarjan), each reported with one circle through it."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    problems = []
    for comp in comps:
        if len(comp) < 2:
            continue
        members = set(comp)
        start = comp[0]
        # shortest way from start back to start inside the component
        prev, frontier, found = {}, [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        cycle, v = [start], found
        while v != start:
            cycle.insert(1, v)
            v = prev[v]
        steps = [f"{a} (line {lines[a, b]}) -> {b}" for a, b in zip(cycle, cycle[1:] + [start])]
        problems.append(Problem(paths[start], lines[start, cycle[1 % len(cycle)]], "import circle",
                                f"modules {', '.join(comp)} import each other: " + "; ".join(steps)))
    return problems


def _function_problems(path: str, tree: ast.AST) -> list:
    problems = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    n = child.end_lineno - child.lineno + 1
                    doc = ast.get_docstring(child) or ""
                    if n > MAX_FUNCTION_LINES and LONG_MARKER.lower() not in doc.lower():
                        problems.append(Problem(path, child.lineno, "long function",
                                                f"{name} is {n} lines (> {MAX_FUNCTION_LINES}): split it along its jobs, "
                                                f"or say why in its docstring ('{LONG_MARKER} ...')"))
                walk(child, f"{name}.")
            else:
                walk(child, prefix)

    walk(tree, "")
    return problems


def check(sources: dict) -> list:
    """Problems of the modules in ``sources`` ({path under the repository, e.g.
    'deebert_cli/core/model/highway.py': its source}), sorted by path and line."""
    known = {module_of(p)[0]: p for p in sources}
    problems, graph, lines = [], {m: set() for m in known}, {}
    for path, source in sources.items():
        module = module_of(path)[0]
        tree = ast.parse(source, path)
        imports = imports_of(path, source, set(known))
        problems += _layer_problems(path, imports)
        for line, target, _ in imports:
            if target in known and target != module:
                graph[module].add(target)
                lines.setdefault((module, target), line)
        n = len(source.splitlines())
        if n > MAX_MODULE_LINES:
            problems.append(Problem(path, 1, "long module", f"{n} lines (> {MAX_MODULE_LINES}): split it by job"))
        problems += _function_problems(path, tree)
    problems += _circles(graph, lines, known)
    return sorted(problems, key=lambda p: (p.path, p.line, p.rule))


def package_sources() -> dict:
    return {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


# ------------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------------
def test_the_package_keeps_its_layers():
    sources = package_sources()
    assert any(p.startswith(f"{PACKAGE}/core/") for p in sources) and any(p.startswith(f"{PACKAGE}/cli/") for p in sources)
    problems = check(sources)
    if problems:
        pytest.fail(f"{len(problems)} layering problem(s); a module may import only its own package or strictly "
                    f"lower ones: {_order()}\n" + "\n".join(map(str, problems)), pytrace=False)


def test_every_part_of_core_is_in_the_layer_map():
    parts = {p.name[:-3] if p.suffix == ".py" else p.name for p in (ROOT / PACKAGE / "core").iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert parts == set(RANKS), f"not in RANKS: {sorted(parts - set(RANKS))}; gone: {sorted(set(RANKS) - parts)}"


SYNTHETIC = {
    "deebert_cli/__init__.py": "",
    "deebert_cli/core/__init__.py": '"""docstring only"""\n',
    "deebert_cli/core/errors.py": "class UserError(Exception):\n    pass\n",
    "deebert_cli/core/model/__init__.py": "",
    "deebert_cli/core/model/highway.py": "from ..errors import UserError\n\n\ndef f():\n    from ..train import stage1\n",
    "deebert_cli/core/train/__init__.py": "",
    "deebert_cli/core/train/stage1.py": "from ..model import highway\nfrom . import common\n",
    "deebert_cli/core/train/common.py": "def g():\n    import deebert_cli.core.train.stage1\n",
    "deebert_cli/cli/__init__.py": "",
    "deebert_cli/cli/app.py": "import typer\nfrom ..core.train import stage1\n",
}


def test_the_checker_reports_an_upward_import_and_circles():
    problems = check(SYNTHETIC)
    text = "\n".join(map(str, problems))
    up = [p for p in problems if p.rule == "upward import"]
    assert [(p.path, p.line) for p in up] == [("deebert_cli/core/model/highway.py", 5)], text
    assert "deebert_cli.core.train.stage1" in up[0].message and "from ..train import stage1" in up[0].message
    circles = [p for p in problems if p.rule == "import circle"]
    assert len(circles) == 1, text  # one component: highway -> stage1 -> highway, stage1 <-> common
    for m in ("model.highway", "train.stage1", "train.common"):
        assert f"deebert_cli.core.{m}" in circles[0].message
    assert len(problems) == 2, text  # the CLI may import typer and anything of core


def test_the_checker_reports_the_clis_libraries_in_core_long_modules_and_long_functions():
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    sources = {
        "deebert_cli/core/__init__.py": "",
        "deebert_cli/core/metrics.py": "from rich.console import Console\n",
        "deebert_cli/core/files.py": "\n" * 501,
        "deebert_cli/core/device.py": f"def long():\n{body}\n\n\ndef explained():\n    '''Long because: a table.'''\n{body}\n",
        "deebert_cli/core/config.py": "from .runtime import engine\n",
    }
    rules = sorted((p.path.split("/")[-1], p.rule) for p in check(sources))
    assert rules == [("config.py", "upward import"), ("device.py", "long function"), ("files.py", "long module"),
                     ("metrics.py", "core imports the CLI's libraries")]


def test_the_checker_passes_a_clean_picture():
    sources = {k: v for k, v in SYNTHETIC.items() if "highway" not in k and "common" not in k}
    sources["deebert_cli/core/train/stage1.py"] = "from ..model import ramps\nfrom ..errors import UserError\n"
    sources["deebert_cli/core/model/ramps.py"] = "import torch\n"
    assert check(sources) == []
