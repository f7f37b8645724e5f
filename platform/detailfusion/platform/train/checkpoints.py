"""Training checkpoints that survive a bad write: each rank's files land in Ray Train's storage under a temporary name
and are renamed into place (``upload``), its checksum manifest last; a resume checks the manifests of every rank
(``problem``) and falls back from a damaged latest checkpoint to the newest one that checks (``resumable``).

A checkpoint directory holds DeepSpeed's files (``step<N>/...``, ``latest``), Ray's ``.metadata.json`` (step, epoch,
batch, world size), each rank's RNG state (``rng.rank<R>.safetensors``) and ``manifest.rank<R>.json``: {relative
path: [bytes, sha256]} of the files that rank wrote.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.rank{rank}.json"
PARTIAL = ".partial"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | Path, rank: int) -> Path:
    """``manifest.rank<R>.json`` over every file under ``directory`` (this rank's local checkpoint before upload)."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): [p.stat().st_size, sha256(p)]
             for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.startswith("manifest.rank")}
    path = directory / MANIFEST.format(rank=rank)
    path.write_text(json.dumps(files, indent=1) + "\n")
    return path


def problem(directory: str | Path, world_size: int) -> str | None:
    """Why the checkpoint in ``directory`` cannot be resumed from (a missing manifest, a missing, truncated or changed
    file: its name), or None when every rank's manifest checks."""
    directory = Path(directory)
    for rank in range(world_size):
        manifest = directory / MANIFEST.format(rank=rank)
        try:
            files = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            return f"{manifest.name} unreadable ({type(exc).__name__})"
        for name, (size, digest) in files.items():
            path = directory / name
            if not path.is_file():
                return f"{name} missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} written"
            if sha256(path) != digest:
                return f"{name} differs from its checksum"
    return None


def upload(checkpoint, dir_name: str, rank: int):
    """Ray Train's ``checkpoint_upload_fn``: copy this rank's local checkpoint into the run's storage file by file,
    each under a temporary name in its final directory and then renamed (a reader never sees a half-written file
    under its real name), the rank's manifest last. Returns the persisted checkpoint."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    fs, dest = storage.storage_filesystem, storage.build_checkpoint_path_from_name(dir_name)
    local = Path(checkpoint.path)
    manifest = local / MANIFEST.format(rank=rank)
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and p != manifest] + [manifest]
    local_fs = pyarrow.fs.LocalFileSystem()
    for path in files:
        target = f"{dest}/{path.relative_to(local).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0])
        partial = f"{target}{PARTIAL}.rank{rank}"
        pyarrow.fs.copy_files(str(path), partial, source_filesystem=local_fs, destination_filesystem=fs)
        fs.move(partial, target)
    return ray.train.Checkpoint(path=dest, filesystem=fs)


def resumable(latest, world_size: int, log):
    """The checkpoint to resume from: ``latest`` (Ray's) when it checks, else the newest other checkpoint of the run
    (by the step in its metadata) that does, after one warning line through ``log`` naming the damaged one; None (start
    over, with a warning) when none checks."""
    import pyarrow.fs
    import ray.train

    def checked(checkpoint) -> str | None:
        with checkpoint.as_directory() as directory:
            return problem(directory, world_size)

    bad = checked(latest)
    if bad is None:
        return latest
    fs, path = latest.filesystem, latest.path.rstrip("/")
    candidates = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path.rsplit("/", 1)[0])):
        if info.type != pyarrow.fs.FileType.Directory or info.path.rstrip("/") == path:
            continue
        checkpoint = ray.train.Checkpoint(path=info.path, filesystem=fs)
        try:
            candidates.append((int(checkpoint.get_metadata()["step"]), checkpoint))
        except Exception:  # noqa: BLE001  (not a checkpoint of this recipe, or its metadata is unreadable)
            continue
    for step, checkpoint in sorted(candidates, key=lambda c: c[0], reverse=True):
        if checked(checkpoint) is None:
            log(f"WARNING: checkpoint {path} is damaged ({bad}); resuming from {checkpoint.path} (step {step})")
            return checkpoint
    log(f"WARNING: checkpoint {path} is damaged ({bad}) and no other checkpoint of the run checks; starting over")
    return None
