"""deepctr-torch's CTR models on this project's rows (Table 3's external baselines).

The adapter maps a window's :class:`~umair.baselines.inputs.RowInputs` to deepctr-torch
feature columns, so every model reads the same inputs as :class:`UmairFPS`:

===========================  =================================================
RowInputs                    deepctr-torch column (embedding width k = emb_dim)
===========================  =================================================
user_id                      ``SparseFeat("user_id", n_users, k)``
user_tags [T]                ``VarLenSparseFeat(SparseFeat("user_tags", n_tags,
                             k), T, combiner="mean")`` (0 = padding, masked)
user_fields[:, p]            ``SparseFeat("u_<field>", size, k)``
item_fields[:, m]            ``SparseFeat("i_<field>", size, k)``
sem / sty / tsem             ``DenseFeat(name, d_m)`` (when ``with_vectors``)
===========================  =================================================

The same columns feed the linear and the deep part (deepctr's usual setup), and a
window is encoded once as deepctr's ``X`` matrix (columns in the model's
``feature_index`` order), the way its own ``fit`` materialises inputs. Models (the
deepctr class and the settings that make it the named model):

- ``DCN``: ``DCN(cross_parameterization="vector")`` (Wang et al. 2017);
- ``DCN-V2``: ``DCN(cross_parameterization="matrix")``, full-rank
  x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l (Wang et al. 2021);
- ``DCNMix``: the low-rank mixture-of-experts DCN-V2;
- ``xDeepFM``, ``FiBiNET``, ``DIFM``: as shipped. DIFM reads sparse fields only in its
  deep part (its design); the vectors reach it through the linear part.

Every other hyperparameter is deepctr's default unless given (as the paper did: defaults
except embedding width 8 and L2 1e-3). deepctr's own L2 terms are set to 0 because they
only act inside its ``fit``; :mod:`umair.baselines.training` applies the same
``l2_emb · Σ‖E‖²`` to every model instead. deepctr models emit probabilities.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from umair.baselines.inputs import RowInputs
from umair.baselines.rankers import Ranker

# name -> (deepctr_torch.models class, settings that make it that model)
DEEPCTR_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "DCN": ("DCN", {"cross_parameterization": "vector"}),
    "DCN-V2": ("DCN", {"cross_parameterization": "matrix"}),
    "DCNMix": ("DCNMix", {}),
    "xDeepFM": ("xDeepFM", {}),
    "FiBiNET": ("FiBiNET", {}),
    "DIFM": ("DIFM", {}),
}
_ZERO_L2 = {
    "DCN": ("l2_reg_linear", "l2_reg_embedding", "l2_reg_cross"),
    "DCNMix": ("l2_reg_linear", "l2_reg_embedding", "l2_reg_cross"),
}


def _import_models() -> Any:
    # deepctr-torch prints a "check the latest version" notice (it has no network); keep it quiet
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import deepctr_torch.inputs as dinputs
        import deepctr_torch.models as dmodels
    return dmodels, dinputs


def feature_columns(
    n_users: int,
    n_tags: int,
    max_tags: int,
    user_fields: Mapping[str, int],
    item_fields: Mapping[str, int],
    vector_dims: Mapping[str, int],
    emb_dim: int = 8,
) -> list[Any]:
    """deepctr-torch feature columns of the rows (see the module table); pass the same
    list as linear and DNN columns."""
    _, di = _import_models()
    cols: list[Any] = [di.SparseFeat("user_id", n_users, emb_dim)]
    if max_tags > 0:
        cols.append(di.VarLenSparseFeat(di.SparseFeat("user_tags", n_tags, emb_dim), max_tags, combiner="mean"))
    cols += [di.SparseFeat(f"u_{f}", n, emb_dim) for f, n in user_fields.items()]
    cols += [di.SparseFeat(f"i_{f}", n, emb_dim) for f, n in item_fields.items()]
    cols += [di.DenseFeat(m, d) for m, d in vector_dims.items()]
    return cols


class DeepCTRRanker(Ranker):
    """A deepctr-torch model (a key of :data:`DEEPCTR_MODELS`) behind :class:`Ranker`.

    ``sizes`` are the vocabulary sizes of :meth:`FeatureSpace.model_sizes` (``n_users``,
    ``n_tags``, ``user_fields``, ``item_fields``); ``vector_dims`` the dense vectors it
    reads (empty = ids and metadata only); ``overrides`` any constructor argument of the
    deepctr class (e.g. ``dnn_hidden_units``)."""

    emits = "probs"

    def __init__(
        self,
        model: str,
        sizes: Mapping[str, Any],
        max_tags: int,
        vector_dims: Mapping[str, int],
        emb_dim: int = 8,
        seed: int = 0,
        overrides: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        if model not in DEEPCTR_MODELS:
            raise ValueError(f"unknown deepctr-torch model {model!r}; expected one of {list(DEEPCTR_MODELS)}")
        dm, _ = _import_models()
        cls_name, fixed = DEEPCTR_MODELS[model]
        self.name = name or f"{model} (deepctr)"
        self.model = model
        self.vector_names = tuple(vector_dims)
        cols = feature_columns(
            sizes["n_users"],
            sizes["n_tags"],
            max_tags,
            sizes["user_fields"],
            sizes["item_fields"],
            vector_dims,
            emb_dim,
        )
        kwargs: dict[str, Any] = {"seed": seed, "task": "binary", "device": "cpu"}
        kwargs.update({k: 0.0 for k in _ZERO_L2.get(cls_name, ("l2_reg_linear", "l2_reg_embedding"))})
        kwargs.update(fixed)
        kwargs.update(overrides or {})
        torch.manual_seed(seed)
        try:
            self.module = getattr(dm, cls_name)(cols, cols, **kwargs)
        except TypeError as err:
            raise ValueError(
                f"{self.name}: bad constructor argument for deepctr_torch.models.{cls_name}: {err}"
            ) from None
        self.hyperparameters = {k: v for k, v in kwargs.items() if k not in ("device",)}

    def encode(self, rows: RowInputs) -> Tensor:
        """deepctr's input matrix X [N, Σ widths], float32, columns at ``feature_index``."""
        index: Mapping[str, tuple[int, int]] = self.module.feature_index
        width = max(end for _, end in index.values())
        x = torch.zeros(len(rows), width, dtype=torch.float32)
        sources: dict[str, Tensor] = {"user_id": rows.user_id.unsqueeze(1)}
        if "user_tags" in index:
            sources["user_tags"] = rows.user_tags
        sources.update({f"u_{f}": rows.user_fields[:, i : i + 1] for i, f in enumerate(rows.user_field_names)})
        sources.update({f"i_{f}": rows.item_fields[:, i : i + 1] for i, f in enumerate(rows.item_field_names)})
        for m in self.vector_names:
            if m not in rows.vectors:
                raise ValueError(f"{self.name}: the rows hold no {m!r} vectors")
            sources[m] = rows.vectors[m]
        for name, (start, end) in index.items():
            if name not in sources:
                raise ValueError(f"{self.name}: no input for feature column {name!r}")
            src = sources[name]
            if src.shape[1] != end - start:
                raise ValueError(f"{self.name}: column {name!r} is {end - start} wide, the rows give {src.shape[1]}")
            x[:, start:end] = src.float()
        return x

    def forward(self, encoded: Tensor, idx: Tensor) -> Tensor:
        return self.module(encoded[idx]).squeeze(-1)
