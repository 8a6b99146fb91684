"""The console of a job (umair/console.py, issue #20): its own lines and progress on
stdout; Ray, PyTorch, Hugging Face and MLflow messages in a log file of the run, whose
path it prints; ``-v`` keeps them on the console. The consoles of real Ray Train jobs are
asserted where those jobs already run: tests/test_pretrain_image.py (a one-epoch
pretrain-image) and tests/test_train.py (``umair train`` with 2 workers)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
UMAIR = str(Path(sys.executable).parent / "umair")
LOG_LINE = re.compile(r"^\[umair\] [\w-]+: messages of Ray, PyTorch, Hugging Face and MLflow go to (\S+\.log)", re.M)


def _python(code: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


LOOPS = """
    import time
    from umair.console import progress, say
    with progress(total=30, desc="[t] epoch 0", unit="step") as bar:
        for _ in range(30):
            time.sleep(0.05)
            bar.update(1)
    say("[t] epoch 0: loss=1")
    for _ in progress(range(3), desc="[t] short"):  # shorter than the interval: no progress line
        pass
    say("[t] done")
"""


def test_off_a_terminal_progress_is_plain_lines_whose_gaps_double():
    out = _python(LOOPS, env={"UMAIR_PROGRESS_S": "0.3"})
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stdout and out.stderr == ""
    lines = out.stdout.splitlines()
    ticks = [line for line in lines if line.startswith("[t] epoch 0: ") and "%" in line]
    # ~1.5 s of loop: lines at ~0.3 s and ~0.9 s (then 2.1 s: after the end), not one every 0.3 s
    assert 2 <= len(ticks) <= 3, lines
    assert all(re.match(r"\[t\] epoch 0:\s+\d+% \d+/30 \[", t) for t in ticks), ticks
    assert lines[len(ticks) :] == ["[t] epoch 0: loss=1", "[t] done"], "short loops and closed bars add nothing"


def test_on_a_terminal_progress_is_a_bar_that_goes_away():
    pid, fd = pty.fork()
    if pid == 0:  # the child, on a terminal of 100 columns
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        os.execv(sys.executable, [sys.executable, "-c", textwrap.dedent(LOOPS)])
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # the child exited
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    screen = b"".join(chunks).decode()
    assert re.search(r"\r\[t\] epoch 0:\s+\d+%\|", screen), screen[:500]  # a bar redrawn in place
    shown = [line.split("\r")[-1].strip() for line in screen.replace("\r\n", "\n").split("\n")]
    assert [line for line in shown if line] == ["[t] epoch 0: loss=1", "[t] done"], shown


def test_job_log_takes_the_stderr_of_the_process_and_its_children(tmp_path):
    code = """
        import logging, os, subprocess, sys, warnings
        from umair.console import job_log, say
        with job_log("t", directory="LOGS"):
            say("[t] a job line")
            print("python stderr", file=sys.stderr)
            warnings.warn("a library warning")
            logging.getLogger("lib").warning("a logging record")
            os.write(2, b"c++ stderr\\n")
            subprocess.run([sys.executable, "-c", "import sys; print('child stderr', file=sys.stderr)"])
        print("after the block", file=sys.stderr)
        with job_log("t", directory="LOGS"):
            raise SystemExit("failed midway")
    """.replace("LOGS", str(tmp_path))
    out = _python(code)
    paths = LOG_LINE.findall(out.stdout)
    assert len(paths) == 2 and out.stdout.splitlines()[1] == "[t] a job line", out.stdout
    log = Path(paths[0]).read_text()
    for text in ("python stderr", "a library warning", "a logging record", "c++ stderr", "child stderr"):
        assert text in log and text not in out.stdout + out.stderr, text
    assert "after the block" in out.stderr, "stderr is the console again after the block"
    assert f"[umair] t: the log of this run: {paths[1]}" in out.stderr  # a failed run says where to look
    assert "failed midway" in out.stderr


def test_verbose_keeps_the_library_messages_on_the_console(tmp_path):
    """A quick real job: finetune-text with one pair stops with a clear error after MLflow
    created its store (MLflow's INFO lines are the chatter)."""
    names = tmp_path / "names.parquet"
    pq.write_table(pa.table({"concept": ["cat", "cat"], "lang": ["en", "ja"], "name": ["cat", "猫"]}), names)
    conf = {
        "sources": [{"uri": str(names), "kind": "names"}],
        "finetune": {"output_dir": str(tmp_path / "enc"), "epochs": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "v"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(conf))
    env = {**os.environ, "UMAIR_LOG_DIR": str(tmp_path / "logs")}
    cmd = [UMAIR, "finetune-text", "--config", str(tmp_path / "c.yaml")]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    (tmp_path / "mlflow.db").unlink()
    loud = subprocess.run([*cmd, "-v"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    for run in (quiet, loud):
        assert run.returncode == 2 and "error: 1 training pair(s)" in run.stderr, run.stdout + run.stderr
    (path,) = LOG_LINE.findall(quiet.stdout)
    assert "Creating initial MLflow database tables" in Path(path).read_text()
    assert "Creating initial MLflow database tables" not in quiet.stdout + quiet.stderr
    assert f"the log of this run: {path}" in quiet.stderr
    assert "Creating initial MLflow database tables" in loud.stderr and not LOG_LINE.search(loud.stdout)
    assert len(list((tmp_path / "logs").iterdir())) == 1, "-v writes no log file"


@pytest.mark.slow
def test_the_raylets_messages_go_to_the_runs_log_and_workers_lines_stay_on_the_console(tmp_path):
    """Ray prints its raylet's warnings ("N PYTHON worker processes have been started …") on
    the driver's stdout; the jobs send them to the run's log. Emitted through Ray's own
    dispatcher and print handler, and as an error message published through GCS (how the
    raylet sends its worker-pool warning), in a local Ray started as every job starts it."""
    code = """
        from pipelines.runtime import init_ray
        from umair.config import RayConfig
        from umair.console import job_log
        with job_log("t", directory="LOGS"):
            init_ray(RayConfig(num_cpus=1))
            init_ray(RayConfig(num_cpus=1))  # a second call changes nothing (wrapped once)
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as d
            base = {"ip": "127.0.0.1", "localhost": "127.0.0.1", "is_err": False, "job": "", "task_name": "", "actor_name": ""}
            d.emit({**base, "pid": "raylet", "lines": ["WARNING: 18 PYTHON worker processes have been started"]})
            d.emit({**base, "pid": 4242, "lines": ["[t] a worker's job line"]})
            import time, ray
            from ray._private.utils import publish_error_to_driver
            # the raylet's own warnings come as error messages through GCS, another path
            publish_error_to_driver("worker_pool_large", "WARNING: 19 PYTHON workers (by GCS)", ray._private.worker.global_worker.gcs_client)
            time.sleep(0.5)
            print("handlers", sum(n == "ray_print_logs" for n, _ in d.handlers), flush=True)
            ray.shutdown()
    """.replace("LOGS", str(tmp_path))
    out = _python(code, env={"RAY_DEDUP_LOGS": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    log = Path(LOG_LINE.findall(out.stdout)[0]).read_text()
    assert "PYTHON worker processes have been started" in log and "19 PYTHON workers (by GCS)" in log
    assert "PYTHON worker" not in out.stdout + out.stderr, out.stdout
    assert "[t] a worker's job line" in out.stdout and "handlers 1" in out.stdout
