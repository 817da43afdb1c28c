"""What the tests share, in one package (importable as ``helpers``: pytest puts ``tests/`` on ``sys.path`` as it
does for ``conftest.py``). ``conftest.py`` keeps only fixtures and hooks; no test module imports another or
``conftest``.

- :mod:`helpers.runs`: ``REPO``, ``run_python``, ``assert_ok``, ``sft_flags`` (running the CLIs in a subprocess)
- :mod:`helpers.records`: ``counting_records``, ``write_jsonl``, ``corpus_prompts``, ``mean_response_nll``,
  ``saved_dtypes``
- :mod:`helpers.iq_batches`: batches, a bare trainer and a fixed policy sampler for the IQ-Learn loss tests
- :mod:`helpers.iq_reference`: the per-token loop references of the IQ-Learn loss
- :mod:`helpers.loss_api`: ``iq_learn_loss`` / ``fused_iq_learn_loss``, the offline loss as one call (full logits,
  or fused with the lm_head), composed from ``openrlhf_irl.losses``
- :mod:`helpers.openrlhf_checkout`: a copy of the installed OpenRLHF with ``patches/`` applied
- scripts and hooks the tests' subprocesses load (``PYTHONPATH`` = ``tests/``, names ``helpers.<module>``):
  :mod:`helpers.engine_probe`, :mod:`helpers.golden_digits`, :mod:`helpers.record_rewards`, :mod:`helpers.amx_probe`,
  :mod:`helpers.ckpt_rotation` (run as a script), and :mod:`helpers.local_cluster` (the two-node Ray cluster)
- :mod:`helpers.task_levels`: the golden level of a demo task's expert and careless answers
"""

from .records import corpus_prompts, counting_records, mean_response_nll, saved_dtypes, write_jsonl
from .runs import REPO, TESTS, assert_ok, interruptible, run_python, sft_flags

__all__ = ["REPO", "TESTS", "assert_ok", "corpus_prompts", "counting_records", "interruptible", "mean_response_nll",
           "run_python", "saved_dtypes", "sft_flags", "write_jsonl"]
