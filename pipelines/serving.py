"""The trained UMAIR-FPS fusion model as an MLflow pyfunc model, logged into its training
run and registered: ``mlflow.pyfunc.load_model("models:/umair-fps/N").predict(df)`` scores
``(user_id, illust_id[, ts])`` rows in any process with this project's environment, and
``mlflow models serve -m models:/umair-fps/N --env-manager local`` serves it over HTTP.

The pyfunc directory (run artifact ``pyfunc/``; :func:`save_pyfunc` writes it anywhere)::

    MLmodel, python_env.yaml, requirements.txt, input_example.json, ...
    umair_fps_pyfunc.py          the model as code (MLflow "models from code"): a PythonModel
                                 whose load_context builds a FusionScorer
    artifacts/model/             the model directory: model.pt, model.json, feature_space.json
    artifacts/tables/            what scoring reads besides the model, so a fresh process needs
                                 nothing else: item_features.parquet (illust_id + the model's
                                 vector columns e_SEM / e_STY / e_TSEM as stored, with their
                                 umair.* metadata), illustrations.parquet (the items' metadata
                                 columns the feature space encodes), users.parquet (user_id and
                                 the profile columns it encodes)
    best_train.yaml              (a version registered by ``umair tune``) its train config

Size cost: the item vectors dominate, ≈ items × Σ_m d_m × 4 bytes (float32, as the
extraction writes them; they barely compress): 1 M items with 512 + 64 + 384 dims ≈ 3.8 GB
per logged model, the demo world's 2 400 items ≈ 9 MB; the users table adds tens of bytes
a user. Measured on the tiny test world (96 items, 512 + 64 + 16 dims, 24 users):
item_features.parquet 262 KB, illustrations 4 KB, users 2 KB, beside the 140 KB model.

Scoring (:class:`FusionScorer`) is the code ``umair evaluate`` runs: the same
:func:`~umair.training.lookup.load_lookup` encoding of the tables with the model's
:class:`~umair.model.features.FeatureSpace` and the same
:func:`~umair.training.scoring.score_rows`, so a version's probabilities equal evaluate's.
``predict`` returns one row per input row: ``prob`` = σ(logit), ``alpha_<m>`` = the effective
UMCM weight ᾱ_m = Σ_k β_k α_{k,m} of each modality (summing to 1 over the present ones;
none for a model without UMCM) and ``status``:

- ``ok``: both ids known;
- ``unknown_user``: a user_id not in the users table is scored as a new user with no
  profile (user-id, tag and profile slots all OOV / padding): the cold-start path the
  model takes for every user it did not train on, minus the profile;
- ``unknown_item``: an illust_id without item features cannot be scored (no e_SEM / e_STY /
  e_TSEM to attend over): ``prob`` and ``alpha_*`` are NaN. One bad id does not fail a
  whole batch; check ``status``.

``ts`` (optional) is accepted so interaction logs score as they are; the model reads no
time: its user and item tables are frozen at logging.

Registration tags every version with the training run's encoder versions (``umair.<key>``
for each ``encoder_versions`` entry of ``model.json``, plus ``encoder_version`` and
``text_model``: the image and text encoders of the features), ``variant``, ``val_auc`` /
``test_auc`` when present and ``train_run_id``.

Logging uses ``MlflowClient`` only (:func:`mlflow.pyfunc.save_model`, then the directory
logged into the run; the version's source is that ``pyfunc/`` artifact): no fluent
active-run or global tracking-URI state, so it works from a Ray driver or a Tune process
whatever tracking URI it was given. Serving needs this project installed (the model code
imports :mod:`pipelines.serving`): use ``--env-manager local`` from its environment (with
``.venv/bin`` on ``PATH``: MLflow starts ``uvicorn`` from there).

This module imports MLflow only inside its functions: jobs may import it at module level
without slowing ``umair --help``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umair import contracts, storage
from umair.errors import FeatureError
from umair.model.features import UserTable
from umair.model.interactions import rows_of
from umair.model.item_features import features_info
from umair.training.inputs import Inputs, check_encoders, read_item_features, resolve_eval_inputs
from umair.training.lookup import Lookup, load_lookup, read_log
from umair.training.model_io import META, SPACE, WEIGHTS, SavedModel, load_model
from umair.training.scoring import score_rows

PYFUNC = "pyfunc"  # the run artifact holding the pyfunc model
MODEL, TABLES = "model", "tables"  # its artifacts (artifacts/model, artifacts/tables)
ITEMS, ILLUSTRATIONS, USERS = "item_features.parquet", "illustrations.parquet", "users.parquet"
INTERACTIONS = "interactions.parquet"  # the log the user history reads (models with one)
STATUS_OK, UNKNOWN_USER, UNKNOWN_ITEM = "ok", "unknown_user", "unknown_item"
REGISTERED_DESCRIPTION = (
    "UMAIR-FPS fusion model (MLflow pyfunc): predict(DataFrame user_id, illust_id[, ts]) -> "
    "prob, alpha_<modality>, status"
)

# The pyfunc model as code (MLflow "models from code"): nothing is pickled, the class
# comes from the installed `pipelines` package when the model loads.
MODEL_CODE = '''"""UMAIR-FPS fusion model as an MLflow pyfunc (written by pipelines.serving)."""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from pipelines.serving import FusionScorer


class UmairFpsPyfunc(PythonModel):
    def load_context(self, context):
        self.scorer = FusionScorer.load(context.artifacts["model"], context.artifacts["tables"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.scorer.predict(model_input)


mlflow.models.set_model(UmairFpsPyfunc())
'''


def _with_unknown_user(users: UserTable) -> UserTable:
    """``users`` plus one last row of zeros: user id, tags, profile fields and bags all in
    their OOV / padding slot (index 0), the row an unknown ``user_id`` is scored with."""

    def add(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((1, *a.shape[1:]), a.dtype)])

    return UserTable(
        add(users.user_ids),
        add(users.uid),
        add(users.tags),
        add(users.fields),
        {k: add(v) for k, v in users.bags.items()},
    )


def _ids(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """An id column as (int64 ids, valid mask); nulls and non-integral values are invalid."""
    import pandas as pd

    s = pd.Series(values)
    if pd.api.types.is_integer_dtype(s.dtype) and not s.hasnans:
        return s.to_numpy(np.int64), np.ones(len(s), bool)
    num = pd.to_numeric(s, errors="coerce").astype("float64").to_numpy()  # null, text -> NaN
    valid = np.isfinite(num) & (num % 1 == 0)
    return np.where(valid, num, 0).astype(np.int64), valid


@dataclass
class FusionScorer:
    """A saved model and its lookup tables, scoring ``(user_id, illust_id)`` rows as
    ``umair evaluate`` does (see the module docstring for the output columns)."""

    saved: SavedModel
    lookup: Lookup
    users: UserTable  # without the unknown-user row
    item_ids: np.ndarray  # item_row -> illust_id
    batch_size: int = 4096

    @classmethod
    def load(cls, model_dir: str, tables_dir: str, settings: storage.StorageSettings | None = None) -> FusionScorer:
        """The model in ``model_dir`` with the tables :func:`write_scoring_tables` wrote to ``tables_dir``."""
        saved = load_model(model_dir, settings)
        history = saved.config.user_history
        inputs = Inputs(
            storage.join(tables_dir, ILLUSTRATIONS),
            storage.join(tables_dir, USERS),
            storage.join(tables_dir, INTERACTIONS),  # read only for a model with a user history
            storage.join(tables_dir, ITEMS),
            saved.meta["split"],
        )
        expected = (saved.meta.get("data") or {}).get("features_fingerprint")
        _, user_table, items = load_lookup(
            saved.space, inputs, saved.modalities, "cpu", settings, expected, with_log=False
        )
        log = read_log(inputs.interactions, user_table, items, settings) if history else None
        lookup = Lookup(_with_unknown_user(user_table), items, saved.modalities, "cpu", log)
        return cls(saved, lookup, user_table, items.illust_ids)

    @property
    def modalities(self) -> list[str]:
        """The J modalities ᾱ is reported for (``alpha_<m>`` columns; empty without UMCM)."""
        return list(self.saved.config.modalities)

    def predict(self, rows: Any) -> Any:
        """A pandas DataFrame with ``user_id`` and ``illust_id`` (``ts`` and other columns
        ignored) -> a DataFrame of ``prob``, ``alpha_<m>``, ``status``, in the input's order."""
        import pandas as pd
        import torch

        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
        missing = [c for c in ("user_id", "illust_id") if c not in df.columns]
        if missing:
            raise ValueError(f"UMAIR-FPS input: no column(s) {missing} (columns: {list(df.columns)})")
        n = len(df)
        uid, u_valid = _ids(df["user_id"])
        iid, i_valid = _ids(df["illust_id"])
        urow = np.where(u_valid, self.users.rows(uid), -1)
        irow = np.where(i_valid, rows_of(self.item_ids, iid), -1)
        unknown_user = urow < 0
        urow = np.where(unknown_user, len(self.users.user_ids), urow)  # the appended OOV row
        ok = irow >= 0
        prob = np.full(n, np.nan)
        alpha = np.full((n, len(self.modalities)), np.nan)
        if ok.any():
            s = score_rows(
                self.saved.model,
                self.lookup,
                torch.as_tensor(urow[ok].astype(np.int64)),
                torch.as_tensor(irow[ok].astype(np.int64)),
                self.batch_size,
            )
            prob[ok] = s.probs
            if s.weights is not None:
                alpha[ok] = s.weights
        status = np.where(~ok, UNKNOWN_ITEM, np.where(unknown_user, UNKNOWN_USER, STATUS_OK))
        out = {"prob": prob, **{f"alpha_{m}": alpha[:, j] for j, m in enumerate(self.modalities)}, "status": status}
        return pd.DataFrame(out, index=df.index)


# --------------------------------------------------------------------------- writing the pyfunc model


def write_scoring_tables(
    saved: SavedModel, inputs: Inputs, out: str, settings: storage.StorageSettings | None = None
) -> dict[str, int]:
    """Copy what scoring reads into the local directory ``out``: the item features (the
    model's vector columns only, with their ``umair.*`` metadata, checked to be the set the
    model trained on: same encoders, same rows), the illustrations of those items, the
    users, each with only the columns the feature space encodes, and for a model with a user
    history the interactions it reads "now" (its counts read all of them). Returns bytes per file."""
    os.makedirs(out, exist_ok=True)
    space = saved.space
    features = read_item_features(inputs, settings, columns=["illust_id", *saved.modalities])
    info = features_info(features, inputs.item_features)
    check_encoders(info, saved)
    expected = (saved.meta.get("data") or {}).get("features_fingerprint")
    if expected and info.fingerprint != expected:
        raise FeatureError(
            f"{inputs.item_features}: the item features changed since the model was trained (rows or their order differ)"
        )
    ill = contracts.read_table(inputs.illustrations, "illustrations", settings)
    ill = ill.filter(pc.is_in(ill.column("illust_id"), value_set=pa.array(info.illust_ids, pa.int64())))
    keep = ["illust_id", "image_uri", *space.item_fields, *space.item_bags]
    users = contracts.read_table(inputs.users, "users", settings)
    ukeep = ["user_id", "interest_tags", *space.user_fields, *space.user_bags]
    tables = {
        ITEMS: features,
        ILLUSTRATIONS: ill.select([c for c in ill.column_names if c in keep]),
        USERS: users.select([c for c in users.column_names if c in ukeep]),
    }
    if saved.config.user_history:
        inter = contracts.read_table(inputs.interactions, "interactions", settings)
        tables[INTERACTIONS] = inter.select(["user_id", "illust_id", "ts", "label"])
    sizes = {}
    for name, table in tables.items():
        path = os.path.join(out, name)
        storage.write_parquet(table, path)
        sizes[name] = os.path.getsize(path)
    return sizes


def signature_of(modalities: list[str]) -> Any:
    """The pyfunc signature: ``user_id``, ``illust_id`` (long), optional ``ts`` (any) in;
    ``prob``, ``alpha_<m>`` (double), ``status`` (string) out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    # ts: any type (MLflow's datetime refuses the tz-aware timestamps interaction logs hold)
    ts = ColSpec(AnyType(), "ts", required=False)
    inputs = Schema([ColSpec("long", "user_id"), ColSpec("long", "illust_id"), ts])
    outputs = [ColSpec("double", "prob"), *(ColSpec("double", f"alpha_{m}") for m in modalities)]
    return ModelSignature(inputs, Schema([*outputs, ColSpec("string", "status")]))


def requirements() -> list[str]:
    """Pinned pip requirements of the pyfunc (informational: the model needs this project
    installed, so serve it with ``--env-manager local`` in the project's environment)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("umair", "mlflow", "torch", "pyarrow", "numpy", "pandas", "pydantic"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def save_pyfunc(
    model_dir: str,
    path: str,
    inputs: Inputs | None = None,
    settings: storage.StorageSettings | None = None,
    run_id: str | None = None,
) -> str:
    """Write the pyfunc model of the model directory ``model_dir`` (local or s3://) to the
    new local directory ``path``. ``inputs``: the tables it was trained on (default: the
    ones its ``model.json`` records, as ``umair evaluate`` reads them)."""
    import mlflow
    import pandas as pd
    from mlflow.models import Model

    saved = load_model(model_dir, settings)
    inputs = inputs or resolve_eval_inputs(saved, settings)[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_copy = os.path.join(tmp, MODEL)
        os.makedirs(model_copy)
        for name in (WEIGHTS, SPACE, META):
            with open(os.path.join(model_copy, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(model_dir, name), settings))
        tables = os.path.join(tmp, TABLES)
        write_scoring_tables(saved, inputs, tables, settings)
        code = os.path.join(tmp, "umair_fps_pyfunc.py")
        with open(code, "w") as f:
            f.write(MODEL_CODE)
        users = storage.read_parquet(os.path.join(tables, USERS), columns=["user_id"]).column("user_id")
        items = storage.read_parquet(os.path.join(tables, ITEMS), columns=["illust_id"]).column("illust_id")
        n = min(2, len(users), len(items))
        example = pd.DataFrame(
            {"user_id": users.to_numpy()[:n].astype(np.int64), "illust_id": items.to_numpy()[:n].astype(np.int64)}
        )
        mlflow.pyfunc.save_model(
            path,
            python_model=code,
            artifacts={MODEL: model_copy, TABLES: tables},
            signature=signature_of(list(saved.config.modalities)),
            input_example=example if n else None,
            pip_requirements=requirements(),
            metadata={k: str(v) for k, v in version_tags(saved.meta).items()},
            mlflow_model=Model(run_id=run_id, artifact_path=PYFUNC) if run_id else None,
        )
    return path


def version_tags(meta: dict[str, Any]) -> dict[str, str]:
    """Model-version tags from a ``model.json``: encoder versions (``umair.<key>``,
    ``encoder_version``, ``text_model``), ``variant``, ``val_auc`` / ``test_auc`` when
    present, ``train_run_id``."""
    enc = meta.get("encoder_versions") or {}
    tags = {f"umair.{k}": str(v) for k, v in enc.items()}
    if "encoder.version" in enc:
        tags["encoder_version"] = str(enc["encoder.version"])
    if "tsem.encoder" in enc:
        tags["text_model"] = str(enc["tsem.encoder"])
    tags["variant"] = str(meta.get("variant") or "full")
    tags["modalities"] = ",".join(meta.get("modalities") or []) or "none"
    if meta.get("val_auc") is not None:
        tags["val_auc"] = f"{float(meta['val_auc']):.6f}"
    if (meta.get("test") or {}).get("test_auc") is not None:
        tags["test_auc"] = f"{float(meta['test']['test_auc']):.6f}"
    if meta.get("mlflow_run_id"):
        tags["train_run_id"] = str(meta["mlflow_run_id"])
    return tags


# --------------------------------------------------------------------------- MLflow: log and register


def _client(client_or_uri: Any) -> Any:
    import mlflow

    return mlflow.MlflowClient(client_or_uri) if isinstance(client_or_uri, str) else client_or_uri


def has_pyfunc(client: Any, run_id: str) -> bool:
    """True when the run holds a logged pyfunc model (``pyfunc/MLmodel``)."""
    return f"{PYFUNC}/MLmodel" in {a.path for a in client.list_artifacts(run_id, PYFUNC)}


def log_fusion_model(
    client_or_uri: Any,
    run_id: str,
    model_dir: str,
    *,
    inputs: Inputs | None = None,
    register_as: str | None = None,
    settings: storage.StorageSettings | None = None,
    tags: dict[str, str] | None = None,
) -> Any:
    """Log the pyfunc model of ``model_dir`` into the run ``run_id`` (artifact ``pyfunc/``)
    and, with ``register_as``, register it as a new version of that model
    (:func:`register_pyfunc`; ``tags`` added to :func:`version_tags`). Returns the
    ``ModelVersion``, or None without ``register_as``. ``client_or_uri``: an
    ``MlflowClient`` or a tracking URI; ``inputs`` as for :func:`save_pyfunc`."""
    client = _client(client_or_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_pyfunc(model_dir, os.path.join(tmp, PYFUNC), inputs, settings, run_id)
        client.log_artifacts(run_id, path, PYFUNC)
    meta = json.loads(storage.read_bytes(storage.join(model_dir, META), settings))
    if register_as is None:
        return None
    return register_pyfunc(client, register_as, run_id, {**version_tags(meta), **(tags or {})})


def register_pyfunc(client: Any, name: str, run_id: str, tags: dict[str, str], description: str | None = None) -> Any:
    """A new version of registered model ``name`` (created when missing) from the run's
    ``pyfunc/`` artifact, with ``tags``; returns the ``ModelVersion``."""
    import mlflow

    try:
        client.create_registered_model(name, description=REGISTERED_DESCRIPTION)
    except mlflow.exceptions.MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err) and "already exists" not in str(err):
            raise
    run = client.get_run(run_id)
    return client.create_model_version(
        name, source=f"{run.info.artifact_uri}/{PYFUNC}", run_id=run_id, tags=tags, description=description
    )


def ensure_pyfunc(client: Any, run_id: str, settings: storage.StorageSettings | None = None) -> dict[str, Any]:
    """Make sure the training run ``run_id`` holds its pyfunc model: when it does not (a run
    logged before pyfunc models were), build it from the run's ``model/`` artifacts and the
    tables its ``model.json`` records. Returns that ``model.json``."""
    with tempfile.TemporaryDirectory() as tmp:
        if has_pyfunc(client, run_id):
            got = client.download_artifacts(run_id, f"{MODEL}/{META}", tmp)
            with open(got) as f:
                return json.load(f)
        model_dir = client.download_artifacts(run_id, MODEL, tmp)
        log_fusion_model(client, run_id, model_dir, settings=settings)
        return load_model(model_dir).meta


def publish_trained_model(
    client: Any,
    run_id: str,
    model_dir: str,
    cfg: Any,
    inputs: Inputs,
    history: list[dict[str, Any]],
    best_epoch: int,
    settings: storage.StorageSettings | None,
    parent_run_id: str | None,
) -> str | None:
    """What ``umair train`` publishes after saving ``model_dir``: the training curves
    (``<output>/training_curves.png`` and the run's artifact root) and, when
    ``cfg.register_model`` is set and this is not a Tune trial (``parent_run_id``: ``umair
    tune`` registers its best trial), the pyfunc model registered under that name. Returns ``models:/NAME/N`` or None."""
    from umair.plots_runs import training_curves

    png = training_curves(
        history,
        storage.join(cfg.output, "training_curves.png"),
        settings,
        best_epoch,
        f"{cfg.run_name} ({cfg.variant or 'full'})",
    )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "training_curves.png")
        with open(path, "wb") as f:
            f.write(png)
        client.log_artifact(run_id, path)
    if parent_run_id is not None or not cfg.register_model:  # the copy of the item vectors costs items × Σd × 4 B
        return None
    version = log_fusion_model(
        client, run_id, model_dir, inputs=inputs, register_as=cfg.register_model, settings=settings
    )
    return f"models:/{cfg.register_model}/{version.version}" if version is not None else None
