"""Checkpoint and export integrity without Ray (issue 35, point 3): the checksum manifest finds a truncated or
changed checkpoint file; exports are written atomically and a damaged one is refused naming the file. The resume's
fall-back to the previous good checkpoint runs on Ray Train in test_training.py."""

import json
import os

import pytest
import torch

from detailfusion.library.model import load_model, save_model
from detailfusion.library.model.detailfusion import DetailFusionModel
from detailfusion.platform.train.checkpoints import problem, resumable, write_manifest


def a_checkpoint(run, name, step):
    """A checkpoint directory as the recipe writes one (a states file, Ray's metadata, the rank's manifest)."""
    from ray.train import Checkpoint

    directory = run / name
    (directory / f"step{step}").mkdir(parents=True)
    (directory / f"step{step}" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(2048))
    checkpoint = Checkpoint.from_directory(directory)
    checkpoint.set_metadata({"step": step, "epoch": 0, "batch_in_epoch": step, "world_size": 1})
    write_manifest(directory, rank=0)
    return checkpoint


def test_a_checkpoint_manifest_finds_a_truncated_a_changed_and_a_missing_file(tmp_path):
    (tmp_path / "step4").mkdir()
    (tmp_path / "step4" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    (tmp_path / "latest").write_text("step4")
    write_manifest(tmp_path, rank=0)
    assert problem(tmp_path, world_size=1) is None
    assert "manifest.rank1.json unreadable" in problem(tmp_path, world_size=2)  # rank 1 never finished its upload
    states = tmp_path / "step4" / "mp_rank_00_model_states.pt"
    data = states.read_bytes()
    states.write_bytes(data[:1000])
    assert problem(tmp_path, 1) == "step4/mp_rank_00_model_states.pt has 1000 bytes, 4096 written"
    states.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert problem(tmp_path, 1) == "step4/mp_rank_00_model_states.pt differs from its checksum"
    states.unlink()
    assert problem(tmp_path, 1) == "step4/mp_rank_00_model_states.pt missing"


def test_an_export_is_written_atomically_and_replaced_whole(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    out = tmp_path / "model"
    save_model(model, tokenizer, out)
    before = (out / "model.safetensors").read_bytes()

    def dies_mid_write(self, directory, **kwargs):  # a node lost after part of the weights were written
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("node lost")

    monkeypatch.setattr(DetailFusionModel, "save_pretrained", dies_mid_write)
    with pytest.raises(OSError, match="node lost"):
        save_model(model, tokenizer, out)
    monkeypatch.undo()
    assert (out / "model.safetensors").read_bytes() == before  # the previous export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial directory left behind
    save_model(model, tokenizer, out, dtype=torch.bfloat16)  # a replaced export is whole and new
    assert (out / "model.safetensors").read_bytes() != before
    assert load_model(out)[0].config.num_query_tokens == model.config.num_query_tokens  # loads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("damage", ["truncated weights", "garbage weights", "truncated config"])
def test_a_damaged_export_is_refused_naming_the_file(tiny, tmp_path, damage):
    model, tokenizer = tiny
    out = save_model(model, tokenizer, tmp_path / "model")
    weights, config = out / "model.safetensors", out / "config.json"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage weights":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    else:
        config.write_text(config.read_text()[:50])
    named = config if damage == "truncated config" else weights
    with pytest.raises(ValueError, match=f"{named}: corrupt"):
        load_model(out)
    with pytest.raises(ValueError, match=f"{named}: corrupt"):
        DetailFusionModel.from_pretrained(out)
    json.loads((out / "tokenizer_config.json").read_text())  # the rest of the export is as written


def test_resume_falls_back_from_a_damaged_latest_checkpoint_with_one_warning(tmp_path):
    """Ray hands the latest checkpoint; when it does not check, the newest one that does is resumed from (by step,
    whatever the directory names say), after one warning line naming the damaged one; none: start over."""
    run = tmp_path / "tiny-stage2"
    a_checkpoint(run, "checkpoint_b", 2)
    four = a_checkpoint(run, "checkpoint_a", 4)  # sorts first by name, newer by step
    six = a_checkpoint(run, "checkpoint_c", 6)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own file beside them: not a candidate
    said = []
    assert resumable(six, 1, said.append) is six and said == []
    states = run / "checkpoint_c" / "step6" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    chosen = resumable(six, 1, said.append)
    assert chosen.path == four.path
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith(f"WARNING: checkpoint {six.path} is damaged (step6/mp_rank_00_model_states.pt has 100 "
                              "bytes, 2048 written); resuming from") and "checkpoint_a (step 4)" in said[0]
    for name in ("checkpoint_a", "checkpoint_b"):
        (run / name / "manifest.rank0.json").unlink()
    assert resumable(six, 1, said.append) is None and "starting over" in said[-1]
