"""One-off pre-training of the ``tiny`` preset's stand-in for BLIP-2's frozen EVA-CLIP ViT (METHOD.md "Starting
points"): CLIP's image-text contrastive objective on a synthetic corpus of rendered scenes and their captions.

The ViT (the preset's ``Blip2VisionModel``: 64 px, patch 8, width 64, 2 layers) and a small text encoder are
projected into a shared space; the loss is the symmetric InfoNCE over the batch (``losses.ImageTextContrastiveLoss``
with one image token) with a learned temperature, clamped in place so that it keeps its gradient
(``model.branch.clamped_temperature``). The image side pools the mean of all final tokens, not [CLS] alone: the
Q-Former reads every token, and with [CLS] pooling the last layer's patch outputs get no gradient at all (BLIP-2
drops EVA-CLIP's last layer for that reason). A batch holds whole groups of a scene and three one-edit variants of
it, each other's hard negatives (as NegCLIP), so the edited detail has to be seen. Only the ViT is kept: ``save_vit`` writes its state dict (safetensors) and
config, which ``build_model("tiny")`` loads into the frozen ``vision_model`` (``model/presets/tiny_vit/``). Like
downloading BLIP-2's weights, it happens once: plain torch on the CPU, no Ray.

The corpus draws scenes from its own seed stream (``corpus_rng``: a string seed, so it never equals a benchmark's
integer stream) and refuses any scene whose key is in an exclusion set (e.g. a benchmark's test1 scenes,
``benchmark_scene_keys``). Shapes: B batch, S image side (px), T ViT tokens (1 + (S / 8)^2), W width, D shared space.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel

from detailfusion.library.data.images import model_pixels
from detailfusion.library.data.synthetic_detail import (
    GLOBAL_TYPES,
    LOCAL_TYPES,
    DetailScene,
    apply,
    benchmark_scene_keys,  # noqa: F401 (re-exported: `pretrain-vit --exclude`)
    describe_scene,
    random_local_edit,
    random_look_edit,
    random_scene,
    render_detail,
)
from detailfusion.library.errors import ConfigError, DataError
from detailfusion.library.losses import ImageTextContrastiveLoss
from detailfusion.library.model.backbone import load_preset
from detailfusion.library.model.branch import clamped_temperature
from detailfusion.library.pixels import normalize_pixels

CORPUS_NAMESPACE = "detailfusion.vit-corpus"  # the corpus's seed stream: random.Random(f"{CORPUS_NAMESPACE}/{seed}")
RENDER_SIZE = 128  # scenes are rendered as the benchmarks render them, then resized as `prepare` does
GROUP = 4  # corpus scenes per group: a drawn scene and 3 one-edit variants, kept together in a batch
LOCAL_SHARE = 0.75  # share of a group's variants made by a local edit (the rest change one look attribute)


# -- the corpus --------------------------------------------------------------------------------------


def corpus_rng(seed: int) -> random.Random:
    """The corpus's own stream: a string seed (hashed by sha512), so no benchmark's ``Random(int)`` replays it."""
    return random.Random(f"{CORPUS_NAMESPACE}/{seed}")


def draw_group(rng: random.Random) -> list[DetailScene] | None:
    """A drawn scene and ``GROUP - 1`` distinct one-edit variants of it (local with probability ``LOCAL_SHARE``, else
    one look attribute changed), or None when the scene allows too few: in one batch the group members are each
    other's hard negatives, which only the edited shape's kind, colour, size or cell (or the look) tells apart."""
    base = random_scene(rng)
    group, keys = [base], {base.key()}
    for _ in range(4 * GROUP):
        if len(group) == GROUP:
            return group
        if rng.random() < LOCAL_SHARE:
            edit = random_local_edit(rng, base, rng.choice(LOCAL_TYPES))
        else:
            edit = random_look_edit(rng, base, rng.choice(GLOBAL_TYPES))
        scene = apply(edit, base) if edit is not None else base
        if scene.key() not in keys:
            group.append(scene)
            keys.add(scene.key())
    return group if len(group) == GROUP else None


def corpus_groups(seed: int, exclude: Iterable[Hashable] = (), refused: list | None = None) -> Iterator[list[DetailScene]]:
    """Endless groups (``draw_group``) of the corpus stream ``seed``, no scene twice; a group holding a scene whose key
    is in ``exclude`` is refused (the excluded keys appended to ``refused`` when given)."""
    rng, excluded, seen = corpus_rng(seed), frozenset(exclude), set()
    while True:
        group = draw_group(rng)
        if group is None:
            continue
        keys = [scene.key() for scene in group]
        hit = [key for key in keys if key in excluded]
        if hit:
            if refused is not None:
                refused.extend(hit)
            continue
        if not seen.intersection(keys):
            seen.update(keys)
            yield group


def corpus_scenes(seed: int, exclude: Iterable[Hashable] = (), refused: list | None = None) -> Iterator[DetailScene]:
    """The corpus's scenes in order: its groups, one after the other."""
    return chain.from_iterable(corpus_groups(seed, exclude, refused))


@dataclass
class Corpus:
    """pixels: uint8 [N, S, S, 3]; captions / keys: N each; refused: draws refused by the exclusion set."""

    pixels: torch.Tensor
    captions: list[str]
    keys: list[Hashable]
    refused: int = 0

    def __len__(self) -> int:
        return len(self.captions)


def build_corpus(size: int, seed: int, image_size: int, exclude: Iterable[Hashable] = ()) -> Corpus:
    """The first ``size`` scenes (``size / GROUP`` whole groups, in order) of stream ``seed`` with their captions (``describe_scene``), rendered as the
    benchmark renders them (``render_detail`` at ``RENDER_SIZE`` px, shapes jittered) and resized to ``image_size``
    px as ``prepare`` resizes (targetpad + bicubic)."""
    if size % GROUP:
        raise ConfigError(f"pretrain-vit: the corpus size ({size}) must be a multiple of the group size {GROUP}")
    render_rng = random.Random(f"{CORPUS_NAMESPACE}/{seed}/render")
    refused: list = []
    scenes = corpus_scenes(seed, exclude, refused)
    pixels = np.empty((size, image_size, image_size, 3), dtype=np.uint8)
    captions, keys = [], []
    for i in range(size):
        scene = next(scenes)
        pixels[i] = model_pixels(render_detail(scene, RENDER_SIZE, render_rng), image_size)
        captions.append(describe_scene(scene))
        keys.append(scene.key())
    return Corpus(torch.from_numpy(pixels), captions, keys, len(refused))


# -- the objective -----------------------------------------------------------------------------------


class WordVocabulary:
    """Word-level ids of the corpus's closed vocabulary (the text encoder is thrown away after pre-training, so
    it needs no general tokenizer): [CLS] + words, padded with 0; a word outside the vocabulary is refused."""

    def __init__(self, captions: Iterable[str]):
        words = sorted({w for caption in captions for w in self.split(caption)})
        self.ids = {w: i for i, w in enumerate(["[PAD]", "[CLS]"] + words)}

    @staticmethod
    def split(caption: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", caption.lower())

    def __len__(self) -> int:
        return len(self.ids)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (input_ids [N, L], attention_mask [N, L]), L the longest caption + 1."""
        try:
            rows = [[1] + [self.ids[w] for w in self.split(c)] for c in captions]
        except KeyError as exc:
            raise DataError(f"caption word {exc} is not in the corpus vocabulary") from None
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, (ids != 0).long()


class TextEncoder(nn.Module):
    """Token ids [B, L] + mask [B, L] -> [B, W]: embeddings, a small pre-LN transformer, the [CLS] token."""

    def __init__(self, vocab_size: int, width: int, max_length: int, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(input_ids) + self.positions[: input_ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return self.norm(x[:, 0])


class ImageTextPretrainer(nn.Module):
    """The tiny ViT and a text encoder, each projected to a shared unit-norm space [B, D] (CLIP)."""

    def __init__(self, vision_config: Blip2VisionConfig, vocab_size: int, max_length: int, embed_dim: int = 64,
                 init_temperature: float = 0.07, pool: str = "mean"):
        super().__init__()
        self.pool = pool
        self.vision = Blip2VisionModel(vision_config)
        self.text = TextEncoder(vocab_size, vision_config.hidden_size, max_length)
        self.vision_proj = nn.Linear(vision_config.hidden_size, embed_dim, bias=False)
        self.text_proj = nn.Linear(vision_config.hidden_size, embed_dim, bias=False)
        self.temp = nn.Parameter(torch.tensor([init_temperature]))  # [1]; clamped in place before each use

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """pixels uint8 [B, S, S, 3] -> {image [B, D], text [B, D], temperature [1]}."""
        tokens = self.vision(pixel_values=normalize_pixels(pixels)).last_hidden_state  # post-LN, [B, T, W]
        pooled = tokens.mean(dim=1) if self.pool == "mean" else tokens[:, 0]  # [B, W]
        image = nn.functional.normalize(self.vision_proj(pooled), dim=-1)
        text = nn.functional.normalize(self.text_proj(self.text(input_ids, attention_mask)), dim=-1)
        return {"image": image, "text": text, "temperature": clamped_temperature(self.temp)}


def contrastive_loss() -> Callable[[dict], dict]:
    """Symmetric InfoNCE of CLIP: stage 0's loss with one image token per image (its max is the plain dot product)."""
    loss = ImageTextContrastiveLoss(gather=False)
    return lambda out: loss(out["text"], out["image"][:, None], out["temperature"])


# -- training ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    steps: int = 1500
    batch_size: int = 128
    corpus_size: int = 30_000
    held_out: int = 1024  # corpus scenes never trained on: image->text retrieval at the end
    lr: float = 2e-3
    weight_decay: float = 0.05  # matrices only: never norms, biases, embeddings' positions or the temperature
    warmup_steps: int = 75
    preset: str = "tiny"
    log_every: int = 50

    def __post_init__(self):
        for name in ("steps", "batch_size", "corpus_size", "held_out", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretrain-vit: {name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size > self.corpus_size:
            raise ConfigError(f"pretrain-vit: batch_size {self.batch_size} exceeds corpus_size {self.corpus_size}")
        for name in ("batch_size", "corpus_size", "held_out"):
            if getattr(self, name) % GROUP:
                raise ConfigError(f"pretrain-vit: {name} ({getattr(self, name)}) must be a multiple of the group "
                                  f"size {GROUP} (a batch holds whole groups)")


@dataclass
class PretrainResult:
    vision: Blip2VisionModel
    config: PretrainConfig
    curve: list[tuple[int, float]]  # (step, mean loss over the last log_every steps)
    held_out_r1: float  # image -> text R@1 among `held_out` unseen corpus scenes
    corpus_s: float
    train_s: float
    refused: int  # corpus draws refused by the exclusion set
    info: dict = field(default_factory=dict)


def vision_config_of(preset: str) -> Blip2VisionConfig:
    return Blip2VisionConfig(**load_preset(preset)["config"]["vision_config"])


def pretrain_vit(config: PretrainConfig, exclude: Iterable[Hashable] = (), log: Callable[[str], None] = print) -> PretrainResult:
    """Train the preset's ViT with a text encoder on ``config.corpus_size`` corpus scenes (CLIP objective, AdamW,
    linear warm-up then cosine decay, a seeded shuffle every epoch); returns the ViT and the loss curve."""
    exclude = frozenset(exclude)
    vision_config = vision_config_of(config.preset)
    start = time.perf_counter()
    corpus = build_corpus(config.corpus_size + config.held_out, config.seed, vision_config.image_size, exclude)
    corpus_s = time.perf_counter() - start
    vocabulary = WordVocabulary(corpus.captions)
    input_ids, attention_mask = vocabulary(corpus.captions)
    log(f"pretrain-vit: corpus of {len(corpus)} scenes ({config.held_out} held out, {corpus.refused} draws refused as excluded) in {corpus_s:.1f} s")

    torch.manual_seed(config.seed)
    model = ImageTextPretrainer(vision_config, len(vocabulary), max_length=input_ids.shape[1])
    loss_fn = contrastive_loss()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    order = torch.Generator().manual_seed(config.seed)
    n, curve, window = config.corpus_size, [], []
    batches = _epochs(n // GROUP, config.batch_size // GROUP, order)
    start = time.perf_counter()
    model.train()
    for step in range(1, config.steps + 1):
        index = next(batches)
        length = int(attention_mask[index].sum(dim=1).max())  # the batch's longest caption
        out = model(corpus.pixels[index], input_ids[index, :length], attention_mask[index, :length])
        loss = loss_fn(out)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if step % config.log_every == 0 or step == config.steps:
            curve.append((step, sum(window) / len(window)))
            window = []
            log(f"pretrain-vit: step {step}/{config.steps} loss {curve[-1][1]:.4f} "
                f"tau {model.temp.item():.4f} ({time.perf_counter() - start:.0f} s)")
    train_s = time.perf_counter() - start
    held = torch.arange(n, len(corpus))
    r1 = retrieval_r1(model, corpus.pixels[held], input_ids[held], attention_mask[held])
    log(f"pretrain-vit: {config.steps} steps in {train_s:.0f} s; held-out image->text R@1 {r1:.3f} "
        f"among {len(held)} (chance {1 / len(held):.4f})")
    return PretrainResult(model.vision.eval(), config, curve, r1, corpus_s, train_s, corpus.refused,
                          {"final_temperature": model.temp.item()})


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "position" not in name]
    rest = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "position" not in name)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _lr_factor(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _epochs(groups: int, per_batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Scene index batches [per_batch * GROUP] of whole groups, in a fresh seeded order of the groups every epoch
    (the last partial batch dropped)."""
    members = torch.arange(GROUP)
    while True:
        permutation = torch.randperm(groups, generator=generator)
        for start in range(0, groups - per_batch + 1, per_batch):
            yield (permutation[start : start + per_batch, None] * GROUP + members).reshape(-1)


@torch.no_grad()
def retrieval_r1(model: ImageTextPretrainer, pixels: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> float:
    """Image -> text R@1 among the given items (each image's own caption against all of them)."""
    model.eval()
    out = model(pixels, input_ids, attention_mask)
    hits = (out["image"] @ out["text"].T).argmax(dim=1) == torch.arange(len(pixels))
    return hits.float().mean().item()


# -- the shipped weights -----------------------------------------------------------------------------


def save_vit(result: PretrainResult, directory: str | Path, command: str) -> Path:
    """``directory``/model.safetensors (the ``Blip2VisionModel`` state dict, fp32), config.json (its
    ``Blip2VisionConfig``) and README.md (the command, seed, steps, corpus, loss curve and date)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in result.vision.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(result.vision.config.to_dict(), indent=1, sort_keys=True) + "\n")
    (directory / "README.md").write_text(_readme(result, command))
    return directory


def _readme(result: PretrainResult, command: str) -> str:
    c = result.config
    first, last = result.curve[0], result.curve[-1]
    curve = ", ".join(f"{step}: {loss:.3f}" for step, loss in result.curve[:: max(1, len(result.curve) // 8)])
    return "\n".join([
        "# tiny_vit: the tiny preset's stand-in for BLIP-2's frozen EVA-CLIP ViT", "",
        "A `Blip2VisionModel` (64 px, patch 8, width 64, 2 layers) pre-trained once with CLIP's image-text "
        "contrastive objective (symmetric InfoNCE, learned temperature) on rendered synthetic scenes and their "
        "captions, drawn from the corpus's own seed stream (`detailfusion.library.vit_pretraining`). "
        "`build_model(\"tiny\")` loads it into the frozen `vision_model`.", "",
        f"- command: `{command}`",
        f"- seed {c.seed}, {c.steps} steps, batch {c.batch_size}, lr {c.lr:g}, corpus {c.corpus_size} scenes "
        f"+ {c.held_out} held out, {result.refused} draws refused by the exclusion set",
        f"- loss (mean over {c.log_every} steps) {first[1]:.4f} at step {first[0]} -> {last[1]:.4f} at step {last[0]}"
        f"; curve: {curve}",
        f"- held-out image->text R@1 {result.held_out_r1:.3f} among {c.held_out} (chance {1 / c.held_out:.4f}); "
        f"final temperature {result.info['final_temperature']:.4f}",
        f"- corpus {result.corpus_s:.0f} s + training {result.train_s:.0f} s on {torch.get_num_threads()} CPU "
        f"thread(s), torch {torch.__version__}; written {time.strftime('%Y-%m-%d')}",
        "",
    ])
