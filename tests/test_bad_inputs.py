"""One row per kind of bad input, over the Python API, checkpoint loading and training configs.

Each row: the call, the exception it must raise, and words its message must contain (the
bad value, what is allowed, the fix). The error must come from the project's own code within
``MAX_FRAMES`` frames of the call (never from deep inside torch, safetensors or yaml), so a
regression shows as a row. Rows in ``ACCEPTED`` are inputs that must work.

``python tests/test_bad_inputs.py`` runs every row outside pytest and prints, as JSON, how
many raise a clear error, raise from inside a library, raise an unclear error, or return
without any error (a silent wrong result): the issue-13 counts.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MAX_FRAMES = 8  # frames from the first project frame to the raise (nested config sections recurse)
PROJECT_DIRS = (str(REPO / "mvdpp_core"), str(REPO / "train"))


class Ctx:
    """What the rows need, built once: a tiny model, condition views, a bundle to mutate."""

    def __init__(self, tmp: Path):
        from tiny_models import object_views, tiny_model

        from mvdpp_core.checkpoint import save_checkpoint

        self.tmp = tmp
        self.model = tiny_model(seed=0)
        self.images, self.masks = object_views(1, size=64)
        self.path = save_checkpoint(self.model, tmp / "tiny.safetensors")
        self._n = 0

    def fresh(self, suffix: str = ".safetensors") -> Path:
        self._n += 1
        return self.tmp / f"case_{self._n}{suffix}"

    def generate(self, **kwargs):
        from mvdpp_core.pipeline import generate

        args = {"images": self.images, "masks": self.masks, "steps": 1, **kwargs}
        return generate(args.pop("model", self.model), args.pop("images"), args.pop("masks"), **args)

    def bundle(self, *, meta: dict | None = None, tensors: Callable[[dict], dict] | None = None) -> Path:
        """A copy of the tiny bundle with metadata entries replaced and tensors transformed."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(self.path), framework="pt") as f:
            metadata = dict(f.metadata())
        data = load_file(str(self.path))
        path = self.fresh()
        save_file(tensors(data) if tensors else data, str(path), metadata={**metadata, **(meta or {})})
        return path

    def config_json(self, **changes) -> str:
        from mvdpp_core.config import ModelConfig

        config = self.model.config.to_dict()
        for key, value in changes.items():
            *parents, leaf = key.split("__")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = value
        return json.dumps(config) if changes else ModelConfig.to_json(self.model.config)

    def raw(self, data: bytes, suffix: str = ".safetensors") -> Path:
        path = self.fresh(suffix)
        path.write_bytes(data)
        return path

    def train_config(self, *overrides: str, path: Path | None = None):
        from train.config import TrainConfig, load_config

        return load_config(TrainConfig, path, list(overrides))

    def yaml(self, text: str) -> Path:
        path = self.fresh(".yaml")
        path.write_text(text)
        return path


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Ctx], object]
    exc: type[Exception]
    words: tuple[str, ...]
    # Rows too costly to run on code that lacks the check (it would allocate GBs first).
    costly_unguarded: bool = False


def _nan_weights(t: dict) -> dict:
    t = dict(t)
    key = next(k for k in t if k.startswith("unet.") and k.endswith("conv_in.weight"))
    t[key] = torch.full_like(t[key], float("nan"))
    return t


def _int8(t: dict) -> dict:
    t = dict(t)
    key = next(k for k in t if k.startswith("unet.") and k.endswith("conv_in.weight"))
    t[key] = t[key].mul(100).to(torch.int8)
    return t


def _load(path: Path, **kwargs):
    from mvdpp_core.checkpoint import load_checkpoint

    return load_checkpoint(path, **kwargs)


def _meta(path: Path):
    from mvdpp_core.checkpoint import read_metadata

    return read_metadata(path)


def _fake_header(header_len: int, body: bytes, total: int) -> bytes:
    """A file that starts like safetensors: u64 header length, then '{' ..."""
    return (struct.pack("<Q", header_len) + body).ljust(total, b" ")


def _huge_config_bundle(c: Ctx) -> Path:
    """A 1-2 KB file whose config claims the full-size (sd2) model."""
    from safetensors.torch import save_file

    from mvdpp_core.checkpoint import FORMAT_NAME
    from mvdpp_core.config import preset

    path = c.fresh()
    meta = {"format": FORMAT_NAME, "format_version": "1", "config": preset("sd2").to_json()}
    save_file({"unet.conv_in.weight": torch.zeros(4)}, str(path), metadata=meta)
    assert path.stat().st_size < 4096
    return path


def _views(n: int, size: int = 64):
    from tiny_models import object_views

    images, masks = object_views(max(n, 1), size=size)
    return images[:n], masks[:n]


def _config(case_id: str, override: str, *words: str) -> Case:
    """A row refusing one ``--set`` override of the UNet training config."""
    return Case(case_id, lambda c: c.train_config(override), ValueError, words)


def _no_cuda() -> bool:
    return not torch.cuda.is_available()


API = [
    Case("guidance_nan", lambda c: c.generate(guidance=float("nan")), ValueError, ("guidance=nan", "finite", "3.0")),
    Case("guidance_inf", lambda c: c.generate(guidance=float("inf")), ValueError, ("guidance=inf", "finite")),
    Case("guidance_negative", lambda c: c.generate(guidance=-2.0), ValueError, ("guidance=-2.0", ">= 0", "1 = off")),
    Case("guidance_str", lambda c: c.generate(guidance="3"), TypeError, ("guidance='3'", "number", "guidance=3.0")),
    Case("guidance_tensor", lambda c: c.generate(guidance=torch.ones(2)), TypeError, ("guidance=", "number")),
    Case("seed_2_64", lambda c: c.generate(seed=2**64), ValueError, ("seed=18446744073709551616", "0..2**64-1")),
    Case("seed_negative", lambda c: c.generate(seed=-1), ValueError, ("seed=-1", "0..2**64-1")),
    Case("seed_float", lambda c: c.generate(seed=1.5), TypeError, ("seed=1.5", "integer", "seed=1")),
    Case("seed_none", lambda c: c.generate(seed=None), TypeError, ("seed=None", "integer")),
    Case("steps_float", lambda c: c.generate(steps=2.0), TypeError, ("steps=2.0", "integer", "steps=2")),
    Case("steps_str", lambda c: c.generate(steps="20"), TypeError, ("steps='20'", "integer")),
    Case("steps_zero", lambda c: c.generate(steps=0), ValueError, ("steps=0", "1..1000")),
    Case("steps_too_many", lambda c: c.generate(steps=1001), ValueError, ("steps=1001", "1..1000")),
    Case("sampler_unknown", lambda c: c.generate(sampler="euler"), ValueError, ("'euler'", "ddpm", "dpmpp_2m")),
    Case("views_zero", lambda c: c.generate(images=_views(0)[0], masks=_views(0)[1]), ValueError,
         ("0 condition views", "1 to 10", "at least one")),
    Case("views_eleven", lambda c: c.generate(images=_views(11)[0], masks=_views(11)[1]), ValueError,
         ("11 condition views", "1 to 10", "fewer")),
    Case("images_numpy", lambda c: c.generate(images=c.images.numpy()), TypeError, ("ndarray", "torch")),
    Case("images_channels_last", lambda c: c.generate(images=c.images.permute(0, 2, 3, 1)), ValueError,
         ("(1, 64, 64, 3)", "(n, 3, H, W)", "permute")),
    Case("images_255", lambda c: c.generate(images=c.images * 255), ValueError, ("outside [0, 1]", "scale")),
    Case("images_nan", lambda c: c.generate(images=c.images * float("nan")), ValueError, ("NaN",)),
    Case("masks_mismatch", lambda c: c.generate(masks=c.masks[:, :32, :32]), ValueError,
         ("do not match", "same height and width")),
    Case("masks_empty", lambda c: c.generate(masks=c.masks * 0), ValueError, ("empty", "1 = object")),
    Case("embeddings_shape", lambda c: c.generate(embeddings=torch.zeros(1, 7)), ValueError,
         ("(1, 7)", "(1, 32)", "CLIP")),
    Case("embeddings_type", lambda c: c.generate(embeddings=[0.0] * 32), TypeError, ("embeddings", "list", "tensor")),
    Case("callback_not_callable", lambda c: c.generate(callback=3), TypeError, ("callback=3", "callable")),
    Case("model_is_a_path", lambda c: c.generate(model=str(c.path)), TypeError, ("str", "load_checkpoint")),
    Case("bundle_nan_weights", lambda c: c.generate(model=_load(c.bundle(tensors=_nan_weights))), ValueError,
         ("NaN", "weights", "unet.conv_in.weight")),
    Case("timesteps_float", lambda c: c.model.schedule.timesteps(2.0), TypeError, ("steps=2.0", "integer")),
]

CHECKPOINT = [
    Case("missing_file", lambda c: _load(c.tmp / "nope.safetensors"), ValueError,
         ("nope.safetensors", "does not exist")),
    Case("directory_named_safetensors", lambda c: _load(c.tmp / "dir.safetensors"), ValueError,
         ("dir.safetensors", "is a directory", "the .safetensors file")),
    Case("path_none", lambda c: _load(None), TypeError, ("path=None", "str or Path")),
    Case("pickle_suffix", lambda c: _load(c.raw(b"\x80\x04K\x01.", ".ckpt")), ValueError, ("pickle", "safetensors")),
    Case("pickle_disguised", lambda c: _load(c.raw(b"\x80\x04K\x01." + b"\0" * 20)), ValueError,
         ("pickled", "safetensors")),
    Case("zip_disguised", lambda c: _load(c.raw(b"PK\x03\x04" + b"\0" * 40)), ValueError, ("pickled", "safetensors")),
    Case("corrupt_header", lambda c: _load(c.raw(b"\x10\0\0\0\0\0\0\0{not json")), ValueError,
         ("not a valid safetensors file", "corrupt")),
    Case("header_0x80_past_end", lambda c: _load(c.raw(_fake_header(0x10080, b'{"__metadata__":', 1400))), ValueError,
         ("header", "65664", "truncated")),
    Case("truncated_bundle", lambda c: _load(c.raw(c.path.read_bytes()[: c.path.stat().st_size // 2])), ValueError,
         ("truncated",)),
    Case("empty_file", lambda c: _load(c.raw(b"")), ValueError, ("empty", "0 bytes")),
    Case("foreign_safetensors", lambda c: _load(c.bundle(meta={"format": "other"})), ValueError,
         ("not an MVDiffusion++ bundle", "convert")),
    Case("format_version_abc", lambda c: _load(c.bundle(meta={"format_version": "abc"})), ValueError,
         ("format_version='abc'", "integer", "re-export")),
    Case("format_version_future", lambda c: _load(c.bundle(meta={"format_version": "9"})), ValueError,
         ("format version 9", "Update")),
    Case("config_not_json", lambda c: _load(c.bundle(meta={"config": "{oops"})), ValueError, ("config", "unreadable")),
    Case("config_missing", lambda c: _load(c.bundle(meta={"config": ""})), ValueError, ("config", "unreadable")),
    Case("config_unknown_key", lambda c: _load(c.bundle(meta={"config": c.config_json(unet__channels=3)})), ValueError,
         ("channels", "allowed")),
    Case("config_image_size_str", lambda c: _load(c.bundle(meta={"config": c.config_json(image_size="big")})),
         ValueError, ("image_size='big'", "integer")),
    Case("config_image_size_bool", lambda c: _load(c.bundle(meta={"config": c.config_json(image_size=True)})),
         ValueError, ("image_size=True", "integer")),
    Case("config_negative_channels",
         lambda c: _load(c.bundle(meta={"config": c.config_json(unet__block_out_channels=[-64, 128])})), ValueError,
         ("block_out_channels", "-64")),
    Case("config_shape_mismatch",
         lambda c: _load(c.bundle(meta={"config": c.config_json(unet__block_out_channels=[32, 64])})), ValueError,
         ("does not match its architecture config", "re-export")),
    Case("config_huge_unet_tiny_file", lambda c: _load(_huge_config_bundle(c)), ValueError,
         ("parameters", "file holds", "truncated"), costly_unguarded=True),
    Case("int8_tensors", lambda c: _load(c.bundle(tensors=_int8)), ValueError,
         ("int8", "float", "unet.conv_in.weight")),
    Case("device_cuda_missing", lambda c: _load(c.path, device="cuda") if _no_cuda() else pytest.skip("has CUDA"),
         ValueError, ("device='cuda'", "no CUDA", "device='cpu'")),
    Case("device_unknown", lambda c: _load(c.path, device="gpu"), ValueError, ("device='gpu'", "cpu", "cuda")),
    Case("dtype_unknown", lambda c: _load(c.path, dtype="half8"), ValueError, ("dtype='half8'", "fp32", "bf16")),
    Case("dtype_integer", lambda c: _load(c.path, dtype=torch.int8), ValueError, ("torch.int8", "fp32", "bf16")),
]

CONFIG = [
    Case("missing_config_file", lambda c: c.train_config(path=c.tmp / "nope.yaml"), ValueError,
         ("nope.yaml", "does not exist", "train/configs")),
    Case("yaml_syntax", lambda c: c.train_config(path=c.yaml("optim: [1,\n")), ValueError, ("YAML", "line")),
    Case("yaml_top_level_list", lambda c: c.train_config(path=c.yaml("- 1\n")), ValueError, ("mapping",)),
    _config("unknown_key", "optim.lrate=1", "lrate", "allowed"),
    _config("arithmetic", "optim.lr=2*1e-4", "2*1e-4", "no arithmetic"),
    _config("bad_enum", "runtime.precision=fp8", "fp8", "bf16"),
    _config("max_steps_negative", "optim.max_steps=-5", "optim.max_steps=-5", ">= 1"),
    _config("max_steps_zero", "optim.max_steps=0", "optim.max_steps=0", ">= 1"),
    _config("ema_decay_2", "ema.decay=2.0", "ema.decay=2.0", "[0, 1)", "0.9999"),
    _config("ema_decay_1", "ema.decay=1.0", "ema.decay=1.0", "[0, 1)"),
    _config("cond_dropout_1_5", "stage.cond_dropout=1.5", "stage.cond_dropout=1.5", "[0, 1]"),
    _config("single_view_prob", "stage.single_view_prob=-0.1", "stage.single_view_prob=-0.1", "[0, 1]"),
    _config("max_cond_views", "stage.max_cond_views=11", "stage.max_cond_views=11", "[1, 10]"),
    _config("num_target_views", "data.num_target_views=0", "data.num_target_views=0", "[1, 32]"),
    _config("keep_last_zero", "checkpoint.keep_last=0", "checkpoint.keep_last=0", ">= 1"),
    _config("checkpoint_every_zero", "checkpoint.every=0", "checkpoint.every=0", ">= 1"),
    _config("log_every_zero", "logging.log_every=0", "logging.log_every=0", ">= 1"),
    _config("validate_every_negative", "logging.validate_every=-1", "logging.validate_every=-1", ">= 0"),
    _config("validation_sampler", "logging.validation_sampler=euler", "logging.validation_sampler='euler'", "ddim"),
    _config("grad_accum_zero", "optim.grad_accum_steps=0", "optim.grad_accum_steps=0", ">= 1"),
    _config("batch_size_zero", "optim.batch_size=0", "optim.batch_size=0", ">= 1"),
    _config("lr_negative", "optim.lr=-1", "optim.lr=-1.0", "> 0"),
    _config("lr_nan", "optim.lr=.nan", "optim.lr=nan", "finite"),
    _config("betas_one", "optim.betas=[0.9]", "optim.betas", "two"),
    _config("betas_range", "optim.betas=[0.9,1.5]", "optim.betas", "[0, 1)"),
    _config("warmup_negative", "optim.warmup_steps=-1", "optim.warmup_steps=-1", ">= 0"),
    _config("decay_negative", "optim.decay_steps=-1", "optim.decay_steps=-1", ">= 0"),
    _config("timestep_shift_zero", "stage.timestep_shift=0", "stage.timestep_shift=0", "> 0"),
    _config("decay_past_the_run", "optim.decay_steps=99999999", "optim.decay_steps=99999999", "max_steps"),
    _config("num_workers_negative", "data.num_workers=-2", "data.num_workers=-2", ">= 0"),
    _config("export_name_not_safetensors", "checkpoint.export_name=model.ckpt",
            "checkpoint.export_name='model.ckpt'", ".safetensors"),
    _config("export_name_path", "checkpoint.export_name=../x.safetensors",
            "checkpoint.export_name='../x.safetensors'", "file name"),
    _config("attention_backend", "runtime.attention_backend=flash", "runtime.attention_backend='flash'", "sdpa"),
    _config("init_image_size_negative", "init.image_size=-32", "init.image_size=-32", ">= 0"),
]

ROWS = API + CHECKPOINT + CONFIG


def _frames_below_project(tb: traceback.StackSummary) -> tuple[int, bool]:
    """(frames from the first project frame to the raise, whether the raise is in project code)."""
    files = [f.filename for f in tb]
    ours = [i for i, name in enumerate(files) if name.startswith(PROJECT_DIRS)]
    if not ours:
        return len(files), False
    return len(files) - ours[0], files[-1].startswith(PROJECT_DIRS)


def check_row(case: Case, err: BaseException) -> list[str]:
    """What is wrong with the error a row raised (empty when it is clear)."""
    problems = []
    if not isinstance(err, case.exc):
        problems.append(f"raised {type(err).__name__}, expected {case.exc.__name__}")
    message = str(err)
    missing = [w for w in case.words if w.lower() not in message.lower()]
    if missing:
        problems.append(f"message lacks {missing}")
    depth, ours = _frames_below_project(traceback.extract_tb(err.__traceback__))
    if not ours:
        problems.append("raised inside a library, not by the project")
    elif depth > MAX_FRAMES:
        problems.append(f"raised {depth} frames deep (allowed {MAX_FRAMES})")
    return problems


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    c = Ctx(tmp_path_factory.mktemp("bad_inputs"))
    (c.tmp / "dir.safetensors").mkdir()
    return c


@pytest.mark.parametrize("case", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_raises_a_clear_error_near_the_caller(ctx, case):
    with pytest.raises(Exception) as info:  # noqa: B017 - the row says which type; checked below
        case.call(ctx)
    problems = check_row(case, info.value)
    assert not problems, f"{case.id}: {problems}; message: {info.value}"


def test_integer_like_arguments_are_accepted_and_equal_plain_ones(ctx):
    """numpy scalars from a UI or a sweep script work exactly like Python numbers."""
    from mvdpp_core.inputs import check_guidance, check_seed

    given = ctx.generate(steps=np.int64(1), seed=np.int64(3), guidance=np.float32(2.5))
    plain = ctx.generate(steps=1, seed=3, guidance=2.5)
    assert torch.isfinite(given.images).all()
    assert torch.equal(given.images, plain.images) and torch.equal(given.masks, plain.masks)
    assert check_seed(2**64 - 1) == 2**64 - 1 and type(check_seed(np.uint64(7))) is int
    assert check_guidance(2) == 2.0 and type(check_guidance(np.float64(1.5))) is float


def test_checkpoint_dtype_strings_are_the_nodes(ctx):
    """The node's dtype names load like torch dtypes (fp16 only where kernels exist: not checked)."""
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("float32", torch.float32)):
        assert _load(ctx.path, dtype=name).dtype == dtype


def test_a_config_claiming_a_huge_model_is_refused_before_allocating(ctx):
    """The file's tensors are checked against the config without building the model."""
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ValueError, match="parameters"):
        _load(_huge_config_bundle(ctx))
    assert time.perf_counter() - start < 20
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500, f"peak memory grew by {grown_mib:.0f} MiB: the model was built"


def _classify(case: Case, ctx: Ctx) -> str:
    try:
        case.call(ctx)
    except pytest.skip.Exception:
        return "skipped"
    except Exception as err:  # noqa: BLE001 - classifying every outcome
        depth, ours = _frames_below_project(traceback.extract_tb(err.__traceback__))
        if not ours:
            return "inside_library"
        return "clear" if not check_row(case, err) else "unclear"
    return "silent"


def report() -> dict:
    """Run every row; count outcomes (the issue's before/after figures)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        c = Ctx(Path(tmp))
        (c.tmp / "dir.safetensors").mkdir()
        outcomes: dict[str, str] = {}
        for case in ROWS:
            if case.costly_unguarded and os.environ.get("MVDPP_SKIP_COSTLY_ROWS"):  # code without the check
                outcomes[case.id] = "late (would build the full model first)"
                continue
            outcomes[case.id] = _classify(case, c)
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"kinds": len(ROWS), "counts": counts, "rows": outcomes}


if __name__ == "__main__":
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    print(json.dumps(report(), indent=1))
    sys.exit(0)


@pytest.mark.parametrize("command,message", [
    (["-m", "train.data.shards", "--folders", "{tmp}/none", "--out", "{tmp}/shards/o-%06d.tar"],
     "--folders: data folder {tmp}/none does not exist; render objects there first"),
    (["scripts/overfit_default.py", "--out", "{tmp}/run", "--data", "{tmp}/none"],
     "--data: data folder {tmp}/none does not exist"),
    (["scripts/overfit_default.py", "--out", "{tmp}/run", "--data", "{tmp}", "--objects", "8"],
     "--data {tmp}: fewer than --objects 8 object folders"),
    (["-m", "train.procedural.calibrate", "--mvae", "{tmp}/none.safetensors", "--data", "{tmp}", "--out", "{tmp}/c"],
     "MVAE file {tmp}/none.safetensors must be an existing .safetensors"),
    (["-m", "train.procedural.calibrate", "--mvae", "models/mvdpp_default.safetensors", "--data", "{tmp}/none",
      "--out", "{tmp}/c"], "data folder {tmp}/none does not exist"),
    (["scripts/size_probe.py", "--heldout", "{tmp}", "--checkpoint", "{tmp}/none.safetensors", "--out", "{tmp}/s"],
     "--checkpoint {tmp}/none.safetensors: no such file; give a model bundle"),
])
def test_command_line_tools_refuse_a_missing_input_in_one_line(command, message, tmp_path):
    """The research tools name the flag and the fix in one argparse line (exit code 2), before any
    work and without a traceback, like the trainers, the demo and batch generation."""
    import subprocess

    (tmp_path / "object_0").mkdir()  # one object folder: too few for the default 8
    args = [a.format(tmp=tmp_path) for a in command]
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message.format(tmp=tmp_path) in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["object_0"], "nothing is written"
