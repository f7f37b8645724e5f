"""The tiny preset's stand-in ViT: pre-trained once on a corpus disjoint from the benchmark's test scenes, shipped
with the package, loaded frozen by ``build_model("tiny")``, and its tokens carry per-cell shape, colour and size."""

import hashlib
import json
import random
from importlib import resources
from itertools import islice

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from detailfusion.library.data.images import model_pixels
from detailfusion.library.data.synthetic_detail import (
    KINDS,
    DetailV2Layout,
    random_root,
    render_detail,
    write_detail_v2,
)
from detailfusion.library.data.synthetic_scenes import COLOURS, SIZES
from detailfusion.library.errors import ConfigError
from detailfusion.library.model import build_model, load_model, save_model
from detailfusion.library.pixels import normalize_pixels
from detailfusion.library.vit_pretraining import (
    PretrainConfig,
    benchmark_scene_keys,
    build_corpus,
    corpus_groups,
    corpus_scenes,
    pretrain_vit,
    save_vit,
)
from detailfusion.platform.data.feature_cache import vision_fingerprint

SHIPPED = resources.files("detailfusion.library.model") / "presets" / "tiny_vit"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these small models run 5-20x slower with two threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shipped_corpus_size() -> int:
    """Scenes the shipped weights were trained on, plus the held-out ones (from their README)."""
    readme = (SHIPPED / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("- seed"))
    words = line.replace(",", "").split()
    return int(words[words.index("corpus") + 1]) + int(words[words.index("held") - 1])


# -- the corpus --------------------------------------------------------------------------------------


def test_corpus_is_seeded_and_refuses_excluded_scenes():
    first = [s.key() for s in islice(corpus_scenes(0), 48)]
    assert first == [s.key() for s in islice(corpus_scenes(0), 48)]
    assert len(set(first)) == 48 and not set(first) & {s.key() for s in islice(corpus_scenes(1), 48)}
    groups = [[s.key() for s in g] for g in islice(corpus_groups(0), 20)]
    excluded, refused = {g[1] for g in groups[::2]}, []  # one member of every other group
    kept = [[s.key() for s in g] for g in islice(corpus_groups(0, exclude=excluded, refused=refused), 10)]
    assert kept == groups[1::2] and set(refused) == excluded  # a group with an excluded scene goes whole


def test_corpus_has_no_test1_scene_of_the_benchmark(tmp_path):
    """Every scene of the shipped corpus (keys only, same stream) against benchmark v2's test1 scenes, seed 0."""
    write_detail_v2(tmp_path, DetailV2Layout(train_pairs=10, val_pairs=10, test_pairs=200), seed=0, workers=1)
    test1 = benchmark_scene_keys(tmp_path)
    assert len(test1) > 500
    corpus = {s.key() for s in islice(corpus_scenes(0), shipped_corpus_size())}
    assert not corpus & test1
    # the check can fail: a corpus told to exclude nothing of its own stream does contain it
    sample = set(islice((s.key() for s in corpus_scenes(0)), 100))
    corpus_minus = build_corpus(100, 0, 16, exclude=sample)
    assert corpus_minus.refused == 100 and not set(corpus_minus.keys) & sample


def test_benchmark_scene_keys_names_a_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="scenes.test1.json"):
        benchmark_scene_keys(tmp_path)


def test_a_short_pretraining_lowers_the_loss_and_writes_loadable_weights(tmp_path):
    config = PretrainConfig(seed=3, steps=30, batch_size=32, corpus_size=256, held_out=64, warmup_steps=3,
                            log_every=10)
    result = pretrain_vit(config, log=lambda line: None)
    assert result.curve[-1][1] < result.curve[0][1]
    assert result.info["final_temperature"] != pytest.approx(0.07)  # the temperature is learned
    out = save_vit(result, tmp_path / "vit", "detailfusion pretrain-vit --seed 3 --steps 30")
    state = load_file(out / "model.safetensors")
    assert state.keys() == result.vision.state_dict().keys()
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    assert "--seed 3 --steps 30" in (out / "README.md").read_text()
    again = pretrain_vit(config, log=lambda line: None)  # seeded: the same weights again
    assert all(torch.equal(v, again.vision.state_dict()[k]) for k, v in result.vision.state_dict().items())


# -- the shipped weights in the tiny preset ----------------------------------------------------------


def test_tiny_loads_the_shipped_vit_frozen_and_names_it(tmp_path):
    model, tokenizer = build_model("tiny")
    shipped = load_file(str(SHIPPED / "model.safetensors"))
    assert all(torch.equal(model.vision_model.state_dict()[k], v) for k, v in shipped.items())
    digest = hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest()
    assert model.config.backbone_source == f"tiny_vit sha256:{digest}"
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    torch.manual_seed(0)
    random_vit, _ = build_model("tiny", vision_weights="random")
    assert random_vit.config.backbone_source is None
    assert vision_fingerprint(random_vit) != vision_fingerprint(model)
    assert vision_fingerprint(build_model("tiny")[0]) == vision_fingerprint(model)  # fixed, whatever the seed
    save_model(model, tokenizer, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert vision_fingerprint(loaded) == vision_fingerprint(model)
    assert loaded.config.backbone_source == model.config.backbone_source
    with pytest.raises(ConfigError, match="vision_weights must be one of pretrained, random"):
        build_model("tiny", vision_weights="imagenet")
    with pytest.raises(ConfigError, match="takes its ViT from the BLIP-2 checkpoint"):
        build_model("blip2", vision_weights="random")


def test_the_package_data_config_ships_the_vit():
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["detailfusion"]
    for name in ("model.safetensors", "config.json", "README.md"):
        assert any(fnmatch(f"library/model/presets/tiny_vit/{name}", p) for p in patterns), name
    assert len((SHIPPED / "model.safetensors").read_bytes()) < 1_000_000  # small enough to ship


# -- the linear probe --------------------------------------------------------------------------------

PATCHES = 8  # 64 px / patch 8
CENTRE_PATCH = (1, 4, 6)  # the patch holding each cell column's (row's) centre: 64 / 3 * (c + 0.5) // 8


def probe_set(seed: int, scenes: int) -> tuple[torch.Tensor, list]:
    """Benchmark v2 roots (random background, shapes jittered as the benchmark renders them) at 64 px:
    uint8 [N, 64, 64, 3] and each scene's shapes."""
    rng = random.Random(f"probe/{seed}")
    drawn = [random_root(rng) for _ in range(scenes)]
    pixels = np.stack([model_pixels(render_detail(s, 128, rng), 64) for s in drawn])
    return torch.from_numpy(pixels), [s.shapes for s in drawn]


def cell_features(model, pixels: torch.Tensor, shapes: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The 3x3 patch tokens around each occupied cell's centre, flattened [M, 9 W], and per-cell labels."""
    tokens = model.encode_image(normalize_pixels(pixels))[:, 1:]  # drop [CLS]: [N, 64, W]
    grid = tokens.reshape(len(pixels), PATCHES, PATCHES, -1)
    features, labels = [], {"kind": [], "colour": [], "size": []}
    for i, scene in enumerate(shapes):
        for shape in scene:
            r, c = (CENTRE_PATCH[k] for k in divmod(shape.cell, 3))
            features.append(grid[i, r - 1 : r + 2, c - 1 : c + 2].reshape(-1))
            labels["kind"].append(KINDS.index(shape.kind))
            labels["colour"].append(list(COLOURS).index(shape.colour))
            labels["size"].append(list(SIZES).index(shape.size))
    return torch.stack(features), {k: torch.tensor(v) for k, v in labels.items()}


def probe_accuracy(train_x, train_y, test_x, test_y, weight_decay: float = 1e-3, steps: int = 300) -> float:
    """Multinomial logistic regression on standardised features (full-batch Adam), test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(test_x).argmax(1) == test_y).float().mean().item()


def probe(model, train, test) -> dict[str, float]:
    with torch.no_grad():
        train_x, train_y = cell_features(model, *train)
        test_x, test_y = cell_features(model, *test)
    return {task: probe_accuracy(train_x, train_y[task], test_x, test_y[task]) for task in train_y}


def test_linear_probe_decodes_cell_colour_and_size_better_than_a_random_vit():
    """A logistic-regression probe on the 3x3 patch tokens around each occupied cell's centre: 400 benchmark-v2 root
    scenes (shapes jittered as the benchmark draws them) to fit, 200 others to test; chance is the test set's
    majority class. Measured (2026-12-07, probe sets 0/1 and 2/3, random ViTs of torch seeds 0-3): random ViT kind
    0.25-0.28, colour 0.93-0.95, size 0.78-0.82; CLIP-pre-trained ViTs (400-1500 steps, four corpus variants)
    kind 0.26-0.30, colour 0.96-0.98, size 0.82-0.85; raw pixels of the same window kind 0.25, colour 0.94, size
    0.61. Colour and size: pre-trained above random by >= 0.02 / > 0 (measured +0.03-0.05 / +0.01-0.06). Kind is
    NOT decoded better than by a random ViT (jitter makes it non-linear in the window; without jitter a random
    ViT reaches 0.74, the pre-trained 0.66): asserted above chance only, and reported as such."""
    train, test = probe_set(0, 400), probe_set(1, 200)
    model = build_model("tiny")[0].eval()
    torch.manual_seed(0)
    random_vit = build_model("tiny", vision_weights="random")[0].eval()
    pretrained, baseline = probe(model, train, test), probe(random_vit, train, test)
    _, labels = cell_features(model, *test)
    chance = {task: torch.bincount(y).max().item() / len(y) for task, y in labels.items()}
    print(f"probe accuracy: pre-trained {pretrained}, random {baseline}, chance {chance}")
    for task, floor in (("kind", 0.05), ("colour", 0.6), ("size", 0.25)):
        assert pretrained[task] > chance[task] + floor, (task, pretrained, chance)
    assert pretrained["colour"] >= baseline["colour"] + 0.02, (pretrained, baseline)
    assert pretrained["size"] > baseline["size"], (pretrained, baseline)
