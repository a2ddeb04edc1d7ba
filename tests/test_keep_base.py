"""keep_base: the merged model keeps the base's 80 COCO classes beside the adapter's (issue 15).

Real yolo11n.pt, real crop_weed and coco128 images at 64 px. The base classes of the merged model must be the base
model's outputs exactly, the new classes the plain merged adapter's exactly.
"""

from __future__ import annotations

import ast
import copy
import json

import numpy as np
import pytest
import torch
from conftest import max_rel_diff, randomize_adapters
from ultralytics.cfg import get_cfg

import visionpeft as vp
from visionpeft.export import export, float_nodes
from visionpeft.export.images import letterbox
from visionpeft.inject import merge_
from visionpeft.models import resolve_weights
from visionpeft.modules import adapted_modules
from visionpeft.settings import datasets_dir
from visionpeft.train import PeftSpec
from visionpeft.train.config import load_config
from visionpeft.train.run import check_adapter_targets

IMGSZ = 64
NAMES = ["crop", "weed"]


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    """Three crop_weed and three coco128 val photos, letterboxed to 64 px."""
    root = datasets_dir()
    files = (sorted((root / "crop_weed" / "valid" / "images").glob("*.jpg"))[:3]
             + sorted((root / "coco128" / "images" / "val2017").glob("*.jpg"))[:3])
    return torch.from_numpy(np.concatenate([letterbox(f, (IMGSZ, IMGSZ)) for f in files]))


@pytest.fixture(scope="module")
def tiny_crops(tmp_path_factory):
    """A crop_weed data YAML over 8 train and 6 val images (text lists of the real files)."""
    root, folder = datasets_dir() / "crop_weed", tmp_path_factory.mktemp("tiny_crops")
    for split, src, n in (("train", "train", 8), ("val", "valid", 6)):
        files = sorted((root / src / "images").glob("*.jpg"))[:n]
        (folder / f"{split}.txt").write_text("".join(f"{f}\n" for f in files))
    (folder / "data.yaml").write_text(f"path: {folder}\ntrain: train.txt\nval: val.txt\nnames: {{0: crop, 1: weed}}\n")
    return folder / "data.yaml"


def keep_model(base, layers: str = "16-23", seed: int = 0):
    model = base("yolo11n.pt")
    vp.inject(model, vp.DoraConfig(r=4, alpha=8, layers=layers), adapter_name="keep", names=NAMES, keep_base=True)
    randomize_adapters(model, seed=seed)
    return model


@torch.no_grad()
def decoded(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model.eval()(x)
    return y[0] if isinstance(y, tuple) else y


def test_names_order_and_the_recorded_mode(base):
    model = keep_model(base, layers="11-23")
    info = model.visionpeft["adapters"]["keep"]
    assert info["keep_base"] == {"layer": 13, "base_classes": 80}  # layers 11 and 12 (Upsample, Concat) have no conv
    assert model.names == {0: "crop", 1: "weed"}  # the model that trains: the new classes only
    merged = vp.merge(model)
    coco = base("yolo11n.pt").names
    assert merged.names == {**coco, 80: "crop", 81: "weed"} and merged.model[-1].nc == 82
    assert merged.keep_base == {"layer": 13, "base_classes": 80}
    assert not any(type(m).__name__ == "AdaptedModule" for m in merged.modules())


def test_a_new_name_equal_to_a_base_name_is_a_one_line_error(base, tmp_path):
    model = base("yolo11n.pt")
    with pytest.raises(ValueError, match=r"new class 1 'person' is already base class 0.*rename it") as e:
        vp.inject(model, vp.DoraConfig(r=4, layers="16-23"), names=["crop", "person"], keep_base=True)
    assert "\n" not in str(e.value)
    assert not hasattr(model, "visionpeft") and not any(type(m).__name__ == "AdaptedModule" for m in model.modules())
    with pytest.raises(ValueError, match="pass the new class names"):
        vp.inject(model, vp.DoraConfig(r=4), keep_base=True)  # no new classes to keep the base's beside
    with pytest.raises(ValueError, match="peft.keep_base must be true, false, 'head' .* or 'classes'") as e:
        PeftSpec(keep_base="yes")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^keep_base must be true, false, 'head'"):
        vp.inject(model, vp.DoraConfig(r=4), names=NAMES, keep_base="trunk")
    # a config is checked before any run folder is made: coco8's classes are COCO's own
    config = load_config("crops_keep.yaml", {"data": "coco8.yaml", "project": str(tmp_path)})
    with pytest.raises(ValueError, match="the base's own classes"):
        check_adapter_targets(config)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("layers", ["0-23", "5-23", "16-23", "23"])
def test_base_classes_are_the_base_model_and_new_ones_the_adapter(base, real_images, layers):
    model = keep_model(base, layers)
    merged, branch = vp.merge(model), merge_(copy.deepcopy(model))
    y, y_base, y_new = decoded(merged, real_images), decoded(base("yolo11n.pt"), real_images), decoded(branch,
                                                                                                      real_images)
    anchors = y_base.shape[2]
    assert y.shape == (len(real_images), 4 + 82, 2 * anchors)
    assert torch.equal(y[:, :84, :anchors], y_base)  # exact: the same layers on the same trunk outputs
    assert torch.equal(y[:, :4, anchors:], y_new[:, :4]) and torch.equal(y[:, 84:, anchors:], y_new[:, 4:])
    assert not y[:, 84:, :anchors].any() and not y[:, 4:84, anchors:].any()  # zero scores for the other's classes
    assert not torch.equal(y_new[:, 4:], y_base[:, 4:6])  # the adapter does change something
    # training mode is the branch alone: its raw outputs, its 2 classes, its loss (labels 0, 1: crop, weed)
    merged.train(), branch.train()
    assert merged(real_images[:1])["scores"].shape[1] == 2
    merged.args = branch.args = get_cfg()
    batch = {"img": real_images[:2], "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [1.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.1, 0.2]])}
    assert torch.equal(merged.loss(batch)[0], branch.loss(batch)[0])


def test_single_path_is_the_adapter_plus_the_base_class_outputs_on_its_features(base, real_images):
    from visionpeft.families.yolo_keep import single_path_model

    model = base("yolo11n.pt")
    vp.inject(model, vp.DoraConfig(r=4, alpha=8), adapter_name="plain", names=NAMES)  # every conv, one path
    y_base = decoded(base("yolo11n.pt"), real_images)
    at_init = single_path_model(base("yolo11n.pt"), vp.merge(model))  # DoRA at init: the base's own layers
    assert at_init.names == {**base("yolo11n.pt").names, 80: "crop", 81: "weed"} and at_init.model[-1].nc == 82
    assert max_rel_diff([decoded(at_init, real_images)[:, :84]], [y_base]) < 1e-4  # merge rounding (DoRA, float32)
    randomize_adapters(model, seed=1)
    merged = vp.merge(model)
    y, y_new = decoded(single_path_model(base("yolo11n.pt"), merged), real_images), decoded(merged, real_images)
    assert y.shape == (len(real_images), 4 + 82, y_base.shape[2])  # one set of anchors: the trunk runs once
    assert max_rel_diff([y[:, :4], y[:, 84:]], [y_new[:, :4], y_new[:, 4:]]) < 1e-5  # boxes, new classes: the adapter's
    assert max_rel_diff([y[:, 4:84]], [y_base[:, 4:]]) > 1e-3  # base classes: the base's convs on adapted features
    clash = base("yolo11n.pt")
    vp.inject(clash, vp.DoraConfig(r=4), names=["crop", "person"])
    with pytest.raises(ValueError, match="'person' is already base class 0"):
        single_path_model(base("yolo11n.pt"), vp.merge(clash))


# one path; the base's whole head on the shared adapted trunk; the base's class branch on it, the adapted boxes;
# each with what it matches (scores, logits, the head's input features) where it matters
@pytest.mark.parametrize(("keep", "kind"), [(False, "scores"), ("head", "scores"), ("classes", "scores"),
                                            ("classes", "logits"), ("head", "features")])
def test_distillation_targets_are_the_untouched_base_and_only_the_adapter_learns(base, real_images, keep, kind):
    from visionpeft.train.distill import BaseDistillLoss

    model = base("yolo11n.pt")
    vp.inject(model, vp.DoraConfig(r=4, alpha=8), adapter_name="plain", names=NAMES, keep_base=keep)
    model.args = get_cfg()
    loss = BaseDistillLoss(model, weight=2.0, keep_base=keep, kind=kind)
    model.train()
    vp.set_adapter(model, "plain")  # freezes the base again (and keeps its norms in eval mode)
    at_init = loss.distill(model(real_images), real_images)
    assert -1e-6 < at_init.item() < 1e-3  # DoRA at init is the base: the base's outputs are their own targets
    randomize_adapters(model, seed=1)
    batch = {"img": real_images[:2], "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [1.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.1, 0.2]])}
    total, items = loss(model(batch["img"]), batch)
    assert list(items) == [*loss.det(model(batch["img"]), batch)[1], "kd_loss"] and items["kd_loss"] > 0.01
    assert torch.allclose(total[-1], 2.0 * items["kd_loss"] * 2)  # weight x term x batch, as Ultralytics scales
    total.sum().backward()
    teacher = [p for p in loss.teacher.parameters()]
    assert all(p.grad is None for p in teacher) and not any(p.requires_grad for p in teacher)
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert grads and all(".adapters.plain." in n for n in grads)  # only the adapter moves
    with pytest.raises(ValueError, match=r"peft.distill_base must be a number >= 0"):
        PeftSpec(distill_base=-1)
    with pytest.raises(ValueError, match=r"peft.distill_kind must be one of \['scores', 'logits', 'features'\]"):
        PeftSpec(distill_base=1.0, distill_kind="probs")


def test_shared_trunk_doubles_only_the_head(base, real_images, tmp_path):
    model = base("yolo11n.pt")
    vp.inject(model, vp.DoraConfig(r=4, alpha=8), adapter_name="shared", names=NAMES, keep_base="head")
    assert model.visionpeft["adapters"]["shared"]["keep_base"] == {"layer": 23, "base_classes": 80, "trunk": "shared"}
    y_base = decoded(base("yolo11n.pt"), real_images)
    anchors = y_base.shape[2]
    at_init = vp.merge(model)  # DoRA at init: the trunk is the base's, so the base classes are the base's
    assert len(at_init.model) == len(base("yolo11n.pt").model)  # one trunk, run once; only the head is doubled
    assert at_init.keep_base == {"layer": 23, "base_classes": 80, "trunk": "shared"}
    assert max_rel_diff([decoded(at_init, real_images)[:, :84, :anchors]], [y_base]) < 1e-4  # merge rounding
    randomize_adapters(model, seed=1)
    merged, branch = vp.merge(model), merge_(copy.deepcopy(model))
    y, y_new = decoded(merged, real_images), decoded(branch, real_images)
    assert y.shape == (len(real_images), 4 + 82, 2 * anchors)
    assert max_rel_diff([y[:, :4, anchors:], y[:, 84:, anchors:]], [y_new[:, :4], y_new[:, 4:]]) < 1e-5  # the adapter
    base_head = copy.deepcopy(base("yolo11n.pt").model[-1])  # the base classes: the base's head on the adapted trunk
    trunk = copy.deepcopy(branch)
    trunk.model[-1] = base_head
    base_head.i, base_head.f = branch.model[-1].i, branch.model[-1].f
    assert max_rel_diff([y[:, :84, :anchors]], [decoded(trunk, real_images)]) < 1e-5
    assert max_rel_diff([y[:, :84, :anchors]], [y_base]) > 1e-3  # not the base's: what distillation has to keep
    path = vp.save_adapter(model, tmp_path / "shared.safetensors")  # the mode survives the file
    loaded = vp.load_adapter(base("yolo11n.pt"), path)
    assert loaded.visionpeft["adapters"]["shared"]["keep_base"]["trunk"] == "shared"
    assert torch.equal(decoded(vp.merge(loaded), real_images), y)


def test_shared_boxes_double_only_the_class_branch(base, real_images, tmp_path):
    model = base("yolo11n.pt")
    vp.inject(model, vp.DoraConfig(r=4, alpha=8), adapter_name="cls", names=NAMES, keep_base="classes")
    record = {"layer": 23, "base_classes": 80, "trunk": "shared", "boxes": "shared"}
    assert model.visionpeft["adapters"]["cls"]["keep_base"] == record
    y_base = decoded(base("yolo11n.pt"), real_images)
    anchors = y_base.shape[2]
    at_init = vp.merge(model)  # DoRA at init: trunk and boxes are the base's, so the base classes are the base's
    assert at_init.keep_base == record and len(at_init.model) == len(base("yolo11n.pt").model)
    y0 = decoded(at_init, real_images)
    assert y0.shape == (len(real_images), 4 + 82, anchors)  # one set of anchors: no second head
    assert max_rel_diff([y0[:, :84]], [y_base]) < 1e-4  # merge rounding
    randomize_adapters(model, seed=1)
    merged, branch = vp.merge(model), merge_(copy.deepcopy(model))
    y, y_new = decoded(merged, real_images), decoded(branch, real_images)
    assert max_rel_diff([y[:, :4], y[:, 84:]], [y_new[:, :4], y_new[:, 4:]]) < 1e-5  # boxes and new classes: adapter's
    base_cls = copy.deepcopy(branch)  # the base classes: the base's class branch on the adapted trunk
    base_cls.model[-1].cv3 = copy.deepcopy(base("yolo11n.pt").model[-1].cv3)
    vp.families.yolo.YoloFamily().on_activate(base_cls, {"names": base("yolo11n.pt").names})
    assert max_rel_diff([y[:, 4:84]], [decoded(base_cls, real_images)[:, 4:]]) < 1e-5
    assert max_rel_diff([y[:, 4:84]], [y_base[:, 4:]]) > 1e-3  # not the base's: what distillation has to keep
    model.visionpeft["base"] = str(resolve_weights("yolo11n.pt"))  # as the trainer records it
    path = vp.save_adapter(model, tmp_path / "cls.safetensors")  # the mode survives the file
    loaded = vp.load_adapter(base("yolo11n.pt"), path)
    assert loaded.visionpeft["adapters"]["cls"]["keep_base"] == record
    assert torch.equal(decoded(vp.merge(loaded), real_images), y)
    from visionpeft.export import read_metadata

    result = export(adapter=path, imgsz=IMGSZ, runs=2)  # one ONNX file, all classes, parity checked
    assert result.ok, result.report.checks
    metadata = read_metadata(result.files["fp32"])
    assert len(ast.literal_eval(metadata["names"])) == 82 and json.loads(metadata["visionpeft"])["keep_base"] == record


def test_adapter_file_round_trip_switching_and_the_untouched_base(base, real_images, tmp_path):
    model = keep_model(base)
    vp.inject(model, vp.LoraConfig(r=4), adapter_name="plain", names=NAMES)  # an ordinary adapter beside it
    vp.set_adapter(model, "keep")
    path = vp.save_adapter(model, tmp_path / "keep.safetensors")
    assert vp.read_adapter(path)[1]["keep_base"] == {"layer": 16, "base_classes": 80}

    loaded = vp.load_adapter(base("yolo11n.pt"), path)
    assert torch.equal(decoded(vp.merge(loaded), real_images), decoded(vp.merge(model), real_images))
    vp.set_adapter(model, "plain")
    assert len(vp.merge(model).names) == 2  # switching to an ordinary adapter merges as before
    vp.set_adapter(loaded, None)  # the untouched base: its 80 classes, its outputs (merged: bit for bit)
    assert loaded.names == base("yolo11n.pt").names
    reference = decoded(base("yolo11n.pt"), real_images)
    assert torch.equal(decoded(vp.merge(loaded), real_images), reference)
    assert max_rel_diff([decoded(loaded, real_images)], [reference]) < 1e-5  # FrozenBatchNorm2d: float rounding
    vp.delete_adapter(loaded, "keep")
    assert not hasattr(loaded, "visionpeft")


@pytest.fixture(scope="module")
def keep_export(tmp_path_factory, tiny_crops):
    folder = tmp_path_factory.mktemp("keep_export")
    model = vp.load_base("yolo11n.pt")
    torch.manual_seed(0)  # the adapters' initial A: the same whatever tests ran before (predictions below depend on it)
    vp.inject(model, vp.DoraConfig(r=4, layers="16-23"), adapter_name="crops_keep", names=NAMES, keep_base=True)
    randomize_adapters(model)
    model.visionpeft["base"] = str(resolve_weights("yolo11n.pt"))  # as the trainer records it
    adapter = vp.save_adapter(model, folder / "crops_keep.safetensors")
    return export(adapter=adapter, imgsz=IMGSZ, data=tiny_crops, quantize=8, calib=4, runs=3, val=True), model


def test_onnx_export_holds_all_classes_and_ultralytics_reads_it(keep_export):
    from ultralytics import YOLO

    from visionpeft.export import read_metadata

    result, _ = keep_export
    assert result.ok, result.report.checks  # fp32 parity against the unmerged adapter beside the base
    metadata = read_metadata(result.files["fp32"])
    names = ast.literal_eval(metadata["names"])  # Ultralytics writes them as a Python dict literal
    assert len(names) == 82 and names[0] == "person" and [names[80], names[81]] == NAMES
    assert json.loads(metadata["visionpeft"])["keep_base"] == {"layer": 16, "base_classes": 80}
    image = datasets_dir() / "coco128" / "images" / "val2017" / "000000000139.jpg"
    for file in result.files.values():
        predicted = YOLO(str(file), task="detect").predict(image, imgsz=IMGSZ, conf=0.01, verbose=False)[0]
        assert len(predicted.names) == 82 and predicted.boxes.cls.max() < 82
    # the new classes were validated relabelled after the base's (crop = 80): a real, non-zero mAP
    assert result.report.exports["fp32"].map50_95 > 0
    assert abs(result.report.exports["fp32"].map50_95 - result.report.pytorch.map50_95) < 0.01


def test_int8_keeps_the_joined_outputs_in_float(keep_export):
    import onnx

    result, _ = keep_export
    fp32, int8 = onnx.load(str(result.files["fp32"])), onnx.load(str(result.files["int8"]))
    joins = {n.name for n in fp32.graph.node if n.op_type == "Pad"}
    assert len(joins) == 2 and joins <= set(float_nodes(fp32))
    producers = {o: n for n in int8.graph.node for o in n.output}
    output = producers[int8.graph.output[0].name]
    assert output.op_type == "Concat" and all(producers[i].op_type != "DequantizeLinear" for i in output.input)


def test_visionpeft_yolo_predicts_and_validates_every_class(keep_export, tiny_crops, tmp_path, monkeypatch):
    result, adapted = keep_export
    monkeypatch.chdir(tmp_path)  # vp.YOLO names merged copies after the working directory
    model = vp.YOLO("yolo11n.pt", adapters=[result.files["fp32"].with_suffix(".safetensors")])
    assert len(model.names) == 82 and model.names[81] == "weed"
    image = datasets_dir() / "crop_weed" / "valid" / "images"
    boxes = model.predict(sorted(image.glob("*.jpg"))[0], imgsz=IMGSZ, conf=0.01, verbose=False)[0].boxes
    assert len(boxes) and boxes.cls.max() < 82
    args = {"imgsz": IMGSZ, "batch": 2, "workers": 0, "plots": False, "verbose": False, "project": str(tmp_path)}
    new = model.val(data=tiny_crops, name="new", **args)  # crop, weed relabelled 80, 81 for the 82-class model
    branch = vp.YOLO(merge_(copy.deepcopy(adapted))).val(data=tiny_crops, name="branch", **args)  # 2 classes
    assert new.box.map > 0 and new.box.map == pytest.approx(branch.box.map, abs=1e-3)
    coco = model.val(data="coco8", name="coco", **args)  # the base's own dataset: the base classes
    plain = vp.YOLO("yolo11n.pt").val(data="coco8", name="plain", **args)
    assert coco.box.map > 0 and coco.box.map == pytest.approx(plain.box.map, abs=1e-3)
    model.set_adapter(None)
    assert len(model.names) == 80


FAST = {"epochs": 1, "imgsz": IMGSZ, "batch": 4, "nbs": 4, "warmup_epochs": 0, "workers": 0, "plots": False}


def test_crops_keep_branch_config_trains_an_exact_branch_adapter(tiny_crops, tmp_path):
    from visionpeft.train import train

    config = load_config("crops_keep_branch.yaml")
    assert config.peft.keep_base is True and config.peft.methods[0]["layers"] == "16-23"
    summary = train("crops_keep_branch.yaml", data=str(tiny_crops), project=str(tmp_path), name="keep", **FAST)
    meta = vp.read_adapter(summary.adapter_file)[1]
    assert meta["keep_base"] == {"layer": 16, "base_classes": 80} and meta["names"] == {"0": "crop", "1": "weed"}
    assert min(int(t.split(".")[1]) for t in meta["targets"]) == 16  # layers below L stay the base's


def test_crops_keep_config_is_the_measured_benchmark_row():
    """configs/crops_keep.yaml ships the keep-base benchmark's keep_cls_distill05_odreams_l5nobox as trained: that
    row's training settings on crops.yaml's (the benchmark's base), with no scale toward the base."""
    from visionpeft.bench.keep_base import load_keep_config

    config = load_config("crops_keep.yaml")
    bench = load_keep_config("bench_keep_base.yaml")
    row = bench["runs"]["keep_cls_distill05_odreams_l5nobox"]["peft"]
    assert {k: getattr(config.peft, k) for k in row} == row
    crops = load_config("crops.yaml")  # the benchmark rows train crops.yaml with its peft: keys, then theirs, on top
    assert (config.peft.lr_mult, config.peft.bn, config.peft.file_bits) == (crops.peft.lr_mult, crops.peft.bn,
                                                                            crops.peft.file_bits)
    assert config.peft.keep_scale in (None, 1.0) and not config.peft.keep_scale_pattern
    assert config.augmentations == crops.augmentations
    # the benchmark's reference row repeats crops.yaml's methods (its peft: block sets DoRA r8 alone for the rest)
    assert bench["runs"]["recipe"]["peft"]["methods"] == crops.peft.methods


def test_a_run_distills_on_dreams_made_once_in_its_folder(tiny_crops, tmp_path, caplog):
    """... and, with ``peft.keep_scale``, delivers its adapter scaled toward the base (the resume file as trained)."""
    from safetensors import safe_open

    from visionpeft.train import train

    overrides = {"peft.keep_base": "classes", "peft.distill_base": 1.0, "peft.distill_dreams": 2,
                 "peft.dream_steps": 3, "peft.dream_objects": 1, "peft.keep_scale": 0.5,
                 "peft.keep_scale_pattern": {r"model\.5\..*": 0},
                 "peft.file_bits": 16}  # the scaled factors compared in float16, not rounded to 4 bits
    summary = train("crops_keep.yaml", data=str(tiny_crops), project=str(tmp_path), name="dreams",
                    **{**FAST, **overrides})
    dreams = tmp_path / "dreams" / "dreams.safetensors"
    with safe_open(str(dreams), "pt") as f:
        assert f.get_tensor("images").shape == (2, 3, IMGSZ, IMGSZ) and f.metadata()["steps"] == "3"
    assert "train/kd_loss" in (tmp_path / "dreams" / "results.csv").read_text().splitlines()[0]
    log = "".join(r.getMessage() for r in caplog.records)
    assert "2 synthetic images of the base's BatchNorm statistics and 1 of its classes each (made in" in log
    assert ("best.safetensors holds the adapter scaled by 0.5 (model\\.5\\..*: 0) toward the base where the base "
            "classes read it") in log
    trained = vp.load_adapter(vp.load_base("yolo11n.pt"), tmp_path / "dreams" / "weights" / "last.safetensors")
    best = vp.load_adapter(vp.load_base("yolo11n.pt"), summary.adapter_file).state_dict()  # 1 epoch: the same EMA
    scaled = vp.scale_adapter(copy.deepcopy(trained), 0.5, pattern={r"model\.5\..*": 0}).state_dict()
    adapters = [k for k in best if ".adapters." in k]
    assert all(torch.allclose(best[k].float(), scaled[k].float(), rtol=2e-3, atol=1e-5) for k in adapters)
    assert not all(torch.equal(scaled[k], trained.state_dict()[k]) for k in adapters)


def test_keep_base_benchmark_at_a_tiny_budget(tiny_crops, tmp_path):
    from visionpeft.bench.keep_base import load_keep_config, run_keep_benchmark

    cfg_file = tmp_path / "bench.yaml"
    cfg_file.write_text(
        f"base: crops.yaml\ndata: {tiny_crops}\nbase_data: coco8.yaml\nlatency_runs: 3\n"
        f"train: {json.dumps({**FAST, 'seed': 0})}\n"
        "runs:\n  recipe: {peft: {methods: [{method: dora, r: 4, alpha: 8}]}}\n"
        "  keep_l0: {from: recipe, keep_base: true}\n"
        "  single: {from: recipe, keep_base: single}\n"
        "  distill: {keep_base: single, peft: {methods: [{method: dora, r: 4, alpha: 8}], distill_base: 1.0}}\n"
        "  head: {peft: {keep_base: head, methods: [{method: dora, r: 4, alpha: 8}], distill_base: 1.0}}\n"
        "  classes: {peft: {keep_base: classes, methods: [{method: dora, r: 4, alpha: 8}], distill_base: 1.0}}\n"
        "  classes_s0: {from: classes, scale: 0.0}\n"
        r"  classes_p0: {from: classes, scale_pattern: {'model\.\d+\..*': 0}}" "\n"  # every module: scale 0
        "  keep_l16: {peft: {keep_base: true, methods: [{method: dora, r: 4, alpha: 8, layers: 16-23}]}}\n")
    results = run_keep_benchmark(load_keep_config(cfg_file, {"project": str(tmp_path), "name": "kb"}))
    out = tmp_path / "kb"
    assert list(results) == ["base", "recipe", "keep_l0", "single", "distill", "head", "classes", "classes_s0",
                             "classes_p0", "keep_l16"]
    for name in ("results.json", "results.csv", "results.md", "keep_base.png"):
        assert (out / name).stat().st_size > 0, name
    base, recipe, l0, l16 = (results[k] for k in ("base", "recipe", "keep_l0", "keep_l16"))
    assert base["base_map50_95"] > 0 and base["new_map50_95"] == 0 and base["latency_vs_base"] > 0
    assert base["base_train_map50_95"] > 0 and base["base_train_map50_95"] != base["base_map50_95"]  # other images
    assert recipe["base_map50_95"] == 0 and recipe["layer"] is None  # a plain adapter replaced the COCO classes
    assert recipe["base_train_map50_95"] == 0
    assert l0["layer"] == 0 and l16["layer"] == 16 and l0["training"] == recipe["training"]
    for keep in (l0, l16):  # the base classes of the merged model: the base's own detections
        assert keep["base_map50_95"] == pytest.approx(base["base_map50_95"], abs=0.01)
        assert keep["base_map50_95_onnx"] == pytest.approx(base["base_map50_95"], abs=0.01)
        assert keep["base_train_map50_95"] == pytest.approx(base["base_train_map50_95"], abs=0.01)
    assert l0["new_map50_95"] == pytest.approx(recipe["new_map50_95"], abs=0.01)  # the same adapter's new classes
    assert l0["onnx_mb"] > l16["onnx_mb"] > base["onnx_mb"]
    single = results["single"]  # one path: the recipe's new classes, the base's class outputs on its features
    assert single["new_map50_95"] == pytest.approx(recipe["new_map50_95"], abs=0.01) and single["layer"] is None
    assert single["base_map50_95"] > 0 and single["onnx_mb"] == pytest.approx(base["onnx_mb"], rel=0.02)
    assert single["training"] == recipe["training"]
    distill = results["distill"]  # trained with the base's outputs as soft targets, measured as one path
    assert distill["keep_base"] == "single" and distill["layer"] is None and distill["base_map50_95"] > 0
    assert "train/kd_loss" in (out / "distill" / "results.csv").read_text().splitlines()[0]
    head = results["head"]  # the trunk shared and distilled, the head doubled: 82 classes, one trunk
    assert head["layer"] == 23 and head["base_map50_95"] > 0 and head["base_map50_95_onnx"] > 0
    assert head["new_map50_95"] >= 0 and base["onnx_mb"] < head["onnx_mb"] < l16["onnx_mb"]
    assert "train/kd_loss" in (out / "head" / "results.csv").read_text().splitlines()[0]
    classes = results["classes"]  # trunk and boxes shared and distilled, the class branch doubled
    assert classes["layer"] == 23 and classes["base_map50_95"] > 0 and classes["base_map50_95_onnx"] > 0
    assert base["onnx_mb"] < classes["onnx_mb"] < head["onnx_mb"]
    assert "train/kd_loss" in (out / "classes" / "results.csv").read_text().splitlines()[0]
    scaled = results["classes_s0"]  # its adapter scaled to 0 where the base classes read it: the base's own
    assert scaled["training"] == classes["training"] and scaled["layer"] == 23
    assert scaled["keep_base"] == classes["keep_base"] and scaled["scale"] == 0.0
    assert scaled["base_map50_95"] == pytest.approx(base["base_map50_95"], abs=0.005)
    assert scaled["base_train_map50_95"] == pytest.approx(base["base_train_map50_95"], abs=0.005)
    by_pattern = results["classes_p0"]  # a pattern that matches every module at 0: the same as scale 0
    assert by_pattern["keep_base"] == classes["keep_base"] and by_pattern["scale_pattern"] == {r"model\.\d+\..*": 0}
    assert by_pattern["base_map50_95"] == pytest.approx(scaled["base_map50_95"], abs=1e-4)
    assert by_pattern["new_map50_95"] == pytest.approx(scaled["new_map50_95"], abs=1e-4)
    with pytest.raises(ValueError, match="Run 'k': scale_pattern: Scale pattern key '\\[' is not a module name"):
        load_keep_config(cfg_file, {"runs": {"c": {}, "k": {"from": "c", "scale_pattern": {"[": 0}}}})
    with pytest.raises(ValueError, match="scale measures another run's adapter; add from: <that run>"):
        load_keep_config(cfg_file, {"runs": {"k": {"scale": 0.5}}})
    with pytest.raises(ValueError, match="keep_base is true, false or 'single'"):  # one path from a branch adapter
        load_keep_config(cfg_file, {"runs": {"k": {"keep_base": True}, "s": {"from": "k", "keep_base": "single"}}})
    assert "| keep_l16 | keep_base | 16 |" in (out / "results.md").read_text()
    assert "| base, train split | its drop (pts) |" in (out / "results.md").read_text()

    # resumes: finished runs are kept
    stamp = (out / "keep_l16" / "weights" / "best.safetensors").stat().st_mtime_ns
    run_keep_benchmark(load_keep_config(cfg_file, {"project": str(tmp_path), "name": "kb"}))
    assert (out / "keep_l16" / "weights" / "best.safetensors").stat().st_mtime_ns == stamp


def test_shipped_keep_base_benchmark_config_is_valid(tmp_path):
    """Every run of bench_keep_base.yaml builds a valid training config; ``extra_augmentations`` are appended to
    the base config's list (the shipped crops.yaml transforms stay first), and a bad value is a one-line error."""
    from visionpeft.bench.keep_base import _config, load_keep_config
    from visionpeft.train.augment import build_transforms

    cfg = load_keep_config("bench_keep_base.yaml")
    shipped = load_config("crops.yaml").augmentations
    for run, entry in cfg["runs"].items():
        raw = _config(cfg, run, tmp_path)
        config = load_config(raw)
        extra = entry.get("extra_augmentations") or []
        assert raw["augmentations"] == [*shipped, *extra], run
        assert len(build_transforms(raw["augmentations"])) == len(shipped) + len(extra)
        if (entry.get("kind") or "peft") == "peft" and "from" not in entry:
            assert config.peft.methods, run
    assert any(e.get("extra_augmentations") for e in cfg["runs"].values())
    with pytest.raises(ValueError, match="extra_augmentations must be a list of transforms"):
        load_keep_config("bench_keep_base.yaml", {"runs": {"x": {"extra_augmentations": "ChannelShuffle"}}})


def test_scaling_a_shared_trunk_adapter_moves_the_base_classes_back_and_keeps_the_new_branch(base, real_images,
                                                                                             tmp_path):
    """``vp.scale_adapter``: at 0 the shared trunk and boxes are the base's again, so the base classes are the base
    model's outputs, while the new classes' own class branch keeps its training; the scale survives the file."""
    model = base("yolo11n.pt")
    vp.inject(model, vp.DoraConfig(r=4, alpha=8), adapter_name="cls", names=NAMES, keep_base="classes")
    randomize_adapters(model, seed=1)
    y_base, y1 = decoded(base("yolo11n.pt"), real_images), decoded(vp.merge(model), real_images)
    trained = copy.deepcopy(model)
    head = f"model.{len(model.model) - 1}.cv3."
    new_branch = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(head) and ".adapters." in k}
    assert vp.scale_adapter(model, 0.0) is model
    y0 = decoded(vp.merge(model), real_images)
    assert max_rel_diff([y0[:, :84]], [y_base]) < 1e-4  # the base's trunk, boxes and class branch: merge rounding
    assert max_rel_diff([y1[:, 4:84]], [y_base[:, 4:]]) > 1e-3  # (they were not before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in new_branch.items())  # the new branch untouched
    half = vp.scale_adapter(copy.deepcopy(trained), 0.5)
    for name, wrapper in adapted_modules(half):  # LoRA's update halved, DoRA's magnitude half-way to the base's
        if not name.startswith(head):
            dora, start = wrapper.adapters["cls"], trained.get_submodule(name).adapters["cls"]
            assert torch.allclose(dora.lora_B.weight, start.lora_B.weight / 2)
            norm = wrapper.base_layer.weight.flatten(1).norm(dim=1).reshape(dora.magnitude.shape)
            assert torch.allclose(dora.magnitude, (norm + start.magnitude) / 2)
    y_half = decoded(vp.merge(half), real_images)
    assert max_rel_diff([y_half[:, 4:84]], [y_base[:, 4:]]) < max_rel_diff([y1[:, 4:84]], [y_base[:, 4:]])
    half.visionpeft["base"] = str(resolve_weights("yolo11n.pt"))
    loaded = vp.load_adapter(base("yolo11n.pt"), vp.save_adapter(half, tmp_path / "half.safetensors"))
    assert max_rel_diff([decoded(vp.merge(loaded), real_images)], [y_half]) < 1e-3  # the file is float16


def test_a_scale_pattern_gives_modules_their_own_factor(base):
    """``pattern``: layers 0-4 and the box branch back to the base (0), the rest of the shared trunk halved (the
    default factor), the new classes' own class branch kept."""
    model = base("yolo11n.pt")
    vp.inject(model, vp.DoraConfig(r=4, alpha=8), adapter_name="cls", names=NAMES, keep_base="classes")
    randomize_adapters(model, seed=1)
    trained = copy.deepcopy(model)
    last = len(model.model) - 1
    vp.scale_adapter(model, 0.5, pattern={r"model\.[0-4]\..*": 0, rf"model\.{last}\.cv2\..*": 0.0})
    factors = []
    for name, wrapper in adapted_modules(model):
        adapter, start = wrapper.adapters["cls"], trained.get_submodule(name).adapters["cls"]
        if name.startswith(f"model.{last}.cv3."):  # the new classes' own branch
            assert all(torch.equal(v, start.state_dict()[k]) for k, v in adapter.state_dict().items()), name
            continue
        factor = 0.0 if int(name.split(".")[1]) <= 4 or name.startswith(f"model.{last}.cv2.") else 0.5
        factors.append(factor)
        assert torch.allclose(adapter.lora_B.weight, start.lora_B.weight * factor), name
        norm = wrapper.base_layer.weight.flatten(1).norm(dim=1).reshape(adapter.magnitude.shape)
        assert torch.allclose(adapter.magnitude, norm + factor * (start.magnitude - norm), atol=1e-6), name
    assert factors.count(0.0) > 10 and factors.count(0.5) > 10
    for bad, message in ((["model.0"], "A scale pattern maps module names or regexes to factors"),
                         ({"model\\.[": 0}, "is not a module name or regex"),
                         ({"model.0": 2}, r"must be a number in \[0, 1\], not 2")):
        with pytest.raises(ValueError, match=message):
            vp.scale_adapter(model, 0.5, pattern=bad)


def test_scaling_refuses_a_branch_a_bad_factor_and_an_unknown_adapter(base):
    with pytest.raises(ValueError, match="keeps the base classes in a branch of their own, exactly"):
        vp.scale_adapter(keep_model(base), 0.5)
    model = base("yolo11n.pt")
    vp.inject(model, vp.DoraConfig(r=4, alpha=8), adapter_name="cls", names=NAMES, keep_base="classes")
    for bad in (1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match=r"must be a number in \[0, 1\]"):
            vp.scale_adapter(model, bad)
    with pytest.raises(ValueError, match="No adapter named 'other' to scale"):
        vp.scale_adapter(model, 0.5, "other")


def test_keep_scale_settings_are_checked():
    for bad in (0, 1.5, "0.8", True):
        with pytest.raises(ValueError, match=r"peft.keep_scale must be a number in \(0, 1\]"):
            PeftSpec(keep_base="classes", distill_base=1.0, keep_scale=bad)
    with pytest.raises(ValueError, match=r"peft.keep_scale scales a trunk shared with the base classes"):
        PeftSpec(keep_base=True, keep_scale=0.8)
    assert PeftSpec(keep_base="head", distill_base=1.0, keep_scale=0.8).keep_scale == 0.8
    with pytest.raises(ValueError, match=r"peft.keep_scale_pattern: Scale pattern key .* is not a module name"):
        PeftSpec(keep_base="classes", distill_base=1.0, keep_scale_pattern={"(": 0})
    with pytest.raises(ValueError, match=r"peft.keep_scale scales a trunk shared with the base classes"):
        PeftSpec(keep_base=True, keep_scale_pattern={"model.0": 0})
