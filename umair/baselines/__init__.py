"""Comparison models of the paper's Table 3 and the shared training loop of ``umair ablate``.

- :mod:`umair.baselines.inputs`: :class:`RowInputs`, the per-row model inputs of one time
  window (user id, u^IL tags, u^O profile fields, i^O item fields, e_SEM / e_STY / e_TSEM),
  gathered once so that every model sees the same rows.
- :mod:`umair.baselines.rankers`: one interface (:class:`Ranker`) over this project's
  :class:`~umair.model.fusion.UmairFPS` and the external models.
- :mod:`umair.baselines.deepctr_adapter`: deepctr-torch's DCN, DCN-V2 (DCN with
  ``cross_parameterization='matrix'``), DCNMix, xDeepFM, FiBiNET and DIFM on those rows.
- :mod:`umair.baselines.finalmlp`: FinalMLP (arXiv 2304.00902) built from fuxictr's
  installed layers (``MLP_Block``, ``MaskedAveragePooling``) plus its feature-selection and
  interaction-aggregation parts written from the paper (fuxictr ships no model zoo).
- :mod:`umair.baselines.training`: the one training loop every model goes through (same
  batches, Adam, BCE + L2 on embeddings) with samples/s measured the same way.
- :mod:`umair.baselines.sample_features`: item features for a sample world computed in
  this process (a small dual encoder, hashed tag vectors), standing in for ``umair
  extract`` when a benchmark needs features fast.
"""
