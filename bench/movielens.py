"""Benchmark and worked example: a real catalogue (MovieLens + posters) through umair's jobs (issue #15).

Reads ``../shared/data/movielens-posters`` in place (610 users, 9,742 movies, 100,836
timestamped ratings, 3,683 user tags, a poster for 7,596 movies) and

- ``convert``: writes umair's tables (the only hand-written step a new site needs; the
  README's "Your own data" walks through it):

  * ``illustrations.parquet``: ``illust_id`` = movieId, ``image_uri`` = the poster's
    absolute path or NULL (2,146 movies have none), ``title``, ``tags`` = the genres
    (list<string>: the image pretext's labels and part of the text), ``user_tags`` =
    the distinct user tags given to the movie before the test window (list<string>),
    ``created_at`` = 1 January of the year in the title (NULL when there is none);
  * ``users.parquet``: ``user_id``, ``interest_tags`` = the user's own tags before the test window;
  * ``interactions.parquet``: ``user_id``, ``illust_id``, ``ts``, ``label`` = rating >= 4;
  * ``split.json``: by time over all ratings, the oldest 80 % train, the next 10 %
    validation (epoch selection), the last 10 % test (reported only), chosen before any run.

- ``run``: pretrain-image (posters, genre labels), extract (e_SEM, e_STY from the posters;
  e_TSEM from title + genres + user tags with the shipped base text model), then per seed
  ``train`` (full model and ``variant: dcn_v2_only``) and ``evaluate`` through the real
  CLI with the configs in ``pipelines/configs/movielens/``; one JSON line per run in
  ``OUT/results.jsonl``.
- ``table``: the results as one table (mean ± std over seeds) beside item popularity.

    .venv/bin/python bench/movielens.py convert
    .venv/bin/python bench/movielens.py run --seeds 0 1 2
    .venv/bin/python bench/movielens.py table
    .venv/bin/python bench/movielens.py content-probe
    .venv/bin/python bench/movielens.py history-probe   # after run: a history as of each rating
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_line  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "movielens-posters"
OUT = REPO / "outputs" / "movielens"
CONFIGS = REPO / "pipelines" / "configs" / "movielens"
YEAR = re.compile(r"\((\d{4})\)\s*$")


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(float(unix_s), UTC).isoformat()


def time_split(ts: np.ndarray, train: float = 0.8, validation: float = 0.1) -> dict[str, str]:
    """Boundaries by time over all ratings: ``[.., validation)`` train, ``[validation, split)``
    validation, ``[split, ..)`` test (the oldest ``train`` share, the next ``validation``)."""
    v, s = np.quantile(ts, [train, train + validation])
    return {"validation": _iso(np.ceil(v)), "split": _iso(np.ceil(s))}


def _distinct_lower(values: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        key = v.strip().lower()
        if key:
            seen.setdefault(key, None)
    return list(seen)


def convert(data: Path, out: Path) -> dict[str, Any]:
    """Write the umair tables of the MovieLens-with-posters data to ``out`` (see the module doc)."""
    out.mkdir(parents=True, exist_ok=True)
    movies = pacsv.read_csv(data / "movies.csv", convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    ratings = pacsv.read_csv(data / "ratings.csv")
    tags = pacsv.read_csv(data / "tags.csv", convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    ts = ratings.column("timestamp").to_numpy()
    split = time_split(ts)
    split_unix = datetime.fromisoformat(split["split"]).timestamp()

    early = tags.filter(pc.less(tags.column("timestamp"), split_unix))
    by_movie: dict[int, list[str]] = {}
    by_user: dict[int, list[str]] = {}
    for uid, mid, tag in zip(
        early.column("userId").to_pylist(), early.column("movieId").to_pylist(), early.column("tag").to_pylist()
    ):
        by_movie.setdefault(mid, []).append(tag)
        by_user.setdefault(uid, []).append(tag)

    ids = movies.column("movieId").to_pylist()
    titles = movies.column("title").to_pylist()
    posters = data / "posters"
    image_uri = [str(posters / f"{m}.jpg") if (posters / f"{m}.jpg").is_file() else None for m in ids]
    genres = [[] if g == "(no genres listed)" else g.split("|") for g in movies.column("genres").to_pylist()]
    created = []
    for t in titles:
        year = YEAR.search(t.strip())
        created.append(datetime(int(year.group(1)), 1, 1, tzinfo=UTC) if year else None)
    illustrations = pa.table(
        {
            "illust_id": pa.array(ids, pa.int64()),
            "image_uri": pa.array(image_uri, pa.string()),
            "title": pa.array(titles, pa.string()),
            "tags": pa.array(genres, pa.list_(pa.string())),
            "user_tags": pa.array([_distinct_lower(by_movie.get(m, [])) for m in ids], pa.list_(pa.string())),
            "created_at": pa.array(created, pa.timestamp("us", tz="UTC")),
        }
    )
    user_ids = sorted(set(ratings.column("userId").to_pylist()))
    users = pa.table(
        {
            "user_id": pa.array(user_ids, pa.int64()),
            "interest_tags": pa.array([_distinct_lower(by_user.get(u, [])) for u in user_ids], pa.list_(pa.string())),
        }
    )
    interactions = pa.table(
        {
            "user_id": ratings.column("userId").cast(pa.int64()),
            "illust_id": ratings.column("movieId").cast(pa.int64()),
            "ts": pa.array((ts * 1_000_000).astype("datetime64[us]"), pa.timestamp("us", tz="UTC")),
            "label": pa.array((ratings.column("rating").to_numpy() >= 4.0).astype(np.int8), pa.int8()),
        }
    )
    for name, table in (("illustrations", illustrations), ("users", users), ("interactions", interactions)):
        pq.write_table(table, out / f"{name}.parquet")
    summary = {
        **split,
        "movies": illustrations.num_rows,
        "movies_without_poster": sum(u is None for u in image_uri),
        "users": users.num_rows,
        "ratings": interactions.num_rows,
        "label_rate": round(float(np.mean(interactions.column("label").to_numpy())), 4),
    }
    (out / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def umair(*args: str) -> float:
    """Run one ``umair`` CLI job from the repository root; its wall time in seconds."""
    t0 = time.perf_counter()
    cmd = [str(REPO / ".venv" / "bin" / "umair"), *args]
    print("$ umair " + " ".join(args), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.perf_counter() - t0


def _config_copy(src: Path, dst: Path, sets: list[str] | None = None, **updates: Any) -> Path:
    """``src`` YAML with top-level keys replaced, then ``sets`` applied (the README's configs
    stay the source of truth)."""
    import yaml

    data = yaml.safe_load(src.read_text())
    data.update(updates)
    _apply(data, sets or [])
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


def popularity(tables: Path, split: dict[str, str]) -> dict[str, Any]:
    """Item popularity (log count of training-window ratings) scored on the test window,
    overall and on warm / cold users and items, with the same metric code as ``umair evaluate``."""
    from umair.training.scoring import warm_cold_report, window_metrics

    inter = pq.read_table(tables / "interactions.parquet")
    ts = inter.column("ts").cast(pa.int64()).to_numpy()
    v_us = int(datetime.fromisoformat(split["validation"]).timestamp() * 1e6)
    s_us = int(datetime.fromisoformat(split["split"]).timestamp() * 1e6)
    users, items = inter.column("user_id").to_numpy(), inter.column("illust_id").to_numpy()
    labels = inter.column("label").to_numpy().astype(np.float64)
    train, test = ts < v_us, ts >= s_us
    ids, counts = np.unique(items[train], return_counts=True)
    count_of = dict(zip(ids.tolist(), counts.tolist()))
    score = np.log1p(np.array([count_of.get(i, 0) for i in items[test]], np.float64))
    prob = 0.05 + 0.9 * score / max(score.max(), 1.0)  # a monotone map into (0, 1): AUC is what counts
    warm = {"users": np.isin(users[test], users[train]), "items": np.isin(items[test], items[train])}
    out = window_metrics(users[test], labels[test], prob)
    out["warm_cold"] = warm_cold_report(users[test], labels[test], prob, warm)
    return out


def _apply(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``KEY=JSON`` overrides with dotted keys (``features.item_bags=["tags"]``)."""
    for item in sets:
        key, _, raw = item.partition("=")
        *parents, leaf = key.split(".")
        node = data
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = json.loads(raw)
    return data


def run(out: Path, seeds: list[int], variants: list[str], skip_encoders: bool, name: str = "", sets=()) -> None:
    """The whole chain through the real CLI; one JSON line per (variant, seed) in OUT/results.jsonl."""
    tables = out / "tables"
    if not (tables / "split.json").is_file():
        print(json.dumps(convert(DATA, tables), indent=2))
    split = json.loads((tables / "split.json").read_text())
    rel = str(tables.relative_to(REPO))
    umair(
        "validate",
        *("--illustrations", f"{rel}/illustrations.parquet", "--users", f"{rel}/users.parquet"),
        *("--interactions", f"{rel}/interactions.parquet"),
    )
    times: dict[str, float] = {}
    if not skip_encoders:
        times["pretrain-image"] = umair("pretrain-image", "--config", str(CONFIGS / "pretrain_image.yaml"))
        times["extract"] = umair("extract", "--config", str(CONFIGS / "extract.yaml"))
    results = out / "results.jsonl"
    for seed in seeds:
        for variant in variants:
            label = f"{name}{variant}"
            run_id = f"{label}-s{seed}"
            model_dir = out / "runs" / run_id
            cfg = _config_copy(
                CONFIGS / "train.yaml",
                out / "configs" / f"train-{run_id}.yaml",
                sets=list(sets),
                variant=None if variant == "full" else variant,
                seed=seed,
                run_name=f"movielens-{run_id}",
                output=str(model_dir.relative_to(REPO)),
                validation=split["validation"],
                split=split["split"],
            )
            t_train = umair("train", "--config", str(cfg))
            ev = _config_copy(
                CONFIGS / "evaluate.yaml",
                out / "configs" / f"evaluate-{run_id}.yaml",
                model=str(model_dir.relative_to(REPO)),
                run_name=f"movielens-evaluate-{run_id}",
            )
            umair("evaluate", "--config", str(ev))
            meta = json.loads((model_dir / "model.json").read_text())
            report = json.loads((model_dir / "evaluation.json").read_text())
            hist = meta["training"]["history"]
            row = {
                "variant": label,
                "seed": seed,
                "overrides": list(sets),
                "best_epoch": meta["best_epoch"],
                "val_auc": meta["val_auc"],
                "val_logloss": meta["val_logloss"],
                "test_auc": report["auc"],
                "test_logloss": report["logloss"],
                "test_gauc": report["gauc"],
                "warm_cold": report.get("warm_cold"),
                "modality_coverage": report.get("modality_coverage"),
                "rows_per_s": float(np.mean([h["rows_per_s"] for h in hist])),
                "train_s": round(t_train, 1),
                **{f"{k}_s": round(v, 1) for k, v in times.items()},
            }
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    table(out)


def content_probe(tables: Path) -> dict[str, float]:
    """How much a *new* film's content tells: logistic regression on genres (multi-hot) +
    release year, fitted on the training window's rows, AUC on the validation and test
    windows' rows of movies never rated in training (deterministic: lbfgs, no seed)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    split = json.loads((tables / "split.json").read_text())
    ill, inter = pq.read_table(tables / "illustrations.parquet"), pq.read_table(tables / "interactions.parquet")
    genres = sorted({g for gs in ill.column("tags").to_pylist() for g in gs})
    x = np.zeros((ill.num_rows, len(genres) + 1))
    for r, gs in enumerate(ill.column("tags").to_pylist()):
        x[r, [genres.index(g) for g in gs]] = 1.0
    years = [c.year if c else 1990 for c in ill.column("created_at").to_pylist()]
    x[:, -1] = (np.array(years) - 1990) / 20
    row_of = {int(i): r for r, i in enumerate(ill.column("illust_id").to_pylist())}
    rows = np.array([row_of[int(i)] for i in inter.column("illust_id").to_pylist()])
    ts, y = inter.column("ts").cast(pa.int64()).to_numpy(), inter.column("label").to_numpy()
    v_us, s_us = (int(datetime.fromisoformat(split[k]).timestamp() * 1e6) for k in ("validation", "split"))
    train = ts < v_us
    clf = LogisticRegression(max_iter=1000).fit(x[rows[train]], y[train])
    cold = ~np.isin(rows, rows[train])
    out = {}
    for name, window in (("validation", (ts >= v_us) & (ts < s_us)), ("test", ts >= s_us)):
        m = window & cold
        out[f"{name}_cold_item_auc"] = float(roc_auc_score(y[m], clf.predict_proba(x[rows[m]])[:, 1]))
        out[f"{name}_cold_item_rows"] = int(m.sum())
    return out


def _as_of(users: np.ndarray, ts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per row, the sum of ``values`` [N, ...] over the same user's rows with a strictly
    earlier ``ts`` (rows at the same instant are not each other's past)."""
    order = np.lexsort((ts, users))
    u, t, v = users[order], ts[order], values[order]
    csum = np.concatenate([np.zeros((1, *v.shape[1:]), v.dtype), np.cumsum(v, axis=0)])
    first = np.searchsorted(u, u, side="left")  # the user's first sorted row
    # rows of this user strictly before t: from `first` to the first row with (u, ts) >= (u, t)
    rank = np.unique(t, return_inverse=True)[1].astype(np.int64)  # dense rank of the instant
    key = u.astype(np.int64) * (int(rank.max()) + 2) + rank
    end = np.searchsorted(key, key, side="left")
    out = np.empty_like(v)
    out[order] = csum[end] - csum[first]
    return out


def history_probe(out: Path) -> dict[str, Any]:
    """Would a user history *as of each rating* make the modalities pay? (issue #15: 91 % of
    test rows are users the training window never saw, so the model's training-window
    history table is empty for them.)

    Per rating, from the same user's strictly earlier ratings (over the whole log, the test
    window included, as a live service would know them): A = non-content features (their
    count and smoothed positive rate; the item's training-window count and smoothed positive
    rate); B = A + per modality (e_SEM, e_STY, e_TSEM, standardised with training items'
    statistics) the cosine of the item to the mean of the user's earlier liked and earlier
    disliked items. A gradient-boosted classifier (scikit-learn, fixed settings, no tuning)
    is fitted on the training window; AUC on the validation and test windows, also on cold
    users / cold items. B - A is what the content history adds over a history without content."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    from umair.feature_store import read_features

    tables = out / "tables"
    split = json.loads((tables / "split.json").read_text())
    inter = pq.read_table(tables / "interactions.parquet")
    users = inter.column("user_id").to_numpy().astype(np.int64)
    items = inter.column("illust_id").to_numpy().astype(np.int64)
    ts = inter.column("ts").cast(pa.int64()).to_numpy()
    y = inter.column("label").to_numpy().astype(np.float64)
    v_us, s_us = (int(datetime.fromisoformat(split[k]).timestamp() * 1e6) for k in ("validation", "split"))
    train = ts < v_us

    n_before = _as_of(users, ts, np.ones(len(y)))
    pos_before = _as_of(users, ts, y)
    ids, inv = np.unique(items, return_inverse=True)
    count = np.bincount(inv[train], minlength=len(ids)).astype(np.float64)
    pos = np.bincount(inv[train], weights=y[train], minlength=len(ids))
    prior = float(y[train].mean())
    a = np.stack(
        [n_before, (pos_before + prior) / (n_before + 1), count[inv], (pos[inv] + 5 * prior) / (count[inv] + 5)], 1
    )

    feats = read_features(str(out / "features"), None, None)
    fid = feats.column("illust_id").to_numpy()
    row_of = dict(zip(fid.tolist(), range(len(fid))))
    rows = np.array([row_of.get(int(i), -1) for i in items])
    in_train = np.zeros(len(fid), bool)
    in_train[np.unique(rows[train & (rows >= 0)])] = True
    cols = []
    for m in ("sem", "sty", "tsem"):
        col = feats.column(m)
        has = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False))
        width = col.type.list_size
        x = np.zeros((len(fid), width), np.float32)
        x[has] = np.stack(col.filter(pa.array(has)).to_numpy(zero_copy_only=False)).astype(np.float32)
        fit = in_train & has
        x = np.where(has[:, None], (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-6), 0.0).astype(np.float32)
        xi = x[np.maximum(rows, 0)] * ((rows >= 0) & has[np.maximum(rows, 0)])[:, None]
        for like in (1.0, 0.0):
            w = ((y == like) & (np.linalg.norm(xi, axis=1) > 0)).astype(np.float32)
            mean = _as_of(users, ts, xi * w[:, None])
            cos = (xi * mean).sum(1) / (np.linalg.norm(xi, axis=1) * np.linalg.norm(mean, axis=1) + 1e-9)
            cols.append(cos)
    b = np.concatenate([a, np.stack(cols, 1)], 1)

    warm_users = np.isin(users, users[train])
    warm_items = np.isin(items, items[train])
    result: dict[str, Any] = {"rows": {"train": int(train.sum())}}
    for name, x in (("A: non-content history", a), ("B: A + content history", b)):
        clf = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, early_stopping=False, random_state=0)
        clf.fit(x[train], y[train])
        p = clf.predict_proba(x)[:, 1]
        r: dict[str, float] = {}
        for window, m in (("val", (ts >= v_us) & (ts < s_us)), ("test", ts >= s_us)):
            r[f"{window}_auc"] = float(roc_auc_score(y[m], p[m]))
            for seg, mask in (("cold_users", ~warm_users), ("cold_items", ~warm_items)):
                r[f"{window}_{seg}_auc"] = float(roc_auc_score(y[m & mask], p[m & mask]))
        result[name] = r
    return result


def _cell(values: list[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "–"
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def table(out: Path) -> None:
    """Mean ± std over seeds per variant, beside item popularity (Markdown)."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    split = json.loads((out / "tables" / "split.json").read_text())
    pop = popularity(out / "tables", split)

    def side(r: dict, kind: str, which: str) -> float | None:
        return ((r.get("warm_cold") or {}).get(kind) or {}).get(which, {}).get("auc")

    cols = ["model", "seeds", "val AUC", "test AUC", "test logloss", "warm users", "cold users"]
    cols += ["warm items", "cold items", "rows/s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        cells = [variant, str(len(rs)), _cell([r["val_auc"] for r in rs]), _cell([r["test_auc"] for r in rs])]
        cells.append(_cell([r["test_logloss"] for r in rs]))
        cells += [_cell([side(r, k, w) for r in rs]) for k, w in (("users", "warm"), ("users", "cold"))]
        cells += [_cell([side(r, k, w) for r in rs]) for k, w in (("items", "warm"), ("items", "cold"))]
        cells.append(f"{np.mean([r['rows_per_s'] for r in rs]):.0f}")
        print("| " + " | ".join(cells) + " |")
    wc = pop["warm_cold"]
    cells = ["item popularity", "–", "–", f"{pop['auc']:.4f}", "–"]
    cells += [f"{wc[k][w]['auc']:.4f}" for k in ("users", "items") for w in ("warm", "cold")]
    print("| " + " | ".join([*cells, "–"]) + " |")
    test_rows = wc["items"]["warm"]["rows"] + wc["items"]["cold"]["rows"]
    print(
        f"\ntest rows {test_rows}: cold items {wc['items']['cold']['rows'] / test_rows:.1%}, "
        f"cold users {wc['users']['cold']['rows'] / test_rows:.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="write umair's tables from the MovieLens-with-posters files")
    c.add_argument("--data", type=Path, default=DATA)
    c.add_argument("--out", type=Path, default=OUT / "tables")
    r = sub.add_parser("run", help="pretrain-image, extract, then train + evaluate per variant and seed")
    r.add_argument("--out", type=Path, default=OUT)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--variants", nargs="+", default=["full", "dcn_v2_only"])
    r.add_argument("--skip-encoders", action="store_true", help="reuse the encoder and features already there")
    r.add_argument("--name", default="", help="prefix of the variants' names in the table (an experiment)")
    r.add_argument("--set", dest="sets", action="append", default=[], help="train override KEY=JSON (dotted keys)")
    c2 = sub.add_parser("content-probe", help="genres + year logistic regression on cold-item rows")
    c2.add_argument("--out", type=Path, default=OUT)
    h = sub.add_parser("history-probe", help="does a history as of each rating make the modalities pay?")
    h.add_argument("--out", type=Path, default=OUT)
    t = sub.add_parser("table", help="print the results table")
    t.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    print(machine_line())
    if args.cmd == "convert":
        t0 = time.perf_counter()
        summary = convert(args.data, args.out)
        print(json.dumps(summary, indent=2))
        print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s")
    elif args.cmd == "content-probe":
        print(json.dumps(content_probe(args.out / "tables"), indent=2))
    elif args.cmd == "history-probe":
        print(json.dumps(history_probe(args.out), indent=2))
    elif args.cmd == "run":
        run(args.out, args.seeds, args.variants, args.skip_encoders, args.name, args.sets)
    else:
        table(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
