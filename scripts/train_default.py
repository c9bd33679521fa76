"""Train a default-recipe model at a size set by the clock, in one command: generate procedural
objects on every CPU core, train `train/configs/default_unet.yaml` from scratch on the shipped
default's MVAE for a fixed number of minutes, evaluate it on the held-out split, and put the
bundle, the reports and the training log in one folder.

Made for one call on a lent GPU machine (a 10-minute command: on the H200 of 2026-12-04, 205 s
of rendering 8000 objects on 16 processes, then training; ~2 min of evaluation unless
--eval-count 0), and runs the same on a CPU:

  python scripts/train_default.py --work /tmp/mvdpp_big --out $OUT --objects 8000 --minutes 5 --batch-size 32
  python scripts/train_default.py --work /tmp/small --out /tmp/small/out --objects 16 --max-steps 20 --eval-count 4
  python scripts/train_default.py --work /tmp/big --out $OUT --objects 8000 --jobs 16 --batch-size 64 \
      --config train/configs/default_unet_3.yaml --set init.path=models/mvdpp_default.safetensors \
      --probe-steps 60 --decay --eval-count 0 --finish-within 8.5   # continue the shipped default

--config picks the trainer config (a bundle-initialised one continues that bundle).
--finish-within bounds the whole command; --probe-steps measures steps/s in a short run apart and
sets optim.max_steps to the step the time limit is expected at; --decay ends the LR's cosine there.

`--parts K` trains on the first --objects training objects made of exactly K primitives, and
evaluates on held-out objects made of K (a simpler rung of the same task; 0, the default: any).
`--upright` trains and evaluates on the upright variant of the objects (each part turned about
the vertical only, as real objects have an up), in folders of their own, and also evaluates the
held-out objects as generated (the issue's set) into eval_as_generated.json. `--mixed` trains on
half and half: the first --objects/2 objects of each render, their folders joined with '::'
(docs/embedded_default.md, "Objects with an up": it learns upright objects and keeps most of
its figures on the others); eval.json scores the objects as generated, eval_upright.json the
upright ones.
Extra `--set KEY=VALUE` go to the trainer (e.g. `--set optim.lr=5e-4`). On CUDA it trains in
bf16 with data-loader workers; on a CPU in fp32 in the main process. A rerun with the same
--work resumes: complete object folders are kept and training continues from its checkpoint.
Writes to --out: model.safetensors (the EMA export), eval.json (scripts/eval_default.py, with
the nearest-training-object baseline), summary.json (timings, steps, object passes, the final
loss, the eval's headline figures) and train.log.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mvdpp_core.inputs import average_seeds_error  # noqa: E402
from mvdpp_core.sampling_defaults import EMBEDDED_SAMPLING  # noqa: E402
from train.config import CheckpointConfig, TrainConfig, load_config  # noqa: E402
from train.data import format as fmt  # noqa: E402
from train.loop import Checkpointer  # noqa: E402
from train.models import check_init_files  # noqa: E402
from train.procedural.objects import MAX_PARTS, Split, first_objects  # noqa: E402
from train.procedural.render import folder_name  # noqa: E402

CONFIG = REPO / "train" / "configs" / "default_unet.yaml"
SHIPPED = REPO / "models" / "mvdpp_default.safetensors"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="data and run folder (a rerun resumes here)")
    p.add_argument("--out", type=Path, required=True, help="folder for the bundle, reports and log")
    p.add_argument("--objects", type=int, default=8000, help="procedural training objects")
    p.add_argument("--config", type=Path, default=CONFIG,
                   help="trainer config (default: default_unet.yaml, from scratch; default_unet_3.yaml with "
                        "--set init.path=models/mvdpp_default.safetensors continues the shipped default)")
    p.add_argument("--minutes", type=float, default=0.0, help="training time limit (optim.max_minutes; 0 = none)")
    p.add_argument("--finish-within", type=float, default=0.0, metavar="MIN",
                   help="whole-command limit in minutes (rendering included): training gets what is left, less "
                        "a reserve for start-up and export, never more than --minutes (0 = no such limit)")
    p.add_argument("--probe-steps", type=int, default=0,
                   help="first train this many steps apart to measure steps/s, then set optim.max_steps so the "
                        "run ends at its time limit (needs --minutes or --finish-within; 0 = no probe)")
    p.add_argument("--decay", action="store_true",
                   help="cosine-decay the learning rate to 0 over the whole run (optim.decay_steps = max_steps)")
    p.add_argument("--max-steps", type=int, default=1_000_000, help="step limit (optim.max_steps)")
    p.add_argument("--batch-size", type=int, default=2, help="objects per step (optim.batch_size)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="rendering processes")
    p.add_argument("--loader-workers", type=int, default=-1, help="data-loader workers (-1: 8 on CUDA, 0 on a CPU)")
    p.add_argument("--mvae", type=Path, default=SHIPPED, help="MVAE file or bundle whose VAE is used")
    p.add_argument("--eval-count", type=int, default=50, help="held-out objects to evaluate (0: skip)")
    p.add_argument("--eval-sampling", nargs=3, default=list(EMBEDDED_SAMPLING[:3]),
                   metavar=("SAMPLER", "STEPS", "CFG"),
                   help="sampling of the evaluation (default: the embedded default's, so the figures compare)")
    p.add_argument("--eval-mirror", action=argparse.BooleanOptionalAction, default=EMBEDDED_SAMPLING[3],
                   help="average the evaluation's views with the mirrored input's (the embedded default's sampling)")
    p.add_argument("--eval-average-seeds", type=int, default=EMBEDDED_SAMPLING[4],
                   help="noise draws (in antithetic pairs) whose views the evaluation averages (the embedded "
                   "default's sampling)")
    p.add_argument("--retrieval", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the nearest training object (the bar a model must clear)")
    p.add_argument("--parts", type=int, default=0, choices=range(MAX_PARTS + 1), metavar="K",
                   help="only objects made of exactly K primitives, for training and evaluation (0: any)")
    p.add_argument("--upright", action="store_true",
                   help="train and evaluate on objects whose parts turn about the vertical only, as real "
                        "objects have an up (train.procedural.generate --upright; folders of their own); "
                        "the held-out objects as generated are evaluated too (eval_as_generated.json)")
    p.add_argument("--mixed", action="store_true",
                   help="train on half objects as generated, half upright (the first --objects/2 of each render, "
                        "in folders of their own); evaluate both (eval.json, eval_upright.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="more trainer overrides")
    args = p.parse_args(argv)
    for name in ("objects", "batch_size", "max_steps", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: give at least 1.")
    if message := average_seeds_error("--eval-average-seeds", args.eval_average_seeds):
        p.error(message)
    for name in ("minutes", "finish_within"):
        value = getattr(args, name)
        if value < 0 or not math.isfinite(value):
            p.error(f"--{name.replace('_', '-')} {value}: give 0 (no limit) or a positive number of minutes.")
    if args.probe_steps < 0 or args.probe_steps == 1:
        p.error(f"--probe-steps {args.probe_steps}: give 0 (no probe) or at least 2 steps (the rate is read "
                "over the second half).")
    if args.probe_steps and not (args.minutes or args.finish_within):
        p.error(f"--probe-steps {args.probe_steps} sizes the run by its time limit; give --minutes or "
                "--finish-within too.")
    if args.mixed and args.upright:
        p.error("--mixed --upright: --mixed already trains on upright objects (half of them); give one of the two.")
    if args.mixed and args.objects < 2:
        p.error(f"--objects {args.objects} with --mixed: give at least 2 (half of them are upright).")
    if not args.config.is_file():
        p.error(f"--config {args.config}: no such file; give a trainer config, e.g. {CONFIG}.")
    try:
        args.eval_sampling = [args.eval_sampling[0], int(args.eval_sampling[1]), float(args.eval_sampling[2])]
    except ValueError:
        p.error(f"--eval-sampling {' '.join(map(str, args.eval_sampling))}: give SAMPLER STEPS CFG, e.g. ddim 2 2.0.")
    if args.out.resolve() == args.work.resolve():
        p.error(f"--out {args.out} is --work; give a folder of its own for the results.")
    return args


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def chunks(count: int, jobs: int) -> list[tuple[int, int]]:
    """(start, count) of ``jobs`` near-equal contiguous shares of objects 0..count-1 (no empty ones)."""
    jobs = min(jobs, count)
    edges = [count * j // jobs for j in range(jobs + 1)]
    return [(a, b - a) for a, b in itertools.pairwise(edges)]


def render(root: Path, count: int, jobs: int, parts: int = 0, upright: bool = False) -> float:
    """The first ``count`` training objects (of ``parts`` primitives when > 0; the upright
    variant with ``upright``) under ``root`` (complete folders kept), ``jobs`` processes."""
    t0 = time.perf_counter()
    indices = first_objects(Split.TRAIN, count, parts)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "train.procedural.generate", "--out", str(root), "--split", "train",
             "--count", str(n), "--start", str(start), "--size", "64", "--threads", "1", "--parts", str(parts)]
            + (["--upright"] if upright else []),
            cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for start, n in chunks(indices[-1] + 1, jobs)
    ]
    errors = [p.communicate()[1] for p in procs]  # communicate, not wait: a full stderr pipe would block
    failed = [(p.args, err) for p, err in zip(procs, errors, strict=True) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"rendering failed: {failed[0][0]}\n{failed[0][1][-2000:]}")
    missing = [i for i in indices if not fmt.is_complete(root / folder_name(Split.TRAIN, i))]
    if missing:
        raise RuntimeError(f"{len(missing)} objects were not rendered, e.g. {missing[:5]}")
    return time.perf_counter() - t0


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep + path if path else ''}", "PYTHONUNBUFFERED": "1"}


def stream(cmd: list[str], log: Path, env: dict[str, str]) -> list[str]:
    """Run ``cmd``, echoing and appending its output to ``log``; raise with its tail if it fails, else
    return the last 40 lines."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in proc.stdout:
            f.write(line)
            print(line, end="", flush=True)
            tail = (tail + [line])[-40:]
        if proc.wait() != 0:
            raise RuntimeError(f"{cmd[1]} failed (exit {proc.returncode}):\n{''.join(tail)}")
    return tail


def trainer_overrides(args: argparse.Namespace, data: str, run: Path, cuda: bool) -> list[str]:
    workers = args.loader_workers if args.loader_workers >= 0 else (8 if cuda else 0)
    sets = {
        "data.folders": data, "runtime.output_dir": run, "init.mvae_path": args.mvae.resolve(),
        "runtime.device": "auto" if cuda else "cpu", "runtime.precision": "bf16" if cuda else "fp32",
        "optim.batch_size": args.batch_size, "optim.max_steps": args.max_steps, "optim.max_minutes": args.minutes,
        "data.num_workers": workers, "checkpoint.every": 1000, "checkpoint.keep_last": 2,
        "logging.log_every": 100 if cuda else 10,
    }
    return [f"{k}={v}" for k, v in sets.items()] + list(args.overrides)


RESERVE_MINUTES = 1.0  # the trainer's start-up, the final checkpoint and the export, under --finish-within


def last_rate(log_lines: list[str]) -> float:
    """steps/s of the trainer's last progress line (``step N loss L [the loss's figures] skipped S (R steps/s)``)."""
    for line in reversed(log_lines):
        if line.startswith("step ") and line.rstrip().endswith("steps/s)"):
            return float(line.rsplit("(", 1)[1].split()[0])
    raise RuntimeError("the probe run printed no 'steps/s' progress line")


def train_minutes(args: argparse.Namespace, started: float) -> float:
    """The training time limit: --minutes, capped by what --finish-within leaves (0 = none)."""
    if not args.finish_within:
        return args.minutes
    left = args.finish_within - (time.perf_counter() - started) / 60.0 - RESERVE_MINUTES
    if left <= 0:
        raise RuntimeError(f"--finish-within {args.finish_within:g} min leaves no time to train "
                           f"({(time.perf_counter() - started) / 60.0:.1f} min spent before training)")
    return min(left, args.minutes) if args.minutes else left


def run_summary(run: Path) -> dict:
    """Step and mean loss of the last 100 steps, from the newest checkpoint of ``run`` that verifies."""
    latest = Checkpointer(run / "checkpoints", CheckpointConfig()).latest()
    state = json.loads((latest / "train_state.json").read_text())
    losses = state["losses"]
    return {"steps": state["step"], "loss_last_100": sum(losses[-100:]) / max(1, len(losses[-100:]))}


def headline(report: dict) -> dict:
    """The 1-view figures of an eval_default.py report, and the nearest-neighbour bar."""
    trained = report.get("trained", {}).get("1", {}).get("summary", {})
    keys = ("psnr", "mask_iou", "mask_iou_other", "psnr_other", "volume_iou", "silhouette", "mask_iou_consensus")
    out = {k: round(trained[k]["mean"], 4) for k in keys if k in trained}
    nearest = report.get("retrieval_baseline", {})
    out.update({f"retrieval_{k}": round(v, 4) for k, v in nearest.items() if k != "objects"})
    return out


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    cuda = cuda_available() if args.device != "cpu" else False
    if args.device == "cuda" and not cuda:
        print("--device cuda, but torch sees no CUDA device here; use --device cpu (or auto).", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # a rung and each variant get their own objects and run, so a --work reused with another
    # --parts, --upright or --mixed never mixes them
    suffix = (f"_{args.parts}_parts" if args.parts else "") + (
        "_upright" if args.upright else "_mixed" if args.mixed else "")
    half = (args.objects + 1) // 2
    renders = ([(args.work / "data" / f"train{suffix}_generated", half, False),
                (args.work / "data" / f"train{suffix}_upright", args.objects - half, True)] if args.mixed
               else [(args.work / "data" / f"train{suffix}", args.objects, args.upright)])
    data = "::".join(str(root) for root, _, _ in renders)  # data.folders joins several with '::'
    heldout = args.work / "data" / ("heldout_upright" if args.upright else "heldout")
    run, log = args.work / f"run{suffix}", args.out / "train.log"
    summary: dict = {"config": args.config.name, "objects": args.objects, "parts": args.parts, "upright": args.upright,
                     "mixed": args.mixed,
                     "batch_size": args.batch_size, "minutes": args.minutes, "finish_within": args.finish_within,
                     "eval_sampling": list(args.eval_sampling), "eval_mirror": args.eval_mirror,
                     "eval_average_seeds": args.eval_average_seeds,
                     "device": "cuda" if cuda else "cpu", "overrides": list(args.overrides)}
    if cuda:
        import torch

        summary["device_name"] = torch.cuda.get_device_name(0)
    overrides = trainer_overrides(args, data, run, cuda)
    try:  # the config and the files it names, before minutes of rendering (the objects are not there yet)
        check_init_files(load_config(TrainConfig, args.config,
                                     overrides + ([f"optim.decay_steps={args.max_steps}"] if args.decay else [])).init)
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(f"[train_default] rendering {args.objects} objects with {args.jobs} processes", flush=True)
    summary["render_s"] = round(sum(render(root, n, args.jobs, args.parts, up) for root, n, up in renders), 1)
    print(f"[train_default] rendered in {summary['render_s']} s", flush=True)

    def trainer(sets: list[str]) -> list[str]:
        return [sys.executable, str(REPO / "train" / "train_mvdiff.py"), "--config", str(args.config),
                *(a for item in sets for a in ("--set", item))]

    if args.probe_steps:
        t0 = time.perf_counter()
        probe = overrides + [f"runtime.output_dir={args.work / 'probe'}", "checkpoint.resume=false",
                             f"optim.max_steps={args.probe_steps}", "optim.decay_steps=0", "optim.max_minutes=0",
                             f"logging.log_every={args.probe_steps // 2}",
                             f"checkpoint.every={args.probe_steps}"]
        rate = last_rate(stream(trainer(probe), log, child_env()))
        summary.update(probe_s=round(time.perf_counter() - t0, 1), probe_steps_per_s=rate)
    minutes = train_minutes(args, started)
    max_steps = args.max_steps
    if args.probe_steps:
        # the step the time limit is expected at (less the trainer's ~30 s start-up), less 5 % for the
        # loader's slower moments; optim.max_minutes stays as the hard stop
        max_steps = min(max_steps, max(1, int(0.95 * rate * (minutes * 60.0 - 30.0))))
    overrides += [f"optim.max_minutes={minutes}", f"optim.max_steps={max_steps}"]
    if args.decay:
        overrides.append(f"optim.decay_steps={max_steps}")
    summary["train_minutes"] = round(minutes, 2)
    print(f"[train_default] training for at most {minutes:.2f} min: {' '.join(overrides[-3:])}", flush=True)
    t0 = time.perf_counter()
    stream(trainer(overrides), log, child_env())
    summary["train_s"] = round(time.perf_counter() - t0, 1)
    summary.update(run_summary(run))
    summary["object_passes"] = summary["steps"] * args.batch_size
    summary["passes_per_object"] = round(summary["object_passes"] / args.objects, 2)
    shutil.copyfile(run / "export" / "model.safetensors", args.out / "model.safetensors")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.eval_count:
        sampler, steps, guidance = args.eval_sampling

        def evaluate(folder: Path, upright: bool, name: str, retrieval: bool) -> dict:
            cmd = [sys.executable, str(REPO / "scripts" / "eval_default.py"),
                   "--checkpoint", str(args.out / "model.safetensors"), "--heldout", str(folder),
                   "--count", str(args.eval_count), "--parts", str(args.parts), "--views", "1", "--copy-count", "0",
                   "--no-baseline",
                   "--sampler", sampler, "--steps", str(steps), "--guidance", str(guidance),
                   "--mirror" if args.eval_mirror else "--no-mirror", "--average-seeds", str(args.eval_average_seeds),
                   "--threads", str(args.jobs), "--out", str(args.out / name)]
            cmd += ["--upright"] if upright else []
            cmd += ["--retrieval-baseline", data] if retrieval else []
            stream(cmd, log, child_env())
            return headline(json.loads((args.out / name).read_text()))

        t0 = time.perf_counter()
        summary["eval"] = evaluate(heldout, args.upright, "eval.json", args.retrieval)
        if args.upright:
            # the figures are on the objects as generated: an upright run reports those too
            summary["eval_as_generated"] = evaluate(args.work / "data" / "heldout", False, "eval_as_generated.json",
                                                    False)
        if args.mixed:
            summary["eval_upright"] = evaluate(args.work / "data" / "heldout_upright", True, "eval_upright.json", False)
        summary["eval_s"] = round(time.perf_counter() - t0, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as err:  # a step failed: its own output is above, the reason here
        print(f"[train_default] {err}", file=sys.stderr)
        sys.exit(1)
