"""The installed package: importable, console script present, and the stdlib `platform` module not shadowed."""

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
    result = run_python("import detailfusion, detailfusion.model; print(detailfusion.__file__)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("detailfusion/__init__.py")


def test_console_script_lists_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "detailfusion.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "synth" in result.stdout
    script = subprocess.run([str(Path(sys.executable).parent / "detailfusion"), "--help"], capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "synth" in script.stdout


def test_the_library_layers_hold():
    """import-linter's contracts in pyproject.toml: the library (configs, errors, model and its inference, losses,
    ranking, index, metrics, protocols, variants, submission formats, readers, manifest, transforms, synthetic data)
    imports no Ray, DeepSpeed, MLflow or platform module; the index does not depend on evaluation; no cycles between
    the package's top-level modules. (Checked to fail: `import ray` in losses.py, the index taking top_k from
    eval.metrics, model/inference.py importing data.transforms.)"""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_a_wheel_ships_the_job_configs_the_pipeline_reads(tmp_path):
    """The pipeline and the ablation read stage<N>_<preset>.yaml from the package, not from a checkout: a built
    wheel holds them (and the presets and the search page), and the default config folder is inside the package."""
    import zipfile

    from detailfusion.pipeline import CONFIGS

    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("detailfusion-*.whl"))).namelist()
    for stage in (0, 1, 2, 3):
        assert f"detailfusion/configs/stage{stage}_tiny.yaml" in names
    assert "detailfusion/model/presets/tiny.json" in names and "detailfusion/serving/static/index.html" in names
    assert "detailfusion/model/presets/tiny_vit/model.safetensors" in names  # the tiny preset's pre-trained ViT
    assert CONFIGS.parent == Path(__import__("detailfusion").__file__).parent
