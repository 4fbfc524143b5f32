"""One reader for every YAML nnctl reads (issue 20, "At the root: One reader"; defect 3).

Every YAML read (configs, a run's config.yaml in `nnctl runs` / `nnctl compare`) goes through
nnctl/config/yamlio.py, the safe loader with its limits (alias bombs, self-referential aliases,
deep nesting, huge files, tags beyond the core schema refused before any object is built).
An architecture test walks the package's source with `ast` and fails on any YAML *reading* API
used outside that module; it is shown to fail on planted violations.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nnctl

PACKAGE = Path(nnctl.__file__).resolve().parent
THE_READER = Path("config") / "yamlio.py"

# the PyYAML names that read (parse, compose, construct) YAML, or hand out a loader that does
READING = frozenset({
    "load", "load_all", "safe_load", "safe_load_all", "full_load", "full_load_all", "unsafe_load",
    "unsafe_load_all", "compose", "compose_all", "parse", "scan",
    "Loader", "SafeLoader", "FullLoader", "UnsafeLoader", "BaseLoader",
    "CLoader", "CSafeLoader", "CFullLoader", "CUnsafeLoader", "CBaseLoader",
    "loader", "reader", "scanner", "parser", "composer", "constructor", "cyaml",
})
YAML_MODULES = ("yaml", "ruamel", "ruamel.yaml", "_yaml", "oyaml", "strictyaml")


def yaml_reads(source: str, filename: str = "<source>") -> list[str]:
    """Every use of a YAML-reading API in one module's source: 'file:line: what'."""
    tree = ast.parse(source, filename)
    aliases: set[str] = set()  # local names bound to a YAML module (import yaml / import yaml as y)
    found: list[str] = []

    def is_yaml(module: str | None) -> bool:
        return bool(module) and (module in YAML_MODULES or module.split(".")[0] in YAML_MODULES)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if is_yaml(a.name):
                    aliases.add(a.asname or a.name.split(".")[0])
                    if any(part in READING for part in a.name.split(".")[1:]):
                        found.append(f"{filename}:{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and is_yaml(node.module):
            if any(part in READING for part in (node.module or "").split(".")[1:]):
                found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
            for a in node.names:
                if a.name == "*" or a.name in READING:
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in READING:
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            first = node.args[0]
            by_name = (node.func.id == "getattr" and len(node.args) >= 2 and isinstance(first, ast.Name)
                       and first.id in aliases and isinstance(node.args[1], ast.Constant)
                       and node.args[1].value in READING)
            imported = (node.func.id == "__import__" and isinstance(first, ast.Constant)
                        and is_yaml(str(first.value)))
            if by_name or imported:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def package_yaml_reads(root: Path) -> list[str]:
    """YAML reads in every module under root except the one reader."""
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel == THE_READER:
            continue
        out += yaml_reads(path.read_text(encoding="utf-8"), str(rel))
    return out


def test_every_yaml_read_in_the_package_goes_through_yamlio():
    assert package_yaml_reads(PACKAGE) == []
    # and the reader itself is where the walk would look: it does read YAML
    assert yaml_reads((PACKAGE / THE_READER).read_text(encoding="utf-8"))


@pytest.mark.parametrize("planted", [
    "import yaml\ndata = yaml.safe_load(text)\n",
    "import yaml\ndata = yaml.load(text, Loader=yaml.SafeLoader)\n",
    "import yaml\nnode = yaml.compose(text)\n",
    "import yaml\ndata = yaml.full_load(text)\n",
    "import yaml\ndata = yaml.unsafe_load(text)\n",
    "import yaml\nloader = yaml.Loader(text)\n",
    "import yaml as y\ndata = y.safe_load_all(text)\n",
    "from yaml import safe_load\ndata = safe_load(text)\n",
    "from yaml import *\n",
    "import yaml\ndata = getattr(yaml, 'safe_load')(text)\n",
    "import yaml\nclass L(yaml.reader.Reader, yaml.scanner.Scanner):\n    pass\n",
    "def f(text):\n    import yaml\n    return yaml.safe_load(text)\n",
    "yaml = __import__('yaml')\n",
])
def test_the_architecture_check_fails_on_a_planted_read(planted):
    assert yaml_reads(planted), planted


def test_writing_yaml_is_not_a_read():
    assert yaml_reads("import yaml\ntext = yaml.safe_dump({'a': 1}, sort_keys=False)\n"
                      "try:\n    pass\nexcept yaml.YAMLError:\n    pass\n") == []


def test_the_package_walk_fails_on_a_planted_module(tmp_path):
    root = tmp_path / "nnctl"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__", "*.gz"))
    assert package_yaml_reads(root) == []
    (root / "runs" / "sneaky.py").write_text("import yaml\n\n\ndef read(p):\n    return yaml.safe_load(open(p))\n")
    assert package_yaml_reads(root) == [f"{Path('runs', 'sneaky.py')}:5: yaml.safe_load"]


# --- defect 3: nnctl runs / compare read config.yaml through the one reader ---------------------

# 9 levels of 9: 9**9 (387 million) strings once expanded; 315 bytes on disk
BOMB = ("name: x\n" + 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh")))
LOOP = "name: y\nloop: &l [*l]\n"


def _run_folder(root: Path, name: str, config: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config)
    return folder


def _cli(*args: str, cwd: Path) -> tuple[int, str, str, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "nnctl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


@pytest.mark.slow  # real CLI listings under a time limit (about 14 s): .ci/run runs the slow group
def test_runs_and_compare_refuse_an_alias_bomb_and_a_self_referential_alias(tmp_path):
    assert len(BOMB.encode()) < 400
    runs = tmp_path / "runs"
    for name in ("bomb-1", "bomb-2"):  # two runs of one config name: their configs are compared
        _run_folder(runs, name, BOMB)
    for name in ("loop-1", "loop-2"):
        _run_folder(runs, name, LOOP)
    _run_folder(runs, "fine", "name: fine\ntrain: {epochs: 3}\n")
    bomb_note = ("config.yaml unreadable at line 2 (f[0][3][3][7][1][3]): the document expands to more than 100,000 "
                 "values (an alias bomb?); refused before building it")
    loop_note = ("config.yaml unreadable at line 2 (loop[0]): a self-referential alias (an anchor used "
                 "inside itself) is refused")

    code, out, err, seconds = _cli("runs", "runs", "--json", cwd=tmp_path)
    assert code == 0, err
    assert seconds < 30  # before: no end, memory growing past 1 GB
    rows = {r["name"]: r for r in json.loads(out)}
    assert sorted(rows) == ["bomb-1", "bomb-2", "fine", "loop-1", "loop-2"]
    assert rows["bomb-1"]["notes"] == [bomb_note] and rows["loop-2"]["notes"] == [loop_note]
    assert rows["fine"]["notes"] == [] and rows["fine"]["epochs_total"] == 3

    code, out, err, _ = _cli("runs", "runs", cwd=tmp_path)
    assert code == 0, err
    text = " ".join(out.split())  # the notes under the table, folded to the terminal's width
    assert f"bomb-1: {bomb_note}" in text and f"loop-1: {loop_note}" in text

    for pair in (("runs/loop-1", "runs/loop-2"), ("runs/bomb-1", "runs/fine")):
        code, out, err, seconds = _cli("compare", *pair, "--json", cwd=tmp_path)
        assert code == 0, err  # before: internal error: RecursionError (the self-referencing pair)
        assert "internal error" not in err and seconds < 30
        notes = [r["notes"] for r in json.loads(out)["runs"]]
        assert notes[0] == [loop_note if "loop" in pair[0] else bomb_note]

    # nnctl check refuses the same files with the same words (one reader, one message)
    for config, note in ((BOMB, bomb_note), (LOOP, loop_note)):
        (tmp_path / "c.yaml").write_text(config)
        code, out, err, _ = _cli("check", "c.yaml", cwd=tmp_path)
        assert code == 2 and note.split(": ", 1)[1] in err, err
