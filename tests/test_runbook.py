"""Every command of docs/RUNBOOK.md is one this checkout accepts: parsed by the real argument parser, its config
file loaded and its --set keys applied (a dry run: nothing is started)."""

import re
import shlex
from pathlib import Path

import pytest

from detailfusion.cli import build_parser
from detailfusion.config import JobConfig, load_config

REPO = Path(__file__).resolve().parents[1]
STAGE_SCRIPTS = {"jobs/stage1_pretrain_detail.py": 1, "jobs/stage2_joint.py": 2, "jobs/stage3_compositor.py": 3}


def runbook_commands() -> list[str]:
    text = (REPO / "docs" / "RUNBOOK.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith(("detailfusion ", "ray job submit"))]


def dry_run(argv: list[str]) -> None:
    """Parse like the console script, then build the typed config the command would run with (the CLI's own
    mapping, ``cli.command_config``); a sweep's settings and space are checked as ``sweep`` checks them."""
    from detailfusion import cli, tune

    args = build_parser().parse_args(argv)
    if args.command in ("prepare", "evaluate", "index", "serve"):
        cli.command_config(args)
    elif args.command == "sweep":
        config, settings = cli.command_config(args)
        tune.check_settings(config, settings)


def test_the_runbook_has_every_step():
    commands = " ".join(runbook_commands())
    for needed in ("prepare --dataset ipr2pr", "prepare --dataset cirr", "prepare --dataset fashioniq",
                   "stage1_pretrain_detail.py", "stage2_blip2_cirr", "stage2_blip2_fashioniq", "stage3_compositor.py",
                   "--split test1", "score-cirr", "sweep --stage 2 --space tune_spaces/gamma.yaml", "serve --checkpoint"):
        assert needed in commands, needed


@pytest.mark.parametrize("command", runbook_commands(), ids=lambda c: c[:60])
def test_runbook_command_is_accepted(command, monkeypatch):
    monkeypatch.chdir(REPO)  # the runbook's paths are relative to the checkout
    argv = shlex.split(command.replace('"$(which python)"', "python"))
    if argv[0] == "detailfusion":
        dry_run(argv[1:])
        return
    entry = argv[argv.index("--") + 1:]  # ray job submit ... -- python jobs/<script> --config F --set k=v
    assert entry[0] == "python" and (REPO / entry[1]).is_file()
    config_file = entry[entry.index("--config") + 1]
    sets = [entry[i + 1] for i, a in enumerate(entry) if a == "--set"]
    config = load_config(JobConfig, REPO / config_file, sets)
    assert config.train.stage == STAGE_SCRIPTS[entry[1]]
    assert config.model.preset == "blip2" and config.train.use_gpu
