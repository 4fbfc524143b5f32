"""The README says what nnctl does: its examples run against the shipped configs."""

from __future__ import annotations

import re
import shlex


from .conftest import ROOT, run_cli

README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^( *)```{lang}\n(.*?)^\1```", README, flags=re.S | re.M)


def dedented(indent: str, body: str) -> str:
    return "".join(line[len(indent):] if line.startswith(indent) else line for line in body.splitlines(True))


def test_set_examples_fit_a_shipped_config():
    """Every `--set model.layers[...]` example is part of a command on a shipped config that checks."""
    commands = re.findall(r"nnctl (?:check|train) (configs/[\w.]+\.yaml)((?: --set \S+?)+)`", README)
    layer_sets = re.findall(r"--set (model\.layers\S+?)`", README)
    assert layer_sets, "the README shows no model.layers override"
    covered = {s for _, sets in commands for s in re.findall(r"--set (\S+)", sets)}
    assert set(layer_sets) <= covered, "a model.layers override without the config it applies to"
    for config, sets in commands:
        r = run_cli("check", config, *shlex.split(sets), cwd=ROOT)
        assert r.returncode == 0, (config, sets, r.stderr)


def test_inline_config_is_digits_cnn_and_its_output_matches():
    section = README[README.index("## The config language"):]
    inline = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    assert inline == (ROOT / "configs" / "digits_cnn.yaml").read_text()
    r = run_cli("check", "configs/digits_cnn.yaml", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    params = re.search(r"([\d,]+) parameters", r.stdout).group(1)
    # the training output shown in the quick start is that of this config
    assert f"model: {params} parameters" in README
    assert "nnctl train configs/digits_cnn.yaml" in README


def test_configs_table_lists_every_config():
    listed = set(re.findall(r"^\| `([\w.]+\.yaml)` \|", README, flags=re.M))
    shipped = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert shipped <= listed, f"not in the README's configs table: {sorted(shipped - listed)}"
    assert listed <= shipped, f"listed but not shipped: {sorted(listed - shipped)}"


def test_yaml_examples_check(tmp_path):
    """The model-only and repeated-block examples are configs nnctl accepts; the block's mistake gets the fix."""
    examples = [dedented(indent, body) for indent, body in blocks("yaml") if body.lstrip().startswith("model:")]
    repeat = [e for e in examples if "repeat: 9" in e]
    model_only = [e for e in examples if "data:" not in e and "repeat" not in e]
    assert repeat and model_only
    for i, text in enumerate(repeat + model_only):
        p = tmp_path / f"example{i}.yaml"
        p.write_text(text)
        r = run_cli("check", str(p))
        assert r.returncode == 0, (text, r.stderr)
    # the natural mistake: no colon after the block's name
    wrong = re.sub(r"- ResBlock:[^\n]*\n(\s*)repeat: 9[^\n]*", r"- ResBlock\n\1  repeat: 9", repeat[0])
    assert wrong != repeat[0]
    p = tmp_path / "wrong.yaml"
    p.write_text(wrong)
    r = run_cli("check", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "write `- ResBlock:`" in r.stderr
    line = wrong.splitlines().index(next(x for x in wrong.splitlines() if x.strip() == "- ResBlock")) + 1
    assert r.stderr.startswith(f"{p}:{line}:")


def test_finetuning_snippet_normalises_like_training():
    import dataclasses

    from nnctl.data.record import Preprocessing

    (snippet,) = [b for _, b in blocks("python") if "parity.safetensors" in b]
    fed = re.search(r"print\(model\((.*?)\)", snippet).group(1)
    assert "rand" not in fed, "raw random values are not what the model was trained on"
    # it reads the run's record (export-weights metadata), with the record's own field names
    assert 'f.metadata()["preprocessing"]' in snippet
    fields = {f.name for f in dataclasses.fields(Preprocessing)}
    used = set(re.findall(r'pre\["(\w+)"\]', snippet)) | set(re.findall(r'"(mean|std)"', snippet))
    assert used == {"mean", "std", "scale"} and used <= fields
    assert re.search(r"\(pixels / pre\[\"scale\"\] - mean\) / std", snippet)
    compile(snippet, "README.md", "exec")


def test_which_default_and_paths_documented():
    flat = " ".join(README.split())
    assert "takes `best.pt` by default" in flat
    assert "are relative to the folder of that file" in flat
    assert "A path given with `--set` on the command line is relative to the current directory" in flat


def test_no_plural_for_one_epoch_in_the_readme():
    assert not re.search(r"\b1 epochs\b", README)
