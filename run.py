"""SimCLR command line: the authors' TF2 run.py flags -> Config -> strategy -> train/eval/export.

    python run.py --flagfile=flags/quickstart.cfg --model_dir=/tmp/simclr_quickstart
    python run.py --helpfull

The program lives in `simclr_tf_cli.py` (its flags, and flags -> Config), which `pip install .`
installs as the `simclr-tf` command; this file runs it from a checkout, and names it for code that
imports `run` (`bench/`).
"""

from simclr_tf_cli import FLAGS, cli, config_from_flags, main, summary  # noqa: F401

if __name__ == '__main__':
    cli()
