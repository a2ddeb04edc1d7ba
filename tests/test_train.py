"""Training through the Ultralytics pipeline, on real data at tiny sizes (coco8, 2% of crop_weed, 64 px, CPU).

What PEFT training must guarantee, each checked where it can break: the base stays bitwise the pretrained one
(weights and BatchNorm statistics, in the model, the EMA and the checkpoints), the optimizer sees only the adapter,
the adapter files hold what was trained, configured augmentations run inside Ultralytics' pipeline, an interrupted
run resumes where it stopped, and nothing touches the network.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import Messages
from ultralytics.nn.tasks import load_checkpoint

import visionpeft as vp
from visionpeft.inject import adapted_modules, trainable_parameter_names
from visionpeft.io import adapter_state_dict, read_adapter
from visionpeft.methods.trainable import TrainableCopy
from visionpeft.train import train
from visionpeft.train.config import PeftSpec
from visionpeft.train.summary import MAP50, MAP50_95

ROOT = Path(__file__).resolve().parents[1]
BASE = "yolo11n.pt"
FAST = {"imgsz": 64, "batch": 2, "nbs": 2, "warmup_epochs": 0, "workers": 0, "plots": False, "exist_ok": True}


@pytest.fixture(scope="module")
def fresh_base() -> dict[str, torch.Tensor]:
    return vp.base_state_dict(vp.load_base(BASE))


def assert_base_unchanged(model: torch.nn.Module, fresh: dict[str, torch.Tensor]) -> None:
    """Every base tensor, weights and BatchNorm running statistics alike, bitwise equal to the pretrained one."""
    got = vp.base_state_dict(model)
    assert got.keys() == fresh.keys()
    changed = [k for k, v in fresh.items() if not torch.equal(got[k].detach().cpu().to(v.dtype), v)]
    assert not changed, f"{len(changed)} base tensors changed, e.g. {changed[:5]}"


class Recorder:
    """Ultralytics callbacks keeping what the tests inspect: the trainer and the adapter before training."""

    def __init__(self) -> None:
        self.trainer = None
        self.initial: dict[str, torch.Tensor] = {}
        self.start_epoch = None

    def callbacks(self) -> dict:
        return {"on_pretrain_routine_end": self.setup_done, "on_train_start": self.started}

    def setup_done(self, trainer) -> None:
        self.trainer = trainer
        self.initial = {k: v.clone() for k, v in adapter_state_dict(trainer.model).items()}

    def started(self, trainer) -> None:
        self.start_epoch = trainer.start_epoch


@pytest.fixture(scope="module")
def coco8_run(tmp_path_factory):
    rec = Recorder()
    summary = train("coco8_smoke.yaml", callbacks=rec.callbacks(), project=str(tmp_path_factory.mktemp("runs")),
                    name="coco8", **FAST)
    return summary, rec


def test_coco8_run_writes_adapters_metrics_and_summary(coco8_run):
    summary, rec = coco8_run
    run = Path(summary.run_dir)
    wdir = run / "weights"
    for f in ("best.pt", "last.pt", "best.safetensors", "last.safetensors"):
        assert (wdir / f).is_file(), f
    assert not list(wdir.glob(".*tmp"))  # atomic writes leave no temporaries
    results = (run / "results.csv").read_text().splitlines()
    assert MAP50 in results[0] and MAP50_95 in results[0] and len(results) == 1 + 2
    saved = json.loads((run / "peft_summary.json").read_text())
    assert saved == summary.to_dict()
    assert summary.epochs == 2 and summary.map50 is not None and 0 <= summary.map50_95 <= summary.map50 <= 1
    trainable = trainable_parameter_names(rec.trainer.model)
    params = dict(rec.trainer.model.named_parameters())
    assert summary.trainable_params == sum(params[n].numel() for n in trainable) > 0
    assert summary.adapter_bytes == (wdir / "best.safetensors").stat().st_size < summary.checkpoint_bytes
    # the deliverable is fp16 (like best.pt), the resume file fp32
    assert {v.dtype for v in read_adapter(wdir / "best.safetensors")[0].values()} == {torch.float16}
    assert {v.dtype for v in read_adapter(wdir / "last.safetensors")[0].values()} == {torch.float32}
    assert summary.seconds_per_epoch > 0 and summary.peak_rss_mib > 0
    assert (run / "visionpeft.yaml").is_file() and (run / "dataset.yaml").is_file()


def test_base_bitwise_unchanged_in_model_ema_and_checkpoints(coco8_run, fresh_base):
    """Guards the re-freeze before the optimizer (Ultralytics unfreezes everything) and frozen BN in eval mode."""
    summary, rec = coco8_run
    assert_base_unchanged(rec.trainer.model, fresh_base)
    assert_base_unchanged(rec.trainer.ema.ema, fresh_base)
    for ckpt in ("best.pt", "last.pt"):  # fp16 copies; the pretrained base is fp16-exact, so they must match too
        model, _ = load_checkpoint(str(Path(summary.run_dir) / "weights" / ckpt))
        assert_base_unchanged(model, fresh_base)


def test_optimizer_holds_exactly_the_adapter(coco8_run):
    _, rec = coco8_run
    model = rec.trainer.model
    trainable = {id(p) for n, p in model.named_parameters() if n in trainable_parameter_names(model)}
    in_optimizer = [id(p) for g in rec.trainer.optimizer.param_groups for p in g["params"]]
    assert len(in_optimizer) == len(set(in_optimizer)) and set(in_optimizer) == trainable
    assert all(not p.requires_grad for n, p in model.named_parameters() if id(p) not in trainable)


def test_adapter_trained_and_file_reproduces_the_ema(coco8_run, images):
    summary, rec = coco8_run
    tensors, meta = read_adapter(Path(summary.run_dir) / "weights" / "last.safetensors")
    assert tensors.keys() == rec.initial.keys() and meta["adapter_name"] == "coco8" and meta["epoch"] == 1
    changed = [k for k, v in tensors.items() if not torch.equal(v, rec.initial[k])]
    assert len(changed) == len(tensors), f"{len(tensors) - len(changed)} adapter tensors never trained"
    loaded = vp.load_adapter(vp.load_base(BASE), Path(summary.run_dir) / "weights" / "last.safetensors").eval()
    ema = copy.deepcopy(rec.trainer.ema.ema).float().cpu().eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)[0], ema(images)[0], rtol=1e-4, atol=1e-4)


def test_channels_last_on_cpu_trains_nhwc_and_saves_plain_files(tmp_path, images, fresh_base):
    """``channels_last=True`` on the CPU, which Ultralytics ignores with a warning: the model (adapters included) and
    its EMA train in NHWC, no warning, the flag stays recorded, and the adapter file reproduces the EMA."""

    rec = Recorder()
    with Messages() as log:
        summary = train("coco8_smoke.yaml", callbacks=rec.callbacks(), project=str(tmp_path), name="nhwc",
                        channels_last=True, **{**FAST, "epochs": 1})
    assert not [m for m in log.records if "channels_last" in m], log.records
    trainer = rec.trainer
    assert trainer.args.channels_last is True
    for model in (trainer.model, trainer.ema.ema):
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    lora_a = [p for n, p in trainer.model.named_parameters() if n.endswith("lora_A.weight") and p.shape[-1] > 1]
    assert lora_a and all(p.is_contiguous(memory_format=torch.channels_last) for p in lora_a)
    assert_base_unchanged(trainer.ema.ema, fresh_base)
    loaded = vp.load_adapter(vp.load_base(BASE), Path(summary.run_dir) / "weights" / "last.safetensors").eval()
    ema = copy.deepcopy(trainer.ema.ema).float().cpu().eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)[0], ema(images)[0], rtol=1e-4, atol=1e-4)


def test_crop_weed_fraction_with_field_augmentations(tmp_path, fresh_base):
    """The reference config on 2% of crop_weed: new class head, and its albumentations in Ultralytics' pipeline."""
    from ultralytics.data.augment import Albumentations

    rec = Recorder()
    summary = train("crops.yaml", callbacks=rec.callbacks(), project=str(tmp_path), name="cw",
                    **{**FAST, "epochs": 1, "fraction": [0.02, 0.05], "batch": 4, "nbs": 4, "peft.full_lr_mult": 1,
                       "peft.loraplus_lr_ratio": 4, "peft.ema_tau": 2.5})
    trainer = rec.trainer
    assert trainer.model.names == {0: "crop", 1: "weed"} and summary.adapter_name == "crops"
    # the EMA kept Ultralytics' update count and took the run's time constant (2.5 optimizer steps)
    assert trainer.ema.decay.tau == 2.5 and trainer.ema.updates > 0
    assert trainer.ema.decay(trainer.ema.updates) == pytest.approx(0.9999 * (1 - math.exp(-trainer.ema.updates / 2.5)))

    def walk(t):
        for x in getattr(t, "transforms", []):
            yield x
            yield from walk(x)

    hooks = [t for t in walk(trainer.train_loader.dataset.transforms) if isinstance(t, Albumentations)]
    assert len(hooks) == 1
    spec = yaml.safe_load((ROOT / "configs" / "crops.yaml").read_text())["augmentations"]
    configured = [next(iter(item)) for item in spec]
    assert [type(t).__name__ for t in hooks[0].transform.transforms] == configured

    heads = {n: w for n, w in adapted_modules(trainer.ema.ema) if isinstance(w.adapters["crops"], TrainableCopy)}
    assert heads and all(w.adapters["crops"].module.out_channels == 2 for w in heads.values())
    for name, w in heads.items():
        for k, v in w.adapters["crops"].state_dict().items():
            assert not torch.equal(v, rec.initial[f"{name}/{k}"]), f"class head {name}.{k} did not train"
    assert_base_unchanged(trainer.ema.ema, fresh_base)
    assert summary.map50 is not None and (Path(summary.run_dir) / "weights" / "best.safetensors").is_file()
    # crops.yaml ships a 4-bit file (peft.file_bits): the factors in blocks, the rest float16; it loads
    best = Path(summary.run_dir) / "weights" / "best.safetensors"
    meta = read_adapter(best)[1]
    assert meta["rounded"]["bits"] == 4 and meta["rounded"]["tensors"]
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in meta["rounded"]["tensors"])
    assert vp.load_adapter(vp.load_base(BASE), best).names == {0: "crop", 1: "weed"}

    # full_lr_mult=1: the class outputs (trained in full) at Ultralytics' own rate; loraplus_lr_ratio=4: lora_B at
    # 4x crops.yaml's x3, the rest of the adapters at x3
    lr0 = trainer.args.lr0  # what optimizer=auto chose
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    in_full = {id(p) for w in trainer.model.modules() if isinstance(w, TrainableCopy) for p in w.parameters()}
    seen = set()
    for g in trainer.optimizer.param_groups:
        for p in g["params"]:
            want = 1 if id(p) in in_full else 12 if ".lora_B." in names[id(p)] else 3
            assert g["initial_lr"] == pytest.approx(want * lr0), names[id(p)]
            seen.add(want)
    assert seen == {1, 3, 12}


def test_resume_continues_an_interrupted_run(tmp_path, fresh_base):
    """Stop after the epoch-1 checkpoint (KeyboardInterrupt), resume=True: epochs 2-3 run on the fp32 adapters,
    the trained model's from the state file, the EMA's from last.safetensors (last.pt holds an fp16 EMA only)."""
    from visionpeft.train import resume_state

    def interrupt(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt

    args = {**FAST, "epochs": 3, "project": str(tmp_path), "name": "res"}
    with pytest.raises(KeyboardInterrupt):
        train("coco8_smoke.yaml", callbacks={"on_model_save": interrupt}, **args)
    wdir = tmp_path / "res" / "weights"
    first_tensors, first_meta = read_adapter(wdir / "last.safetensors")
    assert first_meta["epoch"] == 0 and len((tmp_path / "res" / "results.csv").read_text().splitlines()) == 2
    state, state_meta = resume_state.read(wdir / "last.state.safetensors")
    trained = {k.removeprefix("model/"): v for k, v in state.items() if k.startswith("model/")}
    assert state_meta["epoch"] == 0 and trained.keys() == first_tensors.keys()

    rec = Recorder()
    ema: dict[str, torch.Tensor] = {}
    summary = train("coco8_smoke.yaml", resume=True, project=str(tmp_path), name="res",
                    callbacks={**rec.callbacks(), "on_train_start": [
                        rec.started, lambda t: ema.update(adapter_state_dict(t.ema.ema))]})
    assert rec.start_epoch == 1 and summary.run_dir == str(tmp_path / "res")
    for k, v in first_tensors.items():  # the fp32 adapters of epoch 1, not the fp16 copy in last.pt
        assert torch.equal(rec.initial[k], trained[k]) and torch.equal(ema[k], v), k
    assert any(not torch.equal(trained[k], v) for k, v in first_tensors.items())  # trained model != its EMA
    rows = (tmp_path / "res" / "results.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3]
    assert read_adapter(wdir / "last.safetensors")[1]["epoch"] == 2 and (wdir / "best.safetensors").is_file()
    assert_base_unchanged(rec.trainer.model, fresh_base)
    assert_base_unchanged(rec.trainer.ema.ema, fresh_base)


def test_model_train_keeps_adapters_injected_by_hand(tmp_path, fresh_base):
    """``YOLO.train(trainer=PeftDetectionTrainer)`` rebuilds the model through get_model: the hand-made adapter
    must be the one trained, and the only thing trained."""
    from ultralytics import YOLO

    from visionpeft.train import PeftDetectionTrainer

    yolo = YOLO(str(vp.models.resolve_weights(BASE)))
    vp.inject(yolo.model, vp.LoraConfig(r=2), adapter_name="hand")
    rec = Recorder()
    for event, fn in rec.callbacks().items():
        yolo.add_callback(event, fn)
    yolo.train(trainer=PeftDetectionTrainer, data="coco8.yaml", epochs=1, project=str(tmp_path), name="hand",
               **{k: v for k, v in FAST.items() if k != "exist_ok"})
    assert read_adapter(tmp_path / "hand" / "weights" / "last.safetensors")[1]["adapter_name"] == "hand"
    assert set(vp.peft_state(rec.trainer.model)["adapters"]) == {"hand"}
    assert_base_unchanged(rec.trainer.ema.ema, fresh_base)


GUARD = textwrap.dedent("""
    import json, runpy, socket, sys
    attempts = []
    LOCAL = {"localhost", "127.0.0.1", "::1", None}
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOCAL:
            attempts.append(str(address)); raise OSError("network blocked by test")
        return real_connect(self, address)
    def getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL:
            attempts.append(f"dns:{host}"); raise socket.gaierror("network blocked by test")
        return real_getaddrinfo(host, *args, **kwargs)
    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    print("ATTEMPTS=" + json.dumps(attempts))
    sys.exit(code)
""")


def test_cli_trains_offline_with_plots(tmp_path):
    """``scripts/train.py`` end to end with plots, a fresh Ultralytics config dir (no cached fonts) and every
    non-loopback connection or DNS lookup recorded and refused."""
    guard = tmp_path / "guard.py"
    guard.write_text(GUARD)
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "ultralytics_config")}
    cmd = [sys.executable, str(guard), str(ROOT / "scripts" / "train.py"), "--cfg", "coco8_smoke.yaml", "epochs=1",
           "plots=True", f"project={tmp_path}", "name=cli"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    attempts = json.loads(out.stdout.rsplit("ATTEMPTS=", 1)[1])
    assert attempts == []
    run = tmp_path / "cli"
    for f in ("results.png", "labels.jpg", "val_batch0_pred.jpg", "weights/best.safetensors", "peft_summary.json"):
        assert (run / f).is_file(), f
    assert "best mAP50" in out.stdout + out.stderr


def test_trainer_with_everything_trainable_reproduces_ultralytics_full_fine_tuning(tmp_path):
    """visionpeft's trainer changes what trains, not how: with every conv and BatchNorm trained (``trainable``
    copies) and the new class outputs at the same init, its losses are plain Ultralytics' batch for batch."""
    from visionpeft.paths import resolve_weights
    from visionpeft.train.baseline import BaselineDetectionTrainer
    from visionpeft.train.trainer import PeftDetectionTrainer

    args = {**FAST, "model": str(resolve_weights(BASE)), "data": "crop_weed.yaml", "fraction": 0.01, "epochs": 1,
            "nbs": 4, "val": False, "seed": 0, "deterministic": True, "project": str(tmp_path)}
    peft = {"methods": [{"method": "trainable", "target_types": ["Conv2d"], "exclude_modules": ["dfl.conv"]}],
            "bn": "train", "lr_mult": 1.0}

    def zero_class_outputs(trainer) -> None:  # Ultralytics draws them at random; visionpeft starts them at zero
        for branch in trainer.model.model[-1].cv3:
            branch[2].weight.data.zero_()

    def record(out: list):
        def on_batch_end(trainer) -> None:  # loss_items: a dict or a tensor, by Ultralytics release
            items = trainer.loss_items
            out.append(torch.as_tensor(list(items.values()) if isinstance(items, dict) else items).clone())
        return on_batch_end

    losses = {"full": [], "peft": []}
    for kind in losses:
        trainer = (BaselineDetectionTrainer(overrides={**args, "name": kind}) if kind == "full"
                   else PeftDetectionTrainer(overrides={**args, "name": kind}, peft=peft))
        if kind == "full":
            trainer.add_callback("on_pretrain_routine_end", zero_class_outputs)
        trainer.add_callback("on_train_batch_end", record(losses[kind]))
        trainer.train()
    assert len(losses["full"]) == len(losses["peft"]) >= 4  # two optimizer steps at least (nbs 4, batch 2)
    torch.testing.assert_close(torch.stack(losses["peft"]), torch.stack(losses["full"]), rtol=1e-5, atol=1e-6)


def stream_states() -> tuple:
    """Python's, numpy's and torch's random stream states, comparable with ``==`` (numpy's key as an array)."""
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def test_eva_init_starts_from_the_train_images_and_leaves_the_runs_draws_as_they_were(tmp_path):
    """``init: eva`` sets each ``A`` from 64 unaugmented train images before training; the run's random streams
    (Python's, which Ultralytics' augmentations read, numpy's, torch's) are where the zero init leaves them, so the
    two runs train on the same batches and augmentations."""
    states, starts = {}, {}

    def grab(init):
        def callback(trainer):
            states[init] = stream_states()
            starts[init] = {n: w.adapters["crops"].lora_A.weight.detach().clone()
                            for n, w in adapted_modules(trainer.model) if hasattr(w.adapters["crops"], "lora_A")}
        return callback

    for init in ("zero", "eva"):
        with Messages(logging.INFO) as log:
            train("crops.yaml", callbacks={"on_pretrain_routine_end": grab(init)}, project=str(tmp_path), name=init,
                  epochs=1, fraction=0.02, val=False, **FAST,
                  **{"peft.methods": [{"method": "dora", "r": 4, "alpha": 8, "init": init}]})
        told = [line for line in log.records if "init eva" in line]
        assert told == ([f"visionpeft: init eva: {len(starts[init])} adapters start along their inputs' principal "
                         "directions"] if init == "eva" else [])
    (py0, np0, t0), (py1, np1, t1) = states["zero"], states["eva"]
    assert py0 == py1 and (np0 == np1).all() and torch.equal(t0, t1)
    assert all(not torch.equal(starts["eva"][n], a) for n, a in starts["zero"].items())
    for a in starts["eva"].values():  # orthogonal rows of the default draw's norm
        a = a.flatten(1)
        assert abs(float(a.norm(dim=1).mean()) - 3 ** -0.5) < 1e-4


def test_min_images_leaves_norm_stats_out_of_a_small_split_and_says_so(tmp_path):
    """A method with ``min_images`` trains only on a train split of at least that many images, and the run says
    which at the start; counting the split leaves the run's random streams where they were."""
    split = 18  # 2 % of crop_weed's 910 train images
    states, kinds = {}, {}

    def grab(label):
        def callback(trainer):
            states[label] = stream_states()
            kinds[label] = {type(w.adapters["crops"]).__name__ for _, w in adapted_modules(trainer.model)}
        return callback

    for label, least in (("plain", 0), ("in", split), ("out", split + 1)):
        stats = {"method": "norm_stats", "normalize": "renorm", **({"min_images": least} if least else {})}
        with Messages(logging.INFO) as log:
            train("crops.yaml", callbacks={"on_pretrain_routine_end": grab(label)}, project=str(tmp_path),
                  name=label, epochs=1, fraction=0.02, val=False, **FAST,
                  **{"peft.methods": [{"method": "dora", "r": 2, "alpha": 4}, stats]})
        told = [line for line in log.records if line.startswith("visionpeft: norm_stats")]
        verdict = {"plain": None, "in": "trains", "out": "left out"}[label]
        assert told == ([f"visionpeft: norm_stats {verdict}: {split} train images, min_images {least}"] if verdict
                        else [])
        saved = vp.read_adapter(tmp_path / label / "weights" / "best.safetensors")[1]["configs"]
        assert [c["method"] for c in saved] == (["dora"] if label == "out" else ["dora", "norm_stats"])
    assert kinds["in"] == kinds["plain"] and "NormStatsAdapter" in kinds["in"]
    assert "NormStatsAdapter" not in kinds["out"]
    for label in ("in", "out"):
        (py0, np0, t0), (py1, np1, t1) = states["plain"], states[label]
        assert py0 == py1 and (np0 == np1).all() and torch.equal(t0, t1)
    with pytest.raises(ValueError, match="Every method of peft.methods needs more train images than the 18"):
        PeftSpec(methods=[{"method": "norm_stats", "min_images": 19}]).configs(18)


def test_a_budget_plans_ranks_without_changing_the_runs_draws(tmp_path):
    """``peft.budget`` probes train images for its plan before the first epoch: Python's stream (which Ultralytics'
    augmentations read) and numpy's are where a run without a budget leaves them, so planned and uniform ranks
    train on the same augmentations (torch's global stream differs by the adapters' own random init: other ranks
    draw other counts; the train loader shuffles with its own generator)."""
    states = {}

    def grab(label):
        def callback(trainer):
            states[label] = stream_states()[:2]  # Python's and numpy's
        return callback

    for label, budget in (("plain", {}), ("planned", {"peft.budget": "5%"})):
        train("crops.yaml", callbacks={"on_pretrain_routine_end": grab(label)}, project=str(tmp_path), name=label,
              epochs=1, fraction=0.02, val=False, **FAST,
              **{"peft.methods": [{"method": "dora", "r": 2, "alpha": 4}], **budget})
    assert "budget" in vp.read_adapter(tmp_path / "planned" / "weights" / "best.safetensors")[1]
    (py0, np0), (py1, np1) = states["plain"], states["planned"]
    assert py0 == py1 and (np0 == np1).all()


def test_streams_kept_puts_every_random_stream_back_even_when_the_block_fails():
    """Work before the first epoch (counting or probing train images) runs inside ``streams_kept``: whether it
    ends or fails, Python's, numpy's and torch's streams are where they were, so the run draws what it would have."""
    from visionpeft.train.trainer import streams_kept

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    def seed() -> None:
        random.seed(3)
        np.random.seed(3)
        torch.manual_seed(3)

    seed()
    expected = draws()
    seed()
    with pytest.raises(RuntimeError, match="probe failed"), streams_kept():
        draws()
        raise RuntimeError("probe failed")
    assert draws() == expected
