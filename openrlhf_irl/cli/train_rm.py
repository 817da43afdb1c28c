"""``python -m openrlhf_irl.cli.train_rm --trainer NAME ...``: OpenRLHF's reward-model CLI with a pluggable trainer."""

import sys

from openrlhf_irl.cli.common import cli_main
from openrlhf_irl.cli.launcher import run


@cli_main("train_rm", resume_hint="a run saving checkpoints (--ckpt.save_steps) resumes with --ckpt.load_enable")
def main(argv=None):
    from openrlhf_irl.cli.common import check_rm_eval_split

    problem = check_rm_eval_split(sys.argv[1:] if argv is None else list(argv))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    run("rm", argv)


if __name__ == "__main__":
    main()
