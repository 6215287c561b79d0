"""The one config schema (pydantic): every YAML is validated here before any work starts.

``PruneConfig`` describes one pruning job (``prunesearch prune --config``); the study config of
the search extends it. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunesearch.errors import UserError
from prunesearch.objectives import downstream
from prunesearch.objectives.registry import OBJECTIVES, objective
from prunesearch.pruning.allocations import ALLOCATIONS
from prunesearch.pruning.engine import PruneSpec, check_spec
from prunesearch.pruning.metrics import METRICS
from prunesearch.spaces import SPACES, VectorSpace, space_names


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = Field("default", description="'default' (bundled SmolLM2-135M), a hub id, a local HF directory or a .gguf file")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    trust_remote_code: bool = False
    max_layers: int | None = Field(None, ge=1, description="keep only the first N decoder blocks (quick experiments, tests)")
    vision_tower_sparsity: float = Field(
        0.0, ge=0.0, lt=1.0, description="image-text-to-text models (LLaVA): also prune the vision tower's linear layers "
                                         "to this sparsity, each layer alike, by the pruning metric's scores (Wanda's for "
                                         "sparsegpt) from the calibration images; outside the decoder's budget, reported "
                                         "apart, the same in every trial of a study. 0: vision tower and projector dense")


class DataConfig(Strict):
    source: str = Field("wikipedia", description="built-in corpus (wikipedia, lee, pydoc), a local file/dir, or a hub dataset NAME[:CONFIG[:SPLIT]]")
    samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=2, le=131072)
    seed: int = 0
    text_field: str = "text"
    batch_size: int = Field(8, ge=1)
    select: Literal["none", "hard", "easy", "random"] = Field(
        "none", description="choose the samples out of a larger pool by data-pruning difficulty (k-means distance "
                            "of the dense model's mean hidden state): hard, easy, or random; none takes the first draw")
    pool: int = Field(4, ge=1, description="with select: the pool holds samples x pool candidate sequences")


class EvalConfig(DataConfig):
    source: str = "wikipedia"
    samples: int = Field(16, ge=1)
    seq_len: int = Field(512, ge=2, le=131072)


class LmEvalConfig(Strict):
    """Downstream tasks through lm-eval-harness (objectives/downstream.py): ``prune`` reports each
    task's accuracy before and after; a study maximises it as an objective ``lm_eval:TASK[,TASK]``."""

    tasks: list[str] = Field([], description="prune: the lm-eval tasks to report (dense and pruned accuracy); a study "
                                             "names its tasks in its objectives instead (lm_eval:TASK[,TASK])")
    tasks_dir: str | None = Field(None, description="a local directory of lm-eval task YAMLs (or one YAML), used "
                                                    "offline instead of lm-eval's own registry (whose datasets come "
                                                    "from the hub); null: the registry (arc_easy, hellaswag, ...)")
    limit: int | None = Field(None, ge=1, description="documents per task (the first ones); null: every document")
    batch_size: int = Field(8, ge=1)
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt; null: the task's own")

    @model_validator(mode="after")
    def _usable(self) -> "LmEvalConfig":
        for task in self.tasks:
            if not task.strip() or "," in task:
                raise ValueError(f"lm_eval.tasks: one task name per entry, not {task!r}")
        _as_value_error(lambda: downstream.check_tasks_dir(self.tasks_dir))
        if self.tasks:
            _as_value_error(downstream.check_library)
        return self


class AllocationConfig(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class PruningSection(Strict):
    """What the two pruning sections (a prune config's, a study's) share: the metric check, and the
    one ``PruneSpec`` each describes (``spec()``), checked whole by ``check_spec`` when read."""

    @field_validator("metric", check_fields=False)
    @classmethod
    def _known_metric(cls, v: str) -> str:
        _as_value_error(lambda: METRICS.resolve(v))
        return v

    @model_validator(mode="after")
    def _consistent(self):
        self._check()
        _as_value_error(lambda: check_spec(self.spec()))
        return self

    def _check(self) -> None:
        """The section's own checks (ValueError), before the spec's."""

    def spec(self, batch_size: int = 8) -> PruneSpec:
        raise NotImplementedError


class PruningConfig(PruningSection):
    metric: str = Field("wanda", description="a metric name, optionally with parameters: ria:a=0.5")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    allocation: str | AllocationConfig = Field("uniform", description="uniform, owl[:M=5,lam=0.08], mrp[:step=0.02,refresh_every=1,refresh_samples=2,M=5], or {name, params}")
    structure: str = Field("unstructured", description="unstructured or N:M, e.g. 2:4")
    group: Literal["auto", "row", "layer"] = "auto"
    mode: Literal["one_shot", "sequential"] = "sequential"
    bias_compensation: bool = Field(False, description="STADE's bias compensation (needs biases the architecture can store)")
    remove_layers: int = Field(0, ge=0, description="Prune&Comp: remove this many decoder blocks (least influential "
                                                    "first, iteratively) before pruning the rest to `sparsity`")
    compensate: bool = Field(True, description="Prune&Comp: fold the magnitude-compensation scale into the residual writers")
    remove_blocks: list[int] | None = Field(None, description="Prune&Comp: which blocks (original indices, in removal "
                                                              "order) remove_layers removes; default: measured. An export "
                                                              "pins the blocks its trial removed")
    max_sparsity: float = Field(0.95, gt=0.0, lt=1.0)

    def _check(self) -> None:
        if self.remove_blocks is not None and len(self.remove_blocks) != self.remove_layers:
            raise ValueError(f"remove_blocks lists {len(self.remove_blocks)} blocks but remove_layers is {self.remove_layers}")

    @field_validator("allocation")
    @classmethod
    def _known_allocation(cls, v):
        _as_value_error(lambda: ALLOCATIONS.resolve(v if isinstance(v, str) else v.model_dump()))
        return v

    def spec(self, batch_size: int = 8) -> PruneSpec:
        alloc = self.allocation if isinstance(self.allocation, str) else self.allocation.model_dump()
        return PruneSpec(self.metric, self.sparsity, alloc, self.structure, self.group, self.mode,
                         self.bias_compensation, self.max_sparsity, batch_size)


class PruneConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    calibration: DataConfig = Field(default_factory=DataConfig)
    evaluation: EvalConfig | None = Field(default_factory=EvalConfig, description="null skips perplexity")
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    reconstruction_samples: int = Field(8, ge=0, description="calibration prompts used for the reconstruction error (0 skips it)")
    kv_cache: KVCacheConfig | None = Field(None, description="evaluate with the KV cache quantized at kv_cache.bits per layer")
    lm_eval: LmEvalConfig | None = Field(None, description="downstream tasks whose accuracy the report gives, dense and pruned")


def storage_url_problem(url: str) -> str | None:
    """Why a storage string is not a database URL (with what it probably meant), or None."""
    from sqlalchemy.engine import make_url

    try:
        make_url(url)
        return None
    except Exception:
        pass
    if "://" not in url and url.strip():
        return f"not a database URL (a SQLite file is written sqlite:///{url})"
    return "not a database URL (e.g. sqlite:///studies.db or postgresql+psycopg://user@host/db)"


def _as_value_error(fn) -> None:
    try:
        fn()
    except UserError as exc:
        raise ValueError(str(exc)) from None


# Keys only one of the two kinds of config has: a file given to the wrong command says so.
_STUDY_ONLY = {"search", "space", "objectives", "workers", "storage", "study"}
_PRUNE_ONLY = {"pruning.allocation", "pruning.mode", "pruning.bias_compensation", "pruning.remove_blocks",
               "pruning.max_sparsity"}


def _wrong_kind(cls: type[BaseModel], exc: ValidationError) -> str | None:
    extra = {".".join(str(p) for p in e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"}
    if cls is PruneConfig and extra & _STUDY_ONLY:
        return "this is a study config (it has " + ", ".join(sorted(extra & _STUDY_ONLY)) + "): run it with `prunesearch launch FILE`"
    if cls is StudyConfig and extra & _PRUNE_ONLY:
        return ("this is a pruning config (it has " + ", ".join(sorted(extra & _PRUNE_ONLY)) + "), as `prunesearch export` "
                "writes: apply it with `prunesearch prune --config FILE`")
    return None


def format_validation_error(exc: ValidationError, where: str = "config", flags: dict[str, str] | None = None,
                            cls: type[BaseModel] | None = None) -> str:
    """One line: every problem as dotted.path: message. A value that came from a command-line
    flag is blamed on the flag (``flags``: dotted path -> flag), not on the file."""
    if cls is not None and (hint := _wrong_kind(cls, exc)):
        return f"{where}: {hint}"
    parts, flag_parts = [], []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        flag = (flags or {}).get(loc)
        if flag:
            flag_parts.append(f"{flag} {err.get('input')!r}: {msg}" if "input" in err else f"{flag}: {msg}")
        else:
            parts.append(f"{loc}: {msg}")
    flag_parts = list(dict.fromkeys(flag_parts))  # one flag may set two keys (--batch-size)
    lines = flag_parts + ([f"{where}: " + "; ".join(parts)] if parts else [])
    return "; ".join(lines)


def read_yaml(path: str | Path) -> dict:
    """A config file as a dict; a missing, empty or malformed file is a one-line error (with the
    line number for YAML syntax)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{path} is a directory, not a config file: give a YAML file such as configs/default.yaml")
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (a YAML config was expected)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: not valid YAML ({where}{problem})") from None
    if data is None or data == {}:
        raise UserError(f"{path} is empty: a config must say what to do; start from a copy of configs/default.yaml "
                        f"(study) or an exported pruning config")
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    return data


def validate(cls: type[BaseModel], data: dict, where: str = "config", flags: dict[str, str] | None = None):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, where, flags, cls)) from None


def load_config(cls: type[BaseModel], path: str | Path):
    return validate(cls, read_yaml(path), str(path))


# --------------------------------------------------------------------------- study configs

class KVCacheConfig(Strict):
    """Simulated KV-cache quantization (fake-quantize K and V where they enter the cache)."""

    bits: list[int] | None = Field(None, description="fixed bits per decoder layer (prune configs); null = 16")
    bits_choices: list[int] = Field([16, 8, 6, 4], description="what the search may pick per layer")
    group_size: int = Field(32, ge=1)
    key_axis: Literal["channel", "token"] = "channel"
    value_axis: Literal["channel", "token"] = "token"

    @field_validator("bits_choices", "bits")
    @classmethod
    def _bits_range(cls, v):
        if v is not None and any(not 1 <= b <= 16 for b in v):
            raise ValueError("KV bits must lie in 1..16")
        return v


class SpaceConfig(Strict):
    name: str = Field("blockwise", description="blockwise (a free ratio per block) or owl (searched M and lambda)")
    split_attn_mlp: bool = Field(False, description="separate ratios for the attention and MLP parts of a block")
    min_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    max_sparsity: float = Field(0.95, gt=0.0, lt=1.0)
    kv_bits: bool = Field(False, description="also search per-layer KV-cache bits (kv_cache.bits_choices)")
    params: dict[str, Any] = Field(default_factory=dict, description="space-specific, e.g. owl: M_range, lam_range")
    remove_layers: list[int] = Field(
        [], description="also search how many decoder blocks a trial removes first (Prune&Comp, least influential "
                        "first), e.g. [0, 1, 2, 3]; empty: not searched. pruning.sparsity then stays the share of ALL "
                        "prunable weights of the full model: the removed blocks count as fully pruned and the kept "
                        "ones share S' = (S N - R_k) / (N - R_k) (N all prunable weights, R_k those of the k removed "
                        "blocks) by the space's allocation; achieved sparsity and its objectives are over the full model")

    @field_validator("name")
    @classmethod
    def _known_space(cls, v: str) -> str:
        _as_value_error(lambda: SPACES.get(v))
        return v

    @field_validator("remove_layers")
    @classmethod
    def _removal_choices(cls, v: list[int]) -> list[int]:
        if any(k < 0 for k in v):
            raise ValueError(f"block counts must be >= 0, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"a block count is listed twice in {v}")
        return sorted(v)


VECTOR_SAMPLERS = {"nsga3": "optishear", "evo": "levels"}  # samplers that evolve vectors, and the VectorSpace each evolves


class SearchConfig(Strict):
    sampler: Literal["tpe", "random", "nsga3", "evo"] = Field(
        "tpe", description="tpe (Optuna), random, nsga3 (pymoo; the optishear space), or evo (budget-exact evolution "
                           "with staged selection, EvoPress's design; the levels space)")
    trials: int = Field(40, ge=1, description="finished (complete or pruned) trials the study ends with; nsga3 and "
                                              "evo: evaluations (evo: a screening stage's evaluation counts as one)")
    timeout_s: float | None = Field(None, gt=0, description="stop asking for new trials after this many seconds")
    seed: int = 0
    n_startup_trials: int = Field(8, ge=0)
    pruner: Literal["median", "percentile", "none"] = Field(
        "percentile", description="median: a trial whose running value after an early stage (search.stages) is worse than "
                              "the median of the complete trials at that stage stops there (PRUNED); percentile: worse "
                              "than search.pruner_percentile of them (25: only the best quarter goes on); none: every "
                              "trial runs every prompt. A trial that ran every stage is COMPLETE")
    pruner_percentile: float = Field(25.0, gt=0, lt=100, description="percentile pruner: the share (in %) of the "
                                                                     "complete trials a trial must be among at each stage")
    stages: list[int] | None = Field(
        None, description="prompt counts after which a trial reports its running value and the pruner may stop it; the "
                          "last stage, all reconstruction_samples prompts, always runs to the end. Default: 2, 4, 8, ... "
                          "below reconstruction_samples")
    pruner_warmup: int = Field(5, ge=0, description="complete trials (baselines included) before the pruner stops any")
    patience: int | None = Field(None, ge=1, description="stop after this many finished trials without a new best")
    baselines: list[Literal["uniform", "owl", "wanda", "ria"]] = Field(
        ["uniform", "owl"], description="enqueued first (nsga3: seeded into the first population; default wanda, ria, owl)")
    population: int = Field(50, ge=2, description="nsga3: individuals per generation")
    offspring: int = Field(16, ge=1, description="evo: children of the parent per generation, all scored at the first stage")
    survivors: list[int] | None = Field(
        None, description="evo: children kept after each stage but the last for the next stage's prompts, decreasing "
                          "(the best one after the last stage challenges the parent); default a quarter per stage")
    ref_partitions: int = Field(3, ge=1, description="nsga3: Das-Dennis partitions of the reference directions")
    heartbeat_s: int = Field(10, ge=1, description="drivers record a heartbeat for their running trials this often")
    grace_s: int = Field(60, ge=2, description="a running trial without a heartbeat for this long belongs to a dead "
                                                "driver: it is failed and its parameters are run again")

    @model_validator(mode="after")
    def _grace_after_heartbeat(self) -> "SearchConfig":
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(f"grace_s ({self.grace_s}) must exceed heartbeat_s ({self.heartbeat_s})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _evolution_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sampler") == "nsga3":
            # seeds: Wanda, the RIA-like point, OWL; and no early stopping: a generation needs every value
            data = {"baselines": ["wanda", "ria", "owl"], **data, "pruner": "none"}
        if isinstance(data, dict) and data.get("sampler") == "evo":
            data = {**data, "pruner": "none"}  # evo stops children itself, by its staged selection
        return data


class WorkersConfig(Strict):
    count: int | Literal["auto"] = Field(1, description="evaluator actors (each holds one model copy); auto: one per "
                                                        "num_gpus GPUs in the cluster when num_gpus > 0, else as many "
                                                        "as its CPUs fit")
    num_cpus: float = Field(1, gt=0, description="Ray CPUs per actor")
    num_gpus: float = Field(0, ge=0, description="Ray GPUs per actor; with several (e.g. 4) an actor places "
                                                 "consecutive decoder blocks on them (a 70B model as one worker)")
    memory_gb: float | None = Field(None, gt=0, description="Ray memory reserved per actor (places actors by memory "
                                                            "too); the host memory a worker plans its model within")
    threads: int | None = Field(None, ge=1, description="torch threads per actor (default: num_cpus)")
    offload: Literal["auto", "none", "blocks"] = Field(
        "auto", description="where a worker keeps the model: none (all of it on the device, masked in place: fastest), "
                            "blocks (decoder blocks in host memory, streamed through the device one at a time), or auto "
                            "(in memory when it fits the device's free memory, else blocks; with several GPUs per "
                            "worker, consecutive blocks fill them and the rest streams)")
    address: str | None = Field(None, description="Ray cluster address (auto or HOST:PORT); null starts Ray in-process")
    connect_timeout_s: float = Field(30, gt=0, description="how long to wait for the Ray cluster at `address` before "
                                                           "giving up with an error")

    @field_validator("count", mode="before")
    @classmethod
    def _count(cls, v: Any) -> Any:
        """One message for both forms (pydantic's own lists the union's internals)."""
        text = str(v).strip()
        if text == "auto":
            return "auto"
        if isinstance(v, bool) or not text.isdigit() or int(text) < 1:
            raise ValueError("a number of evaluator actors >= 1, or auto")
        return int(text)


class StudyPruningConfig(PruningSection):
    metric: str = "wanda"
    sparsity: float = Field(0.7, ge=0.0, lt=1.0, description="the global budget every candidate meets")
    structure: str = "unstructured"
    group: Literal["auto", "row", "layer"] = "auto"
    remove_layers: int = Field(0, ge=0, description="Prune&Comp: remove this many blocks once, before the search; "
                                                    "the search allocates `sparsity` over the rest")
    compensate: bool = Field(True, description="Prune&Comp magnitude compensation of the removed blocks")

    def spec(self, batch_size: int = 8) -> PruneSpec:
        """How the study prunes: every candidate one shot from the dense statistics, under this
        metric, structure and group, on this budget; its allocation is the candidate's own."""
        return PruneSpec(self.metric, self.sparsity, "uniform", self.structure, self.group, "one_shot", batch_size=batch_size)


class StudyConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    calibration: DataConfig = Field(default_factory=DataConfig)
    evaluation: EvalConfig | None = Field(None, description="held-out text; needed by the perplexity objective")
    pruning: StudyPruningConfig = Field(default_factory=StudyPruningConfig)
    reconstruction_samples: int = Field(8, ge=1, description="calibration prompts the reconstruction error runs on")
    kl_cache: int | Literal["auto", "all"] = Field(
        "auto", description="what each worker keeps of the dense side for the kl objective: auto (exact and hidden-sized "
                            "where the lm_head is linear: each token's expected output embedding; for a soft-capped "
                            "head all log-probabilities when they take at most 1 GiB, else the top 1024), all (every "
                            "log-probability), or a number K (the top K per token: a lower bound of the KL)")
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    objectives: list[str] = Field(["frobenius"], min_length=1, description="registered objectives, or lm_eval:TASK[,TASK] "
                                                                      "(mean accuracy on lm-eval tasks, maximised)")
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig, description="settings of the lm_eval:TASK objectives")
    search: SearchConfig = Field(default_factory=SearchConfig)
    storage: str = Field("sqlite:///studies.db", description="any SQLAlchemy URL; PostgreSQL on a cluster")
    study: str | None = Field(None, description="study name; default derived from the config")
    workers: WorkersConfig = Field(default_factory=WorkersConfig)

    @field_validator("storage")
    @classmethod
    def _database_url(cls, v: str) -> str:
        if (problem := storage_url_problem(v)) is not None:
            raise ValueError(problem)
        return v

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, v: list[str]) -> list[str]:
        for name in v:
            if ":" not in name and any(downstream.is_lm_eval(n) for n in v) and name not in OBJECTIVES.names():
                raise ValueError(f"unknown objective '{name}': in a YAML list, [lm_eval:a,b] is split at the comma "
                                 f"into two entries; quote it: [\"lm_eval:a,b\"]")
            _as_value_error(lambda: objective(name))
        if len(set(v)) != len(v):
            raise ValueError("an objective is listed twice")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "StudyConfig":
        if any(downstream.is_lm_eval(n) for n in self.objectives):
            if self.lm_eval.tasks:
                raise ValueError("lm_eval.tasks: a study names its tasks in its objectives (lm_eval:TASK[,TASK])")
            if self.workers.offload == "blocks":
                raise ValueError("lm_eval objectives run the whole model through lm-eval: workers.offload blocks "
                                 "(streamed) cannot; use none or auto")
            _as_value_error(downstream.check_library)
        if "perplexity" in self.objectives and self.evaluation is None:
            raise ValueError("the perplexity objective needs an evaluation section (held-out text)")
        if self.space.kv_bits and "kv_bytes" not in self.objectives:
            raise ValueError("searching KV bits needs the kv_bytes objective, else the search always picks 16 bits")
        if not self.space.min_sparsity <= self.pruning.sparsity <= self.space.max_sparsity:
            raise ValueError(f"impossible budget: pruning.sparsity {self.pruning.sparsity} lies outside "
                             f"[space.min_sparsity {self.space.min_sparsity}, space.max_sparsity {self.space.max_sparsity}]")
        if isinstance(self.kl_cache, int) and self.kl_cache < 1:
            raise ValueError("kl_cache: a number of log-probabilities per token >= 1, all, or auto")
        if self.reconstruction_samples > self.calibration.samples:
            raise ValueError("reconstruction_samples cannot exceed calibration.samples")
        space = SPACES.get(self.space.name).fn
        vector = lambda c: issubclass(c, VectorSpace)  # noqa: E731
        evolves = self.search.sampler in VECTOR_SAMPLERS
        if evolves and self.space.name != VECTOR_SAMPLERS[self.search.sampler]:
            raise ValueError(f"the {self.search.sampler} sampler evolves the {VECTOR_SAMPLERS[self.search.sampler]} "
                             f"space: set space.name to {VECTOR_SAMPLERS[self.search.sampler]} (not {self.space.name})")
        if not evolves and vector(space) and self.space.name == "levels":
            raise ValueError("the levels space is evolved by the evo sampler: set search.sampler to evo")
        if self.search.sampler == "evo":
            self._check_evo()
        if self.space.name == "levels" and self.space.params.get("granularity") == "half" and not self.space.split_attn_mlp:
            self.space.split_attn_mlp = True  # what the export and the report read the trials' ratios by
        if not space.searches_metric and {"wanda", "ria"} & set(self.search.baselines):
            raise ValueError(f"the baselines wanda and ria name a metric: only the "
                             f"{' or '.join(space_names(lambda c: c.searches_metric))} space searches the metric")
        if self.space.remove_layers:
            if self.pruning.remove_layers:
                raise ValueError("space.remove_layers searches how many blocks to remove: set pruning.remove_layers "
                                 "to 0 (it removes a fixed number before the search)")
            if evolves or vector(space):
                raise ValueError(f"space.remove_layers is searched by the tpe or random sampler over the "
                                 f"{' or '.join(space_names(lambda c: not vector(c)))} space, not by "
                                 f"{' / '.join(sorted(VECTOR_SAMPLERS))} / the {' or '.join(space_names(vector))} space")
            if self.pruning.structure not in ("", "unstructured"):
                raise ValueError(f"space.remove_layers needs unstructured pruning: the budget left to the kept blocks, "
                                 f"(S N - R_k) / (N - R_k), is in general not on the {self.pruning.structure} grid")
        stages = self.search.stages
        if stages is not None and (any(not 0 < n < self.reconstruction_samples for n in stages) or stages != sorted(set(stages))):
            raise ValueError(f"search.stages {stages} must be increasing prompt counts below reconstruction_samples "
                             f"({self.reconstruction_samples}): the last stage, every prompt, is implied")
        if self.search.pruner != "none" and len(self.objectives) > 1:
            self.search.pruner = "none"  # Optuna prunes single-objective studies only
        return self

    def _check_evo(self) -> None:
        if len(self.objectives) != 1 or objective(self.objectives[0]).kind != "forward":
            raise ValueError(f"the evo sampler ranks children on one reconstruction objective (frobenius, "
                             f"frobenius_rel or kl), not {self.objectives}")
        n_stages, s = len(self.stage_prompts()), self.search
        if s.survivors is None:
            s.survivors = [max(1, s.offspring // 4 ** (k + 1)) for k in range(n_stages - 1)]
        if len(s.survivors) != n_stages - 1 or any(not 1 <= k <= s.offspring for k in s.survivors) \
                or s.survivors != sorted(s.survivors, reverse=True):
            raise ValueError(f"search.survivors {s.survivors}: one count per stage but the last ({n_stages - 1} for "
                             f"stages {self.stage_prompts()}), non-increasing, each in 1..offspring ({s.offspring})")

    def stage_prompts(self) -> list[int]:
        """The prompt counts of the evaluation stages, the last one every reconstruction prompt."""
        n = self.reconstruction_samples
        stages = self.search.stages if self.search.stages is not None else [2**k for k in range(1, n.bit_length()) if 2**k < n]
        return [*stages, n]

    def study_hash(self) -> str:
        """What defines the study: everything but budgets, storage, naming and where workers run.
        Settings at their default are left out, so a new setting (with a default) added in a later
        version does not orphan the studies launched before it."""
        import hashlib
        import json

        data = self.model_dump(mode="json", exclude_defaults=True, exclude={"storage": True, "study": True, "workers": True,
                                                      "search": {"trials", "timeout_s", "patience", "heartbeat_s", "grace_s"}})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def default_study_name(self) -> str:
        model = Path(self.model.name).name.replace(".gguf", "") or "model"
        return f"{model}-{self.pruning.metric.split(':')[0]}-s{round(self.pruning.sparsity * 100)}-{self.space.name}-{self.study_hash()[:8]}"


PruneConfig.model_rebuild()
