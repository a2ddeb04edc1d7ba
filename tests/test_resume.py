"""Resume and run folders: a resumed run is the run it continues (kill -9 + resume == uninterrupted, bit for bit on
CPU), ``resume=True`` finds Ultralytics' numbered run folders, resume warns only about settings it really ignores,
and one live run holds a run folder at a time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import Messages

from visionpeft.io import read_adapter
from visionpeft.train import load_config, train
from visionpeft.train import run as run_module
from visionpeft.train.run import CONFIG_NAME, find_last_checkpoint
from visionpeft.train.runlock import LOCK_NAME, RunFolderLockedError, acquire, release

ROOT = Path(__file__).resolve().parents[1]
FAST = {"imgsz": 64, "batch": 2, "nbs": 2, "warmup_epochs": 0, "workers": 0, "plots": False, "exist_ok": True}
# 18 crop_weed images (albumentations of crops.yaml), 5 batches an epoch, an optimizer step every 3 batches (steps
# and gradients cross epochs), SGD (momentum, which last.pt stores in fp16), mosaic closed from epoch 3 of 5, an
# EMA that really averages (ema_tau scaled to the run's ~9 steps), so the resumed EMA must be the interrupted one's.
EXACT = {**FAST, "epochs": 5, "fraction": [0.02, 0.05], "batch": 4, "nbs": 12, "optimizer": "SGD",
         "close_mosaic": 3, "peft.ema_tau": "auto"}

KILL_AFTER_FIRST_EPOCH = textwrap.dedent("""
    import json, os, signal, sys
    from visionpeft.train import train

    def kill(trainer):
        if trainer.epoch == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    train("crops.yaml", callbacks={"on_model_save": kill}, **json.loads(sys.argv[1]))
""")


def rows(run: Path) -> list[list[str]]:
    """results.csv without its wall-clock column."""
    return [r.split(",")[:1] + r.split(",")[2:] for r in (run / "results.csv").read_text().splitlines()]


def stop_after(epoch: int):
    def stop(trainer):
        if trainer.epoch == epoch:
            raise KeyboardInterrupt
    return {"on_model_save": stop}


def test_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    """kill -9 after epoch 1, resume, stop after epoch 2, resume, stop after epoch 3, move the folder, resume: the
    final adapter and every results.csv row equal those of one uninterrupted run, bit for bit. The three resumes
    start before, at and after the epoch where Ultralytics closes mosaic, which rebuilds the augmentations."""
    args = {**EXACT, "project": str(tmp_path)}
    train("crops.yaml", name="straight", **args)

    proc = subprocess.Popen([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH, json.dumps({**args, "name": "cut"})],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    run = tmp_path / "cut"
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid  # left by kill -9, to be taken over
    assert len(rows(run)) == 2 and (run / "weights" / "last.state.safetensors").is_file()

    for stop in (1, 2):
        with pytest.raises(KeyboardInterrupt):
            train("crops.yaml", callbacks=stop_after(stop), resume=True, project=str(tmp_path), name="cut")
        assert not (run / LOCK_NAME).exists()  # released although training raised
        assert len(rows(run)) == 2 + stop

    moved = tmp_path / "moved"
    run.rename(moved)  # a resumed run continues in the folder its checkpoint is in
    summary = train("crops.yaml", resume=str(moved), project=str(tmp_path), name="cut")
    assert summary.run_dir == str(moved) and not run.exists() and not (moved / LOCK_NAME).exists()

    straight, _ = read_adapter(tmp_path / "straight" / "weights" / "last.safetensors")
    resumed, meta = read_adapter(moved / "weights" / "last.safetensors")
    assert meta["epoch"] == 4 and straight.keys() == resumed.keys()
    differ = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not differ, f"{len(differ)} adapter tensors differ, e.g. {differ[:3]}"
    assert rows(moved) == rows(tmp_path / "straight")


def test_a_resumed_dream_run_distills_on_the_same_dreams_in_the_same_order(tmp_path, caplog):
    """peft.distill_dreams: the resumed run reads the dreams its folder holds and takes them in the order the
    uninterrupted run did, in the same zoomed and flipped views (3 dreams, one a batch, 5 batches an epoch: a
    restarted count would shift them)."""
    args = {**EXACT, "project": str(tmp_path), "peft.keep_base": "classes", "peft.distill_base": 1.0,
            "peft.distill_dreams": 3, "peft.dream_steps": 2, "peft.dream_augment": True}
    train("crops.yaml", name="straight", **args)
    with pytest.raises(KeyboardInterrupt):
        train("crops.yaml", callbacks=stop_after(1), name="cut", **args)
    caplog.clear()
    train("crops.yaml", resume=True, project=str(tmp_path), name="cut")
    assert "3 synthetic images of the base's BatchNorm statistics (read" in caplog.text
    straight, _ = read_adapter(tmp_path / "straight" / "weights" / "last.safetensors")
    resumed, _ = read_adapter(tmp_path / "cut" / "weights" / "last.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert rows(tmp_path / "cut") == rows(tmp_path / "straight")


def test_resume_true_finds_ultralytics_numbered_runs(tmp_path):
    """Ultralytics numbers a second run of ``crops`` ``crops-2`` (increment_path); resume=True picks the newest."""
    from ultralytics.utils.files import increment_path

    config = load_config("coco8_smoke.yaml", {"project": str(tmp_path), "name": "crops"})
    folders = {}
    for i, name in enumerate(["crops", None, "crops_old", "crops-x"]):
        folder = increment_path(tmp_path / "crops") if name is None else tmp_path / name
        (folder / "weights").mkdir(parents=True)
        (folder / "weights" / "last.pt").write_bytes(b"")
        os.utime(folder / "weights" / "last.pt", (time.time() + 10 * i,) * 2)
        folders[name] = folder
    assert folders[None].name != "crops2"  # the installed Ultralytics' own numbering
    assert find_last_checkpoint(config, True) == folders[None] / "weights" / "last.pt"
    (folders[None] / "weights" / "last.pt").unlink()
    assert find_last_checkpoint(config, True) == folders["crops"] / "weights" / "last.pt"


def test_resume_warns_only_about_settings_that_differ(tmp_path):
    """``epochs=5`` or ``peft.lr_mult`` as the interrupted run had them are no reason to warn; a different value
    (which resume ignores) is."""
    from ultralytics.cfg import get_cfg

    overrides = {"epochs": 5, "fraction": 0.5, "peft.lr_mult": 2, "imgsz": 96, "project": str(tmp_path)}
    config = load_config("coco8_smoke.yaml", overrides)
    (tmp_path / "weights").mkdir()
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(vars(get_cfg(overrides=config.trainer_overrides()))))
    (tmp_path / CONFIG_NAME).write_text(yaml.safe_dump(config.to_dict()))
    previous = run_module.previous_settings(tmp_path / "weights" / "last.pt")

    with Messages() as log:
        args = run_module._explicit_resume_args(overrides, config, previous)
    assert args == {"imgsz": 96} and log.records == []

    changed = {**overrides, "epochs": 6, "peft.lr_mult": 3}
    with Messages() as log:
        run_module._explicit_resume_args(changed, load_config("coco8_smoke.yaml", changed), previous)
    assert len(log.records) == 1 and "['epochs', 'peft.lr_mult']" in log.records[0]


@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_live_run_holds_its_folder(tmp_path, other_process):
    """A run folder locked by a live process is refused before anything in it is touched, with one line naming
    the folder, the holder and the way out."""
    run = tmp_path / "busy"
    run.mkdir()
    (run / "results.csv").write_text("epoch,time\n1,2.0\n")
    holder = {"pid": other_process, "host": socket.gethostname(), "started": "earlier"}
    (run / LOCK_NAME).write_text(json.dumps(holder))
    with pytest.raises(RunFolderLockedError) as e:
        train("coco8_smoke.yaml", project=str(tmp_path), name="busy", **{**FAST, "epochs": 1})
    message = str(e.value)
    assert "\n" not in message and str(run) in message and f"pid {other_process}" in message and "name=" in message
    assert (run / "results.csv").read_text() == "epoch,time\n1,2.0\n" and not (run / "args.yaml").exists()
    assert json.loads((run / LOCK_NAME).read_text()) == holder


def test_lock_is_exclusive_taken_over_when_stale_and_released(tmp_path, other_process):
    lock = acquire(tmp_path)
    with pytest.raises(RunFolderLockedError):  # held by this process: a second trainer here is refused too
        acquire(tmp_path)
    release(lock)
    assert not lock.exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    lock = acquire(tmp_path)  # its process is gone
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": other_process, "host": socket.gethostname()}))
    release(lock)  # another process's lock now: left alone
    assert lock.exists()
