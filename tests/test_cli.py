"""The command line: every example config checks and summarises; fast start; exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import CONFIGS, make, run_cli, write


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_check_and_summary(path, cli):
    code, out, err = cli("check", str(path))
    assert code == 0, err
    assert out.startswith("ok: ")
    assert "warning" not in err
    code, out, err = cli("summary", str(path), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["total_params"] > 0 and data["rows"]
    code, out, err = cli("summary", str(path), "--depth", "0")
    assert code == 0, err and "total params" in out


def test_example_configs_are_headed_by_their_command():
    for path in CONFIGS:
        first = path.read_text().splitlines()[0]
        command = "tune" if "\ntune:" in path.read_text() else "train"  # a search config: nnctl tune
        assert first.startswith(f"# nnctl {command} configs/{path.name}"), path


def test_help_version_schema_do_not_import_torch():
    code = (
        "import sys, runpy\n"
        "sys.argv = ['nnctl'] + sys.argv[1:]\n"
        "try:\n"
        "    from nnctl.cli.app import main; main()\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('NO-TORCH')\n"
    )
    for args in (["--help"], ["--version"], ["schema"], ["train", "--help"]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (args, r.stderr)
        assert "NO-TORCH" in r.stdout, (args, r.stdout, r.stderr)


def test_check_structural_mistake_is_reported_without_importing_torch(tmp_path):
    """A structural mistake (keys, types, ranges) is reported and check exits 2 without importing torch
    (issue 24: `seed: abc` took 2.47 s, all of it import torch); layers and shapes come once it is fixed."""
    p = write(tmp_path, make(train={"epochs": "many"}))
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def spy(name, *a, **k):\n"
        "    if name == 'torch' and 'torch' not in sys.modules:\n"
        "        sys.stdout.write('TORCH-IMPORT AFTER: ' + repr(sys.stderr.getvalue()) + '\\n')\n"
        "    return real(name, *a, **k)\n"
        "import io\n"
        "sys.stderr = io.StringIO()\n"
        "builtins.__import__ = spy\n"
        "sys.argv = ['nnctl', 'check', sys.argv[1]]\n"
        "try:\n"
        "    from nnctl.cli.app import main; main()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 2, e.code\n"
    )
    code = code.replace("    assert e.code == 2, e.code\n", "    assert e.code == 2, e.code\n"
                        "    sys.stdout.write('STDERR: ' + repr(sys.stderr.getvalue()) + '\\n')\n")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert "TORCH-IMPORT" not in r.stdout, r.stdout
    stderr = [line for line in r.stdout.splitlines() if line.startswith("STDERR: ")]
    assert stderr and "train.epochs: expected an integer" in stderr[0], (r.stdout, r.stderr)


def test_version(cli):
    from nnctl import __version__

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"nnctl {__version__}"


def test_layers_lists_torch_signatures(cli):
    code, out, _ = cli("layers", "Conv2d", "--json")
    assert code == 0
    (info,) = json.loads(out)
    names = [a["name"] for a in info["arguments"]]
    assert names[:3] == ["in_channels", "out_channels", "kernel_size"]  # PyTorch's order
    assert info["arguments"][0]["inferred"] is True
    code, out, err = cli("layers", "Conv2D")
    assert code == 2 and "did you mean 'Conv2d'" in err
    code, out, _ = cli("layers")
    assert code == 0 and "ReflectionPad2d" in out


def test_schema_output(cli, tmp_path):
    code, out, _ = cli("schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "nnctl config"
    target = tmp_path / "s.json"
    code, _, _ = cli("schema", "-o", str(target))
    assert json.loads(target.read_text()) == schema


def test_check_lint_and_strict(cli, tmp_path):
    d = make(model={"input_shape": [4], "layers": [{"Linear": {"out_features": 3}}, {"Softmax": {"dim": 1}}]})
    del d["data"]  # a model alone (the digits' 10 classes and 8x8 images would not fit this model)
    p = write(tmp_path, d)
    code, out, err = cli("check", str(p))
    assert code == 0 and "warning" in err and "raw logits" in err
    code, out, err = cli("check", str(p), "--strict")
    assert code == 2 and "error: --strict: 1 warning above count as errors" in err


def test_shape_mismatch_names_layer_line_and_shapes(cli, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nmodel:\n  input_shape: [1, 8, 8]\n  layers:\n    - Flatten\n    - Linear: [100, 10]\n"
                 "data: {source: digits}\ntrain: {loss: cross_entropy}\n")
    code, out, err = cli("check", str(p))
    assert code == 2
    assert f"{p}:6:" in err and "model.layers[1]" in err and "100" in err and "64" in err


def test_real_entry_point_exit_code_and_no_traceback(tmp_path):
    p = write(tmp_path, make(model={"input_shape": [1, 8, 8], "layers": ["Conv2D"]}))
    r = run_cli("check", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "did you mean 'Conv2d'" in r.stderr
