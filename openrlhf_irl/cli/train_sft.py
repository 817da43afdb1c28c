"""``python -m openrlhf_irl.cli.train_sft --trainer NAME ...``: OpenRLHF's SFT CLI with a pluggable trainer."""

from openrlhf_irl.cli.launcher import run


def main(argv=None):
    run("sft", argv)


if __name__ == "__main__":
    main()
