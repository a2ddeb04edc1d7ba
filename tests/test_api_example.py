"""The README's Python example runs as written, and CI runs the README's test command, so neither can rot."""

from __future__ import annotations

import re

from visionpeft.settings import ROOT

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def code_block(text: str, language: str) -> str:
    blocks = re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) == 1, f"expected one {language} block, found {len(blocks)}"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example writes its adapter files to the working directory
    namespace: dict = {}
    exec(compile(code_block(section("Python API"), "python"), "README.md", "exec"), namespace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco.safetensors", "crops.safetensors"]
    assert type(namespace["merged"]).__name__ == "DetectionModel"
    assert namespace["predictions"].shape[:2] == (1, 6)
    printed = capsys.readouterr().out
    assert "all" in printed and "%" in printed  # the trainable report


def test_readme_pipeline_example_runs(tmp_path, monkeypatch, capsys):
    """The 'In a CV pipeline' example, on the adapter files of the Python API example (one as a run folder)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(code_block(section("Python API"), "python"), "README.md", "exec"), {})
    run = tmp_path / "runs" / "detect" / "crops" / "weights"
    run.mkdir(parents=True)
    (tmp_path / "crops.safetensors").rename(run / "best.safetensors")
    capsys.readouterr()
    namespace: dict = {}
    exec(compile(code_block(section("In a CV pipeline"), "python"), "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model.adapters == ["coco", "crops"] and model.active_adapter == "crops"
    assert namespace["people"].names[0] == "person" and set(namespace["people"].boxes.cls.tolist()) <= {0.0}
    assert 0 <= namespace["metrics"].box.map <= 1
    assert namespace["onnx_file"] == str(tmp_path / "crops.onnx")
    boxes = re.findall(r"^(\S+) [0-9.]+ \[\d+, \d+, \d+, \d+\]$", capsys.readouterr().out, flags=re.M)
    assert set(boxes) <= {"crop", "weed"}  # the example's printed boxes are the crops adapter's


def test_ci_runs_the_readme_test_command():
    commands = code_block(section("Set-up"), "bash").strip().splitlines()
    assert len(commands) == 2, "the set-up is two commands: the main job and the tests"
    main_job, tests = commands
    assert "scripts/train.py" in main_job and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "CI must run exactly the README's test command"
