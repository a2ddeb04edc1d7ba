"""Multi-GPU training through Ultralytics' DDP launch, checked on CPU (no GPU on the test machines).

1. The file Ultralytics generates for the DDP workers rebuilds a ``PeftDetectionTrainer`` that trains exactly the
   launcher's spec and adapter initialisation, and hides the base from DDP.
2. Two CPU processes (gloo) run one training step of the PEFT model wrapped in ``DistributedDataParallel`` as
   Ultralytics wraps it: the adapters stay identical across ranks, only they are synchronised, the base is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from ultralytics.utils.dist import ddp_cleanup, find_free_network_port, generate_ddp_file

from visionpeft.inject import trainable_parameter_names
from visionpeft.io import adapter_state_dict
from visionpeft.train import ddp
from visionpeft.train.runlock import LOCK_NAME
from visionpeft.train.trainer import PeftDetectionTrainer, PeftSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = PeftSpec(adapter_name="ddp", methods=[{"method": "lora", "r": 4, "alpha": 8}], lr_mult=3.0)
FAST = {"imgsz": 64, "batch": 2, "nbs": 2, "warmup_epochs": 0, "workers": 0, "plots": False, "device": "cpu"}


def adapter_hash(model: torch.nn.Module) -> str:
    sd = adapter_state_dict(model)
    return hashlib.sha256(b"".join(k.encode() + v.numpy().tobytes() for k, v in sorted(sd.items()))).hexdigest()


def worker_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


PROBE = """\
import hashlib, json
from visionpeft.io import adapter_state_dict
from visionpeft.train.ddp import IGNORE_ATTR
from visionpeft.train.runlock import LOCK_NAME
from visionpeft.train.trainer import PeftDetectionTrainer
trainer.setup_model()  # what _setup_train does first; the DDP wrap comes next
sd = adapter_state_dict(trainer.model)
print("PROBE " + json.dumps({
    "type": type(trainer).__name__, "peft": trainer.peft.to_dict(),
    "hash": hashlib.sha256(b"".join(k.encode() + v.numpy().tobytes() for k, v in sorted(sd.items()))).hexdigest(),
    "ignored": sorted(getattr(trainer.model, IGNORE_ATTR, [])),
    "batch_callbacks": trainer.callbacks["on_train_batch_start"].count(PeftDetectionTrainer._batch_started),
    "locked": (trainer.save_dir / LOCK_NAME).is_file(),
    "restored": (trainer.save_dir / "visionpeft.yaml").read_text(),
}))
"""


def test_generated_ddp_file_rebuilds_the_exact_peft_trainer(tmp_path):
    trainer = PeftDetectionTrainer(overrides={"model": "yolo11n.yaml", "data": "coco8.yaml", "project": str(tmp_path),
                                              "name": "ddp", **FAST}, peft=SPEC)
    (trainer.save_dir / "visionpeft.yaml").write_text("written by the launcher\n")
    ddp.prepare_launch(trainer)  # what train() does before Ultralytics' launch when device=0,1,...
    assert isinstance(trainer.model, torch.nn.Module) and trainer.trainable.trainable > 0
    assert not (trainer.save_dir / LOCK_NAME).exists()  # released: rank 0 takes it
    expected = {"hash": adapter_hash(trainer.model), "trainable": trainable_parameter_names(trainer.model)}
    shutil.rmtree(trainer.save_dir)  # as ultralytics.utils.dist.generate_ddp_command does for a fresh run
    file = generate_ddp_file(trainer)
    try:
        text = Path(file).read_text()
        assert text.count("    trainer.train()\n") == 1
        probe = Path(file).with_name(Path(file).stem + "_probe.py")
        probe.write_text(text.replace("    trainer.train()\n", textwrap.indent(PROBE, "    ")))
        # the environment torch.distributed.run gives rank 0 (read by ultralytics.utils at import)
        out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=300,
                             env=worker_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2"))
        probe.unlink()
    finally:
        ddp_cleanup(trainer, file)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("PROBE "))[6:])
    assert got["type"] == "PeftDetectionTrainer"
    assert got["peft"] == SPEC.to_dict()  # not the default spec of a trainer built without peft=
    assert got["hash"] == expected["hash"]  # the launcher's adapter initialisation, on every rank
    assert got["batch_callbacks"] == 1
    assert got["locked"] and got["restored"] == "written by the launcher\n"
    assert got["ignored"] and not set(got["ignored"]) & expected["trainable"]
    assert {n for n in got["ignored"] if ".adapters." in n} == set()  # the base only (one adapter here)


WORKER = """\
import json, os, sys
import torch
import torch.distributed as dist
from torch import nn
import visionpeft as vp
from visionpeft.inject import freeze, trainable_parameter_names
from visionpeft.io import adapter_state_dict
from visionpeft.train import ddp
from visionpeft.train.trainer import PeftSpec

rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
torch.manual_seed(0)  # same base and adapter init on both ranks (the trainer's come pickled from the launcher)
spec = PeftSpec.from_dict(json.loads(sys.argv[2]))
model = spec.inject(vp.load_base("yolo11n.yaml", nc=3), {0: "a", 1: "b", 2: "c"})
with torch.no_grad():  # LoRA B starts at zero: give A a gradient too
    for n, p in model.named_parameters():
        if ".adapters." in n:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
base = {k: v.clone() for k, v in vp.base_state_dict(model).items()}
start = {k: v.clone() for k, v in adapter_state_dict(model).items()}
for p in model.parameters():  # as Ultralytics' _setup_train leaves them
    p.requires_grad_(True)
ddp.ignore_frozen(model)  # PeftDetectionTrainer.setup_model in a worker
wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, broadcast_buffers=False)
freeze(model)  # PeftDetectionTrainer.build_optimizer, after the wrap
ddp.forget_ignored(model)
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
wrapped.train()
x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(100 + rank))  # different data per rank
def leaves(o):
    if isinstance(o, torch.Tensor):
        return [o]
    return [t for v in (o.values() if isinstance(o, dict) else o) for t in leaves(v)]
sum(t.float().pow(2).mean() for t in leaves(wrapped(x))).backward()
opt.step()
synced = {n for n, _ in wrapped.module.named_parameters() if n not in wrapped.parameters_to_ignore}
after = adapter_state_dict(model)
gathered = [None, None]
dist.all_gather_object(gathered, {k: v.tolist() for k, v in after.items()})
base_now = vp.base_state_dict(model)
json.dump({
    "same_as_other_rank": gathered[0] == gathered[1],
    "adapter_moved": any(not torch.equal(after[k], start[k]) for k in start),
    "base_changed": [k for k, v in base.items() if not torch.equal(base_now[k], v)],
    "synced_is_adapter": synced == trainable_parameter_names(model),
    "ignore_attr_left": hasattr(model, ddp.IGNORE_ATTR),
}, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
dist.destroy_process_group()
"""


def test_gloo_step_keeps_adapters_identical_and_base_frozen(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(find_free_network_port()), str(script), str(tmp_path), json.dumps(SPEC.to_dict())]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=worker_env())
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["same_as_other_rank"], f"rank {rank}: adapters differ across ranks after the step"
        assert got["adapter_moved"]
        assert got["base_changed"] == []
        assert got["synced_is_adapter"], "DDP synchronises tensors besides the adapter"
        assert not got["ignore_attr_left"]
