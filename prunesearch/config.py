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
from prunesearch.pruning.allocations import ALLOCATIONS
from prunesearch.pruning.engine import PruneSpec, check_spec
from prunesearch.pruning.metrics import METRICS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = Field("default", description="'default' (bundled SmolLM2-135M), a hub id, a local HF directory or a .gguf file")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    trust_remote_code: bool = False
    max_layers: int | None = Field(None, ge=1, description="keep only the first N decoder blocks (quick experiments, tests)")


class DataConfig(Strict):
    source: str = Field("wikipedia", description="built-in corpus (wikipedia, lee, pydoc), a local file/dir, or a hub dataset NAME[:CONFIG[:SPLIT]]")
    samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=2, le=131072)
    seed: int = 0
    text_field: str = "text"
    batch_size: int = Field(8, ge=1)


class EvalConfig(DataConfig):
    source: str = "wikipedia"
    samples: int = Field(16, ge=1)
    seq_len: int = Field(512, ge=2, le=131072)


class AllocationConfig(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class PruningConfig(Strict):
    metric: str = Field("wanda", description="a metric name, optionally with parameters: ria:a=0.5")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    allocation: str | AllocationConfig = Field("uniform", description="uniform, owl[:M=5,lam=0.08], mrp[:step=0.01,start=..], or {name, params}")
    structure: str = Field("unstructured", description="unstructured or N:M, e.g. 2:4")
    group: Literal["auto", "row", "layer"] = "auto"
    mode: Literal["one_shot", "sequential"] = "sequential"
    bias_compensation: bool = Field(False, description="STADE's bias compensation (needs biases the architecture can store)")
    max_sparsity: float = Field(0.95, gt=0.0, lt=1.0)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        _as_value_error(lambda: METRICS.resolve(v))
        return v

    @field_validator("allocation")
    @classmethod
    def _known_allocation(cls, v):
        _as_value_error(lambda: ALLOCATIONS.resolve(v if isinstance(v, str) else v.model_dump()))
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "PruningConfig":
        _as_value_error(lambda: check_spec(self.spec()))
        return self

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


def _as_value_error(fn) -> None:
    try:
        fn()
    except UserError as exc:
        raise ValueError(str(exc)) from None


def format_validation_error(exc: ValidationError, where: str = "config") -> str:
    """One line: every problem as dotted.path: message."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return f"{where}: " + "; ".join(parts)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    return data


def validate(cls: type[BaseModel], data: dict, where: str = "config"):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, where)) from None


def load_config(cls: type[BaseModel], path: str | Path):
    return validate(cls, read_yaml(path), str(path))
