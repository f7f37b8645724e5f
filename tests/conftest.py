import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """A tiny model (eval mode) and its tokenizer, built once per session; tests must not train it in place."""
    import torch

    from detailfusion.model import build_model

    torch.manual_seed(0)
    model, tokenizer = build_model("tiny")
    return model.eval(), tokenizer
