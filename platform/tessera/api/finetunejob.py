"""FineTuneJob: the single source of truth for its defaults, validation and CRD schema.

Defaults follow FinGPT's QLoRA recipe (4-bit NF4 with double quantization, rank 8, alpha 32,
dropout 0.1, learning rate 1e-4). Status follows the OpenAI fine-tuning API and Kubeflow KEP-2779.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, model_validator

from tessera.api.base import (
    API_VERSION,
    SHA256_HEX,
    ArtifactUri,
    Condition,
    DnsLabel,
    DnsSubdomain,
    KubeModel,
    KubeResource,
    StoreUri,
)

TaskName = Literal[
    "sentiment", "headline", "ner", "xbrl-tags", "xbrl-values", "recommendation", "forecast", "text", "chat"
]
METRIC_NAMES = ("accuracy", "f1_weighted", "rouge1", "rouge2", "rougeL", "mse", "binary_accuracy", "eval_loss")
Phase = Literal[
    "Pending", "Validating", "Queued", "Training", "Evaluating", "Publishing", "Succeeded", "Failed", "Cancelled"
]
TERMINAL_PHASES = ("Succeeded", "Failed", "Cancelled")

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Quantization(KubeModel):
    """How bitsandbytes quantizes the frozen base weights (QLoRA). `bits: null` trains in full precision."""

    bits: Literal[4, 8] | None = Field(4, description="4 (NF4/FP4) or 8 (LLM.int8); null for no quantization.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; only with bits 4.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too; only with bits 4.")

    @model_validator(mode="after")
    def _four_bit_options_need_four_bits(self) -> Quantization:
        if self.bits != 4:
            if "quant_type" in self.model_fields_set and self.quant_type != "nf4":
                raise ValueError("quantType: only applies when bits is 4")
            if "double_quant" in self.model_fields_set and self.double_quant:
                raise ValueError("doubleQuant: only applies when bits is 4")
        return self


class BaseModelSpec(KubeModel):
    """The frozen base model: a Hugging Face model directory in the store."""

    uri: ArtifactUri = Field(description="s3://bucket/models/<base>, file:///path, or a directory path.")
    name: str | None = Field(None, description="Upstream name, e.g. meta-llama/Llama-3.1-8B-Instruct.")
    format: Literal["safetensors", "pytorch", "gguf"] = Field(
        "safetensors", description="Checkpoint format of the directory."
    )
    quantization: Quantization = Field(default_factory=Quantization)
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    @model_validator(mode="after")
    def _quantizable(self) -> BaseModelSpec:
        if self.quantization.bits is not None and self.format == "gguf":
            raise ValueError(
                "quantization.bits: bitsandbytes quantizes a Hugging Face checkpoint, not GGUF; "
                "use a safetensors base or set bits to null"
            )
        return self


# ---- teacher labelling (spec.dataset.teacher) ----

# Tasks whose rows ask one closed-label question (recommendation: with a conviction the teacher also gives).
TEACHER_TASKS = ("sentiment", "recommendation")


class TokenPrice(KubeModel):
    """What the teacher's endpoint costs per million tokens (for the manifest's cost line)."""

    input_per_million: float = Field(0.0, ge=0.0)
    output_per_million: float = Field(0.0, ge=0.0)
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")


class TeacherSpec(KubeModel):
    """A model on an OpenAI-compatible endpoint that labels the rows whose label is empty, before prepare."""

    url: str = Field(
        pattern=r"^https?://[^\s/@]+(:\d+)?(/[^\s]*)?$",
        description="Base URL of the OpenAI-compatible API, e.g. http://vllm-70b.models.svc/openai/v1 "
        "(requests go to <url>/chat/completions). No credentials in the URL: use credentialsSecret.",
    )
    model: str = Field(min_length=1, max_length=253, description="A base model or adapter name on that server.")
    credentials_secret: DnsSubdomain | None = Field(
        None, description="Secret with TEACHER_API_KEY (sent as a bearer token, never logged). Embedded mode: "
        "the TEACHER_API_KEY environment variable.",
    )
    prompt: str | None = Field(
        None, max_length=20000,
        description="Prompt override; {text} (or any task field in braces) is replaced by the row's value. "
        "Default: the task's own instruction prompt, as the student is trained on.",
    )
    max_concurrency: int = Field(8, ge=1, le=512)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(16, ge=1, le=4096)
    samples: int = Field(1, ge=1, le=32, description="Answers per row; the majority label wins.")
    min_confidence: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of the samples that must agree; rows below are dropped and counted."
    )
    price: TokenPrice = Field(default_factory=TokenPrice)
    relabel: bool = Field(False, description="Also label rows that already have a label (their label is replaced).")
    allow_partial: bool = Field(
        False, description="Train on the rows labelled when some requests failed for good; default: fail the step."
    )
    timeout_seconds: float = Field(60.0, gt=0.0, le=3600.0, description="Per request.")
    max_retries: int = Field(4, ge=0, le=20, description="Retries of a request answered 429/5xx or cut off.")

    @model_validator(mode="after")
    def _samples_can_disagree(self) -> TeacherSpec:
        if self.samples > 1 and self.temperature == 0.0:
            raise ValueError("samples: several answers at temperature 0 are the same answer; set temperature > 0")
        return self


class DatasetSpec(KubeModel):
    """Where the data is and how its columns map onto the task's fields."""

    uri: ArtifactUri = Field(description="s3://bucket/datasets/..., file:///path or a path.")
    format: Literal["csv", "jsonl", "parquet"] | None = Field(None, description="Default: from the extension.")
    task: TaskName
    columns: dict[str, str] = Field(
        default_factory=dict, description="Task field -> source column; unmapped fields use their own name."
    )
    label_map: dict[str, str] = Field(
        default_factory=dict, description="Raw label -> task label, e.g. TFNS {'0': negative}."
    )
    eval_split: float = Field(0.2, gt=0.0, lt=1.0, description="Held-out fraction when no evalUri is given.")
    eval_uri: ArtifactUri | None = Field(None, description="A separate evaluation dataset (replaces evalSplit).")
    on_bad_rows: Literal["fail", "skip"] = Field("fail", description="Fail the job or skip rows that break rules.")
    max_rows: int | None = Field(None, ge=1, description="Deterministic sample of this many rows.")
    max_eval_rows: int | None = Field(None, ge=1, description="Cap on evaluation rows.")
    teacher: TeacherSpec | None = Field(None, description="Label the rows without a label with this model first.")

    @model_validator(mode="after")
    def _one_eval_source(self) -> DatasetSpec:
        if self.eval_uri and "eval_split" in self.model_fields_set:
            raise ValueError("evalSplit: set either evalSplit or evalUri, not both")
        return self

    @model_validator(mode="after")
    def _teacher_task(self) -> DatasetSpec:
        if self.teacher and self.task not in TEACHER_TASKS:
            raise ValueError(f"teacher: labels tasks {', '.join(TEACHER_TASKS)}; not {self.task!r}")
        return self


class LoraSpec(KubeModel):
    """The LoRA adapter's shape (PEFT LoraConfig)."""

    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(32, gt=0, le=4096)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1)


class TrainingSpec(KubeModel):
    """Optimisation settings (Hugging Face TrainingArguments names, camelCase)."""

    epochs: float = Field(1, gt=0, le=100)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(4, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_seq_length: int = Field(512, ge=16, le=131072)
    packing: bool = True
    seed: int = Field(42, ge=0)
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "deepspeed_adam"] = "adamw_torch"
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    checkpoint_every_steps: int = Field(50, ge=1)
    gradient_checkpointing: bool = True
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    logging_steps: int = Field(10, ge=1)


Launcher = Literal["pytorchjob", "trainjob"]
LAUNCHERS: tuple[str, ...] = get_args(Launcher)


class DistributionSpec(KubeModel):
    """How the training job spreads training: workers x GPUs, DeepSpeed ZeRO stage, restarts."""

    launcher: Launcher | None = Field(
        None,
        description="The kind that runs the training pods: pytorchjob (Kubeflow Training Operator v1 "
        "PyTorchJob) or trainjob (Kubeflow Trainer v2 TrainJob). Default: the installation's choice.",
    )
    workers: int = Field(1, ge=1, le=512, description="Training pods (nodes), one torchrun each.")
    gpus_per_worker: int = Field(1, ge=0, le=16, description="0 trains on CPU.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    max_restarts: int = Field(
        3, ge=0, le=100,
        description="Times the training pods may be restarted after a failure (preemption, a lost node), "
        "each time resuming from the last checkpoint; per worker. 0: the first failure fails the job.",
    )


class SchedulingSpec(KubeModel):
    """Placement of the training pods on the GPU node pool."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    priority_class_name: DnsSubdomain | None = None


class EvaluationSpec(KubeModel):
    """Base-vs-adapter evaluation on the held-out split."""

    enabled: bool = True
    compare_with_base: bool = True
    metrics: list[str] = Field(default_factory=list, description="Empty: the task's default metrics.")
    max_samples: int | None = Field(200, ge=1)
    max_new_tokens: int = Field(16, ge=1, le=4096)
    batch_size: int = Field(16, ge=1, le=1024)
    select_checkpoint_by: str | None = Field(None, description="Pick the best checkpoint by this metric.")

    @model_validator(mode="after")
    def _known_metrics(self) -> EvaluationSpec:
        unknown = [m for m in [*self.metrics, self.select_checkpoint_by or "accuracy"] if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"metrics: unknown metric {unknown[0]!r}; known: {', '.join(METRIC_NAMES)}")
        return self


class OutputSpec(KubeModel):
    """Name and version of the published adapter."""

    adapter_name: DnsLabel | None = Field(None, description="Default: the job's name.")
    version: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9.-]{0,62}$", description="Default: 'v' + UTC timestamp at publish."
    )


class PromotionSpec(KubeModel):
    """Whether a new adapter is served: it must beat the base model on a metric by a margin."""

    enabled: bool = True
    metric: str = "accuracy"
    min_improvement: float = Field(0.0, ge=-1.0, le=1.0, description="Adapter minus base, at least.")

    @model_validator(mode="after")
    def _known_metric(self) -> PromotionSpec:
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"metric: unknown metric {self.metric!r}; known: {', '.join(METRIC_NAMES)}")
        return self


class ServingSpec(KubeModel):
    """Where the adapter is served once published."""

    enabled: bool = False
    inference_service: DnsLabel | None = Field(None, description="Default: tessera-<base model dir name>.")
    create_inference_service: bool = True
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)


class StoreSpec(KubeModel):
    """The artifact store root and the Secret holding its credentials (never inline credentials)."""

    uri: StoreUri = Field(".tessera/store", description="s3://bucket[/prefix] or a directory.")
    credentials_secret: DnsSubdomain | None = Field(
        None,
        description="Secret with S3_ENDPOINT, S3_USE_HTTPS, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_DEFAULT_REGION (KServe's storage convention).",
    )


class CostSpec(KubeModel):
    """Price used to turn device hours into the cost on the status and the model card."""

    price_per_device_hour: float = Field(0.0, ge=0.0)
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")


class FineTuneJobSpec(KubeModel):
    """What to train, on what, how, and where the result goes."""

    base_model: BaseModelSpec
    dataset: DatasetSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    distribution: DistributionSpec = Field(default_factory=DistributionSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    cost: CostSpec = Field(default_factory=CostSpec)

    @model_validator(mode="after")
    def _zero3_needs_unquantized_weights(self) -> FineTuneJobSpec:
        # ZeRO-3 shards parameters across ranks; bitsandbytes' quantized weights cannot be sharded.
        if self.distribution.zero_stage == 3 and self.base_model.quantization.bits is not None:
            raise ValueError(
                "distribution.zeroStage: stage 3 cannot shard a 4-bit or 8-bit base; use stage 2, "
                "or set spec.baseModel.quantization.bits to null"
            )
        return self

    @model_validator(mode="after")
    def _s3_needs_a_secret(self) -> FineTuneJobSpec:
        s3_fields = [
            path
            for path, uri in (
                ("baseModel.uri", self.base_model.uri),
                ("dataset.uri", self.dataset.uri),
                ("dataset.evalUri", self.dataset.eval_uri),
                ("store.uri", self.store.uri),
            )
            if uri and uri.startswith("s3://")
        ]
        if s3_fields and not self.store.credentials_secret:
            raise ValueError(
                f"store.credentialsSecret: required because spec.{s3_fields[0]} is an s3:// URI "
                "(name the Secret that holds the store credentials)"
            )
        return self


class Progress(KubeModel):
    percent: float = Field(0.0, ge=0.0, le=100.0)
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    eta_seconds: float | None = None


class JobMetrics(KubeModel):
    train_loss: float | None = None
    eval_loss: float | None = None
    adapter: dict[str, float] = Field(default_factory=dict)
    base: dict[str, float] = Field(default_factory=dict)


class ObjectRef(KubeModel):
    name: str
    uri: str | None = None


class JobError(KubeModel):
    code: str
    message: str


class Cost(KubeModel):
    amount: float = 0.0
    currency: str = "USD"


class FineTuneJobStatus(KubeModel):
    phase: Phase = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    progress: Progress | None = None
    metrics: JobMetrics | None = None
    checkpoints: list[str] = Field(default_factory=list)
    trained_tokens: int | None = None
    gpu_hours: float | None = None
    cost: Cost | None = None
    adapter_ref: ObjectRef | None = None
    workflow_ref: ObjectRef | None = None
    observed_generation: int | None = None
    spec_digest: str | None = Field(
        None, pattern=SHA256_HEX,
        description="sha256 of the frozen spec (the job's ConfigMap) recorded at submission; the operator "
        "reads the ConfigMap only while it matches.")
    error: JobError | None = None
    start_time: str | None = None
    completion_time: str | None = None


class FineTuneJob(KubeResource):
    """A request to turn a dataset into an evaluated, published LoRA adapter."""

    api_version: Literal["tessera.dev/v1alpha1"] = API_VERSION
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @property
    def adapter_name(self) -> str:
        return self.spec.output.adapter_name or self.metadata.name
