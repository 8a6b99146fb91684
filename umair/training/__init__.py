"""Training the fusion model without Ray: settings, inputs, lookup tables, the epoch
step, scoring and model files. ``pipelines/train.py`` runs these on Ray Train workers."""
