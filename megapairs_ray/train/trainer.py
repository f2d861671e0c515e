"""MMRet training on Ray Train (``TorchTrainer``, Train V2).

The driver prepares the data once (``data.prepare_data``), then hands Ray Train a dataset that
Ray Data streams into every worker: checked triplets, or for an alignment run a pipeline run's
(image, caption) pairs. The model is any retriever family (``models/family.py``). Each worker
runs ``run_worker`` (entered through ``entry.train_loop_per_worker``, which keeps the model code
out of Ray Train's controller): ``TrainStep`` (AdamW with linear warm-up and decay, optional
bf16 autocast, gradient accumulation, the gathered InfoNCE loss) under DDP. Rank 0
checkpoints in the family's own form (model + tokenizer) plus ``trainer_state.pt`` (optimiser,
scheduler, step) through ``ray.train.report``; relaunching the same run (same
``checkpoint.storage_path`` and ``checkpoint.name``) resumes from the newest checkpoint at its
step, and ``FailureConfig`` restarts a failed worker group the same way.

On resume the optimiser state and the step are exact; the data stream starts a fresh pass (Ray
Data's streaming split has no replayable position), which for an open-domain corpus sampled
afresh every pass changes nothing that matters. A relaunch whose data changed (settings or
input files) prepares the rows again and still resumes from the checkpoint, with a warning
(``data.prepare_data``); a fresh start is another ``checkpoint.name``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import layout, storage
from megapairs_ray.models.encoders import resolve_model_path
from megapairs_ray.models.family import checkpoint_family, load_retriever
from megapairs_ray.models.fusion import FeatureCache
from megapairs_ray.models.inputs import ModelInput
from megapairs_ray.models.mllm import MMRetMLLM, NotLlavaNext, checkpoint_model_input
from megapairs_ray.models.mllm_twin import TWIN_NAME
from megapairs_ray.models.mmret import MMRetCLIP, clip_mean_std, clip_model_input
from megapairs_ray.models.retriever import resolve_checkpoint
from megapairs_ray.models.towers import MMRetTowers, image_statistics, towers_model_input
from megapairs_ray.train.config import TrainConfig
from megapairs_ray.train.data import (
    RejectTally,
    passes_needed,
    prepare_data,
    tally_name,
    training_dataset,
)
from megapairs_ray.train.entry import MetricsLog, checkpoint_uri, train_loop_per_worker
from megapairs_ray.train.step import TrainStep

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


class TrainDataError(MegapairsError, ValueError):
    """The training data cannot feed one step (too few usable triplets, say)."""


def build_model(cfg: TrainConfig, checkpoint_dir: str | None = None) -> Any:
    """The model a run trains: its own checkpoint when resuming, else ``model.init`` (any
    family; a train run folder gives its last checkpoint), else a new model of
    ``model.family``; then frozen where the config says."""
    m = cfg.model
    path = checkpoint_dir or (resolve_checkpoint(m.init) if m.init is not None else None)
    if path is not None and checkpoint_family(path) == "mllm":
        return _build_mllm(cfg, path)
    if checkpoint_dir is not None:
        model = load_retriever(checkpoint_dir, trainable=True)
    elif m.init is not None:
        model = load_retriever(resolve_checkpoint(m.init), trainable=True)
    elif m.family == "towers":
        model = MMRetTowers.from_towers(**m.towers.model_dump(), seed=cfg.data.seed)
    else:
        torch.manual_seed(cfg.data.seed)
        model = MMRetCLIP.from_config(**m.config_overrides)
    model.freeze(m.freeze_image_tower, m.text_layers_trained)
    if m.freeze_image_tower and m.image_feature_cache:
        model.feature_cache = FeatureCache(m.image_feature_cache)
    return model


def _build_mllm(cfg: TrainConfig, path: str) -> MMRetMLLM:
    """A LLaVA-NeXT under LoRA: the checkpoint's own adapter (resume, or a run's checkpoint as
    init), else a fresh one on the weights; in bf16 when training in bf16 (the adapter's own
    weights stay fp32: peft keeps them so)."""
    m = cfg.model
    dtype = torch.bfloat16 if cfg.optim.precision == "bf16" else torch.float32
    torch.manual_seed(cfg.data.seed)
    model = MMRetMLLM.from_pretrained(path, trainable=True, dtype=dtype,
                                      settings=m.mllm.settings())
    if not model.is_lora:
        model.add_lora(**m.mllm.lora.model_dump())
    model.freeze(m.freeze_image_tower, m.text_layers_trained)
    return model


def model_input_for(cfg: TrainConfig) -> ModelInput:
    """Image size, text length and pixel statistics of the model being trained, read without
    building it (the driver only feeds the loaders)."""
    m = cfg.model
    if m.init is not None:
        path = resolve_checkpoint(m.init)
        if m.family == "mllm" and checkpoint_family(path) != "mllm":
            raise NotLlavaNext(f"model.init {m.init}: a {checkpoint_family(path)} checkpoint, "
                               f"not the LLaVA-NeXT that model.family mllm needs")
        if checkpoint_family(path) == "mllm":
            return checkpoint_model_input(path, m.mllm.settings())
        if checkpoint_family(path) == "towers":
            return towers_model_input(json.loads((Path(path) / "config.json").read_text()))
        from transformers import CLIPConfig

        conf, (mean, std) = CLIPConfig.from_pretrained(path), clip_mean_std(path)
    elif m.family == "towers":
        t = m.towers
        # Refused here, in one line, rather than in every worker: a tower not installed.
        for ref, field in ((t.image_checkpoint, "image_checkpoint"), (t.text_model, "text_model")):
            if ref is not None:
                resolve_model_path(ref, f"model.towers.{field}")
        mean, std = image_statistics(t.image_model)
        return towers_model_input({"image_size": t.image_size, "max_text_len": t.max_text_len,
                                   "image_mean": mean, "image_std": std})
    else:
        from transformers import CLIPConfig

        conf, (mean, std) = CLIPConfig(**m.config_overrides), clip_mean_std("")
    return clip_model_input(conf, (mean, std))


def tokenizer_source(cfg: TrainConfig) -> str | None:
    """The tokenizer the loaders and the checkpoints use: the config's, the init checkpoint's,
    or the family's own (towers: the text tower's; CLIP: OpenAI's BPE)."""
    m = cfg.model
    if m.tokenizer or m.init:
        return m.tokenizer or resolve_checkpoint(m.init)  # type: ignore[arg-type]
    if m.family == "towers":
        return resolve_model_path(m.towers.text_model, "model.towers.text_model")
    return None


def run_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker's loop (``entry.train_loop_per_worker`` calls it)."""
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model

    from megapairs_ray.models.tokenizer import load_tokenizer

    cfg = TrainConfig.model_validate(loop_config["cfg"])
    model_input = ModelInput(**loop_config["model_input"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))
    opt = cfg.optim

    state: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            core, state = restore_checkpoint(cfg, d)
    else:
        core = build_model(cfg)
    if opt.gradient_checkpointing:
        core.gradient_checkpointing_enable()
    model = prepare_model(core)  # moves to the device, wraps in DDP when world > 1
    core = model.module if hasattr(model, "module") else model
    train_step = TrainStep(model, core, opt, cfg.data.num_hard_negatives, model_input, device,
                           rank=rank, world_size=world)
    if state is not None:
        train_step.load_state_dict(state)
        log.info("rank %d resumed at step %d", rank, train_step.step)

    shard = ray.train.get_dataset_shard("train")
    tokenizer = load_tokenizer(loop_config["tokenizer"]) if rank == 0 else None
    samples_per_step = opt.batch_size * opt.grad_accum_steps * world
    window_start, window_steps = time.perf_counter(), 0
    window_loss = torch.zeros((), device=device)
    usable = loop_config["usable"]
    model.train()
    # The stream holds every pass the run needs (``passes_needed``); it is read again only if
    # the run's last batches fall short (a resumed run, rows dropped while loading).
    while train_step.step < opt.max_steps:
        batches_this_pass = 0
        for batch in shard.iter_torch_batches(batch_size=opt.batch_size, drop_last=True,
                                              device=device):
            batches_this_pass += 1
            loss = train_step(batch)
            if loss is None:
                continue  # accumulating
            step = train_step.step
            window_loss += loss
            window_steps += 1
            is_ckpt = step % cfg.checkpoint.every_steps == 0 or step == opt.max_steps
            if is_ckpt or step % cfg.checkpoint.log_every_steps == 0:
                # A report is a barrier across workers: only on log and checkpoint steps.
                mean_loss = window_loss / window_steps
                if world > 1:
                    dist.all_reduce(mean_loss)
                    mean_loss /= world
                elapsed = time.perf_counter() - window_start
                metrics = {"step": step, "loss": float(mean_loss.item()),
                           "lr": train_step.scheduler.get_last_lr()[0],
                           "passes": step * samples_per_step // usable,  # full passes so far
                           "samples_per_s": samples_per_step * window_steps / elapsed}
                if is_ckpt:
                    _report_with_checkpoint(metrics, core, tokenizer, train_step, rank)
                else:
                    ray.train.report(metrics)
                window_start, window_steps = time.perf_counter(), 0
                window_loss = torch.zeros((), device=device)
            if step >= opt.max_steps:
                break
        if batches_this_pass == 0:
            raise TrainDataError(
                f"worker {rank} received no full batch of {opt.batch_size} triplets in a pass "
                f"over the data: too few usable triplets for {world} workers")


def save_checkpoint(folder: str | Path, model: Any, tokenizer: Any, train_step: TrainStep,
                    ) -> None:
    """A checkpoint folder: the model in its family's own form, its tokenizer, and the trainer's
    state (optimiser, scheduler, step) that a resumed run restores (``restore_checkpoint``)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(train_step.state_dict(), Path(folder) / STATE_FILE)


def restore_checkpoint(cfg: TrainConfig, folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """The model and the trainer's state of a ``save_checkpoint`` folder, for ``cfg``'s run."""
    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    return build_model(cfg, str(folder)), state


def _report_with_checkpoint(metrics: dict[str, Any], model: Any, tokenizer: Any,
                            train_step: TrainStep, rank: int) -> None:
    name = f"step_{train_step.step:08d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, tokenizer, train_step)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=name)


def run_dir(cfg: TrainConfig) -> str:
    return layout.train_run_dir(cfg.checkpoint.storage_path, cfg.checkpoint.name)


def _with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local model paths made absolute: Ray Train's workers do not run in the driver's working
    directory, where a relative ``model.init`` would name nothing (and pass for a hub id). The
    mllm twin's name becomes its folder, built here."""
    model = {k: str(Path(v).resolve()) for k in ("init", "tokenizer")
             if (v := getattr(cfg.model, k)) and not storage.is_remote(v) and Path(v).exists()}
    if cfg.model.init == TWIN_NAME:
        model["init"] = resolve_checkpoint(TWIN_NAME)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=model)}) if model else cfg


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` names; returns and stores its summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from megapairs_ray.runtime import init_ray

    cfg = _with_absolute_paths(cfg)
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    prepared, counts = prepare_data(cfg)
    usable = counts.get("usable", 0)
    global_batch = cfg.optim.batch_size * cfg.scaling.num_workers
    if usable < global_batch:
        raise TrainDataError(f"{usable} usable triplets cannot fill one batch of {global_batch} "
                             f"(rejects: {_rejects(counts)})")
    # The tally is books, not work: it lives on the driver's node (a cluster's head, which a
    # lost worker node does not take with it) and, should it go all the same, comes back empty
    # rather than failing the run.
    tally = RejectTally.options(
        name=tally_name(cfg), get_if_exists=True, max_restarts=-1, max_task_retries=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True)).remote()
    model_input = model_input_for(cfg)
    ds = training_dataset(cfg, prepared, model_input, tokenizer_source(cfg), tally_name(cfg),
                          passes=passes_needed(cfg, usable))
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker or 1
    storage_path = cfg.checkpoint.storage_path
    if not storage.is_remote(storage_path):
        storage_path = str(Path(storage_path).resolve())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"),
                           "model_input": model_input.__dict__,
                           "tokenizer": tokenizer_source(cfg), "usable": usable},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers,
                                     use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.checkpoint.name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=[MetricsLog(layout.train_metrics_file(run_dir(cfg)))]),
        datasets={"train": ds},
    )
    result = trainer.fit()
    dropped = ray.get(tally.get.remote())
    summary = {
        "name": cfg.checkpoint.name,
        "checkpoint": (checkpoint_uri(cfg.checkpoint.storage_path, result.checkpoint)
                       if result.checkpoint else None),
        "metrics": result.metrics,
        "triplets": counts,
        "captions": cfg.data.captions_from is not None,  # the rows were captioned images
        "dropped_while_loading": dropped,
        "seconds": time.perf_counter() - t0,
    }
    storage.write_json(layout.train_summary_file(run_dir(cfg)), summary)
    return summary


def _rejects(counts: dict[str, int]) -> str:
    rej = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("reject:")}
    return ", ".join(f"{k}={v}" for k, v in sorted(rej.items())) or "none"
