"""Evaluation that tells the truth: estimators with intervals (``stats``), diversity of samples (``diversity``) and
the multi-seed experiment (``experiment``)."""
