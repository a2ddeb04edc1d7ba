"""Rank planning from a budget (``peft.budget``): ranks go where the weight gradient is, the adapter file fits the
budget, the plan is printed and saved with the adapter, and bad budgets fail with a one-line error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import Messages
from torch import nn

import visionpeft as vp
from visionpeft.budget import METADATA_MARGIN, parse_budget
from visionpeft.inject import adapted_modules
from visionpeft.io import adapter_to_bytes, read_adapter
from visionpeft.train import ConfigError, load_config, train


class TwoBranches(nn.Module):
    """``a`` feeds the loss; ``b`` is computed but multiplied by zero, so its weight gradient is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(128, 128), nn.Linear(128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + 0 * self.b(x)


def branch_losses(model: nn.Module):
    torch.manual_seed(0)
    target = torch.randn(64, 128)
    for _ in range(2):
        x = torch.randn(64, 128)
        yield ((model(x) - target) ** 2).mean()


def test_gradient_plan_puts_rank_where_the_gradient_is():
    torch.manual_seed(0)
    model = TwoBranches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    configs = [{"method": "lora", "r": 4, "target_modules": ["a", "b"]}]
    plan = vp.plan_ranks(model, configs, "20%", branch_losses)
    assert plan.ranks["b"] == 0 and 1 <= plan.ranks["a"] <= 8  # no gradient, no rank; up to 2x the config's r
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is not touched
    assert not hasattr(model, "visionpeft") and model.a.weight.grad is None

    planned = vp.inject(model, plan.configs)
    ranks = {n: w.adapters["default"].r for n, w in adapted_modules(planned)}
    assert ranks == {"a": plan.ranks["a"]}  # 'b' excluded by name, 'a' at its planned rank
    assert len(adapter_to_bytes(planned, dtype=torch.float16)) <= plan.file_limit


def test_uniform_plan_is_the_largest_rank_that_fits():
    configs = [{"method": "dora", "r": 4, "target_modules": ["a", "b"]}]
    small = vp.plan_ranks(TwoBranches(), configs, "5%", mode="uniform")
    large = vp.plan_ranks(TwoBranches(), configs, "30KB", mode="uniform")
    assert len(set(small.ranks.values())) == 1 and len(set(large.ranks.values())) == 1
    assert large.ranks["a"] > small.ranks["a"] >= 1
    for plan in (small, large):  # one rank more would not fit
        model = vp.inject(TwoBranches(), plan.configs)
        assert len(adapter_to_bytes(model, dtype=torch.float16)) <= plan.file_limit


@pytest.mark.parametrize("bits", [8, 4])
def test_rounded_factors_buy_more_rank_in_the_same_file(bits):
    """The budget is the file as stored: with the factors in 8- or 4-bit blocks, the same bytes hold a higher rank,
    the rounded file fits, and one rank more would not."""
    configs = [{"method": "dora", "r": 16, "target_modules": ["a", "b"]}]
    fp16 = vp.plan_ranks(TwoBranches(), configs, "5KB", mode="uniform")
    rounded = vp.plan_ranks(TwoBranches(), configs, "5KB", mode="uniform", bits=bits)
    assert rounded.bits == bits and rounded.record()["file_bits"] == bits
    assert rounded.ranks["a"] > fp16.ranks["a"] and rounded.ranks["a"] < 32  # below the cap: the budget binds
    assert f"factors in {bits}-bit blocks" in rounded.summary()

    def file_bytes(r: int) -> int:
        model = vp.inject(TwoBranches(), [{**configs[0], "r": r}])
        return len(adapter_to_bytes(model, dtype=torch.float16, bits=bits))

    assert file_bytes(rounded.ranks["a"]) <= rounded.file_limit  # with room for the trainer's own metadata:
    assert file_bytes(rounded.ranks["a"] + 1) + METADATA_MARGIN > rounded.file_limit


@pytest.mark.parametrize("budget", ["5", "five%", "0%", "100%", "-3KB", "12 parsecs", 0.05])
def test_bad_budget_is_a_one_line_error(budget):
    with pytest.raises(ValueError, match="peft.budget") as e:
        parse_budget(budget)
    assert "\n" not in str(e.value) and "'5%'" in str(e.value)
    with pytest.raises(ConfigError, match="peft.budget"):
        load_config("crops.yaml", {"peft.budget": budget}, check_files=False)


def test_budget_below_the_fixed_cost_and_without_lora_fail_clearly():
    with pytest.raises(ConfigError, match="rank_plan must be one of"):
        load_config("crops.yaml", {"peft.budget": "5%", "peft.rank_plan": "random"}, check_files=False)
    with pytest.raises(ConfigError, match="add a lora or dora method"):
        load_config("crops.yaml", {"peft.budget": "5%", "peft.methods": [{"method": "bottleneck"}]},
                    check_files=False)
    with pytest.raises(ConfigError, match="remove init: pissa or the budget"):
        load_config("crops.yaml", {"peft.budget": "5%", "peft.methods": [{"method": "dora", "init": "pissa"}]},
                    check_files=False)
    with pytest.raises(ValueError, match="raise the budget") as e:
        vp.plan_ranks(TwoBranches(), [{"method": "lora", "target_modules": ["a"]}], "10B", mode="uniform")
    assert "\n" not in str(e.value)


def test_training_with_a_budget_plans_prints_and_saves_the_ranks(tmp_path):
    """crops.yaml with ``peft.budget: 5%`` on 2 % of crop_weed: gradient-planned DoRA ranks, different per layer,
    the adapter file (factors in 4 bits, as crops.yaml stores them) within 5 % of the task model's fp16 weights and
    close to it, the plan in the file's metadata."""
    fast = {"imgsz": 64, "batch": 4, "nbs": 4, "warmup_epochs": 0, "workers": 0, "plots": False, "epochs": 1,
            "fraction": 0.02, "exist_ok": True}
    with Messages(logging.INFO) as log:
        summary = train("crops.yaml", project=str(tmp_path), name="budget", **fast, **{"peft.budget": "5%"})
    assert any("rank plan 'gradient' for budget 5%" in line for line in log.records)

    path = Path(summary.run_dir) / "weights" / "best.safetensors"
    tensors, meta = read_adapter(path)
    record, config = meta["budget"], meta["configs"][0]
    assert record["budget"] == "5%" and record["rank_plan"] == "gradient"
    assert record["file_bits"] == 4  # crops.yaml's peft.file_bits: the plan counts the factors as 4-bit blocks
    assert 0.9 * record["file_limit_bytes"] <= path.stat().st_size <= record["file_limit_bytes"]  # budget spent

    model = vp.load_adapter(vp.load_base("yolo11n.pt"), path)  # the file alone rebuilds the planned ranks
    task_params = vp.trainable_report(vp.merge(model)).total
    assert path.stat().st_size <= 0.05 * 2 * task_params
    ranks = {n: w.adapters["crops"].r for n, w in adapted_modules(model) if hasattr(w.adapters["crops"], "lora_A")}
    assert len(set(ranks.values())) > 2 and max(ranks.values()) > 8  # planned, not uniform; up to 2x r
    assert set(config["rank_pattern"]) <= set(ranks)  # exact module names
    assert all(n not in ranks for n in config["exclude_modules"] if n.startswith("model."))
    assert json.loads(json.dumps(record)) == record
