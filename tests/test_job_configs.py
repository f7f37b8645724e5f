"""Every shipped job config loads into its typed config, and the stage configs name the stage of their script."""

import re

import pytest
from conftest import REPO, globbed

from detailfusion.library.config import EvalConfig, JobConfig, PrepareConfig, load_config

CONFIGS = globbed(REPO / "jobs" / "configs", "*.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    if path.name.startswith("prepare"):  # prepare_<dataset>_<split>.yaml
        config = load_config(PrepareConfig, path)
        assert f"prepare_{config.dataset}_{config.split}.yaml" == path.name
        return
    if path.name.startswith("eval"):
        assert load_config(EvalConfig, path).dataset in path.name
        return
    config = load_config(JobConfig, path)
    stage = int(re.match(r"stage(\d)", path.name).group(1))
    assert config.train.stage == stage
    if path.name.endswith("tiny.yaml"):
        assert config.model.preset == "tiny" and not config.train.use_gpu and config.train.precision == "fp32"
    else:  # the paper's runs: BLIP-2, GPUs, bf16, global batch 128, AdamW(0.9, 0.98)
        assert config.model.preset == "blip2" and config.train.use_gpu and config.train.precision == "bf16"
        assert config.train.batch_size == 128 and config.optim.betas == (0.9, 0.98)


def test_the_paper_hyperparameters_of_stage_2():
    cirr = load_config(JobConfig, REPO / "jobs/configs/stage2_blip2_cirr.yaml")
    fiq = load_config(JobConfig, REPO / "jobs/configs/stage2_blip2_fashioniq.yaml")
    assert (cirr.optim.lr, cirr.train.epochs, cirr.loss.gamma) == (1e-5, 50, 2.0)
    assert (fiq.optim.lr, fiq.train.epochs) == (2e-5, 30)


def header_commands(path) -> list[str]:
    """The `detailfusion ...` commands of a config's header comment (continuation lines joined)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    joined = " ".join(lines).replace("\\ ", "")
    return [m.strip() for m in re.findall(r"(detailfusion (?:train|prepare|evaluate)\b[^()]*?)(?=\(|detailfusion |ray job|$)",
                                          joined)]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_header_commands_are_accepted(path, monkeypatch):
    """The launch command in a config's header parses with the real CLI and builds its typed config (a dry run)."""
    import shlex

    from detailfusion.platform import cli

    monkeypatch.chdir(REPO)
    commands = header_commands(path)
    assert any(path.name in c for c in commands) or path.name.startswith(("stage1_blip2", "stage2_blip2", "stage3_blip2")), \
        f"{path.name}: its header shows no `detailfusion ... --config {path.name}` command"
    for command in commands:
        args = cli.build_parser().parse_args(shlex.split(command)[1:])
        cli.command_config(args)
    for script in re.findall(r"jobs/\w+\.py", path.read_text().split("\n\n")[0]):  # `ray job submit` entries
        assert (REPO / script).is_file(), f"{path.name}: its header names {script}, which does not exist"
