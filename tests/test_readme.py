"""The README's two commands stay true: CI runs the test command verbatim, and the main-job command names
only files and subcommands that exist."""

import re
import shlex

from conftest import REPO


def readme_commands():
    text = (REPO / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    main_job, tests = readme_commands()
    assert "scripts/setup.sh" in main_job and "scripts/setup.sh" in tests
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_main_job_command_refers_to_things_that_exist():
    main_job, _ = readme_commands()
    for part in main_job.split("&&"):
        words = shlex.split(part)
        if words[0] == "bash" or words[0].endswith("python"):
            assert (REPO / words[1]).is_file(), words[1]
        elif words[0].endswith("/detailfusion"):
            from detailfusion.platform.cli import build_parser

            build_parser().parse_args(words[1:])  # exits (fails the test) on an unknown subcommand or flag
