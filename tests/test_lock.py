"""requirements.lock (scripts/lock.sh) pins the whole tested stack: every requirement of detailfusion[test] at a
version its pyproject.toml range allows, torch at the CPU build's 2.13.0 with no CUDA packages, and this environment
(made by scripts/setup.sh) holds exactly the locked versions."""

import importlib.metadata
import re
import tomllib

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def locked() -> dict[str, str]:
    """{canonical package name: pinned version} of requirements.lock."""
    pins = {}
    for number, line in enumerate((REPO / "requirements.lock").read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;#]+)", line.strip())
        assert match, f"requirements.lock:{number}: not a 'name==version' pin: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_every_requirement_of_the_package_is_pinned_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = locked()
    assert len(requirements) >= 15 and len(pins) > len(requirements)
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} (pyproject.toml) is not in requirements.lock: run bash scripts/lock.sh"
        assert requirement.specifier.contains(Version(pins[name]), prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]} outside pyproject.toml's {requirement}: run bash scripts/lock.sh"


def test_torch_is_the_cpu_builds_version_without_cuda_packages():
    pins = locked()
    assert pins["torch"] == "2.13.0"  # no local label: the CPU wheel installed here (2.13.0+cpu) meets it, so does a CUDA build
    assert not [name for name in pins if name.startswith("nvidia-") or name == "triton"], "CUDA packages in the lock"


def test_this_environment_holds_the_locked_versions():
    """CI's environment is made by scripts/setup.sh from the lock: anything else here means the lock is not what
    the suite tests."""
    wrong = {}
    for name, version in locked().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or Version(installed).public != Version(version).public:
            wrong[name] = (version, installed)
    assert not wrong, f"(locked, installed) differ: {wrong}; run bash scripts/setup.sh"
