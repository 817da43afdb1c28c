"""``python -m openrlhf_irl.cli.train_sft --trainer NAME ...``: OpenRLHF's SFT CLI with a pluggable trainer."""

from openrlhf_irl.cli.common import cli_main
from openrlhf_irl.cli.launcher import run


@cli_main("train_sft", resume_hint="a run saving checkpoints (--ckpt.save_steps) resumes with --ckpt.load_enable")
def main(argv=None):
    run("sft", argv)


if __name__ == "__main__":
    main()
