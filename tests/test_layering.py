"""The package's imports point one way: kernels, quant, dtensor → ops → nn → adapters → training, distributed → jobs → cli.

Every module of ``sorsa_kernels`` is parsed (nothing is imported) and every ``import`` /
``from … import`` in it — at module level, inside functions and under ``if`` blocks — is
resolved to the package module it names.  The tests assert that no module imports one
of a higher layer, that ``quant/`` is a leaf (torch, bitsandbytes and the standard library
only), and that the module graph has no cycle.  The package's ``__init__``, ``__main__``
and ``_version`` sit outside the layers: the first two on top, ``_version`` a leaf.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Optional

import pytest

PACKAGE = "sorsa_kernels"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: Layer of each top-level part of the package (a module may import its own layer or lower).
LEVELS = {
    "kernels": 0, "quant": 0, "dtensor": 0, "ops": 1, "nn": 2, "adapters": 3, "memory": 4,
    "training": 4, "distributed": 4, "jobs": 5, "cli": 6,
}
#: Outside the layers: the package itself and ``__main__`` import anything; ``_version`` nothing.
EXEMPT_TOP = {PACKAGE, f"{PACKAGE}.__main__"}
EXEMPT_LEAF = {f"{PACKAGE}._version"}
#: What a leaf part may import from outside the package.
LEAF_EXTERNAL = {"torch", "bitsandbytes"} | set(sys.stdlib_module_names) | {"__future__"}
LEAVES = ("quant", "dtensor")


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def scan(root: Path, package: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(internal, external)``: per module, the package modules it imports and the
    top-level names of everything else it imports."""
    files = {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    internal: dict[str, set[str]] = {m: set() for m in files}
    external: dict[str, set[str]] = {m: set() for m in files}

    def resolve(name: str) -> Optional[str]:  # the longest package module that ``name`` starts with
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module
                # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one.
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names]
            else:
                continue
            for t in targets:
                if t == package or t.startswith(package + "."):
                    hit = resolve(t)
                    if hit is not None and hit != mod:
                        internal[mod].add(hit)
                else:
                    external[mod].add(t.split(".")[0])
    return internal, external


def level(module: str, package: str = PACKAGE) -> Optional[int]:
    """The module's layer, or None for the exempt modules (package top and ``_version``)."""
    if module in EXEMPT_TOP or module in EXEMPT_LEAF:
        return None
    part = module[len(package) + 1:].split(".")[0]
    if part not in LEVELS:
        raise AssertionError(f"{module} is in no layer; add its folder to LEVELS in tests/test_layering.py")
    return LEVELS[part]


def _part(module: str, package: str = PACKAGE) -> str:
    return module[len(package) + 1:].split(".")[0]


def layering_violations(internal: dict[str, set[str]], external: dict[str, set[str]],
                        package: str = PACKAGE) -> list[str]:
    """Each import that runs up a layer, across level 0, or out of a leaf, as ``"a -> b (why)"``."""
    bad = []
    for src, targets in sorted(internal.items()):
        for dst in sorted(targets):
            if src in EXEMPT_TOP or dst in EXEMPT_LEAF:
                continue
            if dst in EXEMPT_TOP:
                bad.append(f"{src} -> {dst} (imports the package top)")
            elif src in EXEMPT_LEAF:
                bad.append(f"{src} -> {dst} (_version imports nothing)")
            elif level(src, package) < level(dst, package):
                bad.append(f"{src} -> {dst} (upward: layer {level(src, package)} imports layer {level(dst, package)})")
            elif _part(src, package) in LEAVES and _part(dst, package) != _part(src, package):
                bad.append(f"{src} -> {dst} ({_part(src, package)}/ is a leaf)")
            elif level(src, package) == level(dst, package) == 0 and _part(src, package) != _part(dst, package):
                bad.append(f"{src} -> {dst} (kernels/ and quant/ are independent)")
    for src, names in sorted(external.items()):
        if src.startswith(package + ".") and _part(src, package) in LEAVES:
            for name in sorted(names - LEAF_EXTERNAL):
                bad.append(f"{src} -> {name} ({_part(src, package)}/ is a leaf: torch, bitsandbytes, stdlib only)")
    return bad


def find_cycle(internal: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle as ``[a, b, …, a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> Optional[list[str]]:
        state[m] = 1
        path.append(m)
        for n in sorted(internal.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(internal):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


# ---------------------------------------------------------------------- the package
def test_every_module_is_in_a_layer():
    internal, _ = scan(ROOT, PACKAGE)
    assert len(internal) > 20  # the walk found the package
    for m in internal:
        level(m)


def test_no_import_runs_up_a_layer_or_out_of_a_leaf():
    internal, external = scan(ROOT, PACKAGE)
    assert layering_violations(internal, external) == []


def test_no_import_cycle_between_modules():
    internal, _ = scan(ROOT, PACKAGE)
    assert find_cycle(internal) is None


def folder_graph(internal: dict[str, set[str]], package: str = PACKAGE) -> dict[str, set[str]]:
    """The import graph between folders (a module's folder: its package path without the file)."""
    def folder(m: str) -> str:
        path = ROOT.joinpath(*m.split(".")[1:])
        return m if path.is_dir() else m.rpartition(".")[0]

    graph: dict[str, set[str]] = {}
    for src, targets in internal.items():
        a = folder(src)
        graph.setdefault(a, set())
        for dst in targets:
            b = folder(dst)
            if b != a and not a.startswith(b + ".") and not b.startswith(a + "."):
                graph[a].add(b)
    return graph


def test_no_import_cycle_between_folders():
    internal, _ = scan(ROOT, PACKAGE)
    assert find_cycle(folder_graph(internal)) is None


#: Issue 13: no module of the package grows past this (split it by what changes together).
MAX_MODULE_LINES = 800


def test_no_package_module_is_longer_than_800_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert len(sizes) > 20
    assert {f: n for f, n in sizes.items() if n > MAX_MODULE_LINES} == {}


#: Issue 30: no module outside ``kernels/`` grows past this.
MAX_LINES_OUTSIDE_KERNELS = 400
#: The parts whose modules are all within it already: any module over it fails at once.
SPLIT_PARTS = ("adapters", "nn", "distributed", "quant", "training")


def modules_over(limit: int, root: Path = ROOT) -> dict[str, int]:
    """``{path relative to the package: lines}`` of every module outside ``kernels/`` longer than ``limit``."""
    sizes = {p.relative_to(root).as_posix(): len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    return {f: n for f, n in sizes.items() if n > limit and not f.startswith("kernels/")}


@pytest.mark.parametrize("part", SPLIT_PARTS)
def test_no_module_of_a_split_part_is_over_400_lines(part):
    assert (ROOT / part).is_dir()
    assert {f: n for f, n in modules_over(MAX_LINES_OUTSIDE_KERNELS).items() if f.startswith(part + "/")} == {}


def test_no_module_outside_kernels_is_over_400_lines():
    assert modules_over(MAX_LINES_OUTSIDE_KERNELS) == {}


def test_line_limit_check_skips_kernels_and_counts_every_other_module(tmp_path):
    root = _fake_package(tmp_path, {"kernels/big.py": "x = 1\n" * 9, "jobs/run.py": "x = 1\n" * 9,
                                    "nn/small.py": "x = 1\n" * 3})
    assert modules_over(5, root) == {"jobs/run.py": 9}


# ---------------------------------------------------------------------- the checker itself
def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checker_finds_an_upward_import_inside_a_function(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "",
        "ops/__init__.py": "",
        "ops/op.py": "def f():\n    from ..nn.layer import Layer\n    return Layer\n",
        "nn/__init__.py": "",
        "nn/layer.py": "from ..ops import op\nclass Layer: ...\n",
    })
    internal, external = scan(root, PACKAGE)
    assert internal[f"{PACKAGE}.ops.op"] == {f"{PACKAGE}.nn.layer"}
    assert internal[f"{PACKAGE}.nn.layer"] == {f"{PACKAGE}.ops.op"}
    bad = layering_violations(internal, external)
    assert bad == [f"{PACKAGE}.ops.op -> {PACKAGE}.nn.layer (upward: layer 1 imports layer 2)"]
    assert find_cycle(internal) == [f"{PACKAGE}.nn.layer", f"{PACKAGE}.ops.op", f"{PACKAGE}.nn.layer"]


def test_checker_finds_a_leaf_importing_ops_or_a_third_party_package(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "",
        "quant/__init__.py": "import numpy\nimport torch\nimport bitsandbytes\nimport math\n",
        "quant/init.py": "from ..ops.reference import principal_split\n",
        "ops/__init__.py": "",
        "ops/reference.py": "from ..quant import init\n",
    })
    internal, external = scan(root, PACKAGE)
    bad = layering_violations(internal, external)
    assert f"{PACKAGE}.quant.init -> {PACKAGE}.ops.reference (upward: layer 0 imports layer 1)" in bad
    assert f"{PACKAGE}.quant -> numpy (quant/ is a leaf: torch, bitsandbytes, stdlib only)" in bad
    assert len(bad) == 2


def test_checker_accepts_downward_imports(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "from .nn import layer\n",
        "cli.py": "from .jobs import job\n",
        "jobs/__init__.py": "",
        "jobs/job.py": "from ..nn.layer import Layer\nfrom .._version import v\n",
        "nn/__init__.py": "",
        "nn/layer.py": "from ..ops.op import f\nfrom ..quant import nf4\nclass Layer: ...\n",
        "ops/__init__.py": "",
        "ops/op.py": "def f():\n    from ..kernels import k\n",
        "kernels/__init__.py": "",
        "kernels/k.py": "import triton\n",
        "quant/__init__.py": "",
        "quant/nf4.py": "import torch\n",
        "_version.py": "v = '0'\n",
    })
    internal, external = scan(root, PACKAGE)
    assert internal[f"{PACKAGE}.ops.op"] == {f"{PACKAGE}.kernels.k"}
    assert layering_violations(internal, external) == []
    assert find_cycle(internal) is None
