"""``python -m openrlhf_irl.cli.train_rm --trainer NAME ...``: OpenRLHF's reward-model CLI with a pluggable trainer."""

from openrlhf_irl.cli.launcher import run


def main(argv=None):
    run("rm", argv)


if __name__ == "__main__":
    main()
