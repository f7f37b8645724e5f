"""The one training recipe every stage runs inside each Ray Train worker, with a DeepSpeed engine.

Life: check settings -> setup (model, freezing, engine, resume state) -> train -> export. Checkpoints: every
``checkpoint_every`` steps (0: every epoch end) each rank saves its DeepSpeed checkpoint and its RNG state, and all
ranks report it to Ray Train with the metrics (``checkpoints.py``: written under temporary names, then renamed, with a
checksum manifest per rank). Resume (a restarted worker group, or the same command rerun): the latest reported
checkpoint that checks restores weights, optimizer, schedule, the step count, the epoch and every rank's RNG; within
an epoch the position is a count of micro-batches, skipped in the epoch's seeded order (a planned or dealt split: the
same batches; a streamed split: the count only). The logged loss of a step is the mean over its micro-batches and
ranks: the objective whose gradient the step applies.
Stage 3 encodes its split once with the frozen branches and then trains the compositor on those outputs.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from detailfusion.library.config import JobConfig, from_dict
from detailfusion.library.objectives import branch_outputs
from detailfusion.library.pixels import normalize_pixels
from detailfusion.library.registry import install
from detailfusion.platform.data.training_input import Prefetched, iter_worker_batches
from detailfusion.platform.train.checkpoints import resumable, upload, write_manifest
from detailfusion.platform.train.engine import (
    autocast,
    build_engine,
    clip_groups,
    clips_with_torch,
    keep_fp32,
    micro_batch_size,
    train_step,
    without_deepspeed_autotuner_mlflow,
)
from detailfusion.platform.train.faults import deterministic, planned
from detailfusion.platform.train.stage_run import StageRun, stage_dirs
from detailfusion.platform.train.stages import build_loss, freeze_for_stage, stage_loss, stage_spec

CLIENT_STATE = "detailfusion_state"
RNG_STATE = "rng.rank{rank}.safetensors"  # each rank's torch RNG state in a checkpoint (dropout draws differ by rank)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: ``loop_config`` = {"job": JobConfig as dict, "run": the driver's ``StageRun``,
    "extensions": the driver's registered compositors, fusion rules, objectives and datasets from outside the
    package (``library/registry.py``)}."""
    install(loop_config.get("extensions"))
    StageRecipe(from_dict(JobConfig, loop_config["job"], source="train loop config"), loop_config["run"]).run()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's data order in one epoch (a fresh, reproducible order every epoch, METHOD.md)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def in_groups(items, size: int):
    """Consecutive lists of ``size`` items (a short last one dropped: a step needs all its micro-batches)."""
    iterator = iter(items)
    while len(group := list(itertools.islice(iterator, size))) == size:
        yield group


def dealt(rows: dict[str, torch.Tensor], size: int, seed: int, bank: int = 0):
    """Cached rows {name: [N, ...]} dealt into micro-batches of ``size`` in a seeded random order (whole batches).
    ``bank`` > 0: each micro-batch also gets ``bank`` [G, Nq, 2D], G = min(bank, distinct targets), drawn without
    replacement from the rows' distinct targets' gallery embeddings (``target_row`` names them), and ``bank_mask``
    [size, G], true where a drawn item is the row's own target."""
    generator = torch.Generator().manual_seed(seed)
    total = next(iter(rows.values())).shape[0]
    order = torch.randperm(total, generator=generator)[: total // size * size]
    if bank:
        ids, inverse = torch.unique(rows["target_row"], return_inverse=True)
        first = torch.full((len(ids),), total, dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(total), reduce="amin")  # one row holding each distinct target
        gallery = rows["gallery"][first]
    for part in order.split(size):
        batch = {name: value[part] for name, value in rows.items()}
        if bank:
            drawn = torch.randperm(len(ids), generator=generator)[:bank]
            batch["bank"] = gallery[drawn]
            batch["bank_mask"] = batch["target_row"][:, None] == ids[drawn][None, :]
        yield batch


class StageRecipe:
    def __init__(self, config: JobConfig, run: StageRun):
        import ray.train

        self.started = time.time()  # the driver's call time is run.called_at: their gap is the group's start-up
        self.config, self.stage_run = config, run
        self.stage_dir, self.export_dir = stage_dirs(config)
        self.spec = stage_spec(config.train)
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = torch.device("cuda", context.get_local_rank()) if config.train.use_gpu else torch.device("cpu")
        # DeepSpeed (imported at setup) warns on every rank that it fell back to the CPU unless told which one it has
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if config.train.use_gpu else "cpu")
        # Ray sets OMP_NUM_THREADS=1 in a worker with a fractional CPU share: use the cores it was given instead
        torch.set_num_threads(config.train.threads_per_worker or math.ceil(config.train.cpus_per_worker))
        if deterministic():  # a test's switch (faults.py): deterministic kernels, for bit-comparable runs
            torch.use_deterministic_algorithms(True)
        self.micro_batch = micro_batch_size(config.train, self.world_size)
        self.steps_per_epoch = run.rows // self.world_size // self.micro_batch // config.train.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"{run.rows} rows give no full batch of {self.micro_batch} per rank")
        self.total_steps = self.steps_per_epoch * config.train.epochs
        self.fault = planned()  # a test's injected fault (faults.py), else None

    # -- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        from detailfusion.library.model import load_model

        torch.manual_seed(self.config.train.seed)
        self.model, self.tokenizer = load_model(self.stage_run.weights_from)
        freeze_for_stage(self.model, self.spec)
        if self.config.train.precision != "fp32":
            keep_fp32(self.model)
        # after the process group exists: knows its rank
        self.loss_fn = build_loss(self.spec, self.config.loss, self.model.config.fusion_score)
        self.model.to(self.device)
        without_deepspeed_autotuner_mlflow()  # a worker process: 0.6 s less start-up
        self.engine, self.optimizer, self.scheduler = build_engine(
            self.model, self.config.train, self.config.optim, self.world_size, self.total_steps
        )
        clip = clips_with_torch(self.config.train) and self.config.optim.grad_clip > 0  # else DeepSpeed clips
        self.clip_groups = clip_groups(self.model, self.config.optim.clip) if clip else []
        self.step, self.epoch, self.skip_batches = 0, 0, 0
        self.pending_metrics: list[dict] = []  # rank 0's step rows not yet in metrics.csv
        self.validation_split = None  # data.val_prepared, loaded on rank 0 at the first validation
        self._record_placement()
        self._resume()

    def _record_placement(self) -> None:
        """Every rank's node into ``workers.json`` of the stage dir (collective: all ranks call it), logged once."""
        import socket

        import ray

        here = {"rank": self.rank, "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "device": str(self.device)}
        placement = [here]
        if self.world_size > 1:
            placement = [None] * self.world_size
            torch.distributed.all_gather_object(placement, here)
        if self.rank == 0:  # one writer; the gather above is the collective
            (self.stage_dir / "workers.json").write_text(json.dumps(placement, indent=2) + "\n")
            nodes = sorted({p["node_ip"] for p in placement})
            self._log(f"{self.world_size} rank(s) on {len(nodes)} node(s): {', '.join(nodes)}")

    def _resume(self) -> None:
        import ray.train
        from safetensors.torch import load_file

        latest = ray.train.get_checkpoint()
        checkpoint = resumable(latest, self.world_size, self._log) if latest is not None else None
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            _, state = self.engine.load_checkpoint(directory)  # the tag named in its "latest" file
            rng = load_file(Path(directory) / RNG_STATE.format(rank=self.rank))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        state = state[CLIENT_STATE]
        self.step, self.epoch, self.skip_batches = state["step"], state["epoch"], state["batch_in_epoch"]
        if checkpoint is not latest and self.stream is not None:  # opened for the latest's epoch: reopen for ours
            self.stream = None
        self._log(f"resumed at step {self.step} (epoch {self.epoch}, batch {self.skip_batches})")

    # -- train ---------------------------------------------------------------------------------------

    def run(self) -> None:
        # an inline split's Ray Data input starts while the model is set up; a gallery split's opens at once after it
        self.stream = None if self.stage_run.held is not None else self._open_stream(epoch=self._resumed_epoch())
        self.setup()
        try:
            self._train()
        finally:  # a crash must not lose the rows of the steps that ran (metrics.csv is the run's record)
            self._flush_metrics()

    def _train(self) -> None:
        set_up = time.time()
        cached = self._encode_split_once() if self.spec.batches == "branch_outputs" else None
        self.engine.train()
        started, seen, last_loss = time.perf_counter(), 0, float("nan")
        first_step, accum = self.step + 1, self.config.train.grad_accum
        for epoch, batches in self._epochs(cached):
            # the epoch's micro-batches after the resumed position, in optimizer steps of grad_accum each
            steps = in_groups(itertools.islice(batches, self.skip_batches, self.steps_per_epoch * accum), accum)
            for done, micro_batches in enumerate(steps, start=1):
                if self.fault:
                    self.fault.maybe_fail(self.step, self.rank, self.stage_dir)
                parts = self._step_mean(train_step(self.engine, micro_batches, self._loss, self.clip_groups,
                                                   self.config.optim.grad_clip,
                                                   lambda: autocast(self.config.train.precision, self.device)))
                self.step += 1
                seen += len(micro_batches) * self.micro_batch * self.world_size
                last_loss = parts["loss"].item()
                rate = seen / (time.perf_counter() - started)
                self._write_metrics(epoch, parts, rate)
                if self.step == first_step:
                    called = self.stage_run.called_at
                    self._log(f"start-up {time.time() - called:.1f} s to the first step: worker group "
                              f"{self.started - called:.1f} s, setup {set_up - self.started:.1f} s, first batch and step "
                              f"{time.time() - set_up:.1f} s")
                if self.step % self.config.train.log_every == 0 or self.step == self.total_steps:
                    self._flush_metrics()
                    self._log(f"epoch {epoch} step {self.step}/{self.total_steps} loss {last_loss:.4f} "
                              f"lr {self.scheduler.get_last_lr()[0]:.2e} {rate:.1f} samples/s")
                every = self.config.train.checkpoint_every
                if every and self.step % every == 0 and self.step < self.total_steps:
                    self._checkpoint(epoch, self.skip_batches + done * accum, {"loss": last_loss, "epoch": epoch})
            self.skip_batches = 0
            last = epoch + 1 == self.config.train.epochs
            validation = self._validate(epoch) if self._validates(epoch) else {}
            if not self.config.train.checkpoint_every or last:
                self._checkpoint(epoch + 1, 0, {"loss": last_loss, "epoch": epoch + 1, **validation}, export=last)

    def _step_mean(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's step loss parts (``train_step``: the mean over its micro-batches) averaged over the ranks with
        one all-reduce: the objective whose gradient DeepSpeed averaged for the step."""
        if self.world_size == 1:
            return parts
        names = sorted(parts)
        values = torch.stack([parts[name] for name in names])
        if self.world_size > 1:
            values = values.to(self.device)
            torch.distributed.all_reduce(values)
            values = values / self.world_size
        return dict(zip(names, values.cpu()))

    # -- validation ----------------------------------------------------------------------------------

    def _validates(self, epoch: int) -> bool:
        every = self.config.train.validate_every
        return bool(self.config.data.val_prepared) and ((epoch + 1) % every == 0 or epoch + 1 == self.config.train.epochs)

    def _validate(self, epoch: int) -> dict[str, float]:
        """Rank 0: recall on data.val_prepared -> {"val_score": headline Avg of the stage's variant,
        "val/<variant>/<metric>": ...} (also appended to validation.csv). Other ranks return {}."""
        from detailfusion.library.eval.variants import FIXED_WEIGHTS
        from detailfusion.platform.eval.validate import ValidationSplit

        if self.rank != 0:
            return {}
        if self.validation_split is None:
            self.validation_split = ValidationSplit(self.config.data.val_prepared)
        model = self.engine.module
        main = self.spec.validation_variant or model.config.compositor
        variants = list(dict.fromkeys([main, *(FIXED_WEIGHTS if self.spec.validates_fixed_weights else [])]))
        started = time.perf_counter()
        model.eval()
        try:
            metrics = self.validation_split.metrics(model, self.tokenizer, variants)
        finally:
            self.engine.train()
        out = {"val_score": metrics[main]["Avg"], "val_variant": main}
        out.update({f"val/{v}/{k}": value for v, m in metrics.items() for k, value in m.items()})
        self._append_csv("validation.csv", {"epoch": epoch + 1, "step": self.step, **{k: v for k, v in out.items()
                                                                                       if k != "val_variant"}})
        self._log(f"epoch {epoch + 1} validation ({self.validation_split.dataset}, {main}): Avg {out['val_score']:.2f} "
                  f"in {time.perf_counter() - started:.1f} s")
        return out

    def _resumed_epoch(self) -> int:
        """The epoch the latest checkpoint resumes at (its metadata; no checkpoint download), else 0."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return int(checkpoint.get_metadata().get("epoch", 0)) if checkpoint is not None else 0

    def _open_stream(self, start: int = 0, epoch: int = 0) -> Prefetched:
        """This rank's input, read ahead in a background thread: a gallery split's micro-batches from micro-batch
        ``start`` on (every planned epoch), or epoch ``epoch`` of an inline split's Ray Data shard (a local shuffle
        over ``shuffle_buffer_batches`` micro-batches, seeded by train.seed, the epoch and the rank)."""
        gallery, pin = self.stage_run.held, self.device.type == "cuda"
        if gallery is None:
            seed = epoch_seed(self.config.train.seed, epoch, self.rank)
            return Prefetched(iter_worker_batches(self.micro_batch, pin_memory=pin, shuffle_seed=seed,
                                                  shuffle_rows=self.config.train.shuffle_buffer_batches * self.micro_batch))

        def tensors(batch: dict) -> dict:  # numpy gathers -> torch (zero-copy; pinned for a GPU's async copy)
            out = {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in batch.items()}
            return {k: v.pin_memory() for k, v in out.items()} if pin else out

        return Prefetched(tensors(b) for b in gallery.micro_batches(self.rank, self.world_size, self.micro_batch, start))

    def _batches(self, epoch: int = 0):
        """One pass over the input (epoch ``epoch`` of an inline split): the stream opened at the start first."""
        stream, self.stream = self.stream or self._open_stream(epoch=epoch), None
        for batch in stream:
            yield self._to_device(batch)

    def _epochs(self, cached: list[dict] | None):
        """(epoch, its batches) from the resumed epoch on. A gallery split's stream holds every epoch from the
        resumed one on (``data_epochs`` = epochs); an inline split streams one epoch per pass (``data_epochs`` = 1).
        Stage 3 deals this rank's cached rows into new micro-batches every epoch (a fresh seeded permutation)."""
        epochs, per_epoch = self.config.train.epochs, self.steps_per_epoch * self.config.train.grad_accum
        if cached is not None:
            rows = {key: torch.cat([batch[key] for batch in cached]) for key in cached[0]}
            bank = self.config.loss.gallery_negatives
            for epoch in range(self.epoch, epochs):
                yield epoch, dealt(rows, self.micro_batch, epoch_seed(self.config.train.seed, epoch, self.rank), bank)
        elif self.stage_run.data_epochs == 1:
            for epoch in range(self.epoch, epochs):
                yield epoch, self._batches(epoch)
        else:
            stream = iter(self._open_stream(start=self.epoch * per_epoch))
            for epoch in range(self.epoch, epochs):
                yield epoch, (self._to_device(batch) for batch in itertools.islice(stream, per_epoch))

    def _to_device(self, batch: dict) -> dict:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        for key in ("reference", "target", "subset"):
            if key not in out:
                continue
            if out[key].dtype != torch.uint8:
                out[key] = out[key].float()
            elif key == "subset":  # [B, K, S, S, 3] -> [B, K, 3, S, S]
                out[key] = normalize_pixels(out[key].flatten(0, 1)).unflatten(0, out[key].shape[:2])
            else:
                out[key] = normalize_pixels(out[key])
        out["images"] = "pixel_values" if batch["reference"].dtype == torch.uint8 else "embeds"
        return out

    def _loss(self, batch: dict) -> dict[str, torch.Tensor]:
        model = self.engine.module
        images = batch.pop("images", "embeds")  # stage 3's rows: the frozen branches' outputs (_encode_split_once)
        return stage_loss(self.spec, model, self.loss_fn, batch, images)

    @torch.no_grad()
    def _encode_split_once(self) -> list[dict]:
        """Stage 3: the frozen branches' outputs for this rank's shard (``branch_outputs``), computed once: queries,
        target gallery embeddings and, where L_C uses them, the reference's and the img_set members' (drawn for the
        first epoch, then kept)."""
        model, cached = self.engine.module, []
        model.eval()
        for batch in self._batches():
            images = batch.pop("images")
            cached.append({**branch_outputs(model, batch, images, references=self.loss_fn.uses_references),
                           "target_row": batch["target_row"]})  # names each row's target: the gallery bank's draw
        first = cached[0] if cached else {}
        negatives = (["the reference"] if "reference_gallery" in first else []) + (
            [f"{first['subset_gallery'].shape[1]} img_set members"] if "subset_gallery" in first else []) + (
            [f"{self.config.loss.gallery_negatives} gallery items a step"] if self.config.loss.gallery_negatives else [])
        self._log(f"stage 3: encoded {len(cached)} batches once with the frozen branches; L_C's hard negatives per "
                  f"query: {' and '.join(negatives) or 'none (in-batch targets only)'}")
        return cached

    # -- checkpoints, export ---------------------------------------------------------------------------

    def _checkpoint(self, epoch: int, batch_in_epoch: int, metrics: dict, export: bool = False) -> None:
        """Every rank saves its DeepSpeed state (collective) and reports it; the last one also exports."""
        import ray.train

        self._flush_metrics()
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as directory:
            state = {CLIENT_STATE: {"step": self.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                    "world_size": self.world_size}}
            self.engine.save_checkpoint(directory, tag=f"step{self.step}", client_state=state)
            rng = {"cpu": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            save_file(rng, Path(directory) / RNG_STATE.format(rank=self.rank))
            if export:
                self._export()
            metrics = {**metrics, "step": self.step, "stage": self.spec.number}
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            checkpoint.set_metadata(state[CLIENT_STATE])  # read back before the input opens (_resumed_epoch)
            write_manifest(directory, self.rank)  # last: covers every file above
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_upload_fn=lambda c, name: upload(c, name, self.rank))

    def _export(self) -> None:
        """``save_pretrained`` of the trained model for the next stage, evaluation and serving (no DeepSpeed)."""
        from detailfusion.library.model import save_model

        if self.rank == 0:  # one writer (ZeRO <= 2 keeps whole parameters on every rank; ZeRO-3 is refused at check)
            model = self.engine.module
            if self.spec.export_gm_into_di:  # both branches start from the pre-trained Q-Former (as from BLIP-2's)
                model.di_branch.load_state_dict(model.gm_branch.state_dict())
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.config.train.export_precision]
            save_model(model.to("cpu"), self.tokenizer, self.export_dir, dtype=dtype)
            model.to(self.device)
            self._log(f"exported the stage {self.spec.number} model to {self.export_dir}")

    def _write_metrics(self, epoch: int, parts: dict, rate: float) -> None:
        if self.rank != 0:
            return
        self.pending_metrics.append({"step": self.step, "epoch": epoch, "wall_time": round(time.time(), 4),
                                     "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate,
                                     **{k: v.item() for k, v in parts.items()}})

    def _flush_metrics(self) -> None:
        """Rank 0's buffered step rows to metrics.csv: at progress lines and checkpoints, not every step."""
        if self.pending_metrics:
            self._append_csv("metrics.csv", *self.pending_metrics)
            self.pending_metrics = []

    def _append_csv(self, name: str, *rows: dict) -> None:
        path = self.stage_dir / name
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[stage {self.spec.number}] {message}", flush=True)
