"""Running the package's CLIs and scripts in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"  # on PYTHONPATH, subprocesses import the scripts here as ``helpers.<module>``


def sft_flags(model: str, data: str, out: str, *extra: str) -> list[str]:
    """OpenRLHF train_sft flags for a short CPU run on the tiny model."""
    return [
        "--model.model_name_or_path", model, "--data.dataset", data,
        "--data.input_key", "prompt", "--data.output_key", "response", "--data.max_len", "48",
        "--train.micro_batch_size", "4", "--train.batch_size", "8", "--train.max_epochs", "2",
        "--ds.zero_stage", "2", "--ds.attn_implementation", "eager", "--ds.param_dtype", "bf16",
        "--adam.lr", "3e-3", "--lr_warmup_ratio", "0", "--ckpt.output_dir", out, "--ckpt.path", out + "_ckpt",
        "--logger.logging_steps", "1", *extra,
    ]


def run_python(args: list[str], timeout: int = 600, env: dict | None = None, cwd: str | None = None):
    """Run ``python args...`` from the repo's interpreter; returns the CompletedProcess (text output). The run is
    a process group of its own: past ``timeout`` (or on any error here) the whole group is killed, so the ranks of
    a ``torch.distributed.run`` do not outlive it, and ``TimeoutExpired`` carries what it printed."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=cwd or str(REPO), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def assert_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}"


def interruptible() -> None:
    """``preexec_fn`` for a child the test sends SIGINT: Ctrl-C's default disposition, as a terminal gives it. A
    test run started in the background by a non-interactive shell (``make test &``) has SIGINT ignored, and an
    ignored signal stays ignored across exec: the child would never see the Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
