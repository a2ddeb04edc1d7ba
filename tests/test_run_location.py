"""Runs land where README says: ``runs/detect/<name>`` under the current directory, whatever Ultralytics' settings
file says, unless ``project=`` is given or the user set Ultralytics' ``runs_dir`` on purpose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ultralytics.utils import SETTINGS

from visionpeft.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_project_is_under_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(SETTINGS, "runs_dir", "/somewhere/deleted/clone/runs")  # fixed by an earlier first call
    assert load_config("coco8_smoke.yaml").train["project"] == str(tmp_path / "runs" / "detect")
    assert load_config("coco8_smoke.yaml", {"project": "mine"}).train["project"] == str(
        tmp_path / "runs" / "detect" / "mine")
    assert load_config("coco8_smoke.yaml", {"project": "/abs/p"}).train["project"] == "/abs/p"


def test_a_deliberate_runs_dir_is_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SETTINGS, "runs_dir", str(tmp_path / "experiments"))  # yolo settings runs_dir=...
    assert "project" not in load_config("coco8_smoke.yaml").train


def test_train_script_writes_runs_under_the_working_directory(tmp_path: Path) -> None:
    """A stale runs_dir in Ultralytics' settings (as a test run in a deleted clone leaves it) is not followed."""
    config_dir = tmp_path / "config"
    (config_dir / "Ultralytics").mkdir(parents=True)
    stale = {**SETTINGS, "runs_dir": str(tmp_path / "deleted" / "main" / "runs")}  # a complete, valid file
    (config_dir / "Ultralytics" / "settings.json").write_text(json.dumps(stale))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "YOLO_CONFIG_DIR": str(config_dir)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--cfg", "coco8_smoke.yaml",
                           "epochs=1", "name=where"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = work / "runs" / "detect" / "where"
    assert (run / "weights" / "best.safetensors").is_file()
    assert f"run folder {run}" in proc.stdout + proc.stderr  # printed before training
    assert not (tmp_path / "deleted").exists()


def test_export_summary_names_its_folder(tmp_path: Path) -> None:
    import logging

    from ultralytics.utils import LOGGER

    import visionpeft as vp
    from visionpeft.export import export

    model = vp.load_base("yolo11n.pt")
    vp.inject(model, vp.LoraConfig(r=2), adapter_name="weeds", names=["crop", "weed"])
    adapter = vp.save_adapter(model, tmp_path / "weeds.safetensors")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    LOGGER.addHandler(handler)
    try:
        export(base="yolo11n.pt", adapter=adapter, imgsz=64, out=tmp_path / "out", verify=False)
    finally:
        LOGGER.removeHandler(handler)
    assert f"visionpeft: export folder {(tmp_path / 'out').resolve()}" in lines
