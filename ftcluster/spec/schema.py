"""The job spec: the one schema (pydantic v2) for every ftcluster job.

Every field carries a description; the same text feeds ``ftcluster schema`` (JSON
Schema for editors). Unknown keys are errors. ``method`` picks the job kind through a
discriminated union: LoRA options on a full fine-tune, or DeepSpeed options on a LoRA
run, are errors rather than silently ignored.
"""

# pyright: reportArgumentType=false
# (pyright takes a field whose default is given positionally, `Field(None, ...)`, for a required
# one, so it rejects `default_factory=SomeSection` although pydantic builds SomeSection() fine.)

from __future__ import annotations

import re
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PrivateAttr,
    TypeAdapter,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from .envbuild import build_env
from .kubenames import env_problems, section_problems
from .registry import field_of, is_spec_backend, lookup, spec_backends

SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE_KEY|API_KEY|ACCESS_KEY)", re.I)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
TIME_LIMIT = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})$")
QUANTITY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
MEMORY = re.compile(r"^\d+[KMGT]?$")


class _BackendNames:
    """The type of ``backend:``: a name of :mod:`ftcluster.spec.registry`, read when a spec is validated (so a
    backend registered later is accepted) and when the JSON Schema is made. Behaves like the ``Literal`` of those
    names: the same error (``literal_error``) and the same schema (an ``enum`` of strings)."""

    names = staticmethod(spec_backends)

    @classmethod
    def _check(cls, value: Any) -> Any:
        if not is_spec_backend(value):
            names = spec_backends()
            expected = " or ".join(filter(None, [", ".join(repr(n) for n in names[:-1]), repr(names[-1])]))
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return value

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_before_validator_function(cls._check, core_schema.str_schema())

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        return {"enum": list(spec_backends()), "type": "string"}


BackendName = Annotated[str, _BackendNames]
"""A registered backend's name (``spec.backend``)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, use_attribute_docstrings=False)


def _empty_list() -> list[Any]:
    """The default factory of list fields. Not ``list`` itself: pydantic reads every default
    factory's signature, and a builtin's is parsed from text by the tokenizer (start-up time)."""
    return []


def _check_env(env: dict[str, str]) -> dict[str, str]:
    from .secrets import fsspec_env_credential

    for name, value in env.items():
        if not ENV_NAME.match(name):
            raise ValueError(f"{name}: environment variable names use letters, digits and '_' and do not start with a digit")
        if SECRET_NAME.search(name) and value not in ("", None):
            raise ValueError(
                f"{name}: looks like a secret; never put secret values in a job spec. Reference it instead: "
                "slurm.env_passthrough (taken from the submitting shell) or kubernetes.secret_env (a Kubernetes Secret)"
            )
        problem = fsspec_env_credential(name, value)
        if problem:
            raise ValueError(problem)
    return env


def _check_storage_options(opts: dict[str, Any], *uris: str | None) -> None:
    """Refuse a credential among ``storage_options`` (by the option's name; ftcluster.spec.secrets
    finds secret-looking values under any name), with the variable the store of ``uris`` reads instead."""
    from .secrets import credential_options, protocols_of

    for path, problem in credential_options(opts, protocols_of(*uris)):
        raise ValueError(f"storage_options.{'.'.join(path)}: {problem}")


# --------------------------------------------------------------------------- model

PRESETS: dict[str, dict[str, Any]] = {
    # Tiny: CPU tests and the quickstart (about 0.1M parameters).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
    # Shapes of public models, for benchmarks; weights are random.
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}


class RandomInit(_Model):
    """A randomly initialised model built from an architecture config (no download)."""

    architecture: Literal["llama"] = Field("llama", description="Model family; `llama` builds a transformers LlamaForCausalLM.")
    preset: Literal["tiny", "llama-3.2-1b", "llama-3-8b"] | None = Field(
        None, description="Start from a known shape; explicit fields below override it.")
    hidden_size: int = Field(64, gt=0, description="Hidden size.")
    intermediate_size: int = Field(128, gt=0, description="MLP intermediate size.")
    num_hidden_layers: int = Field(2, gt=0, description="Number of decoder layers.")
    num_attention_heads: int = Field(4, gt=0, description="Attention heads.")
    num_key_value_heads: int = Field(2, gt=0, description="Key/value heads (GQA).")
    vocab_size: int = Field(512, gt=0, description="Vocabulary size; also the size of a locally trained tokenizer.")
    max_position_embeddings: int = Field(512, gt=0, description="Longest sequence the positional encoding covers.")
    tie_word_embeddings: bool = Field(False, description="Share input and output embeddings.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _heads(self) -> RandomInit:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size: must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads: must divide num_attention_heads")
        return self


class ModelSpec(_Model):
    """Where the base model comes from. Exactly one of path, hub_id, random_init."""

    path: str | None = Field(None, description="Local directory or fsspec URI (s3://, gs://, file://) of a Hugging Face model folder; downloaded once per node. A relative path is relative to the spec file's folder.")
    hub_id: str | None = Field(None, description="Hugging Face Hub model id. The only way a job reaches a model hub at run time.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when hub_id is used.")
    random_init: RandomInit | None = Field(None, description="Build a model with random weights from this architecture config (tests, benchmarks).")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for `path` (never credentials: options such as key, secret, token, account_key, sas_token or an SSE-C key are refused; the job reads them from its environment, see docs/storage.md).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="Attention kernel.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model folder.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [n for n in ("path", "hub_id", "random_init") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of model.path, model.hub_id or model.random_init"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.revision and not self.hub_id:
            raise ValueError("revision: only applies with hub_id")
        _check_storage_options(self.storage_options, self.path)
        return self


class TokenizerSpec(_Model):
    """Which tokenizer to use. Empty means: the model's own, or one trained locally for random_init models."""

    path: str | None = Field(None, description="Local directory or fsspec URI of a tokenizer. A relative path is relative to the spec file's folder.")
    hub_id: str | None = Field(None, description="Hugging Face Hub tokenizer id.")
    train_vocab_size: int | None = Field(None, gt=0, description="Train a byte-level BPE tokenizer of this size on the training data (no download).")
    add_tokens: list[str] | str = Field(default_factory=_empty_list, description="Domain terms added to the vocabulary, in this order, after the tokenizer is loaded or trained (terms it holds already are skipped): a list, or a UTF-8 file with one term per line (blank lines and lines starting with '#' are skipped; a relative path is relative to the spec file's folder; the loader reads it and the job receives the terms). The embedding and output matrices grow to a multiple of 64; new rows start at exactly the mean of the existing embeddings (Hewitt 2021). Full fine-tuning trains them with everything else; LoRA trains only the new rows (peft trainable_token_indices). See docs/data.md.")
    add_special_tokens: list[str] = Field(default_factory=_empty_list, description="Special tokens added to the vocabulary after add_tokens (never split, skipped by decode(skip_special_tokens=True), e.g. <|case|>); trained like add_tokens.")

    @model_validator(mode="after")
    def _at_most_one(self) -> TokenizerSpec:
        if sum(x is not None for x in (self.path, self.hub_id, self.train_vocab_size)) > 1:
            raise ValueError("set at most one of tokenizer.path, tokenizer.hub_id, tokenizer.train_vocab_size")
        return self


class DataFields(_Model):
    """Record field names in the dataset."""

    text: str = Field("text", description="Field holding the text for format `text`.")
    instruction: str = Field("instruction", description="Field holding the instruction for format `instruction`.")
    input: str = Field("input", description="Optional extra input appended to the instruction.")
    output: str = Field("output", description="Field holding the answer for format `instruction`.")
    messages: str = Field("messages", description="Field holding [{role, content}] turns for format `chat`.")


class PrepareSpec(_Model):
    """How `ftcluster prepare-data` tokenizes a raw corpus into the prepared corpus `data.train` names."""

    source: str = Field(..., description="The raw corpus: jsonl/parquet records (the `data.fields.text` field) or plain .txt/.md files (one document each), compressed or not (.gz, .bz2, .xz, .zst); a file, folder or glob on any fsspec filesystem. A relative path is relative to the spec file's folder.")
    file_format: Literal["auto", "jsonl", "parquet", "text"] = Field("auto", description="Format of the source files; auto picks by extension.")
    shard_tokens: int = Field(1 << 22, ge=1024, le=1 << 31, description="Tokens per shard at most (default 4,194,304: 8 MB of uint16, 16 MB of uint32; a 1B-token corpus is ~240 shards). A process reads single blocks from a shard, so smaller objects keep a ranged read cheap on stores that copy the object per request (docs/BENCHMARKS.md). A source file's tokens fill its own shards, so shards never mix files.")
    workers: int | None = Field(None, ge=1, le=1024, description="Tokenizing processes on one machine (default: its CPU cores).")
    tasks: int = Field(1, ge=1, le=100_000, description="Machines to prepare on: above 1, `ftcluster prepare-data --submit` runs a Slurm job array or a Kubernetes indexed Job of this many tasks, each owning a disjoint set of source files; each task writes the manifest when it finds every file done, so the last to finish does.")


class DataSpec(_Model):
    """Training and evaluation data."""

    train: str = Field(..., description="Training data: a jsonl/parquet file, folder or glob, on any fsspec filesystem (path, file://, s3://, gs://). A relative path is relative to the spec file's folder.")
    eval: str | None = Field(None, description="Evaluation data in the same format; its loss is logged. A relative path is relative to the spec file's folder.")
    general_eval: str | None = Field(None, description="A general-domain text set whose loss is measured before and after training, to show forgetting. A relative path is relative to the spec file's folder.")
    format: Literal["text", "instruction", "chat"] = Field("instruction", description="text: plain LM; instruction and chat: loss only on the answers.")
    file_format: Literal["auto", "jsonl", "parquet"] = Field("auto", description="File format; auto picks by extension.")
    fields: DataFields = Field(default_factory=DataFields, description="Field names in the records.")
    seq_len: int = Field(2048, ge=8, le=1_048_576, description="Sequence length in tokens.")
    packing: bool = Field(True, description="Pack several examples into each sequence (positions restart per example).")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the data URIs (never credentials: options such as key, secret, token, account_key, sas_token or an SSE-C key are refused; the job reads them from its environment, see docs/storage.md).")
    streaming: bool | None = Field(None, description="Stream `data.train` as a prepared corpus (token shards and a manifest.json written by `ftcluster prepare-data`): each process reads only its own blocks, in the background, and never holds the corpus; resume is exact. Default: stream when `data.train` holds a manifest.json. Prepared corpora are plain text (`format: text`).")
    prepare: PrepareSpec | None = Field(None, description="The raw corpus that `ftcluster prepare-data` tokenizes into `data.train` (a prepared corpus). See docs/data.md.")

    @model_validator(mode="after")
    def _no_secrets(self) -> DataSpec:
        _check_storage_options(self.storage_options, self.train, self.eval, self.general_eval,
                               self.prepare.source if self.prepare else None)
        return self

    @model_validator(mode="after")
    def _prepared_is_text(self) -> DataSpec:
        if (self.streaming or self.prepare is not None) and self.format != "text":
            raise ValueError("a prepared (streamed) corpus is plain text for continual pre-training: set "
                             "data.format: text, or drop data.prepare/data.streaming to read records in memory")
        return self


class TrainingSpec(_Model):
    """Optimisation settings."""

    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    epochs: float = Field(1, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(1, gt=0, description="Sequences per GPU (or process) per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    seed: int = Field(42, ge=0, description="Seed for initialisation, shuffling and dropout.")
    gradient_checkpointing: bool | float = Field(
        False, description="Recompute activations in backward to save memory: `true` every decoder layer, "
        "`false` none, or a fraction such as 0.5 for that share of the layers, evenly spaced (selective "
        "checkpointing: less recompute where memory allows; `ftcluster plan` shows the least that fits).")
    compile: bool | Literal["auto"] = Field(
        "auto", description="Compile each decoder layer with torch.compile (regional compilation: one layer's "
        "graph serves them all): fuses the norms, activations, RoPE and LoRA's element-wise work; trains the same "
        "curve (benchmarks/fidelity.py). `auto` (the default): on for GPU runs of LoRA, DeepSpeed ZeRO stages 0-2 "
        "and FSDP2 with a Llama, Mistral or Qwen2/3 model; off on CPUs (compiling costs more than it gains there), "
        "with ZeRO-3 and for other models. `true`: also for other models (refused with ZeRO-3); `false`: never. "
        "A layer dynamo cannot compile runs uncompiled, said in one line after the first step, as are later "
        "recompilations. The first steps pay the compilation (tens of seconds for an 8B model).")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Compute precision (CPU runs fall back to fp32).")
    fp8: Literal["tensorwise", "rowwise"] | None = Field(
        None, description="Full fine-tuning: run the decoder layers' linear layers' matmuls in FP8 (torchao's float8 "
        "training: weights, inputs and gradients cast to float8 with dynamic scales per tensor or per row; the "
        "weights and optimizer stay in bf16/fp32). Needs a GPU of compute capability 8.9 or newer (H100, H200, L40S), "
        "torchao (`ftcluster[gpu]`) and precision bf16; with FSDP2 or DeepSpeed ZeRO stages 0-2. The output layer "
        "stays bf16. On CPUs it is emulated (tests). What it changes in the loss: docs/training.md, \"FP8\".")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW beta2.")
    log_every_steps: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    eval_every_steps: int | None = Field(None, gt=0, description="Evaluate on data.eval every N steps (and at the end).")
    hang_timeout: float = Field(
        300, ge=5, le=86400, description="Seconds after which a rank that stopped making progress is named and the job "
        "ends as an infrastructure fault (docs/lifecycle.md, \"Faults\"): a rank whose heartbeat stops (a stopped, "
        "frozen or lost process) or that stays in one phase (a data read that never returns) while the others wait "
        "for it. Far below NCCL's 30 minutes, above the longest silent phase of a step (a first compile, an eval, a "
        "checkpoint snapshot); set-up, uploads and exports are exempt while the rank's heartbeat goes on.")

    @field_validator("gradient_checkpointing")
    @classmethod
    def _fraction(cls, v: bool | float) -> bool | float:
        if not isinstance(v, bool) and not 0 <= v <= 1:
            raise ValueError(f"{v:g} is not a share of the layers: use true, false or a number from 0 to 1")
        return v

    @property
    def checkpoint_fraction(self) -> float:
        """Share of decoder layers recomputed in backward: 1.0 for ``true``, 0.0 for ``false``."""
        return float(self.gradient_checkpointing)


class LoraSpec(_Model):
    """LoRA adapter settings (peft)."""

    r: int = Field(16, gt=0, le=4096, description="Rank of the update matrices.")
    alpha: float = Field(32, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Modules to adapt: `all-linear` or a list such as [q_proj, v_proj].")
    merge_at_end: bool = Field(False, description="Also save a merged full model at the end.")
    modules_to_save: list[str] = Field(default_factory=_empty_list, description="Modules trained in full and saved inside the adapter, e.g. [embed_tokens, lm_head] (hundreds of MB to GB for an embedding). Without it, tokens added with tokenizer.add_tokens (or a tokenizer.path larger than the model) train only their new rows (peft trainable_token_indices), which keeps the adapter at megabytes.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("list at least one module name, or use all-linear")
        return v


class DeepSpeedSpec(_Model):
    """DeepSpeed ZeRO settings for full fine-tuning."""

    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="ZeRO stage: 2 shards optimizer states and gradients, 3 also parameters.")
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field("none", description="Offload optimizer states.")
    offload_params: Literal["none", "cpu", "nvme"] = Field("none", description="Offload parameters (ZeRO-3 only).")
    nvme_path: str | None = Field(None, description="Local NVMe folder for nvme offload. A relative path is relative to the spec file's folder.")
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with backward.")
    reduce_bucket_size: int = Field(500_000_000, gt=0, description="Elements per gradient-reduction bucket.")
    config_file: str | None = Field(None, description="A DeepSpeed JSON config merged over the generated one (read at validate and render time, relative to the spec file). Keys that the spec decides must agree with it or be \"auto\" (the spec's value): train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size, bf16/fp16.enabled; and gradient_clipping, optimizer lr/betas/weight_decay and scheduler warmup where training sets them. See docs/training.md.")

    @model_validator(mode="after")
    def _combos(self) -> DeepSpeedSpec:
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError("offload_params: parameter offload needs zero_stage: 3")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer: optimizer offload needs zero_stage 1, 2 or 3")
        if "nvme" in (self.offload_optimizer, self.offload_params) and not self.nvme_path:
            raise ValueError("nvme_path: nvme offload needs nvme_path (a fast local folder)")
        return self


class FsdpSpec(_Model):
    """PyTorch FSDP2 settings for full fine-tuning (`engine: fsdp`)."""

    reshard_after_forward: bool = Field(True, description="Free each decoder layer's gathered parameters after its forward and gather them again in backward (ZeRO-3-like: least memory). `false` keeps them gathered from forward to backward (ZeRO-2-like: fewer all-gathers, a whole unsharded model's worth of parameters at the peak).")
    cpu_offload: bool = Field(False, description="Keep the sharded parameters, gradients and optimizer state in host memory and step the optimizer on the CPU (torch's CPUOffloadPolicy): the least GPU memory, slower steps.")


class ResourcesSpec(_Model):
    """What each job asks the cluster for."""

    nodes: int = Field(1, ge=1, le=4096, description="Number of nodes.")
    min_nodes: int | None = Field(None, ge=1, le=4096, description="Fewest nodes the job may run on (Slurm `--nodes=MIN-MAX`): a job requeued after preemption or a lost node goes on with the nodes it gets, resuming its checkpoint on the new number of processes, with the gradient accumulation raised to keep the global batch where it divides. Slurm only.")
    gpus_per_node: int = Field(1, ge=0, le=64, description="GPUs per node (0: CPU only).")
    procs_per_node: int | None = Field(None, ge=1, le=256, description="Training processes per node; defaults to gpus_per_node (1 on CPU).")
    gpu_type: str | None = Field(None, description="GPU model, e.g. h200; becomes the Slurm gres type (gpu:<type>:<n>); on Kubernetes set `kubernetes.node_selector` (GPU product labels differ per cluster).")
    gpu_memory_gb: float | None = Field(None, gt=0, le=10_000, description="Memory of one GPU in GB (10^9 bytes, as the price file's `memory_gb`), for the planner's memory check: needed when `gpu_type` is one the planner does not know (e.g. rtx4090: 24), and wins over the planner's table otherwise (a smaller slice of a GPU).")
    cpus_per_node: int | None = Field(None, ge=1, description="CPU cores per node.")
    memory: str | None = Field(None, description="Memory per node, e.g. 256G (Slurm) / converted to Gi for Kubernetes.")
    time_limit: str | None = Field(None, description="Wall-clock limit, [D-]HH:MM:SS.")
    max_restarts: int = Field(
        2, ge=0, le=100, description="Restarts from the last committed checkpoint after infrastructure faults (a lost "
        "rank or node, a hung rank, a collective or NCCL/gloo error, a rank killed by a signal such as the OOM "
        "killer): the local backend relaunches, Slurm requeues, Kubernetes' backoff limit. An error in the training "
        "code or data is never retried; preemption does not count (docs/lifecycle.md, \"Faults\").")

    @field_validator("memory")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None and not MEMORY.match(v):
            raise ValueError(f"write memory as a number with an optional K/M/G/T suffix, e.g. 256G (got {v!r})")
        return v

    @field_validator("time_limit")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None:
            m = TIME_LIMIT.match(v)
            if not m or int(m.group(3)) > 59 or int(m.group(4)) > 59:
                raise ValueError(f"write the time limit as [D-]HH:MM:SS, e.g. 12:00:00 or 2-00:00:00 (got {v!r})")
        return v

    @model_validator(mode="after")
    def _node_range(self) -> ResourcesSpec:
        if self.min_nodes is not None and self.min_nodes > self.nodes:
            raise ValueError(f"min_nodes: {self.min_nodes} is more than nodes ({self.nodes}); set min_nodes at most "
                             "nodes, or remove it")
        return self

    @property
    def nproc_per_node(self) -> int:
        """Processes per node that torchrun starts."""
        return self.procs_per_node or max(self.gpus_per_node, 1)

    @property
    def time_limit_seconds(self) -> int | None:
        """The time limit in seconds, or None."""
        if not self.time_limit:
            return None
        d, h, m, s = TIME_LIMIT.match(self.time_limit).groups()  # type: ignore[union-attr]
        return ((int(d or 0) * 24 + int(h)) * 60 + int(m)) * 60 + int(s)


class MlflowTracking(_Model):
    """An MLflow tracking server (or store) the run reports to."""

    uri: str = Field(..., description="Tracking URI: http(s)://host:port, databricks, or a local file:/sqlite: store. Credentials never here: the job reads MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD from its environment (slurm.env_passthrough, kubernetes.secret_env).")
    experiment: str | None = Field(None, description="Experiment name (created when missing); default: the job's name (a variant's or stage's parent job name, so they compare side by side).")

    @field_validator("uri")
    @classmethod
    def _no_userinfo(cls, v: str) -> str:
        from urllib.parse import urlsplit

        if urlsplit(v).password is not None or (urlsplit(v).username and "@" in v.split("//", 1)[-1]):
            raise ValueError("credentials in the URI: set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or "
                             "MLFLOW_TRACKING_TOKEN) in the job's environment by reference instead (slurm.env_passthrough, "
                             "kubernetes.secret_env), and give the URI without them")
        return v


class TensorboardTracking(_Model):
    """TensorBoard event files."""

    dir: str | None = Field(None, description="Where the event files go (a local path or fsspec URI); default: <output.uri>/tensorboard, beside the checkpoints.")


class TrackingSpec(_Model):
    """Experiment trackers the run reports to from rank 0 (docs/tracking.md). A tracker that is down never stops
    training: it is retried in the background and its failure is one warning line."""

    mlflow: MlflowTracking | None = Field(None, description="Report to MLflow: parameters (the resolved spec, secrets masked), every metric with its step, the planner's predictions, the artifacts' URIs and record.")
    tensorboard: TensorboardTracking | None = Field(None, description="Write TensorBoard event files (`tensorboard: {}` for the default folder).")


class OutputSpec(_Model):
    """Where checkpoints, adapters and metrics go."""

    uri: str = Field(..., description="Output location: file:///path, s3://bucket/prefix, gs://..., or a local path. A relative path (file://../out, out) is relative to the spec file's folder.")
    checkpoint_every_steps: int | None = Field(None, gt=0, description="Save a resumable checkpoint every N optimizer steps.")
    checkpoint_every_minutes: float | None = Field(30, gt=0, description="Save a resumable checkpoint every M minutes.")
    keep_last: int = Field(3, ge=1, description="Committed checkpoints to keep; older committed ones are deleted.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the output URI, e.g. {client_kwargs: {endpoint_url: ...}}; never credentials: options such as key, secret, token, account_key, sas_token or an SSE-C key are refused; the job reads them from its environment, see docs/storage.md.")
    upload_concurrency: int = Field(8, ge=1, le=128, description="Files uploaded at once.")
    final_upload_timeout: float = Field(600, gt=0, le=7 * 86400, description="Seconds the end of a run waits for the output store: the final checkpoint, adapters and model are retried through transient errors (timeouts, resets, throttling, 5xx) for this long, then the run fails. Also bounds reading the store on resume. Permanent errors (credentials, access denied, no bucket, bad endpoint) fail at once. Periodic checkpoints retry without end while training goes on.")

    @model_validator(mode="after")
    def _no_secrets(self) -> OutputSpec:
        _check_storage_options(self.storage_options, self.uri)
        return self


# sbatch options ftcluster writes itself (see ftcluster.plan.slurm_request), and the spec field that controls each.
SLURM_OWNED = {
    "job-name": "name", "nodes": "resources.nodes", "ntasks-per-node": None, "gpus-per-node": "resources.gpus_per_node",
    "gres": "resources.gpu_type and resources.gpus_per_node", "cpus-per-task": "resources.cpus_per_node",
    "mem": "resources.memory", "time": "resources.time_limit", "partition": "slurm.partition",
    "account": "slurm.account", "qos": "slurm.qos", "constraint": "slurm.constraint",
    "reservation": "slurm.reservation", "signal": "slurm.signal_seconds", "requeue": "slurm.requeue",
    "no-requeue": "slurm.requeue", "open-mode": None, "output": "slurm.output", "array": "variants",
}
# Options that break the one-torchrun-per-node launch (REFERENCE.md, DeepSpeed PR #3165).
SLURM_BREAKS_LAUNCH = ("ntasks", "ntasks-per-gpu", "gpus-per-task", "gpus")


def _directive_problem(key: str) -> str | None:
    """Why ``slurm.extra_directives.<key>`` cannot be used, or None."""
    if len(key) == 1:
        return "write the long option name (e.g. partition, not p)"
    if key in SLURM_OWNED:
        owner = SLURM_OWNED[key]
        return f"ftcluster writes --{key} itself; " + (
            f"set {owner} instead" if owner else "ftcluster sets it for the one-task-per-node launch")
    if key in SLURM_BREAKS_LAUNCH:
        return (f"--{key} breaks the one-torchrun-per-node launch (each task would get its own GPUs); "
                "use resources.gpus_per_node and resources.procs_per_node")
    return None


def _one_line(value: Any) -> Any:
    """A value that becomes a Slurm option or a shell line: a line break would end it early."""
    if value is not None and any(c in str(value) for c in "\n\r\0"):
        raise ValueError(f"contains a line break or NUL ({value!r}); Slurm options and shell lines must be one line")
    return value


def _one_mount(value: str) -> str:
    if "," in value:
        raise ValueError(f"one mount per entry, no commas ({value!r})")
    return value


# Checked where pydantic knows the value's place (an item of a list, a value of a map), so the
# error names its file:line:col like every spec error; the renderer, submitit and the doctor's
# probe all rely on it.
OneLine = Annotated[str, AfterValidator(_one_line)]
Mount = Annotated[str, AfterValidator(_one_line), AfterValidator(_one_mount)]


class SlurmSpec(_Model):
    """Slurm settings (sbatch)."""

    partition: OneLine | None = Field(None, description="Partition (-p).")
    account: OneLine | None = Field(None, description="Account (-A).")
    qos: OneLine | None = Field(None, description="Quality of service.")
    constraint: OneLine | None = Field(None, description="Node feature constraint (-C).")
    reservation: OneLine | None = Field(None, description="Reservation name.")
    extra_directives: dict[str, str | int | None] = Field(default_factory=dict, description="More #SBATCH options, e.g. {exclusive: null, mail-type: END}.")
    setup: list[str] = Field(default_factory=_empty_list, description="Shell lines run before launch on the batch host (module loads, venv activation). Written verbatim: this is your shell.")
    modules: list[OneLine] = Field(default_factory=_empty_list, description="Environment modules to `module load` (quoted).")
    python: OneLine = Field("python3", description="Python interpreter on the compute nodes that has ftcluster[train].")
    container_image: OneLine | None = Field(None, description="Container image for pyxis/enroot (srun --container-image).")
    container_mounts: list[Mount] = Field(default_factory=_empty_list, description="pyxis mounts, SRC:DST[:FLAGS].")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the job (no secrets).")
    env_passthrough: list[str] = Field(default_factory=_empty_list, description="Names of variables taken from the submitting environment (secrets go here).")
    login: OneLine | None = Field(None, description="user@host of a login node to submit through over SSH.")
    signal_seconds: int = Field(120, ge=10, le=3600, description="Seconds before the time limit at which USR2 asks the job to checkpoint and requeue.")
    requeue: bool = Field(True, description="Requeue on preemption or the time-limit signal.")
    output: OneLine = Field("slurm-%x-%j.out", description="Log file pattern (--output).")

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_env(v)

    @field_validator("extra_directives")
    @classmethod
    def _directives(cls, v: dict[str, Any]) -> dict[str, Any]:
        problems = []
        for k in v:
            if not re.match(r"^[a-z][a-z0-9-]*$", k):
                problems.append(f"{k}: write directive names as long sbatch options without dashes, e.g. mail-type")
            elif why := _directive_problem(k):
                problems.append(f"{k}: {why}")
            else:
                try:
                    _one_line(v[k])
                except ValueError as exc:
                    problems.append(f"{k}: {exc}")
        if problems:  # one line per key: the loader places each at its key
            raise ValueError("\n".join(problems))
        return v

    @field_validator("env_passthrough")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not ENV_NAME.match(n)]
        if bad:
            raise ValueError(f"not valid variable names: {', '.join(bad)}")
        return v


class SecretEnv(_Model):
    """An environment variable read from a Kubernetes Secret."""

    name: str = Field(..., description="Environment variable name in the container.")
    secret: str = Field(..., description="Name of the Secret.")
    key: str = Field(..., description="Key inside the Secret.")

    @field_validator("name")
    @classmethod
    def _env(cls, v: str) -> str:
        if not ENV_NAME.match(v):
            raise ValueError("use letters, digits and '_' only")
        return v


class Toleration(_Model):
    """A Kubernetes toleration."""

    key: str | None = Field(None, description="Taint key.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal or Exists.")
    value: str | None = Field(None, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Taint effect.")
    toleration_seconds: int | None = Field(None, description="For NoExecute.")


class Volume(_Model):
    """A volume mounted into every training container."""

    name: str = Field(..., description="Volume name (DNS-1123 label).")
    mount_path: str = Field(..., description="Mount path in the container.")
    pvc: str | None = Field(None, description="PersistentVolumeClaim name.")
    host_path: str | None = Field(None, description="Host path.")
    config_map: str | None = Field(None, description="ConfigMap name.")
    read_only: bool = Field(False, description="Mount read-only.")

    @model_validator(mode="after")
    def _one(self) -> Volume:
        if sum(x is not None for x in (self.pvc, self.host_path, self.config_map)) != 1:
            raise ValueError("set exactly one of pvc, host_path, config_map")
        if not DNS1123.match(self.name) or len(self.name) > 63:
            raise ValueError("name: must be a DNS-1123 label (lower case, digits, '-')")
        if not self.mount_path.startswith("/"):
            raise ValueError("mount_path: must be absolute")
        return self


class KubernetesSpec(_Model):
    """Kubernetes settings (PyTorchJob or TrainJob)."""

    kind: Literal["PyTorchJob", "TrainJob"] = Field("PyTorchJob", description="Resource to create.")
    namespace: str = Field("default", description="Namespace.")
    image: str | None = Field(None, description="Training image with ftcluster[train]; pin a tag or digest.")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field("IfNotPresent", description="Image pull policy.")
    image_pull_secrets: list[str] = Field(default_factory=_empty_list, description="Secrets for pulling the image.")
    service_account: str | None = Field(None, description="Service account (e.g. with workload identity for object storage).")
    queue: str | None = Field(None, description="Kueue LocalQueue name (label kueue.x-k8s.io/queue-name).")
    priority_class: str | None = Field(None, description="PriorityClass name.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector.")
    tolerations: list[Toleration] = Field(default_factory=_empty_list, description="Tolerations.")
    volumes: list[Volume] = Field(default_factory=_empty_list, description="Extra volumes.")
    shm_size: str = Field("64Gi", description="Size of the memory-backed /dev/shm (the default 64 MB breaks NCCL).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment (no secrets).")
    secret_env: list[SecretEnv] = Field(default_factory=_empty_list, description="Environment variables from Secrets, by reference.")
    env_from_secrets: list[str] = Field(default_factory=_empty_list, description="Secrets whose keys all become environment variables.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every object.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations on the job and pods.")
    runtime: str = Field("ftcluster-torch", description="ClusterTrainingRuntime for TrainJob (ftcluster ships one with /dev/shm).")
    restart_policy: Literal["OnFailure", "Never", "ExitCode"] = Field("ExitCode", description="Pod restart policy; ExitCode retries the preemption exit code.")
    backoff_limit: int | None = Field(None, ge=0, description="PyTorchJob retries before the job fails; unset: resources.max_restarts. With restart_policy ExitCode only exits 128-255 are retried (a preemption's 143, an infrastructure fault's 170), and a preemption's retry counts too: raise it where pods are often preempted.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, description="Delete the finished job after this many seconds.")
    disable_istio_sidecar: bool = Field(True, description="Add sidecar.istio.io/inject: 'false' (sidecars break rendezvous).")

    @field_validator("shm_size")
    @classmethod
    def _q(cls, v: str) -> str:
        if not QUANTITY.match(v):
            raise ValueError(f"write a Kubernetes quantity such as 64Gi (got {v!r})")
        return v

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        if not DNS1123.match(v) or len(v) > 63 or "." in v:
            raise ValueError("must be a DNS-1123 label")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_env(v)

    @model_validator(mode="after")
    def _manifest_names(self) -> KubernetesSpec:
        """Clashes with what the manifests set themselves: found on load, so they point at a line."""
        problems = section_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


class LocalSpec(_Model):
    """Settings for the local backend (this machine)."""

    runs_dir: str | None = Field(None, description="Folder for run folders; default $FTCLUSTER_HOME/runs or ~/.ftcluster/runs. A relative path is relative to the spec file's folder.")
    python: str | None = Field(None, description="Interpreter for the training processes; default the one running ftcluster. A command name is looked up on PATH; a relative path (.venv/bin/python) is relative to the spec file's folder.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment (no secrets).")

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_env(v)


class Variant(_Model):
    """One version of the job in a job array: the job's spec plus a few overrides."""

    name: str = Field(..., description="Variant name, a DNS-1035 label: the variant runs as <job name>-<variant> and writes to <output.uri>/<variant>.")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides as dotted field paths, e.g. {lora.r: 64, training.learning_rate: 1.0e-4}; a mapping value replaces the whole section. Not allowed: name, method, backend, resources, env, output.uri, slurm, kubernetes, local (one array runs one shape).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not DNS1035.match(v):
            raise ValueError(f"use lower-case letters, digits and '-', starting with a letter, e.g. {_suggest_name(v)!r}")
        return v


# --------------------------------------------------------------------------- job


class _JobBase(_Model):
    # Never validated itself (LoraJob and FullJob are): building its validator would waste start-up time.
    model_config = ConfigDict(defer_build=True)

    name: str = Field(..., description="Job name: a DNS-1035 label (lower case, digits, '-'), at most 50 characters; it names Slurm jobs and Kubernetes objects.")
    description: str | None = Field(None, description="Free text.")
    backend: BackendName = Field("local", description="Where `ftcluster submit` runs the job.")
    model: ModelSpec = Field(..., description="Base model.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer; empty means the model's own.")
    data: DataSpec = Field(..., description="Datasets.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Nodes, GPUs, CPUs, memory, time.")
    output: OutputSpec = Field(..., description="Checkpoints and artifacts.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment trackers (MLflow, TensorBoard) the run reports to; none by default.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment for every process on every backend, e.g. NCCL_SOCKET_IFNAME (no secrets).")
    slurm: SlurmSpec = Field(default_factory=SlurmSpec, description="Slurm backend settings.")
    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec, description="Kubernetes settings.")
    local: LocalSpec = Field(default_factory=LocalSpec, description="Local backend settings.")
    variants: list[Variant] = Field(default_factory=_empty_list, description="Run several versions of this job as one Slurm job array (one Kubernetes job each; one after another locally). Each variant is this spec plus its `set` overrides. See docs/pipelines.md.")
    array_parallelism: int | None = Field(None, ge=1, description="At most this many variants run at once (sbatch --array=0-N%K); default: no limit.")

    _source_file: str | None = PrivateAttr(None)
    _overrides: tuple[str, ...] = PrivateAttr(())
    _variant: str | None = PrivateAttr(None)  # set on a resolved variant spec (ftcluster.spec.variants)
    _corpus_from: str | None = PrivateAttr(None)  # the pipeline stage that prepares data.train (ftcluster.spec.pipeline)
    _resolved: tuple[Any, ...] | None = PrivateAttr(None)  # resolved variant specs, cached by ftcluster.spec.variants
    # {dotted field: folder} of the relative paths a file wrote, rewritten against the cwd (ftcluster.spec.relpaths)
    _path_folders: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > 50:
            raise ValueError(f"at most 50 characters (got {len(v)}); Kubernetes adds suffixes such as -worker-12 to it")
        if not DNS1035.match(v):
            raise ValueError(f"use lower-case letters, digits and '-', starting with a letter, e.g. {_suggest_name(v)!r}")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_env(v)

    @model_validator(mode="after")
    def _cross(self) -> _JobBase:
        problems = []
        ri = self.model.random_init
        if ri is not None and self.data.seq_len > ri.max_position_embeddings:
            problems.append(f"data.seq_len: {self.data.seq_len} exceeds model.random_init.max_position_embeddings ({ri.max_position_embeddings}); lower seq_len or raise max_position_embeddings")
        if self.training.precision == "fp16" and self.method == "lora" and self.resources.gpus_per_node == 0:  # pyright: ignore[reportAttributeAccessIssue]  # LoraJob and FullJob declare method
            problems.append("training.precision: fp16 needs GPUs; use bf16 or fp32 on CPU")
        if self.array_parallelism is not None and not self.variants:
            problems.append("array_parallelism: only applies to a job with variants; remove it or add variants")
        backend = lookup(self.backend)
        problems += [f"{name}: {why}" for name, why in (backend.required if backend else ()) if not field_of(self, name)]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _kubernetes_env(self) -> _JobBase:
        """Environment names the Kubeflow operators set, or set twice: found on load, so they point at a line."""
        problems = env_problems(self, build_env(self))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def world_size(self) -> int:
        """Total training processes."""
        return self.resources.nodes * self.resources.nproc_per_node


def _suggest_name(v: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", v.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = "job-" + s
    return s[:50].rstrip("-")


class LoraJob(_JobBase):
    """LoRA fine-tuning (transformers + peft): one GPU, data parallel when given more."""

    model_config = ConfigDict(defer_build=False)  # every job spec load validates with it

    method: Literal["lora"] = Field(..., description="`lora` (adapters) or `full` (full fine-tune: DeepSpeed or FSDP2, see `engine`).")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings.")

    @model_validator(mode="after")
    def _no_fp8(self) -> LoraJob:
        if self.training.fp8 is not None:
            raise ValueError("training.fp8: FP8 matmuls are for method: full; LoRA on an FP8-stored base is not "
                             "implemented yet: remove training.fp8")
        return self


class FullJob(_JobBase):
    """Full fine-tuning with DeepSpeed ZeRO or PyTorch FSDP2, one or many nodes."""

    model_config = ConfigDict(defer_build=False)  # every job spec load validates with it

    method: Literal["full"] = Field(..., description="`lora` (adapters) or `full` (full fine-tune: DeepSpeed or FSDP2, see `engine`).")
    engine: Literal["deepspeed", "fsdp"] = Field("deepspeed", description="What trains the full model: `deepspeed` (ZeRO 0-3, settings in `deepspeed:`) or `fsdp` (PyTorch FSDP2's fully_shard, settings in `fsdp:`; resumes on another number of processes). docs/training.md compares them.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed ZeRO settings (`engine: deepspeed`).")
    fsdp: FsdpSpec = Field(default_factory=FsdpSpec, description="FSDP2 settings (`engine: fsdp`).")

    @model_validator(mode="after")
    def _engine_section(self) -> FullJob:
        # A section given for the other engine would be silently ignored: refuse it, as the
        # discriminated union refuses a `lora` section on a full job (spec/problems.py).
        given = self.model_fields_set
        if self.engine == "fsdp" and "deepspeed" in given:
            raise ValueError("deepspeed: DeepSpeed options apply only to engine: deepspeed; remove the `deepspeed` "
                             "section or set engine: deepspeed")
        if self.engine == "deepspeed" and "fsdp" in given:
            raise ValueError("fsdp: FSDP options apply only to engine: fsdp; remove the `fsdp` section or set "
                             "engine: fsdp")
        return self

    @model_serializer(mode="wrap")
    def _without_other_engine(self, handler: Any) -> Any:
        # The dump (payloads, variants, pipelines' stages) is validated again: the section of the
        # engine not in use is left out, so it does not read as given (_engine_section).
        data = handler(self)
        if isinstance(data, dict):
            data.pop("fsdp" if self.engine == "deepspeed" else "deepspeed", None)
        return data

    @model_validator(mode="after")
    def _elastic(self) -> FullJob:
        ds = self.deepspeed
        if self.resources.min_nodes is None or self.resources.min_nodes == self.resources.nodes or self.engine != "deepspeed":
            return self
        if ds.zero_stage == 0 or "nvme" in (ds.offload_optimizer, ds.offload_params):
            why = "zero_stage 0" if ds.zero_stage == 0 else "nvme offload"
            raise ValueError(f"resources.min_nodes: a DeepSpeed checkpoint with {why} cannot resume on another number "
                             "of processes; use zero_stage 1-3 without nvme offload, engine: fsdp, or remove min_nodes")
        return self

    @model_validator(mode="after")
    def _fp8(self) -> FullJob:
        if self.training.fp8 is None:
            return self
        if self.training.precision != "bf16":
            raise ValueError(f"training.fp8: needs precision bf16 (the weights and the other layers' compute), got "
                             f"{self.training.precision}; set training.precision: bf16 or remove fp8")
        if self.engine == "deepspeed" and self.deepspeed.zero_stage == 3:
            raise ValueError("training.fp8: not with deepspeed.zero_stage 3 (its parameter gathers replace the weights "
                             "the float8 layers cast); use engine: fsdp or zero_stage 2")
        return self

    @model_validator(mode="after")
    def _compile_stage(self) -> FullJob:
        if self.training.compile is True and self.engine == "deepspeed" and self.deepspeed.zero_stage == 3:
            raise ValueError("training.compile: not supported with deepspeed.zero_stage 3 (its parameter gathers "
                             "hook every module); use zero_stage 2, engine: fsdp or compile: false")
        return self


JobSpec = Annotated[LoraJob | FullJob, Field(discriminator="method")]
"""A job: :class:`LoraJob` or :class:`FullJob`, picked by ``method``."""

AnyJob = LoraJob | FullJob


@lru_cache(maxsize=1)
def job_adapter() -> TypeAdapter[Any]:
    """The validator of :data:`JobSpec` (built once: building it costs start-up time)."""
    return TypeAdapter(JobSpec)


# --------------------------------------------------------------------------- pipeline


class PipelineStage(_Model):
    """One stage of a pipeline: a job spec file, what it waits for and where its base model comes from."""

    model_config = ConfigDict(defer_build=True)  # built on first use: a job spec never needs it

    name: str | None = Field(None, description="Stage name (DNS-1035 label) that `after` and `model_from` refer to; default the job's name.")
    spec: str = Field(..., description="Job spec file, relative to the pipeline file.")
    after: list[str] = Field(default_factory=_empty_list, description="Stages that must succeed before this one starts (Slurm afterok; every task of an array).")
    model_from: str | None = Field(None, description="Train on the model an earlier stage produces: sets model.path to its <output.uri>/final (full) or <output.uri>/merged (LoRA with merge_at_end), whose tokenizer it uses (a tokenizer.train_vocab_size of the stage spec is dropped); implies `after`.")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides for this stage's spec as dotted field paths, e.g. {training.max_steps: 100}.")
    run: Literal["train", "prepare-data"] = Field("train", description="`train` the spec, or `prepare-data`: tokenize its data.prepare.source into its data.train as its own job (a Slurm array of data.prepare.tasks tasks) before the stages that train on that corpus, which wait for it without an `after`.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not DNS1035.match(v):
            raise ValueError(f"use lower-case letters, digits and '-', starting with a letter, e.g. {_suggest_name(v)!r}")
        return v


class PipelineSpec(_Model):
    """Several jobs submitted as one: each stage starts when the stages it depends on have succeeded."""

    model_config = ConfigDict(defer_build=True)  # built on first use: a job spec never needs it

    pipeline: str = Field(..., description="Pipeline name (DNS-1035 label); names the run folder.")
    description: str | None = Field(None, description="Free text.")
    stages: list[PipelineStage] = Field(..., min_length=1, description="Stages, in the order they are submitted; a stage may only depend on earlier ones.")

    @field_validator("pipeline")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > 50 or not DNS1035.match(v):
            raise ValueError(f"use at most 50 lower-case letters, digits and '-', starting with a letter, e.g. {_suggest_name(v)!r}")
        return v
