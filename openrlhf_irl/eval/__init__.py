"""Evaluation that tells the truth: estimators with intervals (``stats``), diversity of samples (``diversity``) and
reward-model checks (``reward_checks``). The multi-seed experiment that uses them is
:mod:`openrlhf_irl.demo.experiment`, beside the demo pipeline it runs."""
