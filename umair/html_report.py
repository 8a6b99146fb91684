"""One self-contained HTML page for a run directory (``umair report RUN_DIR``).

Walks a run directory (the demo's ``outputs/demo``, or any job's output; local or
s3://) and writes one HTML file that needs nothing else: inline CSS, no script, every
picture inlined as a ``data:`` URI, so it reads the same offline, mailed or archived.
The page has

- settings: the demo's run record (``demo.json``: each stage's YAML, its time, the
  sample world's summary), every trained model's ``model.json`` (variant, windows,
  selected epoch, training recipe, model config) and the YAML files found (e.g. tune's
  ``best_train.yaml``);
- metrics: each ``evaluation.json`` (AUC / logloss / GAUC overall, per user segment with
  mean ᾱ per modality, warm vs cold, ᾱ spread), each recommend ``metrics.json``
  (Recall@K / NDCG@K vs popularity), each finished extraction run (rows per outcome and
  error reason, images/s), and every markdown table the jobs write (the planted-taste
  table ``planted.md``, tune's ``results.md``, ``ablate.md``), rendered by markdown-it
  with raw HTML, links and images off;
- pictures: every PNG under the directory (a sample world's own illustrations
  excepted), with a caption.

Text from the files is escaped (Jinja2 autoescape). Pure Python: no Ray, no MLflow.
"""

from __future__ import annotations

import base64
import json
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from umair import storage
from umair.errors import UmairError
from umair.reports import fmt_cell

DEMO_FORMAT = "umair-demo-run/1"
MODEL_FORMAT = "umair-fps-model/1"
SUFFIXES = (".json", ".md", ".png", ".yaml", ".yml")
SKIP_DIRS = {
    "ray_results",
    "_tmp",
    "runs",
    "mlartifacts",
    "mlruns",
    "__pycache__",
}  # checkpoints, staging, parts, MLflow copies
MAX_PICTURE_BYTES = 20 * 1024 * 1024
KNOWN_JSON = {"demo.json", "model.json", "evaluation.json", "metrics.json"}  # + extraction's _runs/*.json
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEMPLATE = "report.html"  # umair/templates/ (package data)

CAPTIONS = {
    "training_curves.png": "Training curves: loss and AUC per epoch, training vs validation; the dotted line is the epoch the saved model holds.",
    "alpha_by_segment.png": "Mean modality attention ᾱ = Σ_k β_k α_k per modality (e_SEM, e_STY, e_TSEM, meta) for each user segment of the test window.",
    "topk_strips.png": "Top-K recommendations of a few users (one per planted taste where known), best first, with each item's ground-truth style and content.",
    "extraction_summary.png": "Feature extraction: rows per outcome and error reason, and images/s.",
    "heatmap_val_auc.png": "Tune: best validation AUC per cell of K (UMCM experts) × L (DCN-V2 cross layers).",
    "ablate.png": "Ablations: test AUC of every model for all users and for style-driven users (paper Tables 3 and 4).",
    "attention_by_segment.png": "explain: mean ᾱ per modality and expert gate β per user segment.",
}
# The order a person reads a run in: how well the model does, then its parts.
METRIC_ORDER = ("evaluation.json", "planted.md", "metrics.json", r".*\.json", "results.md", "ablate.md")
PICTURE_ORDER = (
    "training_curves.png",
    "alpha_by_segment.png",
    "topk_strips.png",
    r"\d+-style\.png",
    r"\d+-semantic\.png",
    r"\d+-text\.png",
    "attention_by_segment.png",
    "extraction_summary.png",
    "heatmap_val_auc.png",
    "ablate.png",
)
SHEET = re.compile(r"(\d+)-(style|semantic|text)\.png$")
SPACES = {"style": "e_STY", "semantic": "e_SEM", "text": "e_TSEM"}


@dataclass
class Table:
    """A table of the page: a heading, column names, rows of cells (text, escaped)."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Block:
    """One titled part of a section: key/value pairs, tables, preformatted text, markdown."""

    title: str
    source: str = ""
    pairs: list[tuple[str, str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    pre: list[tuple[str, str]] = field(default_factory=list)  # (summary line, text) in <details>
    markdown_html: str = ""  # markdown-it output with raw HTML disabled


@dataclass
class Picture:
    path: str
    caption: str
    data_uri: str


@dataclass
class Collected:
    """What :func:`collect` found under a run directory."""

    run_dir: str
    settings: list[Block] = field(default_factory=list)
    metrics: list[Block] = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReportResult:
    out: str
    pictures: int
    blocks: int
    bytes: int
    skipped: list[str]


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    md.disable(["link", "image", "autolink"])  # nothing on the page may point outside it
    return md.render(text)


def _rel(path: str, base: str) -> str:
    return path[len(base) :] if path.startswith(base) else path


def _walk(run_dir: str, settings: storage.StorageSettings | None) -> tuple[str, list[str]]:
    """(base prefix, relative paths of the files worth reading), sample-world contents left out."""
    _, resolved = storage.resolve(run_dir, settings)
    base = ("s3://" + resolved if storage.is_s3(run_dir) else resolved).rstrip("/") + "/"
    rel = [_rel(f, base) for f in storage.list_files(run_dir, settings)]
    worlds = {posixpath.dirname(r) for r in rel if posixpath.basename(r) == "world.json"}
    keep = []
    for r in rel:
        parts = r.split("/")
        if not r.lower().endswith(SUFFIXES) or SKIP_DIRS & set(parts[:-1]):
            continue
        d = posixpath.dirname(r)
        if any(r != posixpath.join(w, "world.json") and (d == w or d.startswith(w + "/") or w == "") for w in worlds):
            continue
        keep.append(r)
    return base, keep


def _fmt(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, default=str)
    return fmt_cell(v)


def _pairs(d: dict[str, Any], keys: list[str] | None = None) -> list[tuple[str, str]]:
    return [(k, _fmt(d[k])) for k in (keys or list(d)) if k in d]


# --------------------------------------------------------------------------- one block per kind of file


def _demo_block(rel: str, d: dict[str, Any]) -> Block:
    b = Block("demo run", rel)
    b.pairs = _pairs(d, ["started_at", "wall_s", "config"])
    stages = d.get("stages") or {}
    b.tables.append(
        Table(
            "stages, in order",
            ["stage", "config", "seconds"],
            [[n, s.get("config", ""), _fmt(s.get("seconds"))] for n, s in stages.items()],
        )
    )
    world = d.get("world") or {}
    if world:
        b.tables.append(Table("sample world", ["", "value"], [[k, _fmt(v)] for k, v in world.items()]))
    for name, s in stages.items():
        if s.get("yaml"):
            b.pre.append((f"{name}: {s.get('config', '')}", s["yaml"]))
    if d.get("demo_yaml"):
        b.pre.append(("demo settings", d["demo_yaml"]))
    return b


def _model_block(rel: str, d: dict[str, Any]) -> Block:
    b = Block(f"trained model: {posixpath.dirname(rel) or '.'}/", rel)
    b.pairs = _pairs(
        d,
        [
            "variant",
            "modalities",
            "split",
            "validation",
            "train_end",
            "test_end",
            "best_epoch",
            "selected_on",
            "val_auc",
            "val_logloss",
            "test",
            "parameters",
            "feature_dims",
            "mlflow_run_id",
        ],
    )
    training = {k: v for k, v in (d.get("training") or {}).items() if k != "history"}
    if training:
        b.tables.append(Table("training recipe", ["", "value"], [[k, _fmt(v)] for k, v in training.items()]))
    if d.get("model_config"):
        b.pre.append(("model config", yaml.safe_dump(d["model_config"], sort_keys=False, allow_unicode=True)))
    if d.get("encoder_versions"):
        b.pre.append(("encoder versions", yaml.safe_dump(d["encoder_versions"], sort_keys=False, allow_unicode=True)))
    return b


def _evaluation_block(rel: str, d: dict[str, Any]) -> Block:
    b = Block(f"evaluation: {rel}", rel)
    window = d.get("window") or {}
    b.pairs = [
        ("model", _fmt(d.get("model"))),
        ("variant", _fmt(d.get("variant"))),
        ("test window", f"{window.get('start')} → {window.get('end') or 'open'}"),
        ("rows (positives)", f"{fmt_cell(d.get('rows'))} ({fmt_cell(d.get('positives'))})"),
        ("AUC", fmt_cell(d.get("auc"))),
        ("logloss", fmt_cell(d.get("logloss"))),
        ("GAUC", f"{fmt_cell(d.get('gauc'))} ({fmt_cell(d.get('gauc_users'))} users with both classes)"),
    ]
    mods = list(d.get("modalities") or [])
    seg = d.get("segments") or {}
    cols = ["segment", "rows", "users", "AUC", "logloss", "GAUC", *[f"ᾱ {m}" for m in mods]]
    rows = [
        [
            name,
            *(fmt_cell(s.get(k)) for k in ("rows", "users", "auc", "logloss", "gauc")),
            *(fmt_cell((s.get("alpha") or {}).get(m)) for m in mods),
        ]
        for name, s in seg.items()
    ]
    b.tables.append(Table("per user segment", cols, rows, f"segments: {d.get('segments_source') or 'none'}"))
    wc = d.get("warm_cold") or {}
    if wc:
        rows = [
            [f"{side} {kind}", *(fmt_cell(s.get(k)) for k in ("rows", "users", "auc", "logloss", "gauc"))]
            for kind, sides in wc.items()
            for side, s in sides.items()
        ]
        note = f"warm: seen before {d.get('warm_before')}" if d.get("warm_before") else ""
        b.tables.append(Table("warm vs cold", ["", "rows", "users", "AUC", "logloss", "GAUC"], rows, note))
    spread = d.get("alpha_spread") or {}
    if spread:
        smods = list(next(iter(spread.values())).get("std", {}))
        rows = [
            [
                name,
                *(fmt_cell(s.get("std", {}).get(m)) for m in smods),
                "–" if s.get("share_planted_top") is None else f"{s['share_planted_top']:.0%}",
            ]
            for name, s in spread.items()
        ]
        b.tables.append(
            Table(
                "how user-aware ᾱ is", ["segment", *[f"std ᾱ {m}" for m in smods], "largest ᾱ = planted modality"], rows
            )
        )
    return b


def _recommend_block(rel: str, d: dict[str, Any]) -> Block:
    b = Block(f"recommendations: {posixpath.dirname(rel) or '.'}/", rel)
    b.pairs = _pairs(
        d,
        [
            "model",
            "variant",
            "as_of",
            "test_end",
            "k",
            "users",
            "rows",
            "users_evaluated",
            "users_skipped",
            "relevant",
            "relevant_reachable",
            "wall_s",
        ],
    )
    m = d["metrics"]
    keys = sorted(
        set(m.get("model", {})) | set(m.get("popularity", {})),
        key=lambda k: (k.split("_at_")[0], int(k.split("_at_")[-1]) if k.split("_at_")[-1].isdigit() else 0),
    )
    b.tables.append(
        Table(
            "ranking on the test window",
            ["ranking", *keys],
            [[name, *(fmt_cell(v.get(k)) for k in keys)] for name, v in m.items()],
        )
    )
    return b


def _extraction_block(rel: str, s: dict[str, Any]) -> Block:
    b = Block(f"extraction run {s.get('run_id', '')}".strip(), rel)
    b.pairs = _pairs(
        s,
        [
            "output",
            "encoder_version",
            "text_version",
            "catalogue_rows",
            "to_process",
            "already_done",
            "chunks",
            "images_per_s",
            "steady_images_per_s",
            "first_commit_s",
            "pipeline_s",
            "wall_s",
        ],
    )
    rows = [
        ["every modality", fmt_cell(s.get("rows_ok"))],
        ["missing a modality", fmt_cell(s.get("rows_partial"))],
        ["without image_uri", fmt_cell(s.get("rows_no_image"))],
        ["errors", fmt_cell(s.get("rows_failed"))],
    ]
    rows += [[f"with {m}", fmt_cell(n)] for m, n in (s.get("rows_by_modality") or {}).items()]
    b.tables.append(Table("rows", ["outcome", "rows"], rows))
    reasons = s.get("failed_by_reason") or {}
    b.tables.append(
        Table(
            "error rows per reason",
            ["stage:reason", "rows"],
            [[r, fmt_cell(n)] for r, n in reasons.items()] or [["none", "0"]],
        )
    )
    return b


def _kind(d: Any) -> str | None:
    if not isinstance(d, dict):
        return None
    if d.get("format") == DEMO_FORMAT:
        return "demo"
    if d.get("format") == MODEL_FORMAT:
        return "model"
    if {"segments", "auc", "modalities"} <= set(d):
        return "evaluation"
    if isinstance(d.get("metrics"), dict) and {"model", "popularity"} <= set(d["metrics"]):
        return "recommend"
    if d.get("status") == "finished" and isinstance(d.get("summary"), dict) and "rows_ok" in d["summary"]:
        return "extraction"
    if {"rows_ok", "failed_by_reason"} <= set(d):
        return "extraction_summary"
    return None


def _rank(rel: str, order: tuple[str, ...]) -> tuple[int, str]:
    """Sort key: the first of ``order`` that ``rel``'s file name matches (a regex), then the path."""
    name = posixpath.basename(rel)
    return next((i for i, pat in enumerate(order) if re.fullmatch(pat, name)), len(order)), rel


def _caption(rel: str) -> str:
    name = posixpath.basename(rel)
    if name in CAPTIONS:
        return CAPTIONS[name]
    m = SHEET.search(name)
    if m:
        return f"Nearest illustrations to {m.group(1)} by {m.group(2)} (cosine of {SPACES[m.group(2)]}): the paper's Fig. 5."
    return name


def collect(run_dir: str, settings: storage.StorageSettings | None = None) -> Collected:
    """Read every file of ``run_dir`` the page shows (see the module docstring)."""
    base, files = _walk(run_dir, settings)
    c = Collected(run_dir)
    order = {"demo": 0, "model": 1}
    settings_blocks: list[tuple[int, Block]] = []
    for rel in files:
        uri = base + rel
        low = rel.lower()
        try:
            data = storage.read_bytes(uri, settings)
        except Exception as err:  # a file that vanished or cannot be read is named, not fatal
            c.skipped.append(f"{rel}: {err}")
            continue
        if low.endswith(".png"):
            if not data.startswith(PNG_MAGIC) or len(data) > MAX_PICTURE_BYTES:
                c.skipped.append(f"{rel}: not a PNG or over {MAX_PICTURE_BYTES // 2**20} MiB")
                continue
            c.pictures.append(Picture(rel, _caption(rel), "data:image/png;base64," + base64.b64encode(data).decode()))
        elif low.endswith(".md"):
            c.metrics.append(Block(rel, rel, markdown_html=_markdown(data.decode("utf-8", "replace"))))
        elif low.endswith((".yaml", ".yml")):
            settings_blocks.append((2, Block(rel, rel, pre=[(rel, data.decode("utf-8", "replace"))])))
        else:
            try:
                d = json.loads(data)
            except ValueError:  # named when it is a file the page shows (not e.g. Ray Tune's JSON lines)
                if posixpath.basename(rel) in KNOWN_JSON or "_runs" in rel.split("/"):
                    c.skipped.append(f"{rel}: not valid JSON")
                continue
            kind = _kind(d)
            if kind in order:
                settings_blocks.append((order[kind], (_demo_block if kind == "demo" else _model_block)(rel, d)))
            elif kind == "evaluation":
                c.metrics.append(_evaluation_block(rel, d))
            elif kind == "recommend":
                c.metrics.append(_recommend_block(rel, d))
            elif kind in ("extraction", "extraction_summary"):
                c.metrics.append(_extraction_block(rel, d["summary"] if kind == "extraction" else d))
    c.settings = [b for _, b in sorted(settings_blocks, key=lambda x: x[0])]
    c.metrics.sort(key=lambda b: _rank(b.source, METRIC_ORDER))
    c.pictures.sort(key=lambda p: _rank(p.path, PICTURE_ORDER))
    return c


def render(c: Collected, title: str | None = None) -> str:
    """The page of :func:`collect`'s result (every text escaped)."""
    from jinja2 import Environment, PackageLoader

    env = Environment(loader=PackageLoader("umair", "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE).render(
        title=title or f"UMAIR-FPS run report: {c.run_dir}",
        run_dir=c.run_dir,
        written=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        n_pictures=len(c.pictures),
        sections=[("settings", "Settings", c.settings), ("metrics", "Metrics", c.metrics)],
        pictures=c.pictures,
        skipped=c.skipped,
    )


def write_report(
    run_dir: str, out: str | None = None, settings: storage.StorageSettings | None = None, title: str | None = None
) -> ReportResult:
    """Collect ``run_dir`` and write its page to ``out`` (default ``RUN_DIR/report.html``)."""
    if not storage.exists(run_dir, settings) and not storage.list_files(run_dir, settings):
        raise UmairError(f"{run_dir}: no such run directory (nothing to report)")
    c = collect(run_dir, settings)
    html = render(c, title).encode()
    out = out or storage.join(run_dir, "report.html")
    storage.write_bytes(out, html, settings)
    return ReportResult(out, len(c.pictures), len(c.settings) + len(c.metrics), len(html), c.skipped)
