"""Bad input fails early, on one line naming the problem and the fix, before any run folder exists (issue 17).

Datasets are made in ``tmp_path`` from real crop_weed images and labels; one training run (64 px, one epoch)
checks that images Ultralytics drops while scanning are counted in the run summary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from visionpeft import settings
from visionpeft.bench.cli import main as bench_main
from visionpeft.datasets import dropped_images
from visionpeft.train import load_config, train
from visionpeft.train.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
CROP_WEED = settings.datasets_dir() / "crop_weed"
FAST = {"epochs": 1, "imgsz": 64, "batch": 2, "nbs": 2, "warmup_epochs": 0, "workers": 0, "plots": False,
        "val": False}


def add_images(folder: Path, split: str = "train", n: int = 3, labels: bool = True, prefix: str = "") -> list[Path]:
    """Copy ``n`` crop_weed images of ``split`` (and their labels) into ``folder/images`` and ``folder/labels``."""
    src = CROP_WEED / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    out = []
    for image in sorted((src / "images").iterdir())[:n]:
        out.append(Path(shutil.copy(image, folder / "images" / f"{prefix}{image.name}")))
        if labels:
            shutil.copy(src / "labels" / f"{image.stem}.txt", folder / "labels" / f"{prefix}{image.stem}.txt")
    return out


def data_yaml(root: Path, **extra) -> Path:
    spec = {"path": str(root), "train": "train/images", "val": "val/images", "names": {0: "crop", 1: "weed"}, **extra}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    return path


def config_error(data: Path) -> str:
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        load_config({"data": str(data), "model": "yolo11n.pt"})
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# -- datasets: checked before Ultralytics sees them -----------------------------------------------------------------
def test_empty_image_folder_names_the_folder(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    add_images(tmp_path / "val", "valid", 2)
    msg = config_error(data_yaml(tmp_path))
    assert f"the train images folder '{tmp_path / 'train' / 'images'}' holds no images" in msg
    assert "Put the train images there" in msg and "jpg" in msg

    add_images(tmp_path / "train")
    shutil.rmtree(tmp_path / "val" / "images")
    (tmp_path / "val" / "images").mkdir()
    (tmp_path / "val" / "images" / "notes.txt").write_text("not an image")  # only non-images: still empty
    assert f"the val images folder '{tmp_path / 'val' / 'images'}' holds no images" in config_error(data_yaml(tmp_path))


def test_image_list_file_is_read_like_ultralytics(tmp_path):
    """``train:`` may be a text file listing images (``./`` relative to it), as Ultralytics reads it."""
    images = add_images(tmp_path / "train")
    add_images(tmp_path / "val", "valid", 2)
    (tmp_path / "train.txt").write_text("".join(f"./train/images/{p.name}\n" for p in images))
    assert load_config({"data": str(data_yaml(tmp_path, train="train.txt"))}).data == str(tmp_path / "data.yaml")
    (tmp_path / "empty.txt").write_text("\n")
    assert "the train images list" in config_error(data_yaml(tmp_path, train="empty.txt"))


def test_train_images_without_any_label_fail(tmp_path):
    """Ultralytics refuses a train split without labels (after making the run folder); a val split only warns."""
    images = add_images(tmp_path / "train", labels=False)
    add_images(tmp_path / "val", "valid", 2)
    msg = config_error(data_yaml(tmp_path))
    assert "none of the 3 train images has a label file" in msg
    assert str(tmp_path / "train" / "labels" / f"{images[0].stem}.txt") in msg and "labels/a.txt" in msg

    shutil.rmtree(tmp_path / "train")
    add_images(tmp_path / "train")
    shutil.rmtree(tmp_path / "val" / "labels")
    load_config({"data": str(data_yaml(tmp_path))})  # unlabelled val images are allowed, as in Ultralytics


def test_bad_data_yaml_is_one_line(tmp_path):
    add_images(tmp_path / "train")
    add_images(tmp_path / "val", "valid", 2)
    assert "the 'names:' key is missing" in config_error(data_yaml(tmp_path, names=None))
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"path: {tmp_path}\ntrain: train/images\nval: [val/images\n")
    assert f"{bad} is not a valid data YAML" in config_error(bad)


# -- images dropped by Ultralytics' scan are counted ----------------------------------------------------------------
def dataset_with_bad_files(root: Path) -> Path:
    """4 good train images plus a corrupt image and an out-of-range class; val: 2 good plus bad coordinates."""
    add_images(root / "train", n=4, prefix="c_")
    (root / "train" / "images" / "a_corrupt.jpg").write_bytes(b"this is not a JPEG")
    (root / "train" / "labels" / "a_corrupt.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    good = add_images(root / "train", n=1, prefix="b_bad_class_")[0]
    (root / "train" / "labels" / f"{good.stem}.txt").write_text("7 0.5 0.5 0.2 0.2\n")  # only classes 0 and 1
    add_images(root / "val", "valid", n=2)
    bad = add_images(root / "val", "valid", n=1, prefix="z_")[0]
    (root / "val" / "labels" / f"{bad.stem}.txt").write_text("1 1.5 0.5 0.2 0.2\n")  # not normalised
    return data_yaml(root)


def test_dropped_images_follow_ultralytics_fraction(tmp_path):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(dataset_with_bad_files(tmp_path)))
    counts = {}
    for fraction in (1.0, 0.5):  # sorted: a_corrupt, b_bad_class_*, then 4 good c_*; 0.5 keeps a, b and one c
        cfg = get_cfg(overrides={"fraction": fraction, "imgsz": 64})
        dataset = build_yolo_dataset(cfg, data["train"], 2, data, mode="train")
        counts[fraction] = (dropped_images(dataset), len(dataset.im_files))
    assert counts == {1.0: (2, 4), 0.5: (2, 1)}


def test_dropped_images_in_run_summary(tmp_path):
    data = dataset_with_bad_files(tmp_path / "data")
    summary = train("coco8_smoke.yaml", data=str(data), project=str(tmp_path / "runs"), name="dropped", **FAST)
    assert summary.dropped_images == {"train": 2, "val": 1}
    saved = json.loads((Path(summary.run_dir) / "peft_summary.json").read_text())
    assert saved["dropped_images"] == {"train": 2, "val": 1}
    assert "dropped images    train 2, val 1" in summary.table()
    assert "dropped images" not in replace(summary, dropped_images={"train": 0, "val": 0}).table()


# -- command lines: one line on stderr, exit 2, no run folder -------------------------------------------------------
def run_script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--cfg", "coco8_smoke.yaml",
                           f"project={tmp_path / 'runs'}", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_train_script_usage_errors_are_one_line(tmp_path):
    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "images").mkdir(parents=True)
    cases = {
        "peft.methods.0.r=0": "peft.methods[0]: LoraConfig.r must be an integer >= 1, got 0",
        f"data={data_yaml(tmp_path / 'empty')}": "the train images folder",
    }
    for arg, expected in cases.items():
        result = run_script(tmp_path, arg)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("visionpeft-train: error: ") and expected in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args", [
    ["--bogus"],                                     # argparse itself
    ["epoch=3"],                                     # unknown key
    ["epochs=many"],                                 # bad value
    ["model=no_such_model.pt"],                      # missing file
    ["model=no_such_model.yaml"],
    ["peft.methods.0.alpha=-1"],                     # bad method field
    ["peft.methods.0.layers=99"],                    # targets that match no module of the base
    ["peft.methods.0.target_types=[BatchNorm2d]"],   # a module LoRA cannot adapt
])
def test_train_cli_usage_errors_are_one_line(args, tmp_path, capsys):
    try:
        status = cli_main(["--cfg", "coco8_smoke.yaml", f"project={tmp_path / 'runs'}", *args])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("visionpeft-train: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override", [{"peft.methods.0.layers": 99}, {"peft.methods.0.target_types": ["BatchNorm2d"]}])
def test_train_api_checks_targets_before_the_run_folder(override, tmp_path):
    """Python callers get the CLI's target check too: the error, and no run folder."""
    from visionpeft.train import train

    with pytest.raises((ValueError, TypeError), match="match|supports"):
        train("coco8_smoke.yaml", project=str(tmp_path / "runs"), **override)
    assert not (tmp_path / "runs").exists()


def test_benchmark_cli_usage_errors_are_one_line(capsys):
    for args in (["--bogus"], ["--cfg", "bench_smoke.yaml", "epoch=3"], ["--cfg", "nope.yaml"]):
        try:
            status = bench_main(args)
        except SystemExit as e:
            status = e.code
        err = capsys.readouterr().err
        assert status == 2 and err.startswith("visionpeft-benchmark: error: ") and err.count("\n") == 1, err
