"""Gradient accumulation on a real DeepSpeed engine (one rank, gloo, no Ray): ``train_step`` over two micro-batches of
4 rows applies the same update as one step over the batch of 8, and returns the step's loss (the mean over its
micro-batches), not the last micro-batch's (issue 35, point 1)."""

import copy

import pytest
import torch

from detailfusion.library.config import OptimConfig, TrainConfig
from detailfusion.platform.train.engine import build_engine, clips_with_torch, train_step


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-rank gloo group with the torchrun variables DeepSpeed reads (as process_group.join_group sets them)."""
    import os

    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if not dist.is_initialized():
        store = f"file://{tmp_path_factory.mktemp('pg') / 'store'}"
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def row_loss(model, batch):
    """A loss that is a mean over rows (so a batch's loss is the mean of its halves'), with a second named part."""
    error = (model(batch["x"]) - batch["y"]).pow(2).sum(-1)
    return {"loss": error.mean(), "worst": error.max()}


def one_step(model, micro_batches, grad_accum, zero, clip):
    """One ``train_step`` as the loop runs it: torch clips at ZeRO-0 (one group), DeepSpeed at ZeRO-2. AdamW's eps is
    large here: with the recipe's 1e-7 its first step is lr * sign(gradient), which hides a gradient's scale and
    flips on a near-zero component's rounding."""
    train = TrainConfig(batch_size=8, grad_accum=grad_accum, zero_stage=zero)
    optim = OptimConfig(lr=0.5, grad_clip=clip, eps=1.0)
    engine, _, _ = build_engine(model, train, optim, world_size=1, total_steps=10)
    groups = [list(model.parameters())] if clip and clips_with_torch(train) else []
    parts = train_step(engine, micro_batches, lambda b: row_loss(engine.module, b), groups, clip,
                       lambda: torch.autocast("cpu", enabled=False))
    return parts, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("zero", [0, 2])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_accumulating_two_micro_batches_equals_one_step_on_the_whole_batch(process_group, zero, clip):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    batch = {"x": torch.randn(8, 4), "y": torch.randn(8, 3)}
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    expected_loss = row_loss(model, batch)["loss"].item()
    first_half = row_loss(model, halves[0])["loss"].item()
    second_half = row_loss(model, halves[1])["loss"].item()
    assert abs(first_half - second_half) > 0.05  # the halves differ: the last one's loss is not the step's

    whole_parts, whole_weights = one_step(copy.deepcopy(model), [batch], 1, zero, clip)
    acc_parts, acc_weights = one_step(copy.deepcopy(model), halves, 2, zero, clip)

    assert acc_parts["loss"].item() == pytest.approx(expected_loss, rel=1e-6)
    assert whole_parts["loss"].item() == pytest.approx(expected_loss, rel=1e-6)
    assert acc_parts["worst"].item() == pytest.approx((row_loss(model, halves[0])["worst"].item()
                                                       + row_loss(model, halves[1])["worst"].item()) / 2, rel=1e-6)
    moved = max((whole_weights[n] - p).abs().max().item() for n, p in model.named_parameters())
    assert moved > 1e-4  # the step did something to compare
    # ZeRO-0: equal to float rounding. ZeRO-2 (its own gradient buffers): measured up to 0.1 % of the step apart on
    # one rank, cause not found; bounded at 1 % of the step (a lost 1/grad_accum scale or a micro-batch left out of
    # the step moves it by tens of %)
    atol = 1e-7 if zero == 0 else 1e-2 * moved
    for name in whole_weights:
        torch.testing.assert_close(acc_weights[name], whole_weights[name], rtol=1e-5, atol=atol,
                                   msg=lambda m: f"{name} after one step, accumulated vs whole batch: {m}")


def test_the_gradient_of_two_accumulated_micro_batches_is_the_whole_batchs(process_group):
    """Before the step (gradients are zeroed by it): DeepSpeed's backward of each micro-batch, scaled by 1/2, sums to
    the gradient of the whole batch's mean loss."""
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3)
    batch = {"x": torch.randn(8, 4), "y": torch.randn(8, 3)}
    reference = copy.deepcopy(model)
    row_loss(reference, batch)["loss"].backward()
    engine, _, _ = build_engine(model, TrainConfig(batch_size=8, grad_accum=2, zero_stage=0), OptimConfig(), 1, 10)
    for half in (slice(0, 4), slice(4, 8)):
        engine.backward(row_loss(engine.module, {k: v[half] for k, v in batch.items()})["loss"])
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_a_step_that_does_not_end_on_the_accumulation_boundary_is_refused(process_group):
    model = torch.nn.Linear(4, 3)
    engine, _, _ = build_engine(model, TrainConfig(batch_size=8, grad_accum=2), OptimConfig(), 1, 10)
    batch = {"x": torch.randn(4, 4), "y": torch.randn(4, 3)}
    with pytest.raises(RuntimeError, match="did not end on DeepSpeed's accumulation boundary"):
        train_step(engine, [batch], lambda b: row_loss(engine.module, b), [], 0.0,
                   lambda: torch.autocast("cpu", enabled=False))
