"""Typed run configuration: YAML files (shipped ones in selfsup/configs/) plus `key=value`
overrides. Every key is a dotted path a sweep can address (`optim.lr`, `method.temperature`,
`data.views.view0.jitter_strength`). A wrong key or value is an error that names it."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, ValidationError, field_validator, model_validator

from selfsup.methods import METHODS
from selfsup.pipelines.endpoints import StorageError
from selfsup.pipelines.views import VIEW_KINDS, ViewSpec
from selfsup.platform.runs import check_name


class ConfigError(ValueError):
    """A config that cannot run: the message names the key and what is allowed."""


class Strict(BaseModel):
    # inf and nan are no learning rate, budget or temperature
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Strict):
    uri: str = "s3://selfsup/datasets/fashion-mnist"
    train_split: str = "train"
    views: ViewSpec | None = None  # None: the method's view kind with its defaults
    batch_size: int = Field(256, ge=1)  # global: split evenly across workers
    mean: list[float] = [0.2860]  # Fashion-MNIST's; one value per channel, or one for all
    std: list[float] = [0.3530]
    seed: int = 0
    strict: bool = False  # a corrupt shard fails the run instead of being skipped
    prefetch_batches: int = Field(2, ge=0)
    # Where the views are made: "pipeline": Ray Data's CPU tasks decode and augment, the trainer
    # gets finished views; "trainer": the tasks only decode, and each train worker augments on
    # its own device (on a GPU, the CPUs are then free for decoding; see benchmarks/gpu_step.py)
    augment_on: Literal["pipeline", "trainer"] = "pipeline"

    @model_validator(mode="after")
    def _normalisation(self):
        for key in ("mean", "std"):
            if not getattr(self, key):
                raise ValueError(f"data.{key} is empty: give one value per channel, or one for all")
        if len(self.mean) != len(self.std) and 1 not in (len(self.mean), len(self.std)):
            raise ValueError(f"data.mean has {len(self.mean)} values and data.std {len(self.std)}")
        if any(v <= 0 for v in self.std):
            raise ValueError(f"data.std must be > 0 (it divides the pixels), got {self.std}")
        return self


class ModelConfig(Strict):
    name: str = "resnet18"
    cifar_stem: bool = True
    in_chans: int = Field(3, ge=1)
    kwargs: dict[str, Any] = {}


class OptimConfig(Strict):
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = Field(1e-3, gt=0)  # per 256 images; scaled by the global batch (see lr_scaling)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine ends at lr * min_lr_ratio
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    weight_decay_end: float | None = Field(None, ge=0)  # cosine to this; None: constant
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd, lars
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    clip_grad: float | None = Field(3.0, gt=0)
    lars_eta: float = Field(0.02, gt=0)


class ScheduleConfig(Strict):
    """How long the run is: epochs, steps or a wall-clock budget (exactly one)."""

    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    time_budget_s: float | None = Field(None, gt=0)  # seconds spent in training steps (not start-up or evaluation)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("epochs", "steps", "time_budget_s") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of schedule.epochs, schedule.steps, schedule.time_budget_s (got {given or 'none'})")
        return self


class ScalingConfig(Strict):
    num_workers: int = Field(2, ge=1)
    min_workers: int | None = Field(None, ge=1)  # < num_workers: elastic between the two
    # What a resize keeps: "global" keeps data.batch_size (the per-worker batch is global / world
    # size, in steps of at most max_worker_batch by gradient accumulation); "per_worker" keeps
    # data.batch_size / num_workers per worker (the global batch and, by optim.lr_scaling, the
    # learning rate follow the world size).
    batch_policy: Literal["global", "per_worker"] = "global"
    max_worker_batch: int | None = Field(None, ge=1)  # None: no accumulation
    # Recovery (see README "Elastic training"): how often a smaller run looks for room to grow,
    # how long a new worker group may wait for its resources before the controller retries with
    # a fresh view of the cluster, how often workers' health is polled.
    resize_check_s: float = Field(2.0, gt=0)
    worker_start_timeout_s: float = Field(5.0, gt=0)
    health_check_s: float = Field(0.5, gt=0)
    cpus_per_worker: float = Field(0.5, gt=0)  # fractional on small machines: Ray Data needs CPUs too
    gpus_per_worker: float = Field(0, ge=0)
    # Custom Ray resources each worker also needs, e.g. {"spot_a10g": 1} to keep workers on the
    # nodes that advertise it (ray start --resources)
    extra_resources_per_worker: dict[str, NonNegativeFloat] = {}
    torch_threads: int | None = Field(None, ge=1)  # None: the CPUs a worker may use, at least 1


class TrainConfig(Strict):
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device does it natively
    channels_last: bool | Literal["auto"] = "auto"  # auto: for conv nets under bf16
    # torch.compile of the model's forward and loss; off by default: on 2 CPU cores it gained 1-8%
    # images/s for 40-100 s of compiling (benchmarks/gpu_step.py measures both ways)
    compile: bool = False
    log_every_steps: int = Field(10, ge=1)
    checkpoint_every_epochs: float = Field(1.0, gt=0)  # also by steps and seconds: whichever comes first
    checkpoint_every_steps: int | None = Field(None, ge=1)
    checkpoint_every_s: float | None = Field(None, gt=0)  # wall-clock seconds since the last checkpoint
    max_failures: int = Field(10, ge=-1)  # worker-group restarts (killed worker, lost node); -1: no limit
    rollback_after_skipped: int = Field(20, ge=1)  # updates skipped in a row (non-finite) before a rollback
    max_rollbacks: int = Field(3, ge=0)  # rollbacks to the last complete checkpoint before the run fails
    keep_checkpoints: int | None = Field(None, ge=1)  # None: keep every checkpoint
    loggers: list[Literal["mlflow", "tensorboard"]] = []  # trackers beside metrics.jsonl (platform/trackers.py)


class EvalConfig(Strict):
    # A labeled set for the kNN (its memory and queries); None: data.uri. Training reads data.uri,
    # which may be unlabeled: then without this the kNN is off, with one warning.
    data_uri: str | None = None
    knn: bool = True  # false: no kNN while training
    every_epochs: float | None = Field(1.0, gt=0)  # None: only at the end
    at_start: bool = True  # kNN of the random init, the baseline every gain is measured against
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)
    train_split: str = "train"  # the kNN memory
    test_split: str = "test"  # the queries
    train_samples: int = Field(10000, ge=0)  # 0: the whole split
    test_samples: int = Field(2000, ge=0)
    image_size: int | None = Field(None, ge=4)  # None: the global view size


class StorageConfig(Strict):
    root: str = "s3://selfsup/runs"
    name: str | None = None  # None: <method>-<model>-<UTC time>
    # While training, a request the endpoint does not answer (refused, timed out, 5xx) is
    # retried with backoff this long: shard reads, checkpoint uploads, metrics. Then the run fails.
    retry_s: float = Field(90.0, gt=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if v is not None:
            try:
                check_name(v)
            except StorageError as e:
                raise ValueError(str(e)) from None
        return v


class MethodConfig(BaseModel):
    """`name` picks the method; every other key is that method's parameter."""

    model_config = ConfigDict(extra="allow")
    name: str = "simclr"


class Config(Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig(epochs=1)
    scaling: ScalingConfig = ScalingConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _method_and_views(self):
        if self.method.name not in METHODS:
            raise ValueError(f"method.name {self.method.name!r} is not one of {', '.join(sorted(METHODS))}")
        cls = METHODS[self.method.name]
        try:
            cls.Params(**self.method_params())
        except ValidationError as e:
            raise ValueError(_describe(e, prefix="method.", root=cls.Params)) from None
        if self.data.views is None:
            self.data.views = VIEW_KINDS[cls.view_kind]()
        elif self.data.views.kind != cls.view_kind:
            raise ValueError(f"data.views.kind {self.data.views.kind!r} does not fit method {self.method.name!r}, "
                             f"which consumes {cls.view_kind!r}")
        if cls.view_kind == "masked" and "strategy" not in self.data.views.model_fields_set:
            self.data.views.strategy = cls.mask_strategies[0]  # the method's own, unless the config says
        if cls.view_kind == "masked" and self.data.views.strategy not in cls.mask_strategies:
            raise ValueError(f"data.views.strategy {self.data.views.strategy!r} does not fit method {self.method.name!r}, "
                             f"which takes {' or '.join(cls.mask_strategies)}")
        if cls.view_kind == "multi_crop" and cls.masks_global_crops and self.data.views.masks is None:
            raise ValueError(f"method {self.method.name!r} masks its global crops: set data.views.masks "
                             "(e.g. data.views.masks.patch_size=<the ViT's patch size>)")
        if cls.view_kind == "multi_crop" and not cls.masks_global_crops and self.data.views.masks is not None:
            raise ValueError(f"data.views.masks is for methods that mask their global crops (dinov2); "
                             f"{self.method.name!r} does not")
        if self.scaling.min_workers and self.scaling.min_workers > self.scaling.num_workers:
            raise ValueError(f"scaling.min_workers {self.scaling.min_workers} > scaling.num_workers {self.scaling.num_workers}")
        if self.data.mean and len(self.data.mean) not in (1, self.model.in_chans):
            raise ValueError(f"data.mean has {len(self.data.mean)} values for model.in_chans {self.model.in_chans}")
        if self.data.std and len(self.data.std) not in (1, self.model.in_chans):
            raise ValueError(f"data.std has {len(self.data.std)} values for model.in_chans {self.model.in_chans}")
        if self.data.batch_size % self.scaling.num_workers:
            raise ValueError(f"data.batch_size {self.data.batch_size} is not divisible by scaling.num_workers "
                             f"{self.scaling.num_workers}")
        return self

    def batch_at(self, world: int) -> tuple[int, int, int]:
        """(per-worker batch, global batch, micro-batches per step) on `world` workers, by
        scaling.batch_policy: "global" keeps data.batch_size (rounded down to a multiple of the
        world size), "per_worker" keeps data.batch_size / num_workers on each worker."""
        s = self.scaling
        per = self.data.batch_size // (world if s.batch_policy == "global" else s.num_workers)
        accum = -(-per // s.max_worker_batch) if s.max_worker_batch else 1
        return per, per * world, accum

    def method_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.model_dump().items() if k != "name"}

    def eval_uri(self) -> str:
        """The labeled set evaluation reads."""
        return self.eval.data_uri or self.data.uri

    def view_size(self) -> int:
        v = self.data.views
        return {"two_views": lambda: v.view0.size, "multi_crop": lambda: v.global_view.size,
                "masked": lambda: v.view.size, "plain": lambda: v.size}[v.kind]()


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed in the section at `loc` (for 'unknown key' errors)."""
    cls = root
    for part in loc:
        if part in VIEW_KINDS:
            cls = VIEW_KINDS[part]
            continue
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        elif field is None:
            return []
    return sorted(cls.model_fields)


def _describe(e: ValidationError, prefix: str = "", root: type[BaseModel] | None = None) -> str:
    lines = []
    for err in e.errors():
        # pydantic puts the union's tag in the path (data.views.two_views.view0): drop it
        key = prefix + ".".join(str(p) for p in err["loc"] if p not in VIEW_KINDS)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(root or Config, err["loc"][:-1])
            lines.append(f"unknown key {key!r}" + (f" (allowed: {', '.join(allowed)})" if allowed else ""))
        elif err["loc"]:
            lines.append(f"{key}: {msg} (got {err.get('input')!r})")
        else:
            lines.append(msg)
    return "; ".join(lines)


def _set(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} holds a value, not a section")
        node = nxt
    node[parts[-1]] = value


def shipped_configs() -> dict[str, Path]:
    root = resources.files("selfsup") / "configs"
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


# A config or search space is a page of keys: a longer file is a mistake or an attack.
MAX_YAML_BYTES = 1 << 20


class _NoAliases(yaml.SafeLoader):
    """YAML without aliases: a 384-byte file of nested aliases (billion laughs) expands to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed",
                                              event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str):
    """Parse YAML text (no aliases, at most MAX_YAML_BYTES); YAMLError otherwise."""
    if len(text) > MAX_YAML_BYTES:
        raise yaml.YAMLError(f"it is {len(text):,} characters, more than the {MAX_YAML_BYTES:,} allowed")
    return yaml.load(text, Loader=_NoAliases)


def read_text(path: str, what: str, shipped: dict[str, Path]) -> tuple[str, str]:
    """(where it was read, its text) of a file named by an s3:// URI, a local path or the name of a
    shipped file, or a ConfigError naming it."""
    from selfsup.pipelines.storage import is_s3, open_store

    if is_s3(path):
        parent, _, key = path.rstrip("/").rpartition("/")
        try:
            data = open_store(parent).read(key)
        except FileNotFoundError:
            raise ConfigError(f"{what} {path} not found") from None
        where = path
    else:
        p = Path(path)
        if not p.exists() and path in shipped:
            p = shipped[path]
        if not p.exists():
            raise ConfigError(f"{what} {path!r} not found (shipped {what}s: {', '.join(sorted(shipped))})")
        if not p.is_file():
            raise ConfigError(f"{what} {p} is not a file")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"{what} {p} cannot be read: {e.strerror or e}") from None
        where = str(p)
    try:
        return where, data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {where} is not UTF-8 text") from None


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Load `path` (a file, an s3:// URI, or the name of a shipped config) and apply `key=value`
    overrides."""
    tree: dict = {}
    if path:
        where, text = read_text(path, "config", shipped_configs())
        try:
            tree = load_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {where} is not valid YAML: {_one_line(e)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config {where} must be a mapping of sections")
    return configure(tree, overrides)


def configure(tree: dict, overrides: list[str] = ()) -> Config:
    """A config from a tree of sections (a file's, a run's config.yaml) and `key=value` overrides."""
    tree = copy.deepcopy(tree)
    lengths = ("schedule.epochs", "schedule.steps", "schedule.time_budget_s")
    for ov in overrides:
        key, eq, raw = ov.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"override {ov!r} is not key=value")
        if key in lengths:  # a run has one length: a new one replaces the file's
            tree["schedule"] = {k: v for k, v in (tree.get("schedule") or {}).items() if f"schedule.{k}" not in lengths}
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({_one_line(e)})") from None
        _set(tree, key, value)
    for section, value in tree.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{section} is a section of keys, got {value!r} (did you mean {section}.name=...?)")
    method = (tree.get("method") or {}).get("name", "simclr")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"method.name {method!r} is not one of {', '.join(sorted(METHODS))}")
    # The view spec follows the method: switching method.name drops the other kind's views.
    views = (tree.get("data") or {}).get("views")
    if isinstance(views, dict) and "kind" not in views:
        views["kind"] = METHODS[method].view_kind
    return validate(tree)


def _one_line(e: yaml.YAMLError) -> str:
    return " ".join(str(e).split())[:500]


def validate(tree: dict) -> Config:
    try:
        return Config(**copy.deepcopy(tree))
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
