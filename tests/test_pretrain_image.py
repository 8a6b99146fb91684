"""Pretext training with Ray Train on 2 local workers: kill after a checkpoint, resume,
and the exported encoder separates style (e_STY) from content (e_SEM)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from umair import storage
from umair.image.checkpoint import load_encoder
from umair.image.encoder import encode
from umair.image.preprocess import decode_image
from umair.sample.world import write_world

UMAIR = str(Path(sys.executable).parent / "umair")
EPOCHS = 14
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Run the job, SIGKILL it after its first checkpoint, rerun it to completion."""
    root = tmp_path_factory.mktemp("pretrain")
    world = write_world(str(root / "world"), "small", seed=5, progress=False)  # 600 illustrations, 48 px
    conf = {
        "catalogue": str(root / "world" / "illustrations.parquet"),
        "output": str(root / "encoder"),
        "encoder": {"backbone": "resnet18", "image_size": 48},
        "epochs": EPOCHS,
        "batch_size": 32,
        "lr": 0.002,
        "num_workers": 2,
        "seed": 0,
        "run_name": "t-pretrain",
        "checkpoint_dir": str(root / "ray_results"),
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "t-pretrain"},
    }
    (root / "conf.yaml").write_text(yaml.safe_dump(conf))
    cmd = [UMAIR, "pretrain-image", "--config", str(root / "conf.yaml")]
    run_dir = root / "ray_results" / "t-pretrain"
    with open(root / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 400
        while time.time() < deadline and first.poll() is None:
            if run_dir.exists() and any(p.name.startswith("checkpoint_") for p in run_dir.iterdir()):
                time.sleep(1.0)  # let the checkpoint's snapshot be written
                break
            time.sleep(0.5)
        assert first.poll() is None, (root / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    second = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {
        "root": root,
        "world": world,
        "first_log": (root / "first.log").read_text(),
        "second": second.stdout + second.stderr,
        "conf": conf,
    }


def test_killed_run_resumes_from_its_checkpoint(pretrained):
    out = pretrained["second"]
    assert "resuming from the checkpoint of epoch" in out
    resumed_from = int(out.split("resuming from the checkpoint of epoch ")[1].split(";")[0])
    assert 0 <= resumed_from < EPOCHS - 1
    # The rerun trained only the epochs after the checkpoint.
    assert f"epoch {resumed_from}: " not in out.split("resuming from")[1]
    assert f"epoch {EPOCHS - 1}: " in out
    # One MLflow run holds every epoch's metrics, across both processes.
    mlflow.set_tracking_uri(pretrained["conf"]["mlflow"]["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=["t-pretrain"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "val_mAP")
    assert sorted({m.step for m in history}) == list(range(EPOCHS))


def test_pretext_beats_the_tag_frequency_baseline_and_exports_a_manifest(pretrained):
    model, manifest = load_encoder(pretrained["conf"]["output"])
    assert manifest["epochs"] == EPOCHS and model.head is None
    assert manifest["final_metrics"]["val_mAP"] > manifest["baseline"]["mAP"] + 0.05
    assert len(manifest["tag_vocabulary"]) > 10 and manifest["tag_vocab_hash"]


def test_style_and_semantic_outputs_separate_the_planted_factors(pretrained):
    model, _ = load_encoder(pretrained["conf"]["output"])
    world = pretrained["world"]
    n = 300
    uris = world.illustrations.column("image_uri").to_pylist()[:n]
    x = torch.from_numpy(np.stack([decode_image(storage.read_bytes(u), 48) for u in uris])).permute(0, 3, 1, 2)
    sem, sty = encode(model, x, "cpu")
    style = world.truth_items.column("style").to_numpy()[:n]
    content = world.truth_items.column("content").to_numpy()[:n]
    same_style = (style[:, None] == style[None]) & (content[:, None] != content[None])
    same_content = (style[:, None] != style[None]) & (content[:, None] == content[None])

    def mean_cos(e: torch.Tensor, mask: np.ndarray) -> float:
        e = torch.nn.functional.normalize(e - e.mean(0), dim=1)  # centred cosine
        return float((e @ e.T).numpy()[mask].mean())

    sty_ss, sty_sc = mean_cos(sty, same_style), mean_cos(sty, same_content)
    sem_ss, sem_sc = mean_cos(sem, same_style), mean_cos(sem, same_content)
    print(
        f"e_STY: same-style {sty_ss:.3f} vs same-content {sty_sc:.3f}; e_SEM: same-style {sem_ss:.3f} vs same-content {sem_sc:.3f}"
    )
    assert sty_ss > sty_sc + 0.3
    # e_SEM: same-content 0.27 vs same-style 0.18 in one run on a busy AVX512 machine (2026-12-02);
    # the resumed run's point of kill moves the figures by a few hundredths
    assert sem_sc > sem_ss + 0.05


def test_pretext_from_a_saved_encoder_starts_at_its_validation_map_or_better(pretrained):
    """``init: <exported encoder>``: the weights and the pretext head (row by tag) are
    restored, so the run's score before its first step is the saved encoder's final
    validation mAP (same split, same preprocessing); the start is in the manifest and the
    version; the stem and layer1 stay frozen for the first epoch."""
    root, conf = pretrained["root"], pretrained["conf"]
    _, saved = load_encoder(conf["output"])
    again = {
        **conf,
        "output": str(root / "encoder_again"),
        "init": conf["output"],
        "epochs": 1,
        "freeze_epochs": 1,
        "freeze_upto": "layer1",
        "run_name": "t-pretrain-again",
        "mlflow": {**conf["mlflow"], "experiment": "t-pretrain-again"},
    }
    (root / "again.yaml").write_text(yaml.safe_dump(again))
    interval = 1.0
    t0 = time.perf_counter()
    done = subprocess.run(
        [UMAIR, "pretrain-image", "--config", str(root / "again.yaml")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "UMAIR_LOG_DIR": str(root / "logs"), "UMAIR_PROGRESS_S": str(interval)},
    )
    wall = time.perf_counter() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _assert_a_short_console(done, wall, interval)
    model, manifest = load_encoder(again["output"])
    start = manifest["init_metrics"]["val_mAP"]
    assert start >= saved["final_metrics"]["val_mAP"] - 1e-6, (start, saved["final_metrics"])
    assert manifest["init"] == {
        "source": conf["output"],
        "weights": saved["weights_sha"],
        "head_tags": len(saved["tag_vocabulary"]),
    }
    assert manifest["version"] != saved["version"]
    # Frozen for its only epoch: the stem and layer1 are the saved encoder's, BatchNorm statistics too.
    old, _ = load_encoder(conf["output"])
    for name, tensor in old.state_dict().items():
        if name.startswith(("stem.", "layer1.")):
            torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)
    assert not torch.equal(model.state_dict()["layer4.1.conv2.weight"], old.state_dict()["layer4.1.conv2.weight"])


CHATTER = ("Traceback", "(PlacementGroupCleaner", "core_worker", "Warning", "(RayTrainWorker", "(TrainController")
"""What issue #20 found on a job's console and must never be there again."""
LOG_LINE = re.compile(r"^\[umair\] [\w-]+: messages of Ray, PyTorch, Hugging Face and MLflow go to (\S+\.log)", re.M)


def _assert_a_short_console(out: subprocess.CompletedProcess, wall: float, interval: float) -> None:
    """A one-epoch Ray Train job off a terminal: only the job's own lines and its periodic
    progress reach the console, each once; Ray's chatter is in the run's log."""
    console = out.stdout + out.stderr
    assert out.stderr == "", out.stderr[-3000:]
    for chatter in CHATTER:
        assert chatter not in console, chatter
    lines = out.stdout.splitlines()
    ticks = [line for line in lines if re.match(r"\[pretrain-image\] epoch 0:\s+\d+% \d+/\d+ \[", line)]
    own = [line for line in lines if line not in ticks]
    # The budget: the log path, what it reads and writes, the data, the start, one line per epoch, the summary.
    assert len(own) <= 6, own
    assert own[0].startswith("[umair] pretrain-image: messages of") and own[-1].startswith("[pretrain-image] done: ")
    assert sum(line.startswith("[pretrain-image] epoch 0: train_loss=") for line in own) == 1, own
    assert 1 <= len(ticks) <= wall / interval + 1, ticks  # periodic progress of the steps, from rank 0 via the driver
    (path,) = LOG_LINE.findall(out.stdout)
    log = Path(path).read_text()
    assert "Started a local Ray instance" in log and "(TrainController" in log  # the chatter is kept, in the log
