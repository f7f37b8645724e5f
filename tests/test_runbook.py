"""Every command of docs/RUNBOOK.md is one this checkout accepts: parsed by the real argument parser, its config
file loaded and its --set keys applied (a dry run: nothing is started)."""

import re
import shlex
from pathlib import Path

import pytest

from detailfusion.platform.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def runbook_commands() -> list[str]:
    text = (REPO / "docs" / "RUNBOOK.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith(("detailfusion ", "ray job submit"))]


def dry_run(argv: list[str]) -> None:
    """Parse like the console script, then build the typed config the command would run with (the CLI's own
    mapping, ``cli.command_config``); a sweep's settings and space are checked as ``sweep`` checks them."""
    from detailfusion.platform import cli, tune

    args = build_parser().parse_args(argv)
    if args.command in ("prepare", "evaluate", "index", "serve"):
        cli.command_config(args)
    elif args.command == "train":  # the paper's runs: the blip2 preset on GPUs
        config = cli.command_config(args)
        assert config.train.stage == args.stage and config.model.preset == "blip2" and config.train.use_gpu
    elif args.command == "sweep":
        config, settings = cli.command_config(args)
        tune.check_settings(config, settings)


def test_the_runbook_has_every_step():
    commands = " ".join(runbook_commands())
    for needed in ("prepare --dataset ipr2pr", "prepare --dataset cirr", "prepare --dataset fashioniq",
                   "train --stage 1", "stage2_blip2_cirr", "stage2_blip2_fashioniq", "train --stage 3",
                   "--split test1", "score-cirr", "sweep --stage 2 --space tune_spaces/gamma.yaml", "serve --checkpoint"):
        assert needed in commands, needed


@pytest.mark.parametrize("command", runbook_commands(), ids=lambda c: c[:60])
def test_runbook_command_is_accepted(command, monkeypatch):
    monkeypatch.chdir(REPO)  # the runbook's paths are relative to the checkout
    argv = shlex.split(command.replace('"$(which python)"', "python"))
    if argv[0] == "detailfusion":
        dry_run(argv[1:])
        return
    entry = argv[argv.index("--") + 1:]  # ray job submit ... -- python -m detailfusion <command> ...
    assert entry[:3] == ["python", "-m", "detailfusion"], "submitted jobs go through the one front door"
    dry_run(entry[3:])
