"""One writer (issue 20, "At the root"): every file nnctl writes goes through nnctl/files.py.

An architecture test, not a grep: the package's source is walked with ``ast`` and every call that writes
a file is found: ``open``/``Path.open``/``gzip.open``/``ZipFile`` in a writing mode (w, a, x, +), ``os.open``
with O_WRONLY/O_RDWR/O_CREAT/O_APPEND/O_TRUNC, ``.savefig``, ``torch.save``, ``np.save``/``np.savez``,
``onnx.save``, ``torch.onnx.export``, safetensors' ``save_file``, ``.write_text``/``.write_bytes``/``.touch``,
``os.replace``/``os.rename``/``shutil.copy*``/``shutil.move``, temporary files, TensorBoard's
``SummaryWriter``. A serialiser (savefig, torch.save, np.savez, ...) is allowed only when its file is
the file object ``atomic_write`` hands in (``atomic_write(path, lambda fh: torch.save(x, fh))``).
Anything else outside nnctl/files.py must be in ALLOWED below, with its reason; an entry that no
longer matches fails too, so the list only shrinks. The scanner is shown to catch each form on a
planted tree (test_the_scanner_catches_every_planted_write).
"""

from __future__ import annotations

import ast
import textwrap
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nnctl"
WRITER = "nnctl/files.py"  # the one writer: check_output, atomic_write, save_figure, probe_writable

# (file, kind) -> (how many, why it must write by itself). Nothing else outside nnctl/files.py writes.
ALLOWED: dict[tuple[str, str], tuple[int, str]] = {
    ("nnctl/data/cache/fill.py", "open(mode='wb')"): (
        1, "the decoded cache's fill streams the decoded images (up to gigabytes, hashed as they go) into a "
           "temporary file beside the entry, fsyncs it, then renames it into place"),
    ("nnctl/data/cache/fill.py", "os.replace"): (1, "that rename: the cache fill's temporary file into place"),
    ("nnctl/locks.py", "os.open(O_CREAT|O_RDWR)"): (
        1, "the lock file (the run lock RUN/.lock, the cache's <key>.lock): flock needs a descriptor on the "
           "file itself, made in place and never renamed (a rename would let two processes hold two locks); "
           "the holder's pid is written through that descriptor"),
    ("nnctl/cli/render.py", "os.open(O_WRONLY)"): (
        1, "after a BrokenPipeError (nnctl schema | head, nnctl train | head), stdout is pointed at /dev/null so the "
           "interpreter's last flush cannot fail; no file is written"),
    ("nnctl/use/export.py", "torch.onnx.export"): (
        2, "torch's ONNX exporters (torch.export-based, then TorchScript) only write to a path: into a private "
           "TemporaryDirectory; the result is then written through atomic_write"),
    ("nnctl/use/export.py", "onnx.save"): (
        1, "the metadata added to that scratch ONNX file, in the same private TemporaryDirectory"),
    ("nnctl/runs/tensorboard.py", "SummaryWriter"): (
        1, "TensorBoard's event files: torch's SummaryWriter appends to RUN/tensorboard/events.* from its own "
           "thread, in the run folder the claim checked and locked (an append-only log cannot be renamed in)"),
}

_WRITE_MODE = set("wax+")
_WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC", "O_TMPFILE"}
# open-like functions whose mode is their second argument (the first is the file)
_OPEN_MODULE_FUNCS = {"builtins.open", "io.open", "gzip.open", "bz2.open", "lzma.open", "tarfile.open",
                      "codecs.open", "zipfile.ZipFile", "gzip.GzipFile", "tarfile.TarFile"}
# serialisers: allowed only when one argument is the file object atomic_write hands in
_SERIALISERS = {"torch.save", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt",
                "onnx.save", "onnx.save_model", "safetensors.torch.save_file", "safetensors.numpy.save_file",
                "torch.jit.save", "torch.onnx.export", "PIL.Image.Image.save"}
# always a write of its own
_ALWAYS = {"os.replace", "os.rename", "os.renames", "os.link", "os.symlink", "os.mkfifo", "os.truncate",
           "shutil.copy", "shutil.copy2", "shutil.copyfile", "shutil.copytree", "shutil.move",
           "tempfile.mkstemp", "tempfile.NamedTemporaryFile", "tempfile.TemporaryFile",
           "tempfile.SpooledTemporaryFile", "torch.utils.tensorboard.SummaryWriter",
           "torch.utils.tensorboard.writer.SummaryWriter", "tensorboardX.SummaryWriter"}
_ALWAYS_METHODS = {"write_text", "write_bytes", "touch"}  # pathlib
_HANDED_METHODS = {"savefig"}  # matplotlib: a figure saved to a path
_ATOMIC = {"atomic_write", "_atomic_write"}


def _imports(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it names (``np`` -> ``numpy``, ``SummaryWriter`` -> its full name), anywhere in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _qualified(func: ast.AST, imports: dict[str, str]) -> str | None:
    """``np.savez`` -> ``numpy.savez``; ``open`` -> ``builtins.open``; None for a method of a non-module."""
    dotted = _dotted(func)
    if dotted is None:
        return None
    head, _, rest = dotted.partition(".")
    if head in imports:
        return imports[head] + (f".{rest}" if rest else "")
    if dotted == "open":
        return "builtins.open"
    return None


def _arg(call: ast.Call, index: int, keyword: str) -> ast.AST | None:
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    return call.args[index] if len(call.args) > index else None


def _flag_names(expr: ast.AST | None, scope: ast.AST | None) -> set[str]:
    """The O_* names in a flags expression; a variable's assignments in the enclosing function are followed."""
    if expr is None:
        return set()
    found = {n.attr for n in ast.walk(expr) if isinstance(n, ast.Attribute) and n.attr.startswith("O_")}
    found |= {n.id for n in ast.walk(expr) if isinstance(n, ast.Name) and n.id.startswith("O_")}
    variables = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name) and not n.id.startswith("O_")}
    if variables and scope is not None:
        for node in ast.walk(scope):
            targets = (node.targets if isinstance(node, ast.Assign) else
                       [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else [])
            if any(isinstance(t, ast.Name) and t.id in variables for t in targets) and node.value is not None:
                found |= _flag_names(node.value, None)
    return found


class _Scan:
    def __init__(self, tree: ast.AST):
        self.tree = tree
        self.imports = _imports(tree)
        self.parent: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
        # functions passed by name to atomic_write: def write(fh): torch.save(x, fh); atomic_write(p, write)
        self.handed_defs = {a.id for c in ast.walk(tree) if isinstance(c, ast.Call) and self._is_atomic(c)
                            for a in [*c.args, *(k.value for k in c.keywords)] if isinstance(a, ast.Name)}

    @staticmethod
    def _is_atomic(call: ast.Call) -> bool:
        f = call.func
        return (isinstance(f, ast.Name) and f.id in _ATOMIC) or (isinstance(f, ast.Attribute) and f.attr in _ATOMIC)

    def _scope(self, node: ast.AST) -> ast.AST | None:
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                return node
        return None

    def _function_name(self, node: ast.AST) -> str:
        names = []
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.append(node.name)
        return ".".join(reversed(names)) or "<module>"

    def handed_in(self, call: ast.Call) -> bool:
        """One argument is the parameter of a lambda / def that is given to atomic_write."""
        scope = self._scope(call)
        if scope is None:
            return False
        params = {a.arg for a in scope.args.args + scope.args.posonlyargs + scope.args.kwonlyargs}
        used = {a.id for a in [*call.args, *(k.value for k in call.keywords)] if isinstance(a, ast.Name)}
        if not params & used:
            return False
        if isinstance(scope, ast.Lambda):
            holder = self.parent.get(scope)
            if isinstance(holder, ast.keyword):
                holder = self.parent.get(holder)
            return isinstance(holder, ast.Call) and self._is_atomic(holder)
        return scope.name in self.handed_defs

    def writes(self) -> list[tuple[str, int, str]]:
        """(kind, line, function) of every call that writes a file by itself."""
        out = []
        for call in ast.walk(self.tree):
            if not isinstance(call, ast.Call):
                continue
            kind = self._kind(call)
            if kind is not None:
                out.append((kind, call.lineno, self._function_name(call)))
        return out

    def _kind(self, call: ast.Call) -> str | None:
        q = _qualified(call.func, self.imports)
        attr = call.func.attr if isinstance(call.func, ast.Attribute) else None
        if q == "os.open":
            flags = _flag_names(_arg(call, 1, "flags"), self._scope(call)) & _WRITE_FLAGS
            return f"os.open({'|'.join(sorted(flags))})" if flags else None
        if q in _OPEN_MODULE_FUNCS or (q is None and attr == "open"):
            mode = _arg(call, 1 if q else 0, "mode")
            if mode is None:
                return None  # read (the default mode)
            if not (isinstance(mode, ast.Constant) and isinstance(mode.value, str)):
                return "open(mode not a constant)"
            return f"open(mode={mode.value!r})" if _WRITE_MODE & set(mode.value) else None
        if q in _ALWAYS:
            return q.rsplit(".", 1)[-1] if "SummaryWriter" in q else q
        if q is None and attr in _ALWAYS_METHODS:
            return f".{attr}"
        if q in _SERIALISERS:
            return None if self.handed_in(call) else q
        if q is None and attr in _HANDED_METHODS:
            return None if self.handed_in(call) else f".{attr}"
        return None


def scan(root: Path, skip: str = WRITER) -> list[tuple[str, str, int, str]]:
    """Every write outside ``skip`` under root/nnctl: (file, kind, line, function)."""
    found = []
    for path in sorted((root / "nnctl").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == skip:
            continue
        for kind, line, fn in _Scan(ast.parse(path.read_text(), str(path))).writes():
            found.append((rel, kind, line, fn))
    return found


def check(found: list[tuple[str, str, int, str]], allowed: dict) -> list[str]:
    """What is wrong: writes not allowed, and allow-list entries that no longer match (the list only shrinks)."""
    counts = Counter((f, k) for f, k, _, _ in found)
    problems = []
    for f, k, line, fn in found:
        if (f, k) not in allowed:
            problems.append(f"{f}:{line} in {fn}: {k} writes a file outside nnctl/files.py; write through "
                            "files.atomic_write / files.save_figure (or allow it here, with its reason)")
    for key, (n, _why) in allowed.items():
        if counts.get(key, 0) != n:
            problems.append(f"ALLOWED{key} says {n}, the source has {counts.get(key, 0)}: update the allow-list "
                            "(it only shrinks)")
    return problems


def test_every_write_in_the_package_goes_through_the_one_writer():
    found = scan(ROOT)
    assert check(found, ALLOWED) == []
    assert all(why.strip() for _, why in ALLOWED.values())


def test_the_writer_itself_is_where_the_writes_are():
    """The scanner sees nnctl/files.py's own writes (so an empty result elsewhere means something)."""
    kinds = {k for f, k, _, _ in scan(ROOT, skip="") if f == WRITER}
    assert {"open(mode='wb')", "os.replace"} <= kinds


PLANTED = '''
import os, shutil, tempfile
import numpy as np
import torch
from pathlib import Path
from torch.utils.tensorboard import SummaryWriter
from nnctl.files import atomic_write

def bad(fig, x, path, flags):
    open(path, "w").write("x")                      # 1
    with open(path, mode="ab") as fh: pass          # 2
    Path(path).open("x")                            # 3
    Path(path).write_text("x")                      # 4
    Path(path).write_bytes(b"x")                    # 5
    fig.savefig(path)                               # 6
    torch.save(x, path)                             # 7
    np.save(path, x)                                # 8
    np.savez(path, a=x)                             # 9
    os.open(path, os.O_WRONLY | os.O_CREAT)         # 10
    flags = os.O_RDWR
    os.open(path, flags)                            # 11
    os.replace(path, path + ".2")                   # 12
    shutil.copy(path, path + ".3")                  # 13
    tempfile.mkstemp()                              # 14
    SummaryWriter(log_dir=path)                     # 15
    atomic_write(path, lambda fh: torch.save(x, path))  # 16: the lambda ignores the file it is handed
    open(path, flags)                               # 17: a mode that is not a constant

def good(fig, x, path):
    open(path).read()
    open(path, "rb").read()
    Path(path).open("rb")
    os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    atomic_write(path, lambda fh: torch.save(x, fh))
    atomic_write(path, write=lambda fh: np.savez(fh, a=x))

    def write(fh):
        torch.save(x, fh)

    atomic_write(path, write)
'''


def test_the_scanner_catches_every_planted_write(tmp_path):
    """The test can fail: a module holding each forbidden write is caught, one finding a write, and
    the allowed forms (reads, serialisers handed atomic_write's file) are not."""
    (tmp_path / "nnctl").mkdir()
    (tmp_path / "nnctl" / "planted.py").write_text(textwrap.dedent(PLANTED))
    found = scan(tmp_path)
    assert {fn for _, _, _, fn in found} == {"bad"}
    assert len(found) == 17, found
    assert [k for _, k, _, _ in found if k.startswith("os.open")] == ["os.open(O_CREAT|O_WRONLY)", "os.open(O_RDWR)"]
    problems = check(found, {})
    assert len(problems) == 17 and all("nnctl/planted.py:" in p for p in problems)


def test_an_allow_list_entry_that_no_longer_matches_fails(tmp_path):
    (tmp_path / "nnctl").mkdir()
    (tmp_path / "nnctl" / "m.py").write_text("import os\n\ndef f(a, b):\n    os.replace(a, b)\n")
    found = scan(tmp_path)
    assert check(found, {("nnctl/m.py", "os.replace"): (1, "a reason")}) == []
    stale = check(found, {("nnctl/m.py", "os.replace"): (1, "a reason"), ("nnctl/gone.py", "os.replace"): (1, "x")})
    assert stale == ["ALLOWED('nnctl/gone.py', 'os.replace') says 1, the source has 0: update the allow-list "
                     "(it only shrinks)"]
    assert check(found, {("nnctl/m.py", "os.replace"): (2, "a reason")})  # a count that is too high fails too


# --- the defects this closes, each reproduced from the outside (issue 20: 1, 2, 11, 20) ---------------------

import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

import nnctl  # noqa: E402
from nnctl import files  # noqa: E402
from nnctl.errors import NnctlError, UsageError  # noqa: E402
from nnctl.runs.rundir import RunDir  # noqa: E402

from .conftest import digest_of, helper_command, make, run_cli  # noqa: E402

CAFE = os.fsdecode(b"caf\xe9")  # a folder name that is not UTF-8, as os.listdir gives it ('caf\udce9')
COLOURS = {"blue": (0, 0, 255), "red": (255, 0, 0), CAFE: (0, 160, 0)}


def _images(root: Path, names=("blue", "red", "green")) -> Path:
    for c, (name, colour) in enumerate(zip(names, COLOURS.values())):
        for i in range(8):
            rng = np.random.default_rng(c * 100 + i)
            arr = rng.integers(0, 90, (8, 8, 3)) + np.array(colour) * 2 // 3
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def _image_config(root: Path) -> dict:
    return {"name": "colours", "seed": 0,
            "model": {"input_shape": [3, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 3}}]},
            "data": {"source": "image_folder", "root": str(root), "val_fraction": 0.25},
            "train": {"epochs": 1, "batch_size": 8, "loss": "cross_entropy"}}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A run trained on an image folder whose third class folder is named b'caf\\xe9' (not UTF-8)."""
    tmp = tmp_path_factory.mktemp("one-writer")
    data = _images(tmp / "data", names=("blue", "red", CAFE))
    result = nnctl.train(_image_config(data), out=str(tmp / "run"))
    return tmp, data, result.run_dir


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A run trained on an image folder of plain names (blue, red, green)."""
    tmp = tmp_path_factory.mktemp("one-writer-plain")
    data = _images(tmp / "data")
    result = nnctl.train(_image_config(data), out=str(tmp / "run"))
    return tmp, data, result.run_dir


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_summary_graph_never_replaces_an_input_a_run_file_or_waits_on_a_fifo(digits_run, tmp_path, cli,
                                                                              monkeypatch):
    """Defect 1: `summary --graph` wrote with fig.savefig(path): through a link named g.png it replaced the
    config it read, it replaced a run's curves.png, and a FIFO named g.svg / g.pdf hung it."""
    config = tmp_path / "keep.yaml"
    config.write_text(yaml.safe_dump(make(), sort_keys=False))
    text = config.read_bytes()
    (tmp_path / "g.png").symlink_to("keep.yaml")
    os.link(config, tmp_path / "h.png")  # the same file under a picture's name
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    before = digest_of(run)
    cases = [(str(config), "g.png", "exists and is a symbolic link"),
             (str(config), "h.png", "is an input of this command"),
             (str(run), "run/curves.png", "is a file nnctl keeps in the run folder"),
             (str(config), "run/curves.png", "is a file nnctl keeps in the run folder"),
             (str(config), str(_fifo(tmp_path / "g.svg")), "is a FIFO (named pipe)"),
             (str(config), str(_fifo(tmp_path / "g.pdf")), "is a FIFO (named pipe)")]
    monkeypatch.chdir(tmp_path)
    for source, target, words in cases:
        if "FIFO" in words:  # a real process: a hang is a TimeoutExpired, not a stuck test session
            code, _, err = (r := run_cli("summary", source, "--graph", target, cwd=tmp_path, timeout=120)).returncode, \
                r.stdout, r.stderr
        else:
            code, _, err = cli("summary", source, "--graph", target)
        assert code == 2 and words in err, (target, err)
        assert f"error: --graph {target}: " in err
    assert config.read_bytes() == text and (tmp_path / "g.png").is_symlink()
    assert digest_of(run) == before
    code, _, err = cli("summary", str(run), "--graph", "ok.svg")  # beside them, a new file: drawn
    assert code == 0 and (tmp_path / "ok.svg").read_bytes().startswith(b"<?xml"), err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_no_output_inside_a_data_folder_the_command_reads(plain_run, tmp_path, cli):
    """Defect 2: `eval RUN --confusion --confusion-out DATA/class/03.png` overwrote a training image. Every
    path under the data root is an input: a file there, a new file there, reached through a link or '..'."""
    _, data, run = plain_run
    before = digest_of(data)
    (tmp_path / "link").symlink_to(data / "red")
    other = _images(tmp_path / "other")
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"data": {"source": "image_folder", "root": str(other)}}))
    cases = [(str(data / "red" / "03.png"), ()), (str(data / "new.png"), ()), (str(data / "red" / "x.png"), ()),
             (str(tmp_path / "link" / "03.png"), ()), (f"{data}/red/../blue/00.png", ()),
             (str(other / "blue" / "00.png"), ("--data", str(tmp_path / "other.yaml")))]
    for i, (target, more) in enumerate(cases):
        if i == 0:  # the reproduction, as a real process
            r = run_cli("eval", str(run), "--confusion", "--confusion-out", target, *more)
            code, err = r.returncode, r.stderr
        else:
            code, _, err = cli("eval", str(run), "--confusion", "--confusion-out", target, *more)
        assert code == 2, (target, err)
        assert "a data folder this command reads (an input); refused" in err, err
    assert digest_of(data) == before and sorted(os.listdir(data)) == ["blue", "green", "red"]
    code, _, err = cli("eval", str(run), "--confusion", "--confusion-out", str(tmp_path / "cm.png"))
    assert code == 0 and (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG", err


def test_check_output_refuses_everything_under_an_input_folder(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "up").symlink_to(tmp_path / "data")
    for target in ("data/a/x.png", "data/new.png", "up/a/y.png", "data/a/../../data/z.png"):
        with pytest.raises(UsageError, match="a data folder this command reads"):
            files.check_output(tmp_path / target, input_dirs=[tmp_path / "data"])
    for target in ("data2/x.png", "x.png", "data.png"):  # beside it, a name that starts the same: allowed
        assert files.check_output(tmp_path / target, input_dirs=[tmp_path / "data"]) == tmp_path / target
    with pytest.raises(UsageError, match="a data folder"):
        files.atomic_write(tmp_path / "data" / "a" / "w.bin", lambda fh: fh.write(b"x"), input_dirs=[tmp_path / "up"])
    assert not (tmp_path / "data" / "a" / "w.bin").exists()


def test_display_name_shows_the_bytes_of_a_name_that_is_not_utf8():
    assert files.display_name(CAFE) == "caf\\xe9"
    assert files.display_name("café/ok") == "café/ok"  # valid names unchanged
    assert files.display_name("\ud800") == "\\ud800"  # a surrogate that is not an escaped byte
    for name in (CAFE, "\ud800x", os.fsdecode(b"\xff\xfe")):
        files.display_name(name).encode("utf-8")  # never raises


@pytest.mark.slow  # every output command as a real process (about 25 s): .ci/run runs the slow group
def test_a_class_folder_whose_name_is_not_utf8_reaches_every_output(image_run, tmp_path):
    """Defect 11: eval --confusion and compare crashed in matplotlib (set_text), predict --format csv -o
    raised UnicodeEncodeError (surrogates). Such a name is shown as its bytes, caf\\xe9, everywhere."""
    tmp, data, run = image_run
    strict = {"PYTHONIOENCODING": "utf-8"}  # a UTF-8 stdout that refuses surrogates, as a terminal's is
    r = run_cli("eval", str(run), "--confusion", "--confusion-out", str(tmp_path / "cm.png"), env=strict)
    assert r.returncode == 0, r.stderr
    assert "caf\\xe9" in r.stdout and (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    r = run_cli("eval", str(run), "--json", env=strict)
    assert r.returncode == 0, r.stderr
    r = run_cli("predict", str(run), str(data), "--format", "csv", "-o", str(tmp_path / "p.csv"), env=strict)
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "p.csv").read_bytes().decode("utf-8").splitlines()  # valid UTF-8
    assert len(rows) == 1 + 24 and sum(f"/caf\\xe9/0" in row for row in rows) == 8
    for fmt in ("csv", "jsonl", "table"):
        r = run_cli("predict", str(run), str(data / CAFE), "--format", fmt, env=strict)
        assert r.returncode == 0, (fmt, r.stderr)
        shown = [json.loads(line)["input"] for line in r.stdout.splitlines()] if fmt == "jsonl" else [r.stdout]
        assert all("/caf\\xe9/" in text for text in shown), (fmt, r.stdout)
    odd = Path(os.fsdecode(os.fsencode(tmp) + b"/r\xe9"))  # a run folder named b'r\xe9'
    shutil.copytree(run, odd)
    r = run_cli("compare", str(run), str(odd), "-o", str(tmp_path / "c.png"), env=strict)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and "r\\xe9" in r.stdout


@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_a_failed_pid_write_of_the_run_lock_leaves_nothing(tmp_path):
    """Defect 20: a pid write that failed (a full disk, a file-size limit) left a folder holding only .lock.
    Now the claim leaves nothing: no lock file, no folder it made (nor the runs/ it made), one line naming
    the lock file, exit 1; the next train of the same name starts at once."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(make(), sort_keys=False))
    for out in (["--out", "deep/er/run"], []):
        r = subprocess.run(helper_command("nnctl_with_file_size_limit", "0", "train", str(config), *out),
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        target = out[1] if out else "runs/t"
        assert r.returncode == 1 and r.stderr == f"error: cannot write the run lock {target}/.lock: File too large\n"
        assert sorted(os.listdir(tmp_path)) == ["c.yaml"]
    r = run_cli("train", str(config), "--out", "deep/er/run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert RunDir(tmp_path / "deep/er/run").is_run()


def test_run_lock_releases_and_removes_its_file_when_the_pid_cannot_be_written(tmp_path, monkeypatch):
    from nnctl import locks

    def full(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locks.FileLock, "write", full)
    with pytest.raises(NnctlError, match=r"cannot write the run lock .*/\.lock: No space left on device"):
        RunDir(tmp_path).lock()
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    with RunDir(tmp_path).lock():  # nothing held it: taken at once
        assert locks.is_held(tmp_path / ".lock")
