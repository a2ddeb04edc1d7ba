"""Training configs, overrides, dataset YAMLs, augmentations and the offline font: fast, no training."""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import albumentations as A
import pytest
import yaml

from visionpeft import settings
from visionpeft.datasets import DATASETS_DIR, RESOLVED_NAME
from visionpeft.fonts import FONT_NAMES, ensure_fonts, local_font
from visionpeft.train import ConfigError, PeftSpec, load_config, resolve_dataset
from visionpeft.train.augment import build_transforms, to_ultralytics
from visionpeft.train.cli import main as cli_main
from visionpeft.train.config import CONFIGS_DIR, SECTIONS, parse_overrides, ultralytics_train_keys
from visionpeft.train.offline import amp_works, offline_amp_check, outputs_agree

MINIMAL = {"data": "coco8.yaml", "model": "yolo11n.pt"}


# -- finding configs, weights and datasets ---------------------------------------------------------------------
def test_config_found_by_bare_name_or_path():
    by_name, by_stem = load_config("crops.yaml"), load_config("crops")
    by_path = load_config(CONFIGS_DIR / "crops.yaml")
    assert by_name.to_dict() == by_stem.to_dict() == by_path.to_dict()
    assert by_name.model == str(settings.weights_dir() / "yolo11n.pt")
    assert by_name.data == str(DATASETS_DIR / "crop_weed.yaml")
    assert by_name.train["imgsz"] == 320 and by_name.peft.methods[0]["method"] == "dora"


def test_missing_config_says_where_it_looked():
    with pytest.raises(FileNotFoundError) as e:
        load_config("no_such_config.yaml")
    assert str(CONFIGS_DIR / "no_such_config.yaml") in str(e.value) and "crops.yaml" in str(e.value)


def test_missing_weights_says_where_it_looked():
    with pytest.raises(FileNotFoundError) as e:
        load_config(MINIMAL, {"model": "yolo99x.pt"})
    assert str(settings.weights_dir() / "yolo99x.pt") in str(e.value) and settings.ASSETS_ENV in str(e.value)


def test_missing_dataset_says_where_it_looked():
    with pytest.raises(FileNotFoundError) as e:
        load_config(MINIMAL, {"data": "no_such_data.yaml"})
    msg = str(e.value)
    assert str(DATASETS_DIR / "no_such_data.yaml") in msg and "crop_weed.yaml" in msg


def test_dataset_files_missing_under_assets(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.ASSETS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        load_config({"data": "crop_weed.yaml", "model": "yolo11n.yaml"})
    msg = str(e.value)
    assert str(tmp_path / "datasets" / "crop_weed") in msg and settings.ASSETS_ENV in msg


def test_dataset_yaml_resolves_against_assets_setting(tmp_path, monkeypatch):
    """Every dataset YAML follows $VISIONPEFT_ASSETS; Ultralytics accepts the resolved copy."""
    assets = tmp_path / "assets"
    shutil.copytree(settings.datasets_dir() / "coco8", assets / "datasets" / "coco8")
    monkeypatch.setenv(settings.ASSETS_ENV, str(assets))
    out = resolve_dataset("coco8.yaml", tmp_path / "run")
    assert out == tmp_path / "run" / RESOLVED_NAME
    data = yaml.safe_load(out.read_text())
    assert data["path"] == str(assets / "datasets" / "coco8") and len(data["names"]) == 80

    from ultralytics.data.utils import check_det_dataset

    ensure_fonts()  # check_det_dataset looks up Arial.ttf
    checked = check_det_dataset(str(out))
    assert checked["train"] == str(assets / "datasets" / "coco8" / "images" / "train") and checked["nc"] == 80


def test_train_split_as_val_scores_the_other_images(tmp_path):
    """The keep-base benchmark's second set of base-class images: the dataset's train split read as val."""
    from ultralytics.data.utils import check_det_dataset

    from visionpeft.datasets import train_split_as_val

    out = train_split_as_val("coco8.yaml", tmp_path / "split")
    ensure_fonts()
    checked = check_det_dataset(str(out))
    assert checked["val"] == checked["train"] == str(settings.datasets_dir() / "coco8" / "images" / "train")
    same = tmp_path / "same.yaml"  # no other split: nothing to score twice
    same.write_text(f"path: {settings.datasets_dir() / 'coco8'}\ntrain: images/val\nval: images/val\nnames: "
                    "{0: person}\n")
    assert train_split_as_val(same, tmp_path / "none") is None


def test_every_dataset_yaml_resolves():
    for name in ("crop_weed.yaml", "coco8.yaml", "coco128.yaml", "apple_detection.yaml"):
        cfg = load_config({"data": name})
        assert cfg.data == str(DATASETS_DIR / name)


# -- overrides ---------------------------------------------------------------------------------------------------
def test_overrides_plain_dotted_and_sections():
    cfg = load_config("crops.yaml", ["epochs=3", "fraction=[0.02, 0.05]", "peft.lr_mult=2.5", "peft.methods.0.r=4",
                                     "train.imgsz=96", "data=coco8.yaml", "cache=None", "lr0=1e-3",
                                     "augmentations=[MotionBlur: {p: 0.5}]"])
    assert cfg.train["epochs"] == 3 and cfg.train["fraction"] == [0.02, 0.05] and cfg.train["imgsz"] == 96
    assert cfg.train["cache"] is None and cfg.train["lr0"] == 1e-3
    assert cfg.peft.lr_mult == 2.5 and cfg.peft.methods[0]["r"] == 4 and cfg.peft.methods[0]["alpha"] == 16
    assert cfg.data.endswith("coco8.yaml") and cfg.augmentations == [{"MotionBlur": {"p": 0.5}}]
    as_dict = load_config("crops.yaml", {"epochs": 3, "peft": {"lr_mult": 2.5}, "peft.methods.0.r": 4})
    assert as_dict.train["epochs"] == 3 and as_dict.peft.lr_mult == 2.5 and as_dict.peft.adapter_name == "crops"
    assert as_dict.peft.methods[0]["r"] == 4


def test_override_must_be_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="out of range"):
        load_config("crops.yaml", ["peft.methods.3.r=4"])


# -- unknown keys list the valid ones ------------------------------------------------------------------------------
def test_unknown_top_level_key_lists_sections():
    with pytest.raises(ConfigError) as e:
        load_config({**MINIMAL, "pefts": {}})
    assert "'pefts'" in str(e.value) and all(f"'{s}'" in str(e.value) for s in SECTIONS)
    assert "Did you mean ['peft']" in str(e.value)


def test_unknown_peft_key_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config("crops.yaml", ["peft.rank=4"])
    assert "rank" in str(e.value) and all(k in str(e.value) for k in PeftSpec.field_names())


def test_unknown_method_option_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config("crops.yaml", ["peft.methods.0.rr=4"])
    msg = str(e.value)
    assert "peft.methods[0]" in msg and "'rr'" in msg and all(k in msg for k in ("'alpha'", "'r'", "'dropout'"))
    with pytest.raises(ConfigError, match="Available methods"):
        load_config("crops.yaml", ["peft.methods.0.method=lorra"])


def test_unknown_ultralytics_key_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config("crops.yaml", ["epoch=3"])
    msg = str(e.value)
    assert "'epoch'" in msg and "Did you mean ['epochs'" in msg
    assert all(f"'{k}'" in msg for k in ultralytics_train_keys())


def test_reserved_and_mistyped_train_args():
    with pytest.raises(ConfigError, match="top-level 'model:'"):
        load_config({**MINIMAL, "train": {"model": "yolo11n.pt"}})
    with pytest.raises(ConfigError, match="epochs"):
        load_config(MINIMAL, {"epochs": "many"})
    with pytest.raises(ConfigError, match="No dataset"):
        load_config({"model": "yolo11n.pt"})


def test_peft_values_checked():
    for bad, match in [({"bn": "moving"}, "peft.bn"), ({"lr_mult": 0}, "lr_mult"), ({"methods": []}, "methods"),
                       ({"adapter_name": "a.b"}, "adapter_name"), ({"ema_tau": "fast"}, "peft.ema_tau"),
                       ({"ema_tau": 0}, "peft.ema_tau"), ({"file_bits": 2}, "peft.file_bits must be one of"),
                       ({"file_bits": True}, "peft.file_bits")]:
        with pytest.raises(ConfigError, match=match):
            load_config({**MINIMAL, "peft": bad})


def test_ema_time_constant_scales_with_the_run():
    """``auto``: a third of the run's optimizer steps, so the EMA ends near 0.95 whatever the run's length; with
    Ultralytics' 2000 a run of 86 steps (crop_weed, 256 px, 6 epochs) ends at 0.04, its last step's weights."""
    from visionpeft.train.ema import EmaDecay, ema_tau, run_updates

    updates = run_updates(epochs=6, batches=57, accumulate=4)
    assert updates == 86
    for n in (updates, 10 * updates):
        assert EmaDecay(ema_tau("auto", n))(n) == pytest.approx(0.9999 * (1 - math.exp(-3)))
    assert EmaDecay(2000)(updates) < 0.05
    assert ema_tau(50, updates) == 50.0
    assert pickle.loads(pickle.dumps(EmaDecay(12.0)))(12) == pytest.approx(0.9999 * (1 - math.exp(-1)))


# -- augmentations -------------------------------------------------------------------------------------------------
def test_crops_augmentations_build_and_serialise():
    spec = load_config("crops.yaml").augmentations
    transforms = build_transforms(spec)
    assert [type(t).__name__ for t in transforms] == [next(iter(s)) for s in spec]
    one_of = transforms[[type(t) for t in transforms].index(A.OneOf)]
    assert [type(t).__name__ for t in one_of.transforms] == ["MotionBlur", "GaussianBlur"]
    assert transforms[0].brightness_limit == (-0.25, 0.25) and transforms[0].p == 0.4
    restored = [A.from_dict(d) for d in to_ultralytics(spec)]  # what Ultralytics' Albumentations does
    assert [type(t) for t in restored] == [type(t) for t in transforms]
    assert build_transforms(None) is None and to_ultralytics([]) == []


def test_augmentation_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"Did you mean \['MotionBlur'"):
        build_transforms(["MotionBlurr"])
    with pytest.raises(ValueError) as e:
        build_transforms([{"GaussianBlur": {"blur": 3}}])
    assert "'blur'" in str(e.value) and "blur_limit" in str(e.value) and "sigma_limit" in str(e.value)
    with pytest.raises(ValueError, match="augmentations\\[0\\] RandomGamma: invalid"):
        build_transforms([{"RandomGamma": {"p": 2}}])
    with pytest.raises(ValueError, match="transforms"):
        build_transforms([{"OneOf": {"p": 0.5}}])
    with pytest.raises(ConfigError, match="MotionBlurr"):
        load_config(MINIMAL, {"augmentations": ["MotionBlurr"]})


# -- offline fonts -------------------------------------------------------------------------------------------------
def test_ensure_fonts_places_a_loadable_font_once(tmp_path):
    from PIL import ImageFont

    written = ensure_fonts(tmp_path)
    assert sorted(p.name for p in written) == sorted(FONT_NAMES)
    assert (tmp_path / "Arial.ttf").read_bytes() == local_font().read_bytes()
    ImageFont.truetype(str(tmp_path / "Arial.ttf"), 12)
    (tmp_path / "Arial.ttf").write_bytes(b"user font")
    assert ensure_fonts(tmp_path) == [] and (tmp_path / "Arial.ttf").read_bytes() == b"user font"


def test_trainer_amp_check_needs_no_download():
    """Ultralytics' check_amp downloads yolo26n.pt on CUDA; inside the trainer's setup, amp_works replaces it."""
    import torch
    import ultralytics.engine.trainer as engine
    from ultralytics.utils import WEIGHTS_DIR

    if (Path(WEIGHTS_DIR) / "yolo26n.pt").is_file():
        pytest.skip("Ultralytics' AMP weights are local here, so its own check runs offline")
    original = engine.check_amp
    with offline_amp_check():
        assert engine.check_amp is amp_works
    assert engine.check_amp is original
    assert amp_works(torch.nn.Conv2d(3, 3, 1)) is False  # no AMP off CUDA, as in Ultralytics


def test_amp_check_accepts_reduced_precision_noise_and_refuses_broken_outputs(base):
    """The AMP check's comparison, on yolo11n's raw output for bus.jpg: bfloat16 autocast on the CPU (coarser than
    the float16 AMP uses) agrees; NaN, moved boxes or wrong probabilities do not."""
    import cv2
    import torch
    from ultralytics.utils import ASSETS

    model = base("yolo11n.pt").eval()
    im = cv2.resize(cv2.imread(str(ASSETS / "bus.jpg")), (256, 256))[..., ::-1].copy()
    x = torch.from_numpy(im).permute(2, 0, 1)[None].float().div(255)
    with torch.no_grad():
        a = model(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = model(x)[0]
    assert not torch.equal(a, b.float()) and outputs_agree(a, b)
    assert not torch.allclose(a, b.float(), atol=0.5, rtol=1e-2)  # the elementwise bound this check replaced
    broken = b.float().clone()
    broken[0, 0, 7] = float("nan")
    assert not outputs_agree(a, broken)
    assert not outputs_agree(a, a * torch.tensor([1.1, 1.1, 1.1, 1.1] + [1.0] * 80)[None, :, None])  # boxes 10 % off
    assert not outputs_agree(a, torch.cat([a[:, :4], 1 - a[:, 4:]], 1))  # probabilities
    assert not outputs_agree(a, a[:, :, :-1])


# -- command line ---------------------------------------------------------------------------------------------------
def test_cli_reports_config_errors_without_training(capsys):
    assert cli_main(["--cfg", "crops.yaml", "epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "error: Unknown Ultralytics train key 'epoch'" in err
    assert cli_main(["--cfg", "nope.yaml"]) == 2
    assert "Config 'nope.yaml' not found" in capsys.readouterr().err
    assert cli_main(["--cfg", "coco8_smoke.yaml", "resume=True", "project=/nonexistent/runs"]) == 2
    assert "No run to resume" in capsys.readouterr().err
