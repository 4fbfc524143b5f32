"""The package's shape: the import-linter contracts hold, no import cycles, and the only imports inside
functions are the lazy ones listed here, each with its reason (issue 19; README "The layout")."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nnctl"

# Imports allowed inside a function body: the one list, each with its reason.
# - nnctl/cli/ and nnctl/__init__.py import the library inside command bodies and __getattr__, so that
#   `import nnctl`, `nnctl --help`, `--version` and `schema` never import torch (2.4 s on this machine).
LAZY_PACKAGES = ("nnctl/cli/", "nnctl/__init__.py")
# - third-party modules that are optional (extras) or costly and needed by one path only:
LAZY_MODULES = {
    "matplotlib": "curves, confusion and comparison pictures: 0.6-1.0 s to import, only once a picture is drawn",
    "onnx": "the onnx extra, only for export-weights --format onnx",
    "onnxruntime": "the onnx extra, only for export-weights --format onnx",
    "onnxscript": "the onnx extra, only for export-weights --format onnx",
    "tensorboard": "the tensorboard extra, only for train.log: [csv, tensorboard]",
    "torch.utils.tensorboard": "the tensorboard extra, only for train.log: [csv, tensorboard]",
    "torch.distributed.run": "torchrun, only when --nproc-per-node launches workers",
    "torch.utils.flop_counter": "MACs in summaries only (imports sympy)",
    "torch._dynamo": "torch.compile's machinery (2.0 s to import), only when train.compile compiles a run",
    "torch.distributed.checkpoint": "FSDP2's state gathering (0.9 s to import), only for a sharded model",
    "torch.distributed.fsdp": "FSDP2, only for train.distributed.strategy: fsdp under several processes",
    "torch.distributed.device_mesh": "FSDP2's mesh, only for train.distributed.strategy: fsdp",
    "nnctl.search": "the tune extra (Optuna, 0.4 s), only for nnctl tune and tune show",
    "optuna": "the tune extra, only for nnctl tune and tune show",
    "mlflow": "the mlflow extra (mlflow-skinny, 1.2 s to import), only for train.log: [csv, mlflow]",
    "torchvision": "only for configs with a torchvision model or torchvision data sets (0.5 s)",
    "nnctl.serving": "the serve extra (FastAPI, uvicorn, prometheus-client: 0.5 s), only for nnctl serve",
}


def _lint_imports() -> str | None:
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    return exe


def test_import_linter_contracts_hold():
    exe = _lint_imports()
    if exe is None:
        pytest.skip("import-linter is not installed (pip install '.[test]' installs it)")
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_no_import_cycles():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("nnctl")
    modules = sorted(m for m in graph.modules if m.startswith("nnctl"))
    edges = {m: sorted(x for x in graph.find_modules_directly_imported_by(m) if x.startswith("nnctl"))
             for m in modules}
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in modules:
        if m not in index:
            visit(m)
    assert cycles == []


def _function_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                found += [(node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                found.append((node.lineno, ("." * node.level) + (node.module or "")))
    return found


def test_imports_inside_functions_are_only_the_listed_lazy_ones():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(LAZY_PACKAGES):
            continue
        for line, module in _function_imports(path):
            if not any(module == m or module.startswith(m + ".") for m in LAZY_MODULES):
                offenders.append(f"{rel}:{line}: {module}")
    assert offenders == [], "imports inside functions (move them to the top, or list them with a reason):\n" + \
        "\n".join(sorted(set(offenders)))
