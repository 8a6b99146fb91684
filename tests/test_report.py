"""``umair report RUN_DIR``: one self-contained HTML page, checked offline and in a real
headless Chromium (Debian's ``chromium``, installed by scripts/bootstrap.sh; driven with
Playwright on that executable, no browser download).

The run directory is built like the demo's ``outputs/demo``: a real tiny sample world
(its own PNG illustrations must stay out of the page), and each job's files made by the
functions the jobs call: the per-segment report and ᾱ spread of ``umair evaluate``
(:func:`umair.training.scoring.segment_report`, :func:`umair.metrics.alpha_spread`), the
planted-taste table, tune's results table and heat map, the ablation table and chart, an
extraction run's marker with :class:`umair.extraction.progress.Progress`'s summary, and
every picture from :mod:`umair.plots` / :mod:`umair.plots_runs`.
"""

from __future__ import annotations

import html.parser
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from umair.html_report import MODEL_FORMAT, collect, write_report

ROOT = Path(__file__).resolve().parents[1]
UMAIR = str(Path(sys.executable).parent / "umair")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODS = ["tsem", "sem", "sty", "meta"]


def _evaluation(world) -> dict:
    from umair.metrics import alpha_spread
    from umair.training.scoring import segment_report

    rng = np.random.default_rng(0)
    tastes = dict(zip(world.truth_users.column("user_id").to_pylist(), world.truth_users.column("taste").to_pylist()))
    users = np.repeat(np.array(sorted(tastes)), 20)
    labels = rng.integers(0, 2, len(users))
    probs = np.clip(labels * 0.3 + rng.random(len(users)) * 0.7, 0, 1)
    weights = rng.dirichlet(np.ones(len(MODS)), len(users))
    segments = segment_report(users, labels, probs, weights, MODS, tastes)
    return {
        "model": "outputs/demo/model",
        "variant": "full",
        "window": {"start": "2021-10-01T00:00:00+00:00", "end": None},
        "rows": len(users),
        "positives": int(labels.sum()),
        "auc": segments["all"]["auc"],
        "logloss": segments["all"]["logloss"],
        "gauc": segments["all"]["gauc"],
        "gauc_users": segments["all"]["gauc_users"],
        "modalities": MODS,
        "segments_source": "outputs/demo/world/truth/users.parquet",
        "segments": segments,
        "alpha_spread": alpha_spread(users, weights, MODS, tastes),
    }


def build_run_dir(root: Path) -> Path:
    """A demo-like run directory; returns it. Every PNG outside the world is a picture of the page."""
    from umair.extraction.progress import Progress
    from umair.plots import SheetItem, ablation_chart, contact_sheet, tune_heatmap
    from umair.plots_runs import (
        alpha_by_segment,
        extraction_summary_plot,
        strips_from_topk,
        topk_strips,
        training_curves,
    )
    from umair.reports import ablation_markdown, results_markdown
    from umair.sample.world import summarize, write_world
    from umair.training.planted import evaluated_row, planted_markdown

    world = write_world(str(root / "world"), "tiny", 0, True)
    (root / "model").mkdir(parents=True)
    history = [
        {"epoch": e, "train_loss": 0.69 - 0.04 * e, "val_logloss": 0.68 - 0.02 * e, "val_auc": 0.6 + 0.05 * e}
        for e in range(4)
    ]
    meta = {
        "format": MODEL_FORMAT,
        "variant": "full",
        "split": "2021-10-01T00:00:00+00:00",
        "best_epoch": 3,
        "selected_on": "val_auc",
        "val_auc": 0.75,
        "model_config": {"d": 16, "experts": ["tsem", "sem", "sty"], "cross_layers": 2},
        "training": {"epochs": 4, "lr": 0.001, "batch_size": 64, "history": history},
    }
    (root / "model" / "model.json").write_text(json.dumps(meta))
    report = _evaluation(world)
    (root / "model" / "evaluation.json").write_text(json.dumps(report))
    training_curves(history, str(root / "model" / "training_curves.png"), best_epoch=3)
    alpha_by_segment(report["segments"], str(root / "model" / "alpha_by_segment.png"))

    full = evaluated_row(report)
    rows = [full, {**full, "model": "w/o STY"}, {**full, "model": "DCN-V2 only"}]
    (root / "planted.md").write_text(planted_markdown(rows) + "\n\n- style recovered: yes\n")

    trials = [
        {
            "trial_id": f"t{i}",
            "status": "FINISHED",
            "experts": "sem,sty",
            "K": k,
            "cross_layers": cl,
            "val_auc": 0.7 + 0.01 * i,
        }
        for i, (k, cl) in enumerate([(2, 1), (2, 2), (3, 1), (3, 2)])
    ]
    (root / "tune").mkdir()
    (root / "tune" / "results.md").write_text(results_markdown(trials))
    tune_heatmap(trials, str(root / "tune" / "heatmap_val_auc.png"))
    (root / "tune" / "best_train.yaml").write_text("epochs: 4\nmodel:\n  K: 3\n")

    (root / "ablate").mkdir()
    ab = [
        {"group": "Table 4", "model": "UMAIR-FPS", "auc": 0.8, "auc_style": 0.85},
        {"group": "Table 3", "model": "DCN-V2", "auc": 0.7, "auc_style": 0.6},
    ]
    (root / "ablate" / "ablate.md").write_text(ablation_markdown(ab, ["style"], ["seed 0"], {}))
    ablation_chart(ab, "style", str(root / "ablate" / "ablate.png"), "ablations")

    progress = Progress(world.illustrations.num_rows)
    progress.add(
        [
            {
                "features_rows": 90,
                "partial_rows": 6,
                "errors_rows": 2,
                "no_image": 4,
                "reasons": json.dumps({"decode:UnidentifiedImageError": 2}),
                "modality_rows": json.dumps({"sem": 94, "sty": 94, "tsem": 96}),
            }
        ]
    )
    summary = progress.summary({"run_id": "r1", "output": "features", "to_process": 96}, 2.0, 2.5, {}, "mlf")
    (root / "features" / "_runs").mkdir(parents=True)
    (root / "features" / "_runs" / "r1.json").write_text(json.dumps({"status": "finished", "summary": summary}))
    extraction_summary_plot(summary, str(root / "features" / "extraction_summary.png"))

    ids = world.illustrations.column("illust_id").to_pylist()
    uris = dict(zip(ids, world.illustrations.column("image_uri").to_pylist()))
    users = [1, 2, 3]
    topk = pa.table(
        {
            "user_id": np.repeat(users, 5),
            "rank": np.tile(np.arange(1, 6), 3).astype(np.int32),
            "illust_id": np.array(ids[:15]),
            "score": np.linspace(0.9, 0.5, 15).astype(np.float32),
        }
    )
    (root / "recommendations").mkdir()
    metrics = {
        "model": {"recall_at_10": 0.2, "ndcg_at_10": 0.15},
        "popularity": {"recall_at_10": 0.1, "ndcg_at_10": 0.07},
    }
    (root / "recommendations" / "metrics.json").write_text(json.dumps({"k": 5, "users": 3, "metrics": metrics}))
    topk_strips(strips_from_topk(topk, users, uris), str(root / "recommendations" / "topk_strips.png"))

    (root / "similar").mkdir()
    query = SheetItem(ids[0], np.asarray(Image.open(uris[ids[0]]).convert("RGB")))
    tiles = [SheetItem(i, np.asarray(Image.open(uris[i]).convert("RGB")), 0.9) for i in ids[1:6]]
    for by in ("style", "semantic"):
        contact_sheet(query, tiles, f"nearest by {by}", str(root / "similar" / f"{ids[0]}-{by}.png"))

    demo = {
        "format": "umair-demo-run/1",
        "started_at": "2026-01-01T00:00:00",
        "wall_s": 1.0,
        "stages": {"train": {"config": "pipelines/configs/train.yaml", "yaml": "epochs: 4\n", "seconds": 1.0}},
        "world": summarize(world),
    }
    (root / "demo.json").write_text(json.dumps(demo))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_run_dir(tmp_path_factory.mktemp("run"))


def _pictures_in(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("*.png") if "world" not in p.relative_to(run).parts)


class _Refs(html.parser.HTMLParser):
    """Every tag and every src / href attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "action")]


def test_the_page_is_self_contained_and_shows_every_table(run_dir, tmp_path):
    out = tmp_path / "report.html"
    result = write_report(str(run_dir), str(out))
    page = out.read_text()
    refs = _Refs()
    refs.feed(page)
    # offline: no script, no stylesheet link, no frame; every picture a data: URI, links in-page only
    assert not {"script", "link", "iframe", "object", "embed"} & set(refs.tags)
    assert [v[:22] for t, k, v in refs.refs if t == "img"] == ["data:image/png;base64,"] * len(_pictures_in(run_dir))
    assert all(v.startswith("#") for t, k, v in refs.refs if t != "img"), refs.refs
    assert "http://" not in page and "https://" not in page
    assert result.pictures == len(_pictures_in(run_dir)) == 8 and result.skipped == []
    # the tables a person reads
    for text in ("per user segment", "how user-aware ᾱ is", "planted taste", "AUC w/o STY", "heatmap_val_auc.png"):
        assert text in page, text
    assert "recall_at_10" in page and "decode:UnidentifiedImageError" in page and "epochs: 4" in page
    # the sample world's own illustrations are not pictures of the run
    assert "world/images" not in page


def test_text_from_the_files_is_escaped_and_markdown_cannot_reach_out(tmp_path):
    (tmp_path / "notes.md").write_text(
        "# <script>alert(1)</script>\n\n| a | b |\n|---|---|\n| <img src=x onerror=alert(2)> | 1 |\n\n"
        "[site](https://example.com) ![pic](http://example.com/x.png) <https://example.com>\n"
    )
    (tmp_path / "model.json").write_text(json.dumps({"format": MODEL_FORMAT, "variant": "<b>v</b>&"}))
    out = tmp_path / "r.html"
    write_report(str(tmp_path), str(out))
    page = out.read_text()
    assert "<script" not in page and "<b>v</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;v&lt;/b&gt;&amp;" in page
    refs = _Refs()
    refs.feed(page)
    assert not [r for r in refs.refs if not r[2].startswith("#")], refs.refs
    assert "<table>" in page  # the markdown table is still a table


def test_a_missing_run_directory_is_one_clean_error(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "umair report: error:" in err and "no such run directory" in err and "Traceback" not in err


def _artifact_dir() -> Path:
    d = Path(os.environ.get("UMAIR_TEST_ARTIFACTS", ROOT / "outputs" / "test-artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_umair_report_opens_in_headless_chromium_with_every_picture_loaded(run_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), "Debian's chromium is missing: run scripts/bootstrap.sh (it installs it)"
    out = tmp_path / "report.html"
    proc = subprocess.run(
        [UMAIR, "report", str(run_dir), "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"[report] {out}: " in proc.stdout and "8 pictures" in proc.stdout

    shot = tmp_path / "report.png"
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1280, "height": 900}
        )
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.as_uri(), wait_until="load", timeout=60_000)
            state = page.evaluate(
                "() => ({ready: document.readyState, title: document.title,"
                " imgs: [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])})"
            )
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert state["ready"] == "complete" and state["title"].startswith("UMAIR-FPS run report")
    assert len(state["imgs"]) == len(_pictures_in(run_dir)) == 8
    assert all(done and w > 0 and h > 0 for done, w, h in state["imgs"]), state["imgs"]
    assert [u for u in requests if not u.startswith(("file://", "data:"))] == []  # nothing fetched from outside

    kept = _artifact_dir() / "report_chromium.png"
    shutil.copyfile(shot, kept)
    print(f"\nscreenshot of the report in headless Chromium: {kept}")
    with Image.open(io.BytesIO(shot.read_bytes())) as img:
        assert img.width >= 1280 and img.height >= 2000, img.size  # a full page of tables and 8 figures
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert pixels.std() > 20, "the screenshot is blank"
    assert (pixels < 128).mean() > 0.02  # header bar, text and plots: not an empty white page


def test_collect_skips_what_is_not_a_run_file(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nrest")  # recommend's parquet-part staging
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "evaluation.json").write_text("{")  # a report the page would show: named
    (tmp_path / "trial").mkdir()
    (tmp_path / "trial" / "result.json").write_text('{"a": 1}\n{"a": 2}\n')  # Ray Tune's JSON lines: ignored
    c = collect(str(tmp_path))
    assert c.pictures == [] and sorted(s.split(":")[0] for s in c.skipped) == ["broken.png", "evaluation.json"]


def test_the_demo_final_screen_fits_in_twenty_lines_and_names_what_a_user_looks_at_next():
    from umair.reports import demo_summary
    from umair.training.planted import planted_verdicts

    def row(name, style, alpha=None, every=0.80):
        auc = {"style": style, "content": 0.76, "tag": 0.71, "popularity": 0.57, "all": every}
        users = {"style": 140, "content": 120, "tag": 60, "popularity": 80, "all": 400}
        return {"model": name, "auc": auc, "users": users, "alpha_sty": alpha or {}, "spread": {}}

    full = row("full", 0.833, {"style": 0.28, "content": 0.20, "tag": 0.19, "popularity": 0.2, "all": 0.22})
    rows = [full, row("w/o STY", 0.569, every=0.78), row("DCN-V2-only", 0.52, every=0.72)]
    planted = {"rows": rows, "verdicts": planted_verdicts(full, rows[1], rows[2])}
    flat = {"recall_at_5": 0.02, "ndcg_at_5": 0.03, "recall_at_20": 0.068, "ndcg_at_20": 0.05}
    pop = {"recall_at_5": 0.01, "ndcg_at_5": 0.01, "recall_at_20": 0.035, "ndcg_at_20": 0.02}
    lines = demo_summary(
        {"pretrain-image": 192.0, "train": 78.4},
        455.2,
        {"all under": "outputs/demo", "model": "outputs/demo/model"},
        planted,
        {"model": flat, "popularity": pop},
        "outputs/demo/report.html",
        "sqlite:///outputs/mlflow.db",
    )
    assert 10 <= len(lines) <= 20, lines
    text = "\n".join(lines)
    assert "ran in 455 s: pretrain-image 192 s, train 78 s" in text
    style = next(line for line in lines if line.lstrip().startswith("style (140 users)"))
    assert "0.833 | 0.569 | 0.520" in style and "ᾱ(STY) 0.280" in style
    # 0.28 / 0.20 = 1.4x: the α-ratio goal (1.5x) is missed and named; the AUC goals are met
    assert "planted effects recovered: 4 of 5" in text and "missed: ᾱ(STY) of style-driven users 1.40x" in text
    assert "Recall@20 0.0680 vs popularity's 0.0350" in text
    assert lines[-2] == "report: outputs/demo/report.html (open it in a browser)"
    assert lines[-1].startswith("MLflow UI: mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db")
