"""ViT-backbone detectors: timm ViTs (random weights) -> simple feature pyramid -> Ultralytics Detect, at 64-96 px.

Checked where each can break: timm variants (cls/register/distilled tokens, 14 px patches) build and run at sizes
other than 224; the same spec rebuilds the same base (so adapter files fit a fresh build); weights load from a file
through timm, and offline without one the ViT starts random with a warning and no network access; training through
``PeftDetectionTrainer`` moves only the adapters, pyramid and head; merge, Ultralytics' fusion and ONNX export keep
the outputs; adapter files round-trip onto a fresh base.
"""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import max_rel_diff, run
from safetensors.torch import save_file
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils.torch_utils import unwrap_model

import visionpeft as vp
from visionpeft import settings
from visionpeft.families import family_of
from visionpeft.inject import adapted_modules, peft_state
from visionpeft.io import read_adapter
from visionpeft.methods.trainable import TrainableCopy
from visionpeft.models import build_detector
from visionpeft.train import PeftDetectionTrainer
from visionpeft.vitdet import VitDetModel, hub_offline

SPEC = "vitdet:vit_tiny_patch16_224"
OPTS = {"pretrained": False, "img_size": 64, "width": 32}
NC = 3
SMALL = {"depth": 2}  # timm_kwargs keeping the variant tests fast


@pytest.fixture
def vitdet(base):
    return base(SPEC, nc=NC, **OPTS)


def perturb_adapters(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Move every adapter tensor (LoRA, bottleneck, the pyramid/head copies) off its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, wrapper in adapted_modules(model):
            for adapter in wrapper.adapters.values():
                for p in adapter.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * std)


class Messages(logging.Handler):
    """Collects what Ultralytics' logger (which visionpeft's ViT builder uses) says."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_224", {}),
    ("deit_tiny_patch16_224", SMALL),
    ("deit_tiny_distilled_patch16_224", SMALL),  # two prefix tokens
    ("vit_small_patch14_reg4_dinov2", {**SMALL, "embed_dim": 96}),  # registers, 14 px patches
    ("vit_base_patch16_reg4_gap_256", {**SMALL, "embed_dim": 96}),  # registers, no class token
])
def test_timm_vit_variants_build_and_detect_at_any_size(name, kwargs):
    model = vp.load_base(f"vitdet:{name}", nc=NC, pretrained=False, width=32, timm_kwargs=kwargs)
    assert isinstance(model, VitDetModel) and family_of(model).name == "vitdet"
    assert model.model[0].stride == 16 and model.stride.tolist() == [8, 16, 32]
    x = torch.rand(2, 3, 64, 96)  # neither 224 nor square: position embeddings are interpolated
    with torch.no_grad():
        feats = model.train()(x)["feats"]
        assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
        y = model.eval()(x)[0]
    assert y.shape == (2, 4 + NC, 8 * 12 + 4 * 6 + 2 * 3) and torch.isfinite(y).all()


def test_same_spec_rebuilds_the_same_base_and_leaves_the_global_rng_alone(vitdet):
    rng = torch.random.get_rng_state()
    again = vp.load_base(SPEC, nc=NC, **OPTS)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert vp.fingerprint(again) == vp.fingerprint(vitdet)
    assert vp.fingerprint(build_detector(again.yaml, nc=NC)) == vp.fingerprint(vitdet), "model.yaml rebuilds it"
    source = vitdet.spec.source()  # the one-string form recorded as the base of adapter files
    assert source == 'vitdet:{"backbone": "vit_tiny_patch16_224", "pretrained": false, "img_size": 64, "width": 32, ' \
                     '"nc": 3}'
    assert vp.fingerprint(vp.load_base(source)) == vp.fingerprint(vitdet)
    other = vp.load_base(SPEC, nc=NC, **{**OPTS, "seed": 1})
    assert vp.fingerprint(other)["weights"] != vp.fingerprint(vitdet)["weights"]


@pytest.mark.parametrize("source, options, message", [
    ("vitdet:vit_nonexistent_patch16", {}, "timm.list_models"),
    ("vitdet:resnet18", {}, "not a Vision Transformer"),
    (SPEC, {"chanels": 32}, "Valid options"),
    (SPEC, {"patch_size": 12}, "power of two"),
    (SPEC, {"timm_kwargs": {"num_classes": 5}}, "set by the ViT detector"),
])
def test_bad_specs_fail_with_the_fix(source, options, message):
    with pytest.raises(ValueError, match=message):
        vp.load_base(source, nc=NC, **{"pretrained": False, **options})


def test_pretrained_weights_load_from_a_file_through_timm(tmp_path, monkeypatch):
    torch.manual_seed(3)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # with its 1000-class head, as timm saves
    sd = source.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "vit_tiny.safetensors")

    def check(model):
        vit = model.model[0].vit
        got = vit.state_dict()
        for k, v in sd.items():
            if k.startswith(("blocks.", "patch_embed.", "norm.", "cls_token")):
                assert torch.equal(got[k], v), k
        assert vit.pos_embed.shape == (1, 1 + 4 * 4, 192), "resampled from 14x14 to the 64 px grid"

    check(vp.load_base(SPEC, nc=NC, **{**OPTS, "pretrained": str(tmp_path / "vit_tiny.safetensors")}))
    # pretrained=True finds <assets>/weights/<timm name>.safetensors
    (tmp_path / "weights").mkdir()
    (tmp_path / "vit_tiny.safetensors").rename(tmp_path / "weights" / "vit_tiny_patch16_224.safetensors")
    monkeypatch.setenv(settings.ASSETS_ENV, str(tmp_path))
    check(vp.load_base(SPEC, nc=NC, **{**OPTS, "pretrained": True}))
    with pytest.raises(FileNotFoundError, match="not found"):
        vp.load_base(SPEC, nc=NC, **{**OPTS, "pretrained": str(tmp_path / "missing.safetensors")})


def test_offline_without_weights_starts_random_with_a_warning_and_no_network(tmp_path, monkeypatch, vitdet):
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise AssertionError("the ViT builder tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv(settings.ASSETS_ENV, str(tmp_path))  # no weights/ here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    assert hub_offline()
    records = Messages()
    logger = logging.getLogger("ultralytics")
    logger.addHandler(records)
    try:
        model = vp.load_base(SPEC, nc=NC, **{**OPTS, "pretrained": True})
    finally:
        logger.removeHandler(records)
    assert any("RANDOM weights" in m and "HF_HUB_OFFLINE=0" in m for m in records.messages), records.messages
    assert vp.fingerprint(model) == vp.fingerprint(vitdet), "the fallback is the seeded random build"


def test_defaults_adapt_the_vit_and_train_pyramid_and_head(vitdet):
    vp.inject(vitdet, [vp.LoraConfig(r=4), vp.BottleneckConfig(r=8)], adapter_name="a")
    targets = peft_state(vitdet)["adapters"]["a"]["targets"]
    by_method: dict[str, list[str]] = {}
    for name, method in targets.items():
        by_method.setdefault(method, []).append(name)
    depth = len(vitdet.model[0].vit.blocks)
    assert len(by_method["lora"]) == 4 * depth
    assert all(n.startswith("model.0.vit.blocks.") and n.endswith(("qkv", "proj", "fc1", "fc2"))
               for n in by_method["lora"])
    assert sorted(by_method["bottleneck"]) == sorted(f"model.0.vit.blocks.{i}.mlp" for i in range(depth))
    after_backbone = tuple(f"model.{i}." for i in range(1, len(vitdet.model)))
    untrained = [n for n, m in vitdet.named_modules() if n.startswith(after_backbone) and ".adapters." not in n
                 and ".base_layer" not in n and not n.endswith("dfl.conv")
                 and next(m.parameters(recurse=False), None) is not None]
    assert untrained == [], f"pyramid/head layers left out of the adapter: {untrained}"
    assert not any(n.startswith("model.0") or n.endswith("dfl.conv") for n in by_method["trainable"])
    trainable = {n for n, p in vitdet.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a." in n for n in trainable)
    report = vp.trainable_report(vitdet)
    assert 0 < report.percent < 100


@pytest.fixture(scope="module")
def coco8_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vitdet")
    model_yaml = tmp / "vitdet_tiny.yaml"
    model_yaml.write_text(yaml.safe_dump({"vitdet": {"backbone": "vit_tiny_patch16_224", **OPTS}}))
    trainer = PeftDetectionTrainer(
        overrides=dict(model=str(model_yaml), data=str(settings.datasets_dir() / "coco8" / "data.yaml"), epochs=1,
                       imgsz=64, batch=4, nbs=4, warmup_epochs=0, workers=0, project=str(tmp), name="run",
                       exist_ok=True, plots=False),
        peft=dict(adapter_name="c8", methods=[{"method": "lora", "r": 4}, {"method": "bottleneck", "r": 8}]))
    trainer.train()
    return trainer, model_yaml


def test_training_moves_only_adapters_pyramid_and_head(coco8_run):
    trainer, model_yaml = coco8_run
    model = unwrap_model(trainer.model)
    assert isinstance(model, VitDetModel)
    fresh = vp.base_state_dict(vp.load_base(str(model_yaml), nc=80))
    got = vp.base_state_dict(model)
    assert got.keys() == fresh.keys()
    changed = [k for k, v in fresh.items() if not torch.equal(got[k], v)]
    assert not changed, f"base tensors changed: {changed[:5]}"
    lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B.weight")]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "every LoRA B moved off zero"
    copies = [(n, w) for n, w in adapted_modules(model) if isinstance(w.adapters["c8"], TrainableCopy)]
    stale = [n for n, w in copies if all(torch.equal(a, b) for a, b in zip(
        w.adapters["c8"].module.parameters(), w.base_layer.parameters(), strict=True))]
    assert copies and not stale, f"pyramid/head layers that did not train: {stale}"


def test_trained_checkpoints_predict_and_adapter_file_fits_a_fresh_build(coco8_run, tmp_path):
    from ultralytics import YOLO

    trainer, model_yaml = coco8_run
    ckpt, _ = load_checkpoint(str(trainer.last))
    assert isinstance(ckpt, VitDetModel) and ckpt.visionpeft["active"] == "c8"
    results = YOLO(str(trainer.best)).predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)
    assert len(results) == 1 and results[0].boxes is not None
    _, meta = read_adapter(trainer.best.with_suffix(".safetensors"))
    assert meta["family"] == "vitdet" and meta["base"].startswith("vitdet:")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ema = run(trainer.ema.ema.float(), x)
    for name, tol in (("last", 0), ("best", 2e-3)):  # last: fp32, exact; best (the deliverable): fp16
        fresh = vp.load_base(meta["base"])  # what the export path does: the recorded spec rebuilds the base
        vp.load_adapter(fresh, trainer.wdir / f"{name}.safetensors")
        assert max_rel_diff(run(fresh, x), ema) <= tol, name


@pytest.mark.parametrize("methods", [[vp.LoraConfig(r=4)], [vp.LoraConfig(r=4), vp.BottleneckConfig(r=8)]])
def test_merge_and_fusion_keep_the_outputs(vitdet, images, methods):
    vp.inject(vitdet, methods, adapter_name="a", names=["x", "y"])
    perturb_adapters(vitdet)
    adapted = run(vitdet, images)
    merged = vp.merge(vitdet)
    assert isinstance(merged, VitDetModel)
    left = [n for n, m in merged.named_modules() if type(m).__module__.startswith("visionpeft.methods")]
    assert all(".mlp" in n for n in left) and bool(left) == (len(methods) == 2), left  # bottlenecks do not merge
    assert max_rel_diff(run(merged, images), adapted) <= 1e-4
    assert max_rel_diff(run(vitdet.fuse(verbose=False), images), adapted) <= 1e-4  # Ultralytics val/predict path


def test_onnx_export_matches_the_adapted_model(vitdet, tmp_path):
    import onnxruntime as ort
    from ultralytics.engine.exporter import Exporter

    vp.inject(vitdet, [vp.LoraConfig(r=4), vp.BottleneckConfig(r=8)], adapter_name="a", names=["x", "y"])
    perturb_adapters(vitdet)
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))  # not the 64 px embedding grid
    adapted = run(vitdet, images)[0]
    merged = vp.merge(vitdet)
    merged.pt_path = str(tmp_path / "vitdet.pt")  # the exporter names its output after this
    path = Exporter(overrides=dict(format="onnx", imgsz=96, batch=2, device="cpu", simplify=True))(model=merged)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    assert max_rel_diff([torch.from_numpy(out)], [adapted]) <= 1e-4
    with pytest.raises(ValueError, match="fixed input size"):  # a dynamic graph would be wrong at other sizes
        Exporter(overrides=dict(format="onnx", imgsz=96, device="cpu", dynamic=True))(model=vp.merge(vitdet))


def test_adapter_file_round_trip_onto_a_fresh_base(vitdet, images, tmp_path):
    vp.inject(vitdet, [vp.LoraConfig(r=4), vp.BottleneckConfig(r=8)], adapter_name="a", names=["x", "y"])
    perturb_adapters(vitdet)
    vp.save_adapter(vitdet, tmp_path / "a.safetensors")
    fresh = vp.load_base(SPEC, nc=NC, **OPTS)  # rebuilt from the spec, not a copy
    vp.load_adapter(fresh, tmp_path / "a.safetensors")
    assert fresh.names == {0: "x", 1: "y"}
    assert max_rel_diff(run(fresh, images), run(vitdet, images)) == 0


@pytest.mark.parametrize("name", ["vit_crops.yaml", "vit_smoke.yaml"])
def test_shipped_vit_configs_build_their_detector(name):
    from visionpeft.train.config import load_config

    config = load_config(name)
    model = build_detector(config.model, nc=2)
    assert isinstance(model, VitDetModel)
    vp.inject(model, config.peft.configs(), adapter_name=config.peft.adapter_name, names=["crop", "weed"])
    assert vp.trainable_report(model).trainable > 0


def test_vit_crops_config_loads_the_shipped_pretrained_vit() -> None:
    """configs/vit_crops.yaml builds on the assets' ImageNet ViT-Ti: every backbone tensor equals the file's, so a
    silent random start (a missing or mis-keyed file) fails here."""
    from safetensors.torch import load_file

    from visionpeft.train.config import load_config

    model = vp.load_base(load_config("vit_crops.yaml").model, nc=2)
    vit = model.model[0].vit.state_dict()
    pretrained = load_file(settings.weights_dir() / "vit_tiny_patch16_224.safetensors")
    backbone = {k: v for k, v in pretrained.items() if not k.startswith("head.")}  # the classifier is dropped
    assert len(backbone) == len(pretrained) - 2 and backbone.keys() <= vit.keys()
    differ = [k for k, v in backbone.items() if not torch.equal(vit[k], v)]
    assert not differ, f"backbone tensors not loaded from the file: {differ[:5]}"


def test_a_named_missing_vit_file_is_an_error_not_a_random_start() -> None:
    with pytest.raises(FileNotFoundError, match="no_such_vit.safetensors"):
        vp.load_base('vitdet:{"backbone": "vit_tiny_patch16_224", "pretrained": "no_such_vit.safetensors"}', nc=2)


def test_export_merges_a_vit_adapter_with_no_extra_node_and_quantizes_the_transformer(vitdet, tmp_path):
    """``export`` on a ViT detector adapter, its base rebuilt from the spec the file records: the merged ONNX has the
    plain ViT detector's node count and its outputs (1e-4); INT8 runs the ViT's linears and attention products on
    int8 inputs, LayerNorms in float."""
    import onnx

    from visionpeft.export import export
    from visionpeft.settings import datasets_dir

    vp.inject(vitdet, [vp.LoraConfig(r=4)], adapter_name="a", names=["x", "y", "z"])
    perturb_adapters(vitdet)
    vp.save_adapter(vitdet, tmp_path / "a.safetensors")
    result = export(adapter=tmp_path / "a.safetensors", quantize=8, imgsz=64, data=datasets_dir() / "coco8" /
                    "data.yaml", calib=8, runs=0, check_names=False)
    fp32 = result.report.exports["fp32"]
    assert result.ok and fp32.extra_nodes == 0 and fp32.parity.max_rel <= 1e-4
    graph = onnx.load(str(result.file)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    products = [n for n in graph.node if n.op_type in ("Gemm", "MatMul") and "/blocks." in n.name]
    linears = [n for n in products if any(f"/{k}/" in n.name for k in ("qkv", "proj", "fc1", "fc2"))]
    assert len(linears) == 4 * 12 and len(products) == 6 * 12  # and q k^T, attention x v in each block
    assert all(n.input[0] in dequantized and n.input[1] in dequantized for n in products)
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]  # outlier channels: float, as the adds
    assert len(norms) == 2 * 12 + 1 and not any(n.input[0] in dequantized for n in norms)
