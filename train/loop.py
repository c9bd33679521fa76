"""The training loop shared by train_mvae.py and train_mvdiff.py: accelerate setup, EMA,
atomic checkpoints with resume, logging, validation and export hooks.

Checkpoint layout (``<output_dir>/checkpoints/``)::

    step_00001000/          accelerate state (model.safetensors, optimizer, scheduler, RNG per
                            rank), ema.safetensors, train_state.json (step, data position,
                            the size of every file)
    latest                  text: the name of the newest complete checkpoint

A checkpoint is written into ``.tmp_step_*``, verified, and renamed when complete, and
``latest`` is replaced atomically after it, so a process killed at any moment leaves the
previous checkpoint loadable. A checkpoint damaged later (a truncated file) is skipped on
resume, with a warning naming it and why, in favour of the newest one that verifies. The
accelerate state uses torch.save for optimizer / scheduler / RNG (your own training state);
exported model bundles are safetensors only.
Multi-node runs need ``output_dir`` on a file system shared by all nodes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import CheckpointConfig, Device, EMAConfig, LoggingConfig, OptimConfig, Precision, RuntimeConfig

logger = logging.getLogger(__name__)
LossFn = Callable[[dict], tuple[Tensor, dict[str, float]]]
_MIXED = {Precision.BF16: "bf16", Precision.FP16: "fp16", Precision.FP32: "no"}
_clock = time.monotonic  # the clock of optim.max_minutes (tests replace it)


def make_accelerator(runtime: RuntimeConfig, logging_cfg: LoggingConfig) -> Accelerator:
    """One Accelerator per run; DDP / FSDP2 / multi-node come from ``accelerate launch``."""
    out = Path(runtime.output_dir)
    acc = Accelerator(
        cpu=runtime.device is Device.CPU,
        mixed_precision=_MIXED[runtime.precision],
        log_with="tensorboard" if logging_cfg.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, on every rank count
    )
    if runtime.allow_tf32 and acc.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return acc


class WarmupThenDecay:
    """LR multiplier: linear warmup over ``warmup_steps``, then 1, then a cosine from 1 to 0
    over the last ``decay_steps`` of ``max_steps`` (a class so it pickles)."""

    def __init__(self, warmup_steps: int, max_steps: int = 0, decay_steps: int = 0):
        self.warmup_steps, self.max_steps, self.decay_steps = warmup_steps, max_steps, decay_steps

    def __call__(self, step: int) -> float:
        scale = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        start = self.max_steps - self.decay_steps
        if self.decay_steps > 0 and step >= start:
            scale *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - start) / self.decay_steps)))
        return scale


def make_optimizer(
    params: list[nn.Parameter], optim: OptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    if len(optim.betas) != 2:
        raise ValueError(f"optim.betas={list(optim.betas)} must hold two numbers, e.g. [0.9, 0.999].")
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupThenDecay(optim.warmup_steps, optim.max_steps, optim.decay_steps)
    )


def _full(t: Tensor) -> Tensor:
    """A plain tensor from a possibly sharded (FSDP2 DTensor) one; collective when sharded."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    """Exponential moving average of the trainable parameters, kept in float32.

    Under FSDP2 the averages are sharded like the parameters; ``full_state_dict`` gathers
    them (a collective: call it on every rank).
    """

    def __init__(self, module: nn.Module, config: EMAConfig):
        self.config = config
        self.params = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}
        self._live = {n: p for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.config.decay
        if self.config.warmup:
            decay = min(decay, (1 + step) / (10 + step))
        # one fused update over all parameters (per-parameter lerps launched ~500 kernels a step)
        torch._foreach_lerp_(list(self.params.values()), [self._live[n].detach().float() for n in self.params],
                             1.0 - decay)

    def full_state_dict(self) -> dict[str, Tensor]:
        return {n: _full(t).detach().cpu().contiguous() for n, t in self.params.items()}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise ValueError(f"EMA checkpoint lacks {missing[:5]}; it belongs to a different model.")
        for name, avg in self.params.items():
            src = state[name].to(device=avg.device, dtype=avg.dtype)
            if hasattr(avg, "device_mesh"):  # DTensor: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src, avg.device_mesh, avg.placements)
            avg.copy_(src)


@dataclass
class TrainState:
    """What resumes the loop besides the accelerate state."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # per-rank batches consumed (the data position)
    skipped: int = 0  # objects skipped as unreadable, all ranks
    losses: list[float] = field(default_factory=list)  # rank-mean loss per step, for tests and plots


class Checkpointer:
    """Atomic checkpoint folders under ``root`` with a ``latest`` pointer.

    ``train_state.json`` records the size of every file of its checkpoint; a checkpoint is
    verified (sizes, safetensors headers, zip directories) before ``latest`` points to it, and
    on resume the newest one that verifies is used: truncated files never end a run.
    """

    def __init__(self, root: Path, config: CheckpointConfig):
        self.root, self.config = root, config
        self.skipped: list[tuple[Path, str]] = []  # checkpoints passed over by ``latest``, and why

    def candidates(self) -> list[Path]:
        """Checkpoint folders, newest first: the one ``latest`` names, then by step."""
        folders = sorted(self.root.glob("step_*"), reverse=True)
        pointer = self.root / "latest"
        named = self.root / pointer.read_text().strip() if pointer.is_file() else None
        if named in folders:
            folders.remove(named)
            folders.insert(0, named)
        return folders

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies (``skipped`` lists the others and why); None when
        there is none at all. Raises ValueError when checkpoints exist but none verifies."""
        self.skipped = []
        for folder in self.candidates():
            problem = verify_checkpoint(folder)
            if problem is None:
                return folder
            self.skipped.append((folder, problem))
        if self.skipped:
            raise ValueError(_none_loads(self.skipped))
        return None

    def save(self, acc: Accelerator, state: TrainState, ema: EMA | None) -> Path | None:
        """Write checkpoint ``step_<step>``; None (logged) if it fails verification, in which case
        ``latest`` keeps naming the previous one."""
        final = self.root / f"step_{state.step:08d}"
        tmp = self.root / f".tmp_step_{state.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        ema_state = ema.full_state_dict() if ema is not None else None
        acc.wait_for_everyone()  # every rank's files are on disk before the manifest lists them
        saved: Path | None = final
        if acc.is_main_process:
            if ema_state is not None:
                save_file(ema_state, str(tmp / "ema.safetensors"))
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            _write_atomic(tmp / "train_state.json", json.dumps({**asdict(state), "files": files}))
            problem = verify_checkpoint(tmp)
            if problem is not None:
                logger.error("checkpoint %s failed verification (%s); latest still names the previous one. "
                             "Check free disk space.", final.name, problem)
                acc.print(f"checkpoint {final.name} failed verification ({problem}); not used")
                shutil.rmtree(tmp, ignore_errors=True)
                saved = None
            else:
                if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _write_atomic(self.root / "latest", final.name)
                self._prune()
        acc.wait_for_everyone()
        return saved

    def load(self, acc: Accelerator, path: Path, ema: EMA | None, module: nn.Module | None = None) -> TrainState:
        if getattr(acc, "is_fsdp2", False) and module is not None:
            optimizers, acc._optimizers = acc._optimizers, []  # accelerate's FSDP2 optimizer load fails
            try:
                acc.load_state(str(path))
            finally:
                acc._optimizers = optimizers
            load_fsdp2_optimizers(acc, module, path)
        else:
            acc.load_state(str(path))
        if ema is not None:
            if not (path / "ema.safetensors").is_file():
                raise ValueError(
                    f"{path} has no ema.safetensors but ema.enabled is true; resume with ema.enabled=false."
                )
            ema.load_full_state_dict(load_file(str(path / "ema.safetensors")))
        doc = json.loads((path / "train_state.json").read_text())
        return TrainState(**{f.name: doc[f.name] for f in fields(TrainState) if f.name in doc})

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if verify_checkpoint(p) is None)
        for old in complete[: max(0, len(complete) - self.config.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)


def _none_loads(skipped: list[tuple[Path, str]]) -> str:
    reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped[:5])
    return (
        f"no checkpoint in {skipped[0][0].parent} can be resumed ({reasons}). Delete the broken folders, or set "
        "checkpoint.resume=false (or another runtime.output_dir) to start over."
    )


def verify_checkpoint(folder: Path) -> str | None:
    """None when ``folder`` is a complete checkpoint, else what is wrong with it.

    Checks that train_state.json parses, every file it lists has its recorded size (older
    checkpoints list none), safetensors files end where their header says, and zip files
    (torch.save) have their central directory.
    """
    try:
        doc = json.loads((folder / "train_state.json").read_text())
    except FileNotFoundError:
        return "train_state.json is missing (the save did not finish)"
    except (OSError, ValueError) as err:
        return f"train_state.json is unreadable ({err})"
    if not isinstance(doc, dict) or not isinstance(doc.get("step"), int):
        return "train_state.json holds no step"
    for name, size in (doc.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (truncated or replaced)"
    for path in sorted(folder.rglob("*")):
        problem = _file_problem(path) if path.is_file() else None
        if problem is not None:
            return f"{path.relative_to(folder)}: {problem}"
    return None


def _file_problem(path: Path) -> str | None:
    """Structural check of one checkpoint file: safetensors extent, zip directory."""
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors":
            if len(head) < 8:
                return "shorter than a safetensors header"
            try:
                header = json.loads(f.read(int.from_bytes(head, "little")))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, MemoryError, OverflowError):
                return "the safetensors header is unreadable"
            if 8 + int.from_bytes(head, "little") + end != path.stat().st_size:
                return "the safetensors data does not end where its header says (truncated)"
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"the zip archive is damaged ({err})"
    return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resumes(config: CheckpointConfig, output_dir: Path) -> bool:
    """Whether a run in ``output_dir`` resumes from a checkpoint (as ``run_loop`` will)."""
    return config.resume and Checkpointer(Path(output_dir) / "checkpoints", config).latest() is not None


def load_fsdp2_optimizers(acc: Accelerator, module: nn.Module, path: Path) -> None:
    """Load the sharded optimizer states that ``acc.save_state`` wrote under FSDP2.

    accelerate 1.11 saves them keyed by parameter name (``get_optimizer_state_dict``) but
    loads them into the optimizer's own index-keyed, still empty state dict, which fails
    ("Missing key in checkpoint state_dict: optimizer.state.0.step"). Here both sides use
    torch's keys; ``get_optimizer_state_dict`` also creates the moments to load into.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    for i, wrapped in enumerate(acc._optimizers):
        optimizer = getattr(wrapped, "optimizer", wrapped)
        state = {"optimizer": get_optimizer_state_dict(module, optimizer)}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path / f"optimizer_{i}")))
        set_optimizer_state_dict(module, optimizer, state["optimizer"])


@dataclass
class Hooks:
    """What differs between the trainers: the loss, validation and export."""

    loss_fn: LossFn
    batches: Callable[[int], Iterator[dict]]  # start micro-batch -> endless batches
    validate: Callable[[int, dict[str, Tensor]], None] | None = None  # (step, full weights) on main
    export: Callable[[dict[str, Tensor]], Path] | None = None  # full (EMA) weights on main


@dataclass
class LoopConfig:
    optim: OptimConfig
    ema: EMAConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig
    output_dir: Path


def run_loop(
    acc: Accelerator,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    hooks: Hooks,
    cfg: LoopConfig,
) -> TrainState:
    """Train ``module`` (already prepared) to ``optim.max_steps``, resuming from the latest checkpoint;
    with ``optim.max_minutes`` > 0, stop earlier at the first step past that time, with a
    checkpoint and the export (the same command resumes)."""
    ckpt = Checkpointer(cfg.output_dir / "checkpoints", cfg.checkpoint)
    ema = EMA(acc.unwrap_model(module), cfg.ema) if cfg.ema.enabled else None
    state = TrainState()
    if cfg.checkpoint.resume:
        state = _resume(acc, ckpt, ema, module) or state
    batches = hooks.batches(state.micro_batches)
    module.train()
    accum, tick = cfg.optim.grad_accum_steps, time.time()
    stat_sums: dict[str, float] = {}  # the loss's own figures (its parts, rates), summed since the last log line
    stat_steps = 0
    deadline = _clock() + 60.0 * cfg.optim.max_minutes if cfg.optim.max_minutes > 0 else None
    while state.step < cfg.optim.max_steps:
        loss_sum, skipped, stats = _optimizer_step(acc, module, optimizer, scheduler, hooks, batches, cfg.optim)
        stat_steps += 1
        for name, value in stats.items():
            stat_sums[name] = stat_sums.get(name, 0.0) + value
        state.micro_batches += accum
        state.step += 1
        if ema is not None:
            ema.update(state.step)
        mean_loss = acc.reduce(torch.tensor(loss_sum / accum, device=acc.device), "mean").item()
        state.skipped += int(acc.reduce(torch.tensor(skipped, device=acc.device), "sum").item())
        state.losses.append(mean_loss)
        if state.step % cfg.logging.log_every == 0 or state.step == cfg.optim.max_steps:
            rate = cfg.logging.log_every / max(time.time() - tick, 1e-9)
            tick = time.time()
            means = {name: acc.reduce(torch.tensor(total / stat_steps, device=acc.device), "mean").item()
                     for name, total in sorted(stat_sums.items())}
            stat_sums.clear()
            stat_steps = 0
            acc.log(
                {
                    "loss": mean_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "skipped_objects": state.skipped,
                    "steps_per_s": rate,
                    **{f"loss_stats/{name}": value for name, value in means.items()},
                },
                step=state.step,
            )
            parts = "".join(f" {name} {value:.4f}" for name, value in means.items())
            acc.print(f"step {state.step} loss {mean_loss:.4f}{parts} skipped {state.skipped} ({rate:.2f} steps/s)")
        out_of_time = deadline is not None and _any_rank(acc, _clock() >= deadline)
        if state.step % cfg.checkpoint.every == 0 or state.step == cfg.optim.max_steps or out_of_time:
            ckpt.save(acc, state, ema)
        if hooks.validate and cfg.logging.validate_every and state.step % cfg.logging.validate_every == 0:
            _on_main(acc, module, ema, lambda w: hooks.validate(state.step, w))
        if out_of_time and state.step < cfg.optim.max_steps:
            acc.print(
                f"stopped at step {state.step} of {cfg.optim.max_steps}: optim.max_minutes={cfg.optim.max_minutes:g} "
                "reached; checkpoint saved, exporting. Run the same command again to continue."
            )
            break
    if hooks.export is not None:
        _on_main(acc, module, ema, hooks.export)
    acc.end_training()
    return state


def _any_rank(acc: Accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (clocks differ between ranks)."""
    if acc.num_processes == 1:
        return flag
    return acc.reduce(torch.tensor(float(flag), device=acc.device), "sum").item() > 0


def _resume(acc: Accelerator, ckpt: Checkpointer, ema: EMA | None, module: nn.Module) -> TrainState | None:
    """Load the newest checkpoint that verifies and loads, logging each one skipped and why."""
    latest, skipped = ckpt.latest(), list(ckpt.skipped)
    while latest is not None:
        try:
            state = ckpt.load(acc, latest, ema, module)
        except Exception as err:  # noqa: BLE001 - a damaged file the structural check missed: try an older one
            skipped.append((latest, f"loading failed ({type(err).__name__}: {err})"))
            older = [p for p in ckpt.candidates() if p.name < latest.name and verify_checkpoint(p) is None]
            latest = older[0] if older else None
            continue
        for path, why in skipped:
            logger.warning("skipped checkpoint %s: %s", path.name, why)
            acc.print(f"skipped checkpoint {path.name}: {why}")
        acc.print(f"resumed from {latest} at step {state.step}")
        return state
    if skipped:
        raise ValueError(_none_loads(skipped))
    return None


def _optimizer_step(
    acc: Accelerator,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    hooks: Hooks,
    batches: Iterator[dict],
    optim: OptimConfig,
) -> tuple[float, int, dict[str, float]]:
    """One optimizer step over ``grad_accum_steps`` micro-batches (no gradient sync until the last):
    the summed loss, the skipped objects and the mean of each figure the loss reports."""
    loss_sum, skipped, stats = 0.0, 0, {}
    for micro in range(optim.grad_accum_steps):
        batch = next(batches)
        skipped += int(batch["skipped"].sum())
        last = micro == optim.grad_accum_steps - 1
        with acc.no_sync(module) if not last else contextlib.nullcontext():
            with acc.autocast():
                loss, parts = hooks.loss_fn(batch)
            acc.backward(loss / optim.grad_accum_steps)
        loss_sum += loss.detach().item()
        for name, value in parts.items():
            stats[name] = stats.get(name, 0.0) + float(value) / optim.grad_accum_steps
    if optim.max_grad_norm > 0:
        acc.clip_grad_norm_(module.parameters(), optim.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, skipped, stats


def _on_main(acc: Accelerator, module: nn.Module, ema: EMA | None, fn: Callable[[dict[str, Tensor]], object]) -> None:
    """Gather full weights (EMA when enabled) on every rank, run ``fn`` on the main process."""
    weights = ema.full_state_dict() if ema is not None else acc.get_state_dict(module)
    if acc.is_main_process:
        fn({k: v.detach().float().cpu() for k, v in weights.items()})
    acc.wait_for_everyone()
