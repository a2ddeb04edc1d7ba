"""Injection into real YOLO detectors and timm ViTs: targets, freezing, class outputs, report, merge, fuse, training.

Models: Ultralytics YAML builds (v8, 11, 26) with random weights, the COCO-pretrained checkpoints from the assets,
and a timm ViT with random weights, all at 64 px.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VIT, VIT_KWARGS, leaves, max_rel_diff, randomize_adapters, run, visionpeft_modules
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from ultralytics.nn.tasks import DetectionModel

import visionpeft as vp
from visionpeft.families.yolo import class_bias
from visionpeft.frozen_norm import FrozenBatchNorm2d, unfreeze_norms
from visionpeft.inject import adapted_modules, base_named_modules, frozen_norm_modules
from visionpeft.methods import AdaptedModule
from visionpeft.methods.bottleneck import ConvBottleneck, TokenBottleneck
from visionpeft.methods.trainable import TrainableCopy

YAMLS = ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"]
CHECKPOINTS = ["yolo11n.pt", "yolov8n.pt", "yolov5nu-coco-backbone.pt"]


def load(base, source: str) -> nn.Module:
    if source.endswith(".yaml"):
        return base(source, nc=3)
    return base(source, **VIT_KWARGS) if source == VIT else base(source)


def targets(model: nn.Module, adapter: str = "default") -> dict[str, str]:
    return vp.peft_state(model)["adapters"][adapter]["targets"]


def conv_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def adapter_of(model: nn.Module, name: str, adapter: str = "default") -> nn.Module:
    return model.get_submodule(name).adapters[adapter]


# -- target selection -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", YAMLS + ["yolo11n.pt"])
def test_yolo_default_targets_every_conv_but_the_dfl(base, source):
    model = load(base, source)
    expected = {n for n in conv_names(model) if not n.endswith("dfl.conv")}
    assert any(n.endswith("dfl.conv") for n in conv_names(model)) == (source != "yolo26n.yaml")  # 26: no DFL
    vp.inject(model, vp.LoraConfig(r=4))
    assert set(targets(model)) == expected
    assert set(targets(model).values()) == {"lora"}
    assert {n for n, _ in adapted_modules(model)} == expected


def test_yolo11_depthwise_head_convs_are_targeted(base):
    model = load(base, "yolo11n.pt")
    depthwise = {n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1}
    assert {n for n in depthwise if n.startswith("model.23.cv3.")}, "YOLO11's class branch has depthwise convs"
    vp.inject(model, vp.LoraConfig(r=8))
    for name in depthwise:
        assert targets(model)[name] == "lora"
        assert adapter_of(model, name).r == 1  # one 3x3 filter per group holds rank 1
        assert adapter_of(model, name).lora_A.groups == model.get_submodule(name).base_layer.groups


def test_vit_default_targets_attention_and_mlp_linears(base):
    model = load(base, VIT)
    vp.inject(model, vp.LoraConfig(r=4))
    expected = {f"blocks.{i}.{n}" for i in range(len(model.blocks)) for n in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                              "mlp.fc2")}
    assert set(targets(model)) == expected  # not patch_embed.proj (a conv) nor the classifier head


def test_targets_by_regex_and_suffix(base):
    model = load(base, "yolo11n.yaml")
    regex = copy.deepcopy(model)
    vp.inject(regex, vp.LoraConfig(target_modules=[r"model\.\d+\.cv1\.conv"]))
    expected = {n for n in conv_names(model) if n.count(".") == 3 and n.endswith(".cv1.conv")}
    assert set(targets(regex)) == expected and expected

    suffix = copy.deepcopy(model)
    vp.inject(suffix, vp.LoraConfig(target_modules=["cv1.conv"]))
    assert set(targets(suffix)) == {n for n in conv_names(model) if n.endswith(".cv1.conv")}
    assert len(targets(suffix)) > len(expected)  # the suffix also reaches nested blocks


def test_targets_by_ultralytics_layer_index(base):
    model = load(base, "yolo11n.pt")
    expected = {n for n in conv_names(model) if n.split(".")[1] in {"0", "2", "23"} and "dfl" not in n}
    vp.inject(model, vp.LoraConfig(layers=[0, 2, 23]))
    assert set(targets(model)) == expected
    assert "model.0.conv" in expected and not any(n.startswith("model.20.") for n in targets(model))


def test_targets_by_module_type(base):
    vit = load(base, VIT)
    vp.inject(vit, vp.LoraConfig(target_types=["Conv2d"], target_modules=["patch_embed.proj"]))
    assert set(targets(vit)) == {"patch_embed.proj"}

    yolo = load(base, "yolo11n.yaml")
    blocks = {n for n, m in yolo.named_modules() if type(m).__name__ == "C3k2"}
    vp.inject(yolo, vp.BottleneckConfig(r=4, target_types=["C3k2"]))
    assert set(targets(yolo)) == blocks and len(blocks) == 8
    assert set(targets(yolo).values()) == {"bottleneck"}

    with pytest.raises(ValueError, match="No module of the model matches"):
        vp.inject(load(base, "yolo11n.yaml"), vp.LoraConfig(target_types=["Linear"]))


def test_exclude_list_adds_to_the_family_default(base):
    model = load(base, "yolo11n.yaml")
    vp.inject(model, vp.LoraConfig(exclude_modules=[r"model\.23\..*", "m.0.cv2.conv"]))
    assert not any(n.startswith("model.23.") or n.endswith("m.0.cv2.conv") for n in targets(model))
    assert "model.22.cv1.conv" in targets(model)
    assert vp.peft_state(model)["adapters"]["default"]["configs"][0]["exclude_modules"][-1] == "dfl.conv"


def test_rank_pattern_sets_per_target_rank(base):
    model = load(base, "yolo11n.yaml")
    vp.inject(model, vp.LoraConfig(r=4, rank_pattern={r"model\.23\.cv2\..*": 2, "model.0.conv": 1}))
    assert adapter_of(model, "model.0.conv").r == 1
    assert adapter_of(model, "model.23.cv2.0.0.conv").r == 2
    assert adapter_of(model, "model.23.cv2.0.0.conv").scaling == 16 / 2
    assert adapter_of(model, "model.1.conv").r == 4


def test_several_methods_first_config_wins(base):
    model = load(base, "yolo11n.yaml")
    vp.inject(model, [vp.DoraConfig(r=2, layers=[0]), {"method": "lora", "r": 4}])
    assert targets(model)["model.0.conv"] == "dora"
    assert targets(model)["model.1.conv"] == "lora"


def test_config_errors(base):
    model = load(base, "yolo11n.yaml")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['rnk'\].*Valid options"):
        vp.inject(model, [{"method": "lora", "rnk": 4}])
    with pytest.raises(ValueError, match="Unknown adapter method 'lora2'"):
        vp.inject(model, [{"method": "lora2"}])
    vp.inject(model, vp.LoraConfig(), adapter_name="a")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        vp.inject(model, vp.LoraConfig(), adapter_name="a")
    with pytest.raises(KeyError, match=r"No adapter named 'b'.*\['a'\]"):
        vp.set_adapter(model, "b")


# -- freezing, class outputs, BatchNorm, report ------------------------------------------------------------------
def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("source", ["yolo11n.pt", VIT])
def test_only_the_active_adapter_is_trainable(base, source):
    model = load(base, source)
    vp.inject(model, vp.LoraConfig(r=4), adapter_name="a")
    vp.inject(model, vp.DoraConfig(r=2), adapter_name="b")
    assert trainable_names(model) == {n for n, _ in model.named_parameters() if ".adapters.b." in n}
    assert any(n.endswith("magnitude") for n in trainable_names(model))
    vp.set_adapter(model, "a")
    assert trainable_names(model) == {n for n, _ in model.named_parameters() if ".adapters.a." in n}
    assert {n.rsplit(".", 2)[-2] for n in trainable_names(model)} == {"lora_A", "lora_B"}


def test_new_class_names_reinitialise_class_outputs_only(base):
    pretrained = load(base, "yolo11n.pt")
    model = copy.deepcopy(pretrained)
    vp.inject(model, vp.LoraConfig(r=4), names=["crop", "weed"])
    head = model.model[-1]
    outputs = {f"model.23.cv3.{i}.2" for i in range(head.nl)}
    assert {n for n, m in targets(model).items() if m == "trainable"} == outputs
    for i, name in enumerate(sorted(outputs)):
        new = adapter_of(model, name)
        assert isinstance(new, TrainableCopy) and new.module.out_channels == 2
        torch.testing.assert_close(new.module.bias, torch.full((2,), class_bias(2, float(head.stride[i]))))
        assert not new.module.weight.any()  # zero weights: every new logit starts at the prior, whatever the seed
        assert all(p.requires_grad for p in new.parameters())

    # everything else in the head, box branch included, keeps its pretrained weights, frozen
    before, after = pretrained.state_dict(), vp.base_state_dict(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    frozen_head = [n for n, p in model.named_parameters() if n.startswith("model.23.") and ".adapters." not in n]
    assert frozen_head and not any(model.get_parameter(n).requires_grad for n in frozen_head)
    assert trainable_names(model) == {n for n, _ in model.named_parameters() if ".adapters.default." in n}

    assert model.names == {0: "crop", 1: "weed"} and head.nc == 2 and head.no == 2 + 4 * head.reg_max
    y = run(model, torch.rand(1, 3, 64, 64))[0]
    assert y.shape[1] == 4 + 2


def test_yolo26_reinitialises_both_class_heads(base):
    model = load(base, "yolo26n.yaml")
    vp.inject(model, vp.LoraConfig(r=4), names=["a", "b", "c", "d"])
    replaced = {n for n, m in targets(model).items() if m == "trainable"}
    assert replaced == {f"model.23.{h}.{i}.2" for h in ("cv3", "one2one_cv3") for i in range(3)}
    assert run(model, torch.rand(1, 3, 64, 64))[0].shape[1] == 4 + 4


def test_same_class_names_keep_the_class_outputs(base):
    model = load(base, "yolo11n.pt")
    vp.inject(model, vp.LoraConfig(r=4), names=dict(model.names))
    assert targets(model)["model.23.cv3.0.2"] == "lora"
    assert "trainable" not in targets(model).values()


def test_modules_named_trainable_are_trained_in_full(base):
    model = load(base, "yolo11n.pt")
    vp.inject(model, [vp.LoraConfig(r=4), vp.TrainableConfig(target_types=["BatchNorm2d"], layers=[0, 1])])
    trainable_bns = {n for n, m in targets(model).items() if m == "trainable"}
    assert trainable_bns == {"model.0.bn", "model.1.bn"}
    for name in trainable_bns:
        assert all(p.requires_grad for p in adapter_of(model, name).parameters())
    frozen = frozen_norm_modules(model)
    assert model.model[0].bn.base_layer in frozen and model.model[2].cv1.bn in frozen
    assert not any(m is adapter_of(model, n).module for n in trainable_bns for m in frozen)


def test_frozen_batchnorm_keeps_its_running_statistics(base, images):
    """Frozen BatchNorms become FrozenBatchNorm2d: even a trainer's train() cannot move their statistics."""
    model = load(base, "yolo11n.pt")
    vp.inject(model, vp.LoraConfig(r=4))
    frozen = frozen_norm_modules(model)
    assert len(frozen) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(type(m) is FrozenBatchNorm2d for m in frozen)
    stats = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k})

    model.train()  # what Ultralytics' trainer calls every epoch
    model(images * 3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())

    unfreeze_norms(model)  # the control: a plain BatchNorm in training mode does move its statistics
    model.train()
    model(images * 3)
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


def test_merge_gives_plain_batchnorms_back(base, images):
    model = load(base, "yolo11n.pt")
    vp.inject(model, vp.LoraConfig(r=4))
    merged = vp.merge(model)
    norms = [m for m in merged.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)
    assert type(model.model[0].bn) is FrozenBatchNorm2d  # merge() copies; the adapted model is untouched


def test_trainable_report_per_block_and_total(base):
    model = load(base, "yolo11n.pt")
    base_params = sum(p.numel() for p in model.parameters())
    vp.inject(model, vp.LoraConfig(r=4), adapter_name="a", names=["crop", "weed"])
    vp.inject(model, vp.LoraConfig(r=16), adapter_name="b")
    vp.set_adapter(model, "a")
    report = vp.trainable_report(model)

    adapter = {n: p.numel() for n, p in model.named_parameters() if ".adapters.a." in n}
    replaced = sum(p.numel() for n in targets(model, "a") if targets(model, "a")[n] == "trainable"
                   for p in model.get_submodule(n).base_layer.parameters())
    assert report.trainable == sum(adapter.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.total == base_params + sum(adapter.values()) - replaced  # adapter "b" is not counted
    assert report.percent == pytest.approx(100 * report.trainable / report.total)
    assert 0 < report.percent < 10

    rows = {b: (t, n) for b, t, n in report.rows}
    assert set(rows) == {f"model.{i}" for i, block in enumerate(model.model) if list(block.parameters())}
    assert rows["model.0"][0] == sum(v for k, v in adapter.items() if k.startswith("model.0."))
    assert sum(t for t, _ in rows.values()) == report.trainable and sum(n for _, n in rows.values()) == report.total
    text = str(report)
    assert "model.23" in text and text.splitlines()[-1].startswith("all") and f"{report.percent:.2f}%" in text

    vit = load(base, VIT)
    vp.inject(vit, vp.LoraConfig(r=4))
    assert {b for b, _, _ in vp.trainable_report(vit).rows} >= {"blocks.0", "blocks.11", "patch_embed", "head"}


# -- merge -------------------------------------------------------------------------------------------------------
def assert_merges_exactly(model: nn.Module, x: torch.Tensor, base_cls: type) -> nn.Module:
    initial = run(model, x)
    randomize_adapters(model)
    adapted = run(model, x)
    assert max_rel_diff(adapted, initial) > 1e-2, "the non-zero adapters should change the output"
    merged = vp.merge(model)
    assert type(merged) is base_cls
    assert visionpeft_modules(merged) == [] and not hasattr(merged, "visionpeft")
    assert max_rel_diff(run(merged, x), adapted) < 1e-4
    assert max_rel_diff(run(model, x), adapted) == 0, "merge() must leave its input untouched"
    return merged


def assert_same_after_fusion(fused: nn.Module, expected: list[torch.Tensor], x: torch.Tensor) -> None:
    out = run(fused, x)  # fusion drops YOLO26's unused one2one branch: its outputs are a prefix of the unfused ones
    assert max_rel_diff(out, expected[:len(out)]) < 1e-4


@pytest.mark.parametrize("source", YAMLS + CHECKPOINTS + [VIT])
def test_lora_merge_gives_the_plain_model_and_the_same_outputs(base, images, source):
    model = load(base, source)
    vp.inject(model, vp.LoraConfig(r=4))
    merged = assert_merges_exactly(model, images, VisionTransformer if source == VIT else DetectionModel)
    if source != VIT:  # Ultralytics can fuse the merged model (Conv+BN folding), as val/predict/export do
        assert_same_after_fusion(copy.deepcopy(merged).fuse(verbose=False), run(merged, images), images)


@pytest.mark.parametrize("source", ["yolo11n.pt", VIT])
def test_dora_merge_gives_the_same_outputs(base, images, source):
    model = load(base, source)
    vp.inject(model, vp.DoraConfig(r=4))
    assert_merges_exactly(model, images, VisionTransformer if source == VIT else DetectionModel)


def test_merge_folds_lora_into_depthwise_convs(base, images):
    model = load(base, "yolo11n.pt")
    vp.inject(model, vp.LoraConfig(r=4), names=["crop", "weed"])
    depthwise = [n for n, m, _ in base_named_modules(model) if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) >= 6
    merged = assert_merges_exactly(model, images, DetectionModel)
    for name in depthwise:
        before = model.get_submodule(name).base_layer.weight
        after = merged.get_submodule(name).weight
        assert type(merged.get_submodule(name)) is nn.Conv2d and after.shape == before.shape
        assert not torch.equal(after, before), f"{name}: the LoRA update was not folded in"
    assert merged.names == {0: "crop", 1: "weed"} and merged.model[-1].cv3[0][2].out_channels == 2


def test_bottleneck_does_not_merge_but_runs(base, images):
    """LoRA inside C3k2 blocks merges; the bottleneck beside them stays a module and computes the same."""
    model = load(base, "yolo11n.yaml")
    vp.inject(model, [vp.BottleneckConfig(r=8), vp.LoraConfig(r=4)])
    kinds = set(targets(model).values())
    assert kinds == {"bottleneck", "lora"}
    randomize_adapters(model)
    adapted = run(model, images)
    merged = vp.merge(model)
    remaining = [w for _, w in adapted_modules(merged)]
    assert remaining and all(isinstance(w.adapters["default"], ConvBottleneck) for w in remaining)
    assert not any(isinstance(m, AdaptedModule) for w in remaining for m in w.base_layer.modules())
    assert max_rel_diff(run(merged, images), adapted) < 1e-4
    # Ultralytics fusion still works around the bottlenecks
    assert_same_after_fusion(copy.deepcopy(model).fuse(verbose=False), adapted, images)


def test_adaptformer_on_vit_runs_and_survives_merge(base, images):
    model = load(base, VIT)
    vp.inject(model, vp.BottleneckConfig(r=8, act="gelu"))
    assert set(targets(model)) == {f"blocks.{i}.mlp" for i in range(len(model.blocks))}
    assert all(isinstance(adapter_of(model, n), TokenBottleneck) for n in targets(model))
    plain = run(vp.set_adapter(copy.deepcopy(model), None), images)
    assert max_rel_diff(run(model, images), plain) == 0  # zero-initialised up projection
    randomize_adapters(model)
    adapted = run(model, images)
    assert max_rel_diff(adapted, plain) > 1e-3
    assert max_rel_diff(run(vp.merge(model), images), adapted) < 1e-4


# -- training and fusion pitfalls ----------------------------------------------------------------------------------
def test_training_steps_change_adapters_and_leave_the_base_bitwise_unchanged(base, images):
    model = load(base, "yolo11n.pt")
    vp.inject(model, vp.LoraConfig(r=4, dropout=0.1), names=["crop", "weed"])
    base_before = copy.deepcopy(vp.base_state_dict(model))
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all parameters, on purpose
    model.train()
    for m in frozen_norm_modules(model):
        m.eval()
    for _ in range(2):
        out = model(images)
        loss = sum(t.float().pow(2).mean() for t in (out["boxes"], out["scores"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    base_after = vp.base_state_dict(model)
    assert all(torch.equal(base_after[k], v) for k, v in base_before.items())
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], before) for n, before in adapters_before.items())


@pytest.mark.parametrize("config", [vp.LoraConfig(r=4), vp.DoraConfig(r=4), vp.LohaConfig(r=2, use_dora=True)],
                         ids=["lora", "dora", "loha"])
def test_ultralytics_fuse_keeps_the_adapters(base, images, config):
    model = load(base, "yolo11n.pt")
    vp.inject(model, config, names=["crop", "weed"])
    initial = run(model, images)
    randomize_adapters(model)
    adapted = run(model, images)
    assert max_rel_diff(adapted, initial) > 1e-2
    fused = model.fuse(verbose=False)  # what Ultralytics' val/predict/export call
    assert type(fused) is DetectionModel and visionpeft_modules(fused) == []
    assert not any(hasattr(m, "bn") for m in fused.modules() if type(m).__name__ == "Conv")  # BN folded
    assert_same_after_fusion(fused, adapted, images)


# -- several adapters on one base ----------------------------------------------------------------------------------
def test_set_adapter_switches_outputs_and_class_names(base, images):
    model = load(base, "yolo11n.pt")
    plain = run(model, images)
    coco_names = dict(model.names)
    vp.inject(model, vp.LoraConfig(r=4), adapter_name="coco")
    vp.inject(model, vp.DoraConfig(r=4), adapter_name="crops", names=["crop", "weed"])
    randomize_adapters(model)  # both adapters
    crops = run(model, images)
    head = model.model[-1]
    assert model.names == {0: "crop", 1: "weed"} and head.nc == 2 and crops[0].shape[1] == 6

    vp.set_adapter(model, "coco")
    coco = run(model, images)
    assert model.names == coco_names and head.nc == 80 and coco[0].shape[1] == 84
    assert max_rel_diff(coco, plain) > 1e-2

    vp.set_adapter(model, "crops")
    assert max_rel_diff(run(model, images), crops) == 0 and model.names == {0: "crop", 1: "weed"}

    vp.set_adapter(model, None)  # the base, with frozen BatchNorms as FrozenBatchNorm2d (same up to rounding)
    assert max_rel_diff(run(model, images), plain) < 1e-5 and model.names == coco_names


def test_no_graph_below_the_lowest_adapted_layer(base, images):
    """Adapters from layer 5 up, per-adapter BN statistics everywhere: layers 0-4 run forward only (their
    statistics still adapt), so backward stops at layer 5 and keeps no activation of the stem."""
    model = load(base, "yolo11n.pt")
    vp.inject(model, [vp.DoraConfig(r=4, layers="5-23"), vp.NormStatsConfig()],
              names=["crop", "weed"])
    needs_grad = {}
    for i, layer in enumerate(model.model[:-1]):
        layer.register_forward_hook(lambda m, inp, out, i=i: needs_grad.__setitem__(i, out.requires_grad))
    stem_stats = model.model[0].bn.adapters["default"].running_mean.clone()
    model.train()
    out = model(images * 2)
    assert [i for i, g in needs_grad.items() if g] == list(range(5, 23))
    assert not torch.equal(model.model[0].bn.adapters["default"].running_mean, stem_stats)  # forward-only update
    # every trainable tensor gets a gradient (autograd.grad raises for one outside the graph)
    loss = sum(t.square().mean() for t in leaves(out) if t.is_floating_point())
    torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def test_delete_adapter_down_to_the_plain_base(base, images):
    model = load(base, "yolo11n.pt")
    plain = run(copy.deepcopy(model), images)
    vp.inject(model, vp.LoraConfig(r=4), adapter_name="a", names=["crop", "weed"])
    vp.inject(model, vp.DoraConfig(r=2, layers=[23]), adapter_name="b")
    randomize_adapters(model)
    vp.set_adapter(model, "b")
    only_b = run(model, images)
    vp.delete_adapter(model, "a")
    assert vp.peft_state(model)["active"] == "b" and list(vp.peft_state(model)["adapters"]) == ["b"]
    assert all("a" not in w.adapters for _, w in adapted_modules(model))
    assert max_rel_diff(run(model, images), only_b) == 0
    with pytest.raises(KeyError, match="No adapter named 'a'"):
        vp.delete_adapter(model, "a")
    vp.delete_adapter(model, "b")
    assert type(model) is DetectionModel and visionpeft_modules(model) == [] and not hasattr(model, "visionpeft")
    assert all(type(m) is nn.BatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert max_rel_diff(run(model, images), plain) == 0
