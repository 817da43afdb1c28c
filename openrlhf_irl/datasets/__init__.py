"""Datasets for openrlhf_irl."""

from openrlhf_irl.datasets.afd import VARIANTS, build_afd_dataset, format_report  # noqa: F401
