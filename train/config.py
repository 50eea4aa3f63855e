"""The trainer's typed configuration: dataclasses, read from YAML and overridden on the CLI.

One file describes a run: ``train/configs/demo.yaml``, named ``--config demo`` (the files ship
with the package: `config_path` finds a bare name there, installed or not; anything with a '/'
or ending in .yaml is a path). Any field can be overridden with
``--set section.field=value`` (the value is parsed as YAML, so ``--set data.schedule=balanced``
and ``--set flow.cfg_scale=2.5`` both work). A checkpoint stores the resolved config as JSON,
so a run can always be re-created from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.contract.cli import BadInput, InputNotFound, yaml_problem

SHARDINGS = ("fsdp", "ddp")   # train/sharding.py
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"   # the named train configs (package data)


@dataclass
class DataConfig:
    root: str | None = None            # pipeline --out (local folder or s3://, gs://): shards via manifests/folders
    shards: list[str] = field(default_factory=list)      # explicit train URLs: globs, {a..b}, pipe:, s3://
    val_shards: list[str] = field(default_factory=list)  # explicit val URLs (default: root/val)
    split: str = "train"
    val_split: str = "val"
    stage: str = "demo"                # pipeline/configs/stages/<stage>.yaml (or a path): per-bucket batch sizes
    schedule: Any = "balanced"         # balanced | proportional | {bucket_name: weight}
    num_workers: int = 0               # DataLoader workers; each is one deterministic stream
    samples_per_chunk: int = 256       # resample/shuffle unit; bounds the skip work on resume
    shuffle_buffer: int = 32           # samples held for shuffling inside a chunk
    read_ahead_shards: int = 2         # shards read and decoded ahead of the one being batched (train/tario.py)
    worker_timeout_s: float = 300.0    # a DataLoader worker that makes no batch this long ends the run (exit 5,
                                       # train/watchdog.py); 0 = wait forever
    worker_ring_mb: int = 256          # reused shared memory per DataLoader worker for its batches; a batch
                                       # larger than a quarter of it goes the slower default way (0: always)
    text_cache: str | None = None      # model.text.TextEmbeddingCache folder (caption hash -> T5 states)
    text_encoder: str | None = None    # T5 folder, used for captions missing from the cache
    text_max_length: int = 300         # T5 tokens, as the paper and model/text.py (demo configs set less)


@dataclass
class FlowConfig:
    logit_mean: float = 0.0            # logit-normal timestep sampling (SD3 §3.1)
    logit_std: float = 1.0
    shift: bool = True                 # resolution x length shift (Open-Sora 1.2 timestep_transform)
    shift_base_pixels: int = 512 * 512 # pixels at which the shift of one latent frame is 1 (Open-Sora 1.2 and
                                       # the authors' timestep_transform: base_resolution 512 * 512)
    shift_scale: float = 1.0
    # classifier-free guidance training (train.train.condition_drops; the authors' train_magicdrive.py):
    drop_all: float = 0.15             # samples trained with text, camera, boxes and trajectory all null
                                       # together (paper Appendix E: 15 %; authors: drop_cond_ratio 0.15)
    drop_frames_ratio: float = 0.4     # in the other samples, this fraction of the interior frames gets its
                                       # boxes and trajectory masked (authors: drop_cond_ratio_t 0.4)
    sample_steps: int = 30             # Euler steps at inference (paper Appendix E)
    cfg_scale: float = 2.0
    # loss weight of a view's latent frame whose CogVAE group holds a repaired dropped frame (schema 3.0
    # fill_mask: a held image of a neighbouring round); 0 = left out of the loss (docs/train.md: why), 1 = as any
    fill_weight: float = 0.0


@dataclass
class TrainConfig:
    out: str = "runs/demo"
    model: str = "tiny"                # model.registry preset
    model_overrides: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    seed: int = 0
    steps: int = 300                   # total optimizer steps (a resumed run continues up to this)
    # the authors' recipe where the paper's text lost the values (configs/magicdrive/train/stage*.py):
    optimizer: str = "adamw"           # adam | adamw (authors: HybridAdam in AdamW mode)
    lr: float = 8e-5                   # authors: lr = 8e-5 (the paper's value did not survive extraction)
    betas: tuple = (0.9, 0.999)        # authors: optimizer defaults
    eps: float = 1e-15                 # authors: adam_eps = 1e-15
    weight_decay: float = 1e-2         # authors: weight_decay = 1e-2
    warmup: int = 3000                 # linear warm-up steps, then constant LR (paper Appendix E)
    grad_clip: float = 1.0             # authors: grad_clip = 1.0
    ema_decay: float = 0.99            # authors: ema_decay = 0.99
    grad_checkpointing: bool = False
    sp: int = 1                        # sequence parallel ranks per sample (world = dp x sp; train/distributed.py)
    sharding: str = "fsdp"             # fsdp (weights, grads, optimizer, EMA sharded; FSDP2) | ddp; world > 1 only
    reshard_after_forward: bool = True # fsdp: free a block's gathered weights after its forward (False: keep
                                       # them to the backward, ZeRO-2: one all-gather a step, more memory)
    precision: str = "auto"            # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"
    grad_accum: int = 1                # micro-batches per optimizer step (each weighs 1/grad_accum); the
                                       # global batch is micro batch x grad_accum x data-parallel groups
    log_every: int = 10                # console refresh; the JSONL log gets every step
    tensorboard: Any = "auto"          # OUT/tb/ beside log.jsonl: auto (if installed) | true (required) | false
    # clips sampled during training from fixed conditions (train/livesample.py) -> OUT/samples/step-N/
    sample_every: int = 0              # steps between samples; 0 = never
    sample_steps: int = 10             # Euler steps of those samples (flow.sample_steps is for mdv2-sample)
    sample_weights: str = "ema"        # ema | model
    sample_bucket: str | None = None   # bucket of the conditioning sample (default: the split's first)
    vae: str | None = None             # CogVAE folder to decode them (--vae); none: latent previews only
    val_every: int = 100
    val_batches: int = 4
    ckpt_every: int = 100
    keep_last: int = 3
    export: bool = True                # write the single-file export (model/ema.safetensors) at every checkpoint
    peak_tflops: float | None = None   # for MFU; default looked up from the GPU name
    # stage transitions (paper Section 5.1): start from the weights of the previous stage's checkpoint;
    # optimizer, step, data schedule, LR warm-up and EMA start fresh (the EMA from the loaded weights)
    init_from: str | None = None       # checkpoint folder or run folder (its latest checkpoint)
    init_weights: str = "model"        # which weights of it: model (where training left off) | ema
    init_allow_drop: bool = False      # allow a config that drops trained modules (e.g. temporal: false)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if "drop" in d:   # before the joint drop (flow.drop_all): per-condition rates no longer exist
            raise BadInput("config key 'drop' (per-condition rates) is gone: all conditions drop together at "
                           "flow.drop_all, and flow.drop_frames_ratio masks boxes/trajectory per frame")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise BadInput(f"unknown train config keys {sorted(unknown)}")
        data = DataConfig(**_known(DataConfig, d.pop("data", {}) or {}, "data"))
        flow = FlowConfig(**_known(FlowConfig, d.pop("flow", {}) or {}, "flow"))
        cfg = cls(data=data, flow=flow, **d)
        cfg.betas = tuple(cfg.betas)
        if cfg.init_weights not in ("model", "ema"):
            raise ValueError(f"init_weights {cfg.init_weights!r}: use 'model' or 'ema'")
        if not isinstance(cfg.grad_accum, int) or cfg.grad_accum < 1:
            raise BadInput(f"grad_accum {cfg.grad_accum!r}: an integer >= 1 (1 = no accumulation)")
        if cfg.tensorboard not in ("auto", True, False):
            raise BadInput(f"tensorboard {cfg.tensorboard!r}: use auto, true or false")
        if cfg.sample_weights not in ("model", "ema"):
            raise BadInput(f"sample_weights {cfg.sample_weights!r}: use 'ema' or 'model'")
        if cfg.sample_every < 0 or cfg.sample_steps < 1:
            raise BadInput(f"sample_every {cfg.sample_every} (>= 0) / sample_steps {cfg.sample_steps} (>= 1)")
        if cfg.sharding not in SHARDINGS:
            raise BadInput(f"sharding {cfg.sharding!r}: use one of {list(SHARDINGS)}")
        for name in ("drop_all", "drop_frames_ratio"):
            if not 0.0 <= getattr(flow, name) <= 1.0:
                raise BadInput(f"flow.{name} = {getattr(flow, name)}: a rate in [0, 1]")
        return cfg


def _known(klass, d: dict, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = set(d) - names
    if unknown:
        raise BadInput(f"unknown keys in '{where}': {sorted(unknown)}; known: {sorted(names)}")
    return d


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def config_path(name_or_path: str) -> Path:
    """'demo' -> train/configs/demo.yaml (shipped with the package); anything with a '/' or ending in
    .yaml/.yml is a path. A name or path that is not there: InputNotFound naming the known names."""
    s = str(name_or_path)
    is_path = "/" in s or s.endswith((".yaml", ".yml"))
    path = Path(s) if is_path else CONFIGS_DIR / f"{s}.yaml"
    if not path.is_file():
        what = f"train config file {s} not found" if is_path else f"train config {s!r} is not a known name"
        raise InputNotFound(f"{what}; known names: {', '.join(config_names())} (or give a YAML path)")
    return path


def load_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """YAML file or config name (or a ``base`` dict, e.g. a checkpoint's config) + ``section.field=value``
    overrides."""
    d: dict = json.loads(json.dumps(base)) if base else {}
    if path:
        path = config_path(path)
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise BadInput(f"train config {path} is not valid YAML: {yaml_problem(e)}") from None
        if not isinstance(d, dict):
            raise BadInput(f"train config {path}: expected a mapping of TrainConfig fields, got {type(d).__name__}")
    for item in overrides:
        if "=" not in item:
            raise BadInput(f"--set {item!r}: expected key=value, e.g. flow.cfg_scale=2.5")
        key, value = item.split("=", 1)
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(value)
    return TrainConfig.from_dict(d)


def _parse_value(text: str) -> Any:
    """YAML value, plus the floats YAML 1.1 leaves as strings ('2e-3')."""
    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
