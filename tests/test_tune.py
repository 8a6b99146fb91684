"""`umair tune`: the search space, the best config `umair train` accepts, the K × L heat
map, and (slow) a real search against a real MLflow tracking server: killed midway with
SIGKILL, restored without re-running finished trials, a failing trial recorded as failed,
the best model registered."""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines import train, tune
from umair import tuning
from umair.config import ConfigError, load_config, parse_settings
from umair.plots import tune_heatmap
from umair.reports import TUNE_COLUMNS, results_csv, results_markdown
from umair.training.model_io import load_model
from umair.training.step import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
UMAIR = str(Path(sys.executable).parent / "umair")


# --------------------------------------------------------------------------- settings (fast)


def test_expert_mixes_parse_and_bad_ones_are_refused_with_the_mix_named():
    assert tuning.parse_experts("att, SEN,att") == ("att", "sen", "att")
    with pytest.raises(ConfigError, match=r"search\.experts.*'att,moe'"):
        parse_settings(
            {"train_config": "x.yaml", "search": {"experts": ["att", "att,moe"]}}, tuning.TuneConfig, "t.yaml"
        )
    with pytest.raises(ConfigError, match=r"search\.cross_layers"):
        parse_settings({"train_config": "x.yaml", "search": {"cross_layers": []}}, tuning.TuneConfig, "t.yaml")
    with pytest.raises(ConfigError, match="driver_cpus"):
        parse_settings({"train_config": "x.yaml", "trial": {"driver_cpus": 0}}, tuning.TuneConfig, "t.yaml")


@pytest.mark.parametrize(
    "search, message",
    [
        (
            {"experts": ["att", "att,sen,att,sen,att"]},
            r"search\.experts: Value error, expert mix 'att,sen,att,sen,att' has K = 5 experts; each mix in search\.experts must have K in 1\.\.4",
        ),
        (
            {"cross_layers": [0, -1]},
            r"search\.cross_layers: Value error, cross depth\(s\) \[-1\] out of range; each L in search\.cross_layers must be in 0\.\.4",
        ),
        (
            {"cross_layers": [2, 5]},
            r"search\.cross_layers: Value error, cross depth\(s\) \[5\] out of range; .* 0\.\.4",
        ),
        (
            {"lr": [0.001, 0.0]},
            r"search\.lr: Value error, learning rate\(s\) \[0\.0\] out of range; each lr in search\.lr must be > 0",
        ),
        (
            {"lr": [-0.01]},
            r"search\.lr: Value error, learning rate\(s\) \[-0\.01\] out of range; each lr in search\.lr must be > 0",
        ),
        ({"lr": []}, r"search\.lr: Value error, give at least one learning rate"),
        ({"d": [16, 0]}, r"search\.d: Value error, width\(s\) \[0\] out of range; each d in search\.d must be >= 1"),
    ],
)
def test_search_values_out_of_range_are_refused_when_the_config_loads(search, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_settings({"train_config": "x.yaml", "search": search}, tuning.TuneConfig, "t.yaml")
    assert str(err.value).startswith("t.yaml: search.")


def test_search_ranges_accept_their_edges():
    ok = tuning.SearchSpace(experts=["att", "att,sen,sen,att"], cross_layers=[0, 4], lr=[1e-5], d=[1])
    assert ok.size() == 4


def _tiny_train_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"world": "w", "item_features": "f.parquet", "model": {"emb_dim": 4, "d": 8}}))
    return path


def test_every_grid_point_is_built_before_ray_starts_and_a_bad_one_is_named(tmp_path):
    import ray

    data = {
        "train_config": str(_tiny_train_yaml(tmp_path)),
        "search": {"experts": ["att", "sen"], "cross_layers": [0, 3], "d": [8, 16]},
        "storage_path": str(tmp_path / "tune"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"},
    }
    cfg = parse_settings(data, tuning.TuneConfig, "t.yaml")
    assert tuning.check_trials(cfg, tuning.base_train_dict(cfg)) == 8
    # A value only the model settings refuse (a low-rank cross of rank 0) fails every trial:
    # the search stops on the first grid point, before reading data, MLflow or Ray.
    bad = parse_settings({**data, "train": {"model": {"low_rank": 0}}}, tuning.TuneConfig, "t.yaml")
    ray_before = ray.is_initialized()  # the suite's session Ray may already be up
    with pytest.raises(ConfigError) as err:
        tune.run(bad)
    assert str(err.value).startswith(
        'tune: grid point {"experts": "att", "cross_layers": 0, "d": 8}: model: low_rank: '
        "Input should be greater than or equal to 1 (got 0)"
    ), str(err.value)
    assert ray.is_initialized() == ray_before
    # nothing written: no search directory, no MLflow store
    assert not (tmp_path / "tune").exists() and not (tmp_path / "m.db").exists()


@pytest.mark.parametrize(
    "key, value, tune_key",
    [
        ("epochs", 1, "use tune's `epochs`"),
        ("test_end", "2021-11-01", "use tune's `validation_start`"),
        ("num_workers", 2, "use tune's `trial.num_workers`"),
        ("use_gpu", True, "use tune's `trial.use_gpu`"),
        ("cpus_per_worker", 2, "use tune's `trial.cpus_per_worker`"),
        ("run_name", "x", "under tune's `storage_path` / `name`"),
        ("checkpoint_dir", "c", "under tune's `storage_path` / `name`"),
        ("output", "o", "under tune's `storage_path` / `name`"),
        ("mlflow", {"experiment": "e"}, "use tune's `mlflow`"),
        ("variant", "w/o STY", "from tune's `search`"),
        ("eval_every_epoch", False, "validation window"),
        ("validation", "2021-09-01", "use tune's `validation_start`"),
        ("validation_fraction", 0.1, "use tune's `validation_start`"),
        ("patience", 2, "ASHA stops weak trials"),
        ("ray", {"num_cpus": 2}, "use tune's `ray`"),
    ],
)
def test_train_overrides_that_every_trial_sets_itself_are_refused(key, value, tune_key):
    with pytest.raises(ConfigError) as err:
        parse_settings({"train_config": "x.yaml", "train": {"batch_size": 8, key: value}}, tuning.TuneConfig, "t.yaml")
    assert f"t.yaml: train: Value error, train.{key} is set per trial by tune: " in str(err.value)
    assert tune_key in str(err.value)


def test_model_and_lr_overrides_that_the_search_sets_are_refused():
    with pytest.raises(ConfigError) as err:
        parse_settings(
            {"train_config": "x.yaml", "train": {"model": {"d": 8, "experts": ["att"], "cross_layers": 1}}},
            tuning.TuneConfig,
            "t.yaml",
        )
    msg = str(err.value)
    assert "train.model.experts is set per trial by tune: use tune's `search.experts`" in msg
    assert "train.model.cross_layers is set per trial by tune: use tune's `search.cross_layers`" in msg
    with pytest.raises(ConfigError, match=r"train\.lr and search\.lr both set"):
        parse_settings(
            {"train_config": "x.yaml", "train": {"lr": 0.01}, "search": {"lr": [0.001]}}, tuning.TuneConfig, "t.yaml"
        )
    with pytest.raises(ConfigError, match=r"train\.model\.d and search\.d both set"):
        parse_settings(
            {"train_config": "x.yaml", "train": {"model": {"d": 8}}, "search": {"d": [16]}}, tuning.TuneConfig, "t.yaml"
        )
    # without a search grid of their own they are the trials' common settings
    cfg = parse_settings(
        {"train_config": "x.yaml", "train": {"lr": 0.01, "seed": 3, "split": "2021-09-01", "model": {"d": 8}}},
        tuning.TuneConfig,
        "t.yaml",
    )
    assert cfg.train["lr"] == 0.01


def test_grid_size_counts_every_combination():
    space = tuning.SearchSpace(experts=["att", "att,sen"], cross_layers=[0, 1, 2], lr=[1e-3, 3e-3])
    assert space.grid() == {"experts": ["att", "att,sen"], "cross_layers": [0, 1, 2], "lr": [1e-3, 3e-3]}
    assert space.size() == 12


def test_the_shipped_config_loads_with_its_train_config(monkeypatch):
    cfg = load_config(ROOT / "pipelines" / "configs" / "tune.yaml", tuning.TuneConfig)
    assert cfg.scheduler.kind == "asha" and cfg.search.size() >= 4
    cluster = load_config(ROOT / "pipelines" / "configs" / "cluster" / "tune.yaml", tuning.TuneConfig)
    assert cluster.search.size() == 9
    monkeypatch.chdir(ROOT)
    base = tuning.base_train_dict(cfg)
    assert tuning.check_trials(cfg, base) == cfg.search.size()
    assert base["batch_size"] == cfg.train["batch_size"]  # the overrides are merged in
    # trials run in their own working directories: relative inputs and the sqlite store become absolute
    assert base["world"] == str(ROOT / "outputs" / "demo" / "world")
    assert base["mlflow"]["tracking_uri"] == f"sqlite:///{ROOT / 'outputs' / 'mlflow.db'}"


def test_a_missing_train_config_is_named(tmp_path):
    cfg = tuning.TuneConfig(train_config=str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="nope.yaml: no such train config"):
        tuning.base_train_dict(cfg)


def _base() -> dict:
    return {
        "world": "w",
        "item_features": "f.parquet",
        "model": {"emb_dim": 4, "d": 8, "experts": ["att", "sen", "att"]},
        "epochs": 1,
        "seed": 5,
    }


def test_a_trial_is_train_settings_on_the_validation_window():
    data = tuning.trial_train_dict(
        _base(),
        {"experts": "sen,att", "cross_layers": 3, "lr": 0.01, "d": 32},
        epochs=4,
        split="2021-10-01",
        test_end="2021-10-01",
        validation="2021-08-01",
        resources=tuning.TrialResources(num_workers=2, cpus_per_worker=0.5),
        run_name="trial-x",
        checkpoint_dir="/c",
        output="/c/trial-x/model",
        mlflow=tuning.MlflowConfig(tracking_uri="http://m", experiment="e"),
    )
    cfg = parse_settings(data, train.TrainConfig, "trial")
    assert cfg.model == {"emb_dim": 4, "d": 32, "umcm": "moe", "experts": ["sen", "att"], "cross_layers": 3}
    # trained on ts < validation, epochs chosen on [validation, split), an empty test window
    assert (cfg.validation, cfg.split, cfg.test_end) == ("2021-08-01", "2021-10-01", "2021-10-01")
    assert (cfg.epochs, cfg.lr, cfg.patience, cfg.validation_fraction) == (4, 0.01, None, None)
    assert (cfg.num_workers, cfg.cpus_per_worker, cfg.run_name, cfg.seed) == (2, 0.5, "trial-x", 5)
    assert cfg.mlflow.tracking_uri == "http://m"


def test_the_best_config_round_trips_through_yaml_into_umair_train(tmp_path):
    row = {"experts": "att,sen", "cross_layers": 2, "lr": None, "d": 16, "K": 2}
    best = tuning.best_train_config(_base(), row, tuning.TuneConfig(train_config="x.yaml", epochs=3, name="s"))
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(best))
    cfg = load_config(path, train.TrainConfig)
    assert cfg.model["experts"] == ["att", "sen"] and cfg.model["cross_layers"] == 2 and cfg.model["d"] == 16
    assert cfg.split is None and cfg.test_end is None  # the world's split
    # no validation start known: the trials' default window, the last 20 % of the training window
    assert (cfg.validation, cfg.validation_fraction) == (None, 0.2)
    assert cfg.epochs == 3 and cfg.run_name == "train-s-best"
    # its model and checkpoints are the search's own: training it overwrites no base-config model
    tune_dir = os.path.abspath(os.path.join("outputs", "tune", "s"))
    assert cfg.output == os.path.join(tune_dir, "best_model")
    assert cfg.checkpoint_dir == os.path.join(tune_dir, "best_checkpoints")
    s3 = tuning.best_train_config(
        _base(), row, tuning.TuneConfig(train_config="x.yaml", name="s", storage_path="s3://b/tune")
    )
    assert (s3["output"], s3["checkpoint_dir"]) == ("s3://b/tune/s/best_model", "s3://b/tune/s/best_checkpoints")
    # with best_config_out set (the cluster config puts it under models/), the model goes beside it
    out = tuning.best_train_config(
        _base(),
        row,
        tuning.TuneConfig(
            train_config="x.yaml",
            name="s",
            storage_path="s3://b/tune",
            best_config_out="s3://b/models/tune/best_train.yaml",
        ),
    )
    assert (out["output"], out["checkpoint_dir"]) == ("s3://b/models/tune/best_model", "s3://b/tune/s/best_checkpoints")


def test_the_best_config_refits_on_the_training_window_only_unless_told_otherwise():
    row = {"experts": "att", "cross_layers": 1, "lr": None, "d": None, "K": 1, "best_epoch": 1}
    tune_cfg = tuning.TuneConfig(train_config="x.yaml", epochs=5, name="s")
    best = parse_settings(
        tuning.best_train_config(_base(), row, tune_cfg, "2021-08-15T00:00:00+00:00"), train.TrainConfig, "best"
    )
    # the same windows as the trials: ts < validation_start to train, the epoch chosen after it
    assert (best.validation, best.validation_fraction, best.epochs) == ("2021-08-15T00:00:00+00:00", None, 5)
    assert best.has_validation and best.eval_every_epoch
    refit = tune_cfg.model_copy(update={"refit_on_validation": True})
    whole = parse_settings(
        tuning.best_train_config({**_base(), "validation_fraction": 0.3, "patience": 2}, row, refit, "2021-08-15"),
        train.TrainConfig,
        "best",
    )
    # everything before the split, for the best trial's number of epochs (its best epoch + 1)
    assert (whole.validation, whole.validation_fraction, whole.patience, whole.epochs) == (None, None, None, 2)


def test_trials_are_ranked_by_their_best_epoch_not_their_last():
    class Result:
        def __init__(self, trial_id, last, best, best_epoch):
            self.metrics = {"trial_id": trial_id, "training_iteration": 3, "val_auc": last}
            self.metrics |= {"best_val_auc": best, "best_epoch": best_epoch}
            self.config, self.error = {"experts": "att", "cross_layers": 0}, None

    rows = tune.collect([Result("a", 0.70, 0.71, 2), Result("b", 0.60, 0.80, 0)], 3, [])
    assert [(r["trial_id"], r["val_auc"], r["best_epoch"]) for r in rows] == [("b", 0.80, 0), ("a", 0.71, 2)]


def test_heat_map_keeps_the_best_auc_per_cell_and_leaves_failed_cells_empty(tmp_path):
    def row(k, cl, auc, status="FINISHED"):
        return {"K": k, "cross_layers": cl, "val_auc": auc, "status": status}

    rows = [row(1, 0, 0.61), row(1, 0, 0.64, "STOPPED"), row(1, 2, 0.70), row(3, 0, 0.66), row(3, 2, 0.9, "FAILED")]
    grid = tune_heatmap(rows, str(tmp_path / "h.png"))
    assert grid[0, 0] == pytest.approx(0.64) and grid[0, 1] == pytest.approx(0.70) and grid[1, 0] == pytest.approx(0.66)
    assert np.isnan(grid[1, 1])
    assert (tmp_path / "h.png").stat().st_size > 5000


def test_results_table_has_every_column_and_escapes_nothing_it_should_not():
    rows = [{c: None for c in TUNE_COLUMNS} | {"trial_id": "a_1", "status": "FAILED", "error": "x | y", "val_auc": 0.5}]
    md = results_markdown(rows)
    assert md.splitlines()[0].count("|") == len(TUNE_COLUMNS) + 1
    assert "x / y" in md and "0.5000" in md
    lrs = results_markdown([rows[0] | {"lr": lr} for lr in (0.003, 1e-5, 1e30)])
    assert "| 0.0030 |" in lrs and "| 1e-05 |" in lrs and "| 1e+30 |" in lrs
    assert results_csv(rows).splitlines()[0].split(",") == TUNE_COLUMNS


def _child_run(run_id: str, trial_id: str, params: dict, error: str | None = None, metrics: dict | None = None):
    from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag

    tags = [RunTag("umair.trial_id", trial_id)] + ([RunTag("umair.error", error)] if error else [])
    info = RunInfo(run_id, "1", "u", "RUNNING", 0, None, "active", run_name=f"trial-{trial_id}")
    latest = [Metric(k, v, 0, 0) for k, v in (metrics or {}).items()]
    return Run(info, RunData(metrics=latest, params=[Param("trial_params", tuning.trial_key(params))], tags=tags))


def test_a_restored_trial_that_failed_before_reporting_still_gets_its_row_and_run(tmp_path):
    """After Tuner.restore, a trial that errored before its first report comes back with
    its id only (no config, no metrics): its row must still name its point in the search
    space and its MLflow run, so the driver can close that run as FAILED (CI once saw it
    left RUNNING)."""
    from ray.tune import Result

    ok_params, bad_params = {"experts": "att", "cross_layers": 1}, {"experts": "att,sen", "cross_layers": 2, "lr": 1e30}
    results = [
        Result(
            metrics={"trial_id": "t_1", "config": ok_params, "training_iteration": 2, "val_auc": 0.61},
            checkpoint=None,
            error=None,
            path=str(tmp_path / "t_1"),
        ),
        Result(
            metrics={"trial_id": "t_2"}, checkpoint=None, error=RuntimeError("trial raised"), path=str(tmp_path / "t_2")
        ),
    ]
    runs = [
        _child_run("r1", "t_1", ok_params),
        _child_run("r2", "t_2", bad_params, error="TrainingDiverged: training diverged: the BCE loss is nan"),
    ]
    rows = {r["trial_id"]: r for r in tune.collect(results, 2, runs)}
    assert rows["t_1"]["status"] == "FINISHED" and rows["t_1"]["mlflow_run_id"] == "r1"
    bad = rows["t_2"]
    assert (bad["status"], bad["mlflow_run_id"], bad["K"], bad["cross_layers"], bad["lr"]) == (
        "FAILED",
        "r2",
        2,
        2,
        1e30,
    )
    assert "training diverged" in bad["error"]


def test_a_restored_trial_whose_last_epochs_tune_never_saw_counts_as_finished(tmp_path):
    """Killed after a trial's last epoch but before Tune saved that report, the restored
    trial resumes with every epoch checkpointed and reports nothing new: Tune's result
    stops at epoch 1 of 2. The MLflow run recorded both epochs; the row must say FINISHED
    with the last epoch's metrics (CI once ended such a search "no trial finished")."""
    from ray.tune import Result

    params = {"experts": "sen", "cross_layers": 1}
    result = Result(
        metrics={"trial_id": "t_1", "config": params, "training_iteration": 1, "val_auc": 0.70, "best_val_auc": 0.70},
        checkpoint=None,
        error=None,
        path=str(tmp_path / "t_1"),
    )
    run = _child_run("r1", "t_1", params, metrics={"val_auc": 0.75, "best_val_auc": 0.75, "best_epoch": 1})
    row = tune.collect([result], 2, [run], {"r1": 2})[0]
    assert (row["status"], row["epochs"], row["val_auc"], row["best_epoch"]) == ("FINISHED", 2, 0.75, 1)
    # without the run's record it would look stopped after epoch 1
    assert tune.collect([result], 2, [run], {"r1": 1})[0]["status"] == "STOPPED"


def test_a_trial_error_from_ray_train_workers_leads_with_the_worker_error():
    from ray.train.v2.api.exceptions import WorkerGroupError

    diverged = TrainingDiverged(
        "training diverged: the BCE loss is nan at epoch 0, step 1 (lr 1e+30); lower the learning rate (lr)"
    )
    err = WorkerGroupError(
        "[Rank 0] Traceback ... allreduce aborted\n[Rank 1] Traceback ... TrainingDiverged",
        {0: RuntimeError("allreduce aborted"), 1: diverged},
    )
    text = tune.error_text(err)
    assert text.startswith("TrainingDiverged: training diverged: the BCE loss is nan at epoch 0, step 1 (lr 1e+30)")
    assert "(Ray Train worker rank 1)" in text and "WorkerGroupError: Training failed due to worker errors" in text
    assert tune.error_text(ValueError("x")) == "ValueError: x"


# --------------------------------------------------------------------------- a real search (slow)


def _trial_states(tune_dir: Path) -> dict[str, str]:
    """trial id -> status from Tune's latest saved experiment state."""
    files = sorted(glob.glob(str(tune_dir / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        data = json.loads(Path(files[-1]).read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    out = {}
    for entry in data.get("trial_data", []):  # [trial json, runtime json] per trial
        trial = json.loads(entry[0])
        out[trial["trial_id"]] = trial["status"]
    return out


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_killed_search_restores_without_rerunning_finished_trials(
    tiny_world, tiny_features, mlflow_server, tmp_path, monkeypatch
):
    import mlflow

    # Relative paths, as in the shipped configs: trials run in other working directories.
    os.symlink(tiny_world.root, tmp_path / "world")
    os.symlink(tiny_features, tmp_path / "features.parquet")
    (tmp_path / "train.yaml").write_text(
        yaml.safe_dump(
            {
                "world": "world",
                "item_features": "features.parquet",
                "model": {"emb_dim": 4, "d": 8},
                "epochs": 1,
                "batch_size": 64,
                "num_workers": 1,
                "mlflow": {"tracking_uri": mlflow_server.url, "experiment": "t-tune"},
            }
        )
    )
    (tmp_path / "tune.yaml").write_text(
        yaml.safe_dump(
            {
                "train_config": str(tmp_path / "train.yaml"),
                # lr 1e30 is a valid setting whose training diverges: Adam moves every weight by ~lr
                # on the first step, the second batch's loss is NaN and the divergence guard raises
                # on the Ray Train worker, so those two trials fail inside their training loop.
                "search": {"experts": ["att", "sen"], "cross_layers": [1], "lr": [0.003, 1.0e30]},
                "epochs": 2,
                "max_concurrent_trials": 2,
                "name": "t-search",
                "storage_path": str(tmp_path / "tune"),
                "register_model": "umair-fps-test",
                "ray": {"num_cpus": 4},
                "mlflow": {"tracking_uri": mlflow_server.url, "experiment": "t-tune"},
            }
        )
    )
    cmd = [UMAIR, "tune", "--config", str(tmp_path / "tune.yaml")]
    tune_dir = tmp_path / "tune" / "t-search"

    # 1. Start the search; SIGKILL the driver (and its local Ray) once Tune has recorded
    #    a trial as finished and others are still to run.
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 900
        done_before: set[str] = set()
        while time.time() < deadline and first.poll() is None:
            states = _trial_states(tune_dir)
            done_before = {t for t, s in states.items() if s == "TERMINATED"}
            if done_before and len(done_before) + sum(s == "ERROR" for s in states.values()) < 4:
                break
            time.sleep(0.5)
        assert first.poll() is None, (
            "the search ended before it could be killed:\n" + (tmp_path / "first.log").read_text()[-3000:]
        )
        assert done_before, "no trial finished in time:\n" + (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
    time.sleep(3)

    # 2. The same command restores the search and completes it.
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "restoring search 't-search'" in second.stdout
    assert "models:/umair-fps-test/" in second.stdout and "best_train.yaml" in second.stdout
    # The console: one driver line per trial, no Tune status tables, no trial's training lines
    lines = [line for line in second.stdout.splitlines() if line.startswith("[tune] trial ")]
    assert any(" ended after epoch " in line or " failed (" in line for line in lines), second.stdout[:4000]
    assert "Trial status:" not in second.stdout and "[train] epoch" not in second.stdout, second.stdout[:4000]
    assert "View run" not in second.stdout, "MLflow's run-URL lines stay off the console (the job prints its own)"

    client = mlflow.MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("t-tune")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 't-search'")
    assert len(parents) == 1, "the restored search continues the same parent run"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {"results.csv", "results.md", "heatmap_val_auc.png", "best_train.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }

    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_trial = {c.data.tags["umair.trial_id"]: c for c in children}
    assert len(children) == len(by_trial) == 4, "one child run per trial, none duplicated by the restore"

    # Trials Tune had finished before the kill were not run again.
    for trial_id in done_before:
        attempts = client.get_metric_history(by_trial[trial_id].info.run_id, "trial_attempt")
        assert len(attempts) == 1, f"trial {trial_id} finished before the kill but ran again"

    failed = [c for c in children if json.loads(c.data.params["trial_params"])["lr"] == 1.0e30]
    assert len(failed) == 2
    for c in failed:
        error = c.data.tags["umair.error"]
        assert c.info.status == "FAILED", (c.info.status, error)
        assert error.startswith("TrainingDiverged: training diverged: the BCE loss is nan at epoch 0, step "), error
        assert "(lr 1e+30)" in error and "lower the learning rate (lr)" in error
        assert not client.get_metric_history(c.info.run_id, "val_auc"), "a diverged trial reports no epoch"
    ok = [c for c in children if c not in failed]
    assert {c.info.status for c in ok} <= {"FINISHED", "KILLED"} and "FINISHED" in {c.info.status for c in ok}
    for c in ok:  # per-epoch validation metrics in every trial that ran
        assert client.get_metric_history(c.info.run_id, "val_auc")

    # The best finished trial is registered, with its config, and its model is in its run.
    with open(tune_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["status"] for r in rows} >= {"FINISHED", "FAILED"} and len(rows) == 4
    assert all(r["error"].startswith("TrainingDiverged: training diverged") for r in rows if r["status"] == "FAILED")
    best = max((r for r in rows if r["status"] == "FINISHED"), key=lambda r: float(r["val_auc"]))
    versions = client.search_model_versions("name='umair-fps-test'")
    assert len(versions) == 1 and versions[0].run_id == best["mlflow_run_id"]
    assert versions[0].tags["experts"] == best["experts"] and "umair train config" in versions[0].description
    assert "model/model.json" in {a.path for a in client.list_artifacts(best["mlflow_run_id"], "model")}

    # best_train.yaml is accepted by `umair train` as it is, and trains into the search's own directory.
    best_cfg = load_config(tune_dir / "best_train.yaml", train.TrainConfig)
    assert best_cfg.model["cross_layers"] == int(best["cross_layers"]) and best_cfg.split is None
    assert best_cfg.output == str(tune_dir / "best_model") and best_cfg.checkpoint_dir == str(
        tune_dir / "best_checkpoints"
    )
    assert best_cfg.lr == pytest.approx(0.003)

    # The registered version holds the model and its umair train config together, and loads.
    # (MLflow resolves models:/ URIs with the process's tracking / registry URI, not the call's
    # arguments; unset, it would create ./mlflow.db.)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server.url)
    # An earlier test in this process may have set a global tracking URI (sqlite): it wins over the env.
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    got = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/umair-fps-test/{versions[0].version}",
            dst_path=str(tmp_path / "registered"),
            tracking_uri=mlflow_server.url,
        )
    )
    # an MLflow pyfunc model (pipelines/serving.py): the model files are its artifacts
    assert {"MLmodel", "best_train.yaml"} <= {f.name for f in got.iterdir()}
    assert {"model.pt", "model.json", "feature_space.json"} <= {f.name for f in (got / "artifacts" / "model").iterdir()}
    assert (got / "best_train.yaml").read_text() == (tune_dir / "best_train.yaml").read_text()
    saved = load_model(str(got / "artifacts" / "model"))
    assert (
        list(saved.config.experts) == best_cfg.model["experts"]
        and saved.config.cross_layers == best_cfg.model["cross_layers"]
    )
    assert saved.meta["mlflow_run_id"] == best["mlflow_run_id"]
    assert versions[0].tags["encoder_version"] == saved.meta["encoder_versions"]["encoder.version"]
    pyfunc = mlflow.pyfunc.load_model(f"models:/umair-fps-test/{versions[0].version}")
    tables = got / "artifacts" / "tables"
    ids = {
        f: int(pd.read_parquet(tables / f"{t}.parquet")[f].iloc[0])
        for f, t in (("user_id", "users"), ("illust_id", "item_features"))
    }
    scored = pyfunc.predict(pd.DataFrame({k: [v] for k, v in ids.items()}))
    assert scored["status"].tolist() == ["ok"] and 0.0 < float(scored["prob"].iloc[0]) < 1.0

    # Running the finished search again (a nightly schedule does) restores it, re-runs no
    # trial and registers nothing new: the best model keeps its version.
    attempts = {tid: len(client.get_metric_history(r.info.run_id, "trial_attempt")) for tid, r in by_trial.items()}
    third = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    assert "restoring search 't-search'" in third.stdout
    assert f"models:/umair-fps-test/{versions[0].version}" in third.stdout
    assert len(client.search_model_versions("name='umair-fps-test'")) == 1
    again = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(again) == 4
    assert {
        c.data.tags["umair.trial_id"]: len(client.get_metric_history(c.info.run_id, "trial_attempt")) for c in again
    } == attempts, "no trial started again"
