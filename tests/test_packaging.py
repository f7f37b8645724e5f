"""The installed package: importable, console script present, and the stdlib `platform` module not shadowed."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_stdlib_platform_is_not_shadowed_from_repo_root():
    # The repo root holds a folder named platform/; running from there is where shadowing would bite.
    code = "import platform, sysconfig, detailfusion; print(platform.system(), platform.__file__, sysconfig.get_paths()['stdlib'])"
    result = run_python(code, REPO)
    assert result.returncode == 0, result.stderr
    system, location, stdlib = result.stdout.split()
    assert system == "Linux"
    assert location.startswith(stdlib) and location.endswith("platform.py")


def test_package_imports_from_installed_location(tmp_path):
    result = run_python("import detailfusion, detailfusion.library.model; print(detailfusion.__file__)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("detailfusion/__init__.py")


def test_console_script_lists_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "detailfusion.platform.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "synth" in result.stdout
    script = subprocess.run([str(Path(sys.executable).parent / "detailfusion"), "--help"], capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "synth" in script.stdout


def test_the_library_layers_hold():
    """import-linter's contracts in pyproject.toml, written over the two layer packages: detailfusion.library imports
    no Ray, DeepSpeed, MLflow, web framework or platform module; the platform builds on the library, never the
    reverse; the index needs no data reader or metric; no cycles inside either layer. And no file under the library
    subtree names Ray at all (a lazy import inside a function included). (Checked to fail: `import ray` in
    library/losses.py, library/index/exact.py taking top_k from library/eval/metrics.py.)"""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout
    library = REPO / "platform" / "detailfusion" / "library"
    naming_ray = [str(p.relative_to(library)) for p in library.rglob("*.py")
                  if re.search(r"^\s*(import ray|from ray\b)", p.read_text(), re.M)]
    assert not naming_ray, f"the library imports Ray in {naming_ray}"


def test_the_01_module_paths_still_import_with_a_warning_naming_the_new_one(tmp_path):
    """The deprecation path of the 0.2 layout: ``detailfusion.model`` (say, in an export's model card from 0.1)
    imports the same module as ``detailfusion.library.model`` with a DeprecationWarning; unknown names still fail."""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "try:\n    import detailfusion.model\nexcept DeprecationWarning as w:\n    print(w)\n"
            "warnings.simplefilter('ignore')\n"
            "import detailfusion.model, detailfusion.library.model, detailfusion.data.prepare, detailfusion.index\n"
            "print(detailfusion.model is detailfusion.library.model, detailfusion.data.prepare.__name__,"
            " detailfusion.index.__name__)\n"
            "try:\n    import detailfusion.no_such_module\nexcept ModuleNotFoundError as e:\n    print(e)\n")
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "detailfusion.model moved to detailfusion.library.model" in lines[0]
    assert lines[1] == "True detailfusion.platform.data.prepare detailfusion.library.index.exact"
    assert lines[2] == "No module named 'detailfusion.no_such_module'"


def test_a_wheel_ships_the_job_configs_the_pipeline_reads(tmp_path):
    """The pipeline and the ablation read stage<N>_<preset>.yaml from the package, not from a checkout: a built
    wheel holds them (and the presets and the search page), and the default config folder is inside the package."""
    import zipfile

    from detailfusion.platform.pipeline import CONFIGS

    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("detailfusion-*.whl"))).namelist()
    for stage in (0, 1, 2, 3):
        assert f"detailfusion/platform/configs/stage{stage}_tiny.yaml" in names
    assert "detailfusion/library/model/presets/tiny.json" in names and "detailfusion/platform/serving/static/index.html" in names
    assert "detailfusion/library/model/presets/tiny_vit/model.safetensors" in names  # the tiny preset's pre-trained ViT
    assert CONFIGS.parent == Path(__import__("detailfusion.platform").platform.__file__).parent


def test_flag_defaults_are_read_from_the_typed_configs():
    """No flag carries a default of its own: each is None unless given (the config's default applies), and its help
    shows the default its config defines (read when the help is printed)."""
    from detailfusion.platform.ablate import AblationConfig
    from detailfusion.platform.cli import build_parser
    from detailfusion.platform.tune import SweepSettings

    args = build_parser().parse_args(["ablate", "--workdir", "w"])
    assert args.seeds is None and args.bootstrap is None and args.preset is None
    script = Path(sys.executable).parent / "detailfusion"
    sweep = subprocess.run([str(script), "sweep", "--help"], capture_output=True, text=True, timeout=120).stdout
    ablate = subprocess.run([str(script), "ablate", "--help"], capture_output=True, text=True, timeout=120).stdout
    assert f"(default: {SweepSettings.trial_cpus})" in " ".join(sweep.split())
    assert f"training seeds (initialisation and data order) (default: {AblationConfig.seeds})" in " ".join(ablate.split())
