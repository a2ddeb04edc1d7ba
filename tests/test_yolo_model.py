"""``visionpeft.YOLO``: Ultralytics predict/val/track/export over a base with adapters, switching without reloads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters
from ultralytics import YOLO as UltralyticsYOLO

import visionpeft as vp
from visionpeft import settings

IMAGES = settings.datasets_dir() / "coco128" / "images" / "val2017"
BASE = "yolo11n.pt"
IMGSZ = 160


@pytest.fixture(scope="module")
def image() -> str:
    return str(sorted(IMAGES.glob("*.jpg"))[0])


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict[str, Path]:
    """Two trained-looking adapters on yolo11n.pt: 'weeds' (2 new classes) and 'coco' (DoRA, the 80 classes)."""
    out = tmp_path_factory.mktemp("adapters")
    model = vp.load_base(BASE)
    torch.manual_seed(0)  # LoRA A and the new class outputs start from torch's default init: the same every run
    vp.inject(model, vp.LoraConfig(r=4), adapter_name="weeds", names=["crop", "weed"])
    vp.inject(model, vp.DoraConfig(r=4, layers=[22, 23]), adapter_name="coco")
    randomize_adapters(model, std=0.2)
    files = {}
    for name in ("weeds", "coco"):
        files[name] = vp.save_adapter(model, out / f"{name}.safetensors", adapter_name=name)
    return files


def boxes(results) -> torch.Tensor:
    return results[0].boxes.data


def predict(model, image: str):
    return model.predict(image, imgsz=IMGSZ, conf=0.05, verbose=False)


def reference(image: str, adapter: Path | None):
    """What the active adapter must give: a fresh base with that adapter alone, merged, in Ultralytics' YOLO."""
    base = vp.load_base(BASE)
    if adapter is not None:
        vp.load_adapter(base, adapter)
    yolo = UltralyticsYOLO(str(settings.weights_dir() / BASE))
    yolo.model = vp.merge(base) if adapter is not None else base
    return predict(yolo, image)


def test_plain_base_predicts_like_ultralytics(image: str) -> None:
    ours = predict(vp.YOLO(BASE), image)  # bare name: found in the assets, nothing downloaded
    theirs = predict(UltralyticsYOLO(str(settings.weights_dir() / BASE)), image)
    assert len(ours[0].boxes) > 0 and ours[0].names == theirs[0].names
    torch.testing.assert_close(boxes(ours), boxes(theirs))


def test_switching_takes_effect_on_the_next_call(image: str, adapter_files: dict[str, Path]) -> None:
    model = vp.YOLO(BASE, adapters=[adapter_files["weeds"], adapter_files["coco"]])
    adapted = model.adapted_model
    assert model.adapters == ["coco", "weeds"] and model.active_adapter == "coco"  # the last loaded is active
    coco = predict(model, image)
    model.set_adapter("weeds")
    weeds = predict(model, image)  # the predictor of the 'coco' call must not be reused
    assert weeds[0].names == {0: "crop", 1: "weed"} and len(coco[0].names) == 80
    torch.testing.assert_close(boxes(weeds), boxes(reference(image, adapter_files["weeds"])))
    torch.testing.assert_close(boxes(coco), boxes(reference(image, adapter_files["coco"])))
    model.set_adapter("coco")
    torch.testing.assert_close(boxes(predict(model, image)), boxes(coco))  # the cached merged copy is unchanged
    model.set_adapter(None)
    torch.testing.assert_close(boxes(predict(model, image)), boxes(reference(image, None)))
    assert model.adapted_model is adapted  # no reload of the base
    assert sorted(vp.peft_state(adapted)["adapters"]) == ["coco", "weeds"]  # prediction merged copies only


def test_module_sources_and_run_folders(image: str, adapter_files: dict[str, Path], tmp_path: Path) -> None:
    base = vp.load_base(BASE)
    vp.load_adapter(base, adapter_files["weeds"])
    expected = boxes(predict(vp.YOLO(vp.merge(base)), image))  # a merged module, as vp.merge returns it
    torch.testing.assert_close(boxes(predict(vp.YOLO(base), image)), expected)  # a module with adapters
    run = tmp_path / "runs" / "detect" / "weeds"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "best.safetensors").write_bytes(adapter_files["weeds"].read_bytes())
    torch.testing.assert_close(boxes(predict(vp.YOLO(BASE, adapters=run), image)), expected)


def test_track(image: str, adapter_files: dict[str, Path]) -> None:
    model = vp.YOLO(BASE, adapters=adapter_files["coco"]).set_adapter(None)
    for _ in range(2):  # ByteTrack confirms tracks over frames: the same frame twice
        tracked = model.track(image, imgsz=320, persist=True, verbose=False)  # confident enough to track
    assert len(tracked[0].boxes) > 0 and tracked[0].boxes.id is not None
    predictor = model.predictor
    model.set_adapter("coco")
    model.track(image, imgsz=IMGSZ, persist=True, verbose=False)
    assert model.predictor is not predictor  # a new adapter gets a new predictor (and tracker state)


def test_val_checks_class_names(adapter_files: dict[str, Path]) -> None:
    model = vp.YOLO(BASE, adapters=adapter_files["coco"])
    metrics = model.val(data="coco8", imgsz=IMGSZ, batch=4, plots=False, verbose=False)  # a name in datasets/
    assert 0 < metrics.box.map50 <= 1
    model.load_adapter(adapter_files["weeds"])
    with pytest.raises(ValueError, match=r"classes \['crop', 'weed'\] differ from those of .*coco8"):
        model.val(data="coco8", imgsz=IMGSZ)
    assert model.val(data="coco8", imgsz=IMGSZ, batch=4, plots=False, check_names=False).box.map50 < 0.05


def test_export_is_beside_the_working_directory_with_the_adapter_names(
        adapter_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    monkeypatch.chdir(tmp_path)
    assets_before = sorted(settings.weights_dir().iterdir())
    model = vp.YOLO(BASE, adapters=adapter_files["weeds"])
    out = Path(model.export(format="onnx", imgsz=IMGSZ))
    assert out == tmp_path / "weeds.onnx"
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert ast.literal_eval(meta["names"]) == {0: "crop", 1: "weed"}  # as Ultralytics writes it
    assert sorted(settings.weights_dir().iterdir()) == assets_before  # nothing written beside the base weights


def test_train_points_to_the_visionpeft_trainer() -> None:
    with pytest.raises(TypeError, match="visionpeft.train"):
        vp.YOLO(BASE).train(data="coco8")
