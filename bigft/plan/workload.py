"""What is being planned: one training step of one model, method, layout and batch.

`Workload` is the single input of both estimators (analytic and simulated). The rules that
turn user choices into dtypes live here, once, so both estimators agree on them:

- `model.dtype: auto` (bigft.model.load.load_dtype) loads what stays frozen in the compute
  dtype under mixed precision and keeps what trains in fp32: full fine-tuning keeps fp32
  master weights; freeze keeps its frozen layers in bf16 and its trainable ones in fp32;
  lora / dora keep a bf16 base and fp32 adapters (peft's default upcast); qlora stores the
  base linears in NF4 with double quantization and the rest in its compute dtype (bf16).
  An explicit model.dtype sets every stored weight (adapters stay fp32).
- With DDP (or one GPU) the step runs under bf16 autocast: fp32 weights get bf16 copies,
  fp32 inputs are cast per linear. DeepSpeed ZeRO and FSDP2 compute on bf16 copies of
  the weights (fp32 master weights live in the optimizer / the sharded parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bigft.errors import ConfigError
from bigft.plan.arch import LINEARS, ArchSpec

METHODS = ("full", "freeze", "lora", "dora", "qlora")
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "zero3-offload", "fsdp2")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd")
# Spellings accepted for the optimizer (bitsandbytes' class names without underscores).
OPTIMIZER_ALIASES = {"adamw8bit": "adamw_8bit", "paged_adamw8bit": "paged_adamw_8bit"}
ATTENTION = ("sdpa", "flash_attention_2", "eager")
LOSS_IMPLS = ("auto", "chunked", "full", "liger")
# bigft.chunked_loss.LOGIT_TRANSFORMS (the planner does not import torch): models that
# rescale or cap their logits after the lm_head call keep the full loss.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Layouts bigft cannot run, with the reason shown to the user.
UNSUPPORTED = {
    ("qlora", "zero3-offload"): "ZeRO-3 parameter offload cannot move bitsandbytes 4-bit "
    "weights to the CPU",
}


@dataclass(frozen=True)
class Workload:
    """One training step on one GPU of a layout: everything that decides its memory."""

    arch: ArchSpec
    method: str = "full"
    strategy: str = "ddp"
    gpus_per_node: int = 1
    nodes: int = 1
    seq_len: int = 2048
    micro_batch: int = 1
    grad_ckpt: bool = False
    ckpt_every: int = 1  # checkpoint decoder layers 0, k, 2k, ... (transformers' every_n_layers)
    precision: str = "bf16"  # compute precision: bf16 / fp16 autocast, or fp32
    weight_dtype: str = "auto"  # model.dtype; auto follows the rules in the module docstring
    optimizer: str = "adamw"
    lora_rank: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LINEARS
    trainable_layers: int | None = None  # freeze: top layers that train (default: a quarter)
    freeze_embeddings: bool = True  # freeze: embeddings frozen too
    attn: str = "sdpa"
    reduce_bucket: int | None = None  # ZeRO reduce bucket (elements); None: hidden^2
    device: str = "cuda"  # "cpu" for CPU runs (the validation measures there)
    loss_impl: str = "auto"  # train.loss_impl; resolved by `loss_path`
    loss_chunk: int = 256  # train.loss_chunk: token positions per chunk of the chunked loss
    offload_activations: bool = False  # method.offload_activations: ckpt inputs to host memory
    tiled_mlp: bool = False  # method.tiled_mlp: each MLP runs over the sequence in tiles
    tiled_mlp_shards: int | None = None  # method.tiled_mlp_shards; None: ceil(tokens / hidden)
    compile: bool = False  # train.compile: no memory change assumed (none measured)
    reference_copy: bool = False  # task preference, full FT: a frozen reference model

    def __post_init__(self) -> None:
        if self.optimizer in OPTIMIZER_ALIASES:
            object.__setattr__(self, "optimizer", OPTIMIZER_ALIASES[self.optimizer])
        checks = {
            "method": (self.method, METHODS),
            "strategy": (self.strategy, STRATEGIES),
            "optimizer": (self.optimizer, OPTIMIZERS),
            "attention": (self.attn, ATTENTION),
            "precision": (self.precision, tuple(DTYPE_BYTES)),
            "loss_impl": (self.loss_impl, LOSS_IMPLS),
        }
        for what, (value, allowed) in checks.items():
            if value not in allowed:
                raise ConfigError(f"unknown {what} '{value}'; choose one of {', '.join(allowed)}")
        for name, size in (("seq_len", self.seq_len), ("micro_batch", self.micro_batch)):
            if size < 1:
                raise ConfigError(f"{name} must be >= 1 (got {size})")
        if self.loss_chunk < 1:
            raise ConfigError(f"loss_chunk must be >= 1 (got {self.loss_chunk})")
        if self.loss_impl in ("chunked", "liger") and self.logit_transform:
            raise ConfigError(
                f"loss_impl {self.loss_impl} cannot apply: {self.arch.name} sets "
                f"{self.logit_transform} (use auto or full)"
            )
        if self.offload_activations and not self.grad_ckpt:
            raise ConfigError(
                "offload_activations moves checkpointed layer inputs: it needs gradient "
                "checkpointing (--grad-ckpt)"
            )
        if self.tiled_mlp_shards is not None and (self.tiled_mlp_shards < 1 or not self.tiled_mlp):
            raise ConfigError("tiled_mlp_shards needs tiled_mlp and a value >= 1")
        if self.ckpt_every < 1:
            raise ConfigError(f"checkpoint every k layers needs k >= 1 (got {self.ckpt_every})")
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise ConfigError("--gpus-per-node and --nodes must be >= 1")
        bad = [t for t in self.lora_targets if t not in LINEARS]
        if bad and self.adapters:
            raise ConfigError(f"LoRA target(s) {bad} unknown; valid: {', '.join(LINEARS)}")

    # ---- layout -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def adapters(self) -> bool:
        return self.method in ("lora", "dora", "qlora")

    @property
    def zero_stage(self) -> int:
        """0 for DDP, 1-3 for DeepSpeed ZeRO, 3 for FSDP2 (it shards like ZeRO-3)."""
        if self.strategy.startswith("zero"):
            return int(self.strategy[4])
        return 3 if self.strategy == "fsdp2" else 0

    @property
    def sharded_engine(self) -> bool:
        """DeepSpeed and FSDP2 compute on bf16 weight copies instead of autocasting."""
        return self.strategy != "ddp"

    @property
    def logit_transform(self) -> str | None:
        """The config key with which the model rescales or caps its logits, if any."""
        cfg = {**self.arch.hf_config, "final_logit_softcapping": self.arch.logit_softcap}
        return next((k for k in LOGIT_TRANSFORMS if cfg.get(k) is not None), None)

    @property
    def loss_path(self) -> str:
        """The loss bigft.chunked_loss.prepare_loss installs: 'auto' is chunked unless the
        model transforms its logits after the lm_head call. A sequence head's logits are a
        few per position: its loss is the plain one."""
        if self.arch.num_labels is not None:
            return "full"
        if self.loss_impl == "auto":
            return "full" if self.logit_transform else "chunked"
        return self.loss_impl

    @property
    def loss_rows(self) -> int:
        """Token positions whose logits exist at once: the whole micro-batch on the full
        path, one chunk on the chunked one; liger picks chunks of about B x L x hidden
        logits elements (its fused_linear_cross_entropy_forward)."""
        n = self.micro_batch * self.seq_len
        if self.loss_path == "full":
            return n
        if self.loss_path == "chunked":
            return min(self.loss_chunk, n)
        per_chunk = -(-n // -(-self.arch.vocab // self.arch.hidden))
        return min(1 << (per_chunk - 1).bit_length(), n)

    @property
    def mlp_tiles(self) -> int:
        """Tiles each MLP call runs in (bigft.model.tiled_mlp.TiledForward.tiles): 1
        without tiled_mlp; at most one per position."""
        if not self.tiled_mlp:
            return 1
        wanted = self.tiled_mlp_shards or -(-self.micro_batch * self.seq_len // self.arch.hidden)
        return max(1, min(wanted, self.seq_len))

    @property
    def mlp_tile_fraction(self) -> float:
        """The share of the micro-batch's tokens in one MLP tile (the largest tile)."""
        return -(-self.seq_len // self.mlp_tiles) / self.seq_len

    def with_(self, **changes: Any) -> Workload:
        return replace(self, **changes)

    # ---- dtypes -------------------------------------------------------------------------
    @property
    def compute_bytes(self) -> int:
        """Bytes of the dtype matmuls run in: bf16 weights or autocast make it 2."""
        return 2 if self.base_weight_bytes == 2 or self.autocast else 4

    @property
    def frozen_weight_bytes(self) -> float:
        """Bytes per stored frozen weight (qlora: per weight that is not 4-bit), as
        bigft.model.load.load_dtype loads it: model.dtype when set; with 'auto' the compute
        dtype for lora / dora / freeze under mixed precision and for qlora (its
        compute_dtype, bf16 unless workload_from_config passes another), fp32 otherwise.
        For full fine-tuning every weight trains: the same as `trainable_weight_bytes`."""
        if self.sharded_engine and self.precision != "fp32":
            return 2.0  # the engine's bf16 copy; its fp32 master is optimizer state
        if self.weight_dtype != "auto":
            return DTYPE_BYTES[self.weight_dtype]
        if self.method == "qlora":
            return 2.0
        if self.method != "full" and self.precision != "fp32":
            return DTYPE_BYTES[self.precision]
        return 4.0

    @property
    def stored_frozen_bytes(self) -> float:
        """Bytes per frozen weight as stored between steps: `frozen_weight_bytes`, except
        under FSDP2, which keeps frozen weights in the dtype they were loaded in (an
        explicit model.dtype) and computes on bf16 copies of the layers it unshards;
        DeepSpeed's bf16 engine casts the whole module."""
        if self.strategy == "fsdp2" and self.weight_dtype != "auto":
            return DTYPE_BYTES[self.weight_dtype]
        return self.frozen_weight_bytes

    @property
    def trainable_weight_bytes(self) -> float:
        """Bytes per trainable weight held by the module: the adapters' (`adapter_bytes`);
        for full / freeze fp32 master weights with 'auto' under autocast, the engine's bf16
        copy under DeepSpeed / FSDP2 mixed precision, else model.dtype."""
        if self.adapters:
            return self.adapter_bytes
        if self.sharded_engine and self.precision != "fp32":
            return 2.0
        if self.weight_dtype != "auto":
            return DTYPE_BYTES[self.weight_dtype]
        return 4.0

    @property
    def base_weight_bytes(self) -> float:
        """Bytes of the weights the layers compute with: the frozen base under adapters;
        for full / freeze the trainable weights (their layers set the activations)."""
        return self.frozen_weight_bytes if self.adapters else self.trainable_weight_bytes

    @property
    def embeddings_train(self) -> bool:
        return self.method == "full" or (self.method == "freeze" and not self.freeze_embeddings)

    @property
    def autocast(self) -> bool:
        """Accelerate wraps forward in autocast for mixed precision, except under DeepSpeed,
        whose bf16 engine runs the module itself in bf16."""
        return self.precision != "fp32" and not self.strategy.startswith("zero")

    @property
    def adapter_bytes(self) -> int:
        """LoRA weights: fp32 (peft upcasts them), bf16 inside a DeepSpeed bf16 engine."""
        return 2 if self.strategy.startswith("zero") and self.precision != "fp32" else 4

    @property
    def residual_bytes(self) -> int:
        """The residual stream's dtype: the embeddings' output dtype (adding bf16 linear
        outputs to an fp32 stream keeps it fp32), else the compute dtype."""
        embed = self.trainable_weight_bytes if self.embeddings_train else self.frozen_weight_bytes
        return 4 if embed == 4 else self.compute_bytes

    # ---- parameter counts ---------------------------------------------------------------
    @property
    def n_trainable_layers(self) -> int:
        if self.method != "freeze":
            return self.arch.layers
        if self.trainable_layers is not None:
            return min(self.trainable_layers, self.arch.layers)
        return max(1, -(-self.arch.layers // 4))

    @property
    def n_active_layers(self) -> int:
        """Layers that keep activations: all of them unless freezing cuts the graph."""
        if self.method == "freeze" and self.freeze_embeddings:
            return self.n_trainable_layers
        return self.arch.layers

    @property
    def n_ckpt_layers(self) -> int:
        """Checkpointed layers among the active ones (every k-th, from layer 0)."""
        if not self.grad_ckpt:
            return 0
        first = self.arch.layers - self.n_active_layers
        return sum(1 for i in range(first, self.arch.layers) if i % self.ckpt_every == 0)

    def adapter_params_per_layer(self) -> int:
        shapes = self.arch.linear_shapes()
        count = sum(self.lora_rank * (shapes[t][0] + shapes[t][1]) for t in self.lora_targets)
        if self.method == "dora":
            count += sum(shapes[t][1] for t in self.lora_targets)  # magnitude vectors
        return count

    @property
    def trainable_params(self) -> int:
        """Parameters that get gradients and optimizer states."""
        a = self.arch
        if self.adapters:
            # peft trains a sequence head whole (modules_to_save): a copy beside the base's.
            head = a.head_params if a.num_labels is not None else 0
            return a.layers * self.adapter_params_per_layer() + head
        if self.method == "freeze":
            head = a.head_params or a.embed_params
            embed = 0 if self.freeze_embeddings or a.tie_embeddings else a.embed_params
            return self.n_trainable_layers * a.layer_params + a.hidden + head + embed
        return a.n_params

    def base_param_bytes(self) -> float:
        """Stored bytes of the base model on one GPU before any sharding, every weight
        counted as frozen (`memory.model_states` re-prices the trainable ones)."""
        a, frozen = self.arch, self.stored_frozen_bytes
        if self.method != "qlora":
            return a.n_params * frozen
        quantized = a.layers * a.layer_linear_params
        return quantized * NF4_BYTES_PER_PARAM + (a.n_params - quantized) * frozen


# NF4 with double quantization (QLoRA paper, section 3): 4 bits per weight, an 8-bit
# absmax per 64 weights, and an fp32 second-level constant per 256 absmax blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
