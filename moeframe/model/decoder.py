"""Decoder assembly: embedding → blocks → final norm → output head.

Every block has two sublayers, ``attn(attn_norm(.))`` and ``ffn(ffn_norm(.))``, where ``ffn`` is a
dense SwiGLU for the first ``first_k_dense`` layers and a MoE layer afterwards; the block's residual
plugin connects them (the default ``prenorm``: ``h = x + attn(norm(x))``, ``out = h + ffn(norm(h))``).
Which attention, router, experts, norm and residual each block uses is decided by the registry and
the per-layer choices of the config (see ``moeframe.config``). Every plugin of API 2 also receives
the forward context (``moeframe.model.context``) that the decoder builds per forward and narrows
per block.

Build on the meta device (``build_decoder(cfg, device="meta")``) to inspect any size without
allocating, then ``materialize`` on a real device, which initialises every weight.

Generation: ``cache = decoder.new_cache(batch_size, max_len)`` holds one attention cache per
layer; ``decoder(ids, cache=cache)`` processes only the new tokens (a whole prompt, then one
token at a time) at the positions that follow the cached ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moeframe.compat import capture_scalar_outputs
from moeframe.config import ModelConfig, ModelPlan, resolve_model_config
from moeframe.model.base import AttentionCache, NormBase, ResidualBase, RouterBase, default_init
from moeframe.model.compat import build_attention, build_norm, call_attention, call_norm
from moeframe.model.context import ForwardContext
from moeframe.model.ffn import SwiGLU
from moeframe.model.moe import MoE
from moeframe.model.recompute import activation_checkpoint

CheckpointMode = Literal["none", "full", "selective"]
CompileMode = Literal["off", "block"]
CHECKPOINT_MODES: tuple[str, ...] = get_args(CheckpointMode)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


@dataclass
class DecoderOutput:
    """``logits`` [B, T, V]; ``aux_loss``: sum of the plugins' balance losses and of their named
    training losses (0 when none); ``aux_losses``: the same per layer name (``layer3``; a named
    loss as ``layer3.indexer_kl``), for logging; ``mtp_logits``: with ``mtp=True``, one
    [B, T - k, V] tensor per MTP depth k = 1..D, position i predicting token i + k + 1;
    ``named_losses``: the attention plugins' training losses (``AttentionBase.take_training_losses``)
    summed over layers, by name, for logging."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    named_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class DecoderCache:
    """One attention cache per layer; the next tokens go at position ``length``."""

    def __init__(self, layers: list[AttentionCache]) -> None:
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    def nbytes(self) -> int:
        """Bytes held by every layer's cache, measured on the tensors."""
        return sum(layer.nbytes() for layer in self.layers)


class Block(nn.Module):
    """One transformer block: ``forward(h, ctx) -> (h, aux_loss)``; ``h`` is the residual plugin's
    state ([B, T, D] for one stream)."""

    def __init__(self, plan: ModelPlan, layer_id: int) -> None:
        super().__init__()
        cfg = plan.config
        layer = plan.layer(layer_id)
        self.layer_id = layer_id
        self.attn_norm = build_norm(layer.norm, cfg, layer_id)
        self.attn = build_attention(layer.attention, cfg, layer_id)
        self.ffn_norm = build_norm(layer.norm, cfg, layer_id)
        self.ffn: SwiGLU | MoE = (
            SwiGLU(cfg.dim, cfg.dense_ffn_dim) if layer_id < cfg.first_k_dense else MoE(plan, layer_id)
        )
        # a parameter-free residual (prenorm) adds no state-dict entries: checkpoints are unchanged
        self.residual: ResidualBase = layer.residual.cls(cfg, layer.residual.options, layer_id)
        self.checkpointing: CheckpointMode = "none"
        self.compiled = False

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``nn.Module.compile``; every call of the compiled block then traces with scalars read
        from tensors kept in the graph (``compat.capture_scalar_outputs``): expert parallelism's
        all-to-all split sizes come from the routing, and reading them must not split the block's
        graph. Scoped to the block's calls, not set for the process."""
        super().compile(*args, **kwargs)
        self.compiled = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.compiled:
            return super().__call__(*args, **kwargs)
        with capture_scalar_outputs():
            return super().__call__(*args, **kwargs)

    def set_activation_checkpointing(self, mode: CheckpointMode) -> None:
        """``none``; ``full``: keep only the block's input, recompute the whole block in backward;
        ``selective``: recompute only what is cheap to redo and wide to keep: the SwiGLU FFNs (dense,
        shared and routed experts) and the attention's up-projections where the plugin has them
        (MLA's ``wq_b``/``wkv_b``). Router, dispatch and the attention core are kept."""
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"activation checkpointing must be one of {', '.join(CHECKPOINT_MODES)}, got {mode!r}")
        self.checkpointing = mode
        selective = mode == "selective"
        if isinstance(self.ffn, MoE):
            self.ffn.recompute_shared = selective
            self.ffn.experts.set_selective_recompute(selective)  # declared hooks of the plugin bases
        self.attn.set_selective_recompute(selective)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ctx`` is this block's context (``ForwardContext.for_layer``: its layer id and cache)."""
        if self.checkpointing == "full" and ctx.cache is None and torch.is_grad_enabled():
            return activation_checkpoint(self._forward, h, ctx)
        return self._forward(h, ctx)

    def _forward(self, h: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        aux_losses: list[torch.Tensor | None] = []

        def attention(x_BTD: torch.Tensor) -> torch.Tensor:
            return call_attention(self.attn, call_norm(self.attn_norm, x_BTD, ctx), ctx)

        def ffn(x_BTD: torch.Tensor) -> torch.Tensor:
            a_BTD = call_norm(self.ffn_norm, x_BTD, ctx)
            if isinstance(self.ffn, MoE):
                y_BTD, aux_loss = self.ffn(a_BTD, ctx)
                aux_losses.append(aux_loss)
                return y_BTD
            if self.checkpointing == "selective" and torch.is_grad_enabled():
                return activation_checkpoint(self.ffn, a_BTD)
            return self.ffn(a_BTD)

        h = self.residual(h, attention, ffn, ctx)
        return h, (aux_losses[-1] if aux_losses else None)


def _take_training_losses(block: Block, where: str, aux_losses: dict[str, torch.Tensor]) -> None:
    """The block attention's training losses of this forward, as ``<where>.<name>``."""
    for name, loss in block.attn.take_training_losses().items():
        aux_losses[f"{where}.{name}"] = loss


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 §2.2).

    ``h'_i = Block(eh_proj([RMSNorm(Emb(t_{i+k})); RMSNorm(h_i)]))``: the embedding half comes
    first, as in the released checkpoints. The embedding and output head are the main model's;
    ``norm`` is this depth's own final norm (``shared_head.norm`` in HF checkpoints).
    """

    def __init__(self, plan: ModelPlan, layer_id: int) -> None:
        super().__init__()
        cfg = plan.config
        self.enorm = build_norm(plan.norm, cfg, None)
        self.hnorm = build_norm(plan.norm, cfg, None)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(plan, layer_id)  # dense or MoE by layer index, like the main layers
        self.norm = build_norm(plan.norm, cfg, None)

    def forward(
        self, carry: torch.Tensor, emb_BTD: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden state [B, T, D] for this depth's logits, what the next depth receives, balance
        loss). ``carry``: what the previous block's residual passes on (``ResidualBase.mtp_carry``;
        the default residual: h_{k-1} [B, T, D]); the block's residual decides how it enters
        (``ResidualBase.mtp_input``). ``ctx``: this depth's context (``ForwardContext.shifted``
        then ``for_layer``)."""
        outside = ctx.for_layer(None)  # these norms belong to no block

        def combine(e: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            return self.eh_proj(
                torch.cat([call_norm(self.enorm, e, outside), call_norm(self.hnorm, hidden, outside)], -1)
            )

        residual = self.block.residual
        h, aux = self.block(residual.mtp_input(carry, emb_BTD, combine, ctx), ctx)
        x_BTD = residual.reduce(h, ctx)
        return x_BTD, residual.mtp_carry(h, x_BTD, ctx), aux


class Decoder(nn.Module):
    """A DeepSeek-style MoE language model. ``forward(input_ids [B, T]) -> DecoderOutput``.

    ``forward(input_ids, cache=decoder.new_cache(B, max_len))`` decodes incrementally."""

    def __init__(self, config: ModelConfig, plan: ModelPlan | None = None) -> None:
        super().__init__()
        plan = plan or resolve_model_config(config)
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(plan, i) for i in range(config.n_layers))
        self.norm = build_norm(plan.norm, config, None)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPModule(plan, config.n_layers + k) for k in range(config.mtp_depth))

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer; deterministic under ``torch.manual_seed``
        and independent of how the decoder was built (see ``init_random_stream``)."""
        std = self.config.init_std
        with init_random_stream():
            for module in self.modules():
                custom = getattr(module, "init_weights", None)
                if module is not self and callable(custom):
                    custom(std)
                else:
                    default_init(module, std)

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> DecoderCache:
        """Empty caches for ``batch_size`` sequences of up to ``max_len`` tokens (default
        model.max_seq_len), on the device and in the dtype of the weights unless given."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={self.config.max_seq_len}")
        device = torch.device(device) if device is not None else self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return DecoderCache([block.attn.new_cache(batch_size, max_len, device, dtype) for block in self.layers])

    def _positions(
        self,
        T: int,
        device: torch.device,
        positions_T: torch.Tensor | None,
        document_ids_BT: torch.Tensor | None,
        cache: DecoderCache | None,
    ) -> torch.Tensor:
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.config.max_seq_len}")
            return torch.arange(T, device=device) if positions_T is None else positions_T
        if positions_T is not None or document_ids_BT is not None:
            raise ValueError(
                "with a cache, positions come from the cache and documents cannot be packed: "
                "pass neither positions_T nor document_ids_BT"
            )
        return torch.arange(cache.length, cache.length + T, device=device)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        document_ids_BT: torch.Tensor | None = None,
        positions_T: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
        mtp: bool = False,
        step: int = 0,
        tokens_seen: int = 0,
    ) -> DecoderOutput:
        """``mtp=True`` also runs the MTP modules (training); generation leaves them out.
        ``step``/``tokens_seen``: the training progress the plugins see in their context.

        The same as ``begin`` → ``run_layers(0, n_layers)`` → ``finish``: a pipeline strategy calls
        those parts on the stage that holds them."""
        ctx = self.context(input_ids_BT, document_ids_BT, positions_T, cache, step, tokens_seen)
        aux_losses: dict[str, torch.Tensor] = {}
        emb_BTD, h = self.begin(ctx)
        h = self.run_layers(h, ctx, 0, len(self.layers), aux_losses, cache)
        return self.finish(h, ctx, aux_losses, mtp=mtp and cache is None, emb_BTD=emb_BTD)

    # -- the parts of a forward, for strategies that place them on different ranks (pipelining) ----
    def context(
        self,
        input_ids_BT: torch.Tensor,
        document_ids_BT: torch.Tensor | None = None,
        positions_T: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
        step: int = 0,
        tokens_seen: int = 0,
    ) -> ForwardContext:
        """The forward context of a whole-model forward over ``input_ids_BT`` [B, T]."""
        T = input_ids_BT.shape[1]
        positions_T = self._positions(T, input_ids_BT.device, positions_T, document_ids_BT, cache)
        return ForwardContext(positions_T, input_ids_BT, document_ids_BT, step=step, tokens_seen=tokens_seen)

    def begin(self, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeddings [B, T, D], the first block's residual state)."""
        emb_BTD = self.embed(ctx.token_ids_BT)
        return emb_BTD, self.layers[0].residual.expand(emb_BTD, ctx.for_layer(0))

    def run_layers(
        self,
        h: torch.Tensor,
        ctx: ForwardContext,
        start: int,
        stop: int,
        aux_losses: dict[str, torch.Tensor],
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """Blocks ``layers[start:stop]`` on the residual state ``h``; their balance losses go into
        ``aux_losses`` under ``layer<i>``, their attention's training losses under ``layer<i>.<name>``."""
        for i in range(start, stop):
            block = self.layers[i]
            h, aux = block(h, ctx.for_layer(block.layer_id, None if cache is None else cache.layers[i]))
            if aux is not None:
                aux_losses[f"layer{block.layer_id}"] = aux
            _take_training_losses(block, f"layer{block.layer_id}", aux_losses)
        return h

    def finish(
        self,
        h: torch.Tensor,
        ctx: ForwardContext,
        aux_losses: dict[str, torch.Tensor],
        mtp: bool = False,
        emb_BTD: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Final norm, head and (``mtp``) the MTP modules after the last block; ``emb_BTD`` is looked
        up again from the context's token ids when not given (a last pipeline stage)."""
        last, last_ctx = self.layers[-1].residual, ctx.for_layer(self.layers[-1].layer_id)
        x_BTD = last.reduce(h, last_ctx)
        logits_BTV = self.head(call_norm(self.norm, x_BTD, ctx))
        mtp_logits: list[torch.Tensor] = []
        if mtp:
            emb_BTD = self.embed(ctx.token_ids_BT) if emb_BTD is None else emb_BTD
            mtp_logits = self._mtp(last.mtp_carry(h, x_BTD, last_ctx), emb_BTD, ctx, aux_losses)
        aux_loss = sum(aux_losses.values(), torch.zeros((), device=logits_BTV.device))
        named: dict[str, torch.Tensor] = {}
        for key, loss in aux_losses.items():  # "layer3.indexer_kl" -> "indexer_kl", summed over layers
            if "." in key:
                name = key.split(".", 1)[1]
                named[name] = named[name] + loss if name in named else loss
        return DecoderOutput(logits_BTV, aux_loss, aux_losses, mtp_logits, named)

    def _mtp(
        self, carry: torch.Tensor, emb_BTD: torch.Tensor, ctx: ForwardContext, aux_losses: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """Depth k sees h_{k-1} (as the residual carries it: ``carry`` [B, T, ...]) at positions
        0..T-1-k and the embedding of the token k ahead."""
        T, out = emb_BTD.shape[1], []
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            depth_ctx = ctx.shifted(k).for_layer(module.block.layer_id)
            h_BTD, carry, aux = module(carry[:, : T - k], emb_BTD[:, k:], depth_ctx)
            if aux is not None:
                aux_losses[f"mtp{k}"] = aux
            _take_training_losses(module.block, f"mtp{k}", aux_losses)
            out.append(self.head(call_norm(module.norm, h_BTD, depth_ctx.for_layer(None))))
        return out

    def blocks(self) -> list[Block]:
        """Every transformer block: the main layers, then each MTP module's block."""
        return [*self.layers, *(m.block for m in self.mtp)]

    def configure_runtime(
        self,
        activation_checkpointing: CheckpointMode = "none",
        checkpoint_layers: list[int] | None = None,
        compile: CompileMode = "off",
    ) -> None:
        """Activation checkpointing and ``torch.compile``, per block; the results do not change.

        ``checkpoint_layers``: the layer ids to checkpoint (MTP blocks count on from n_layers);
        None = every block. ``compile="block"`` compiles each block on its own (``Module.compile``:
        parameter names stay as they are): blocks of one kind share a graph, so compile time does not
        grow with depth, and the embedding, head and loss stay eager."""
        blocks = self.blocks()
        ids = {b.layer_id for b in blocks}
        unknown = sorted(set(checkpoint_layers or ()) - ids)
        if unknown:
            raise ValueError(f"checkpoint_layers {unknown} are not layers of this model (layer ids 0..{max(ids)})")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        for block in blocks:
            chosen = checkpoint_layers is None or block.layer_id in checkpoint_layers
            block.set_activation_checkpointing(activation_checkpointing if chosen else "none")
        if compile == "block":
            for block in blocks:
                block.compile()

    def moe_layers(self) -> Iterator[tuple[str, MoE]]:
        return ((n, m) for n, m in self.named_modules() if isinstance(m, MoE))

    def high_precision_modules(self) -> list[str]:
        """Modules a low-precision plugin (FP8, bf16-true casts) must leave in full precision:
        embedding, output head, routers and norms (DeepSeek-V3 keeps them in BF16/FP32)."""
        keep = ["embed", "head"]
        keep += [n for n, m in self.named_modules() if isinstance(m, (RouterBase, NormBase, ResidualBase))]
        return keep


@contextmanager
def init_random_stream() -> Iterator[None]:
    """Draw initial weights from a stream restarted at the run's seed (``torch.initial_seed()``).

    A decoder built whole has already drawn random numbers in its constructors (``nn.Linear``'s
    own init), one built on the meta device has drawn none; restarting the stream makes both, and
    a sharded build initialised piece by piece in the same order, hold the same weights for the
    same seed, so ddp, fsdp2 and a single device start from one model. The caller's random state
    is restored afterwards, so initialising consumes nothing from it.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(torch.initial_seed())
        yield


def build_decoder(config: ModelConfig, device: str | torch.device | None = None) -> Decoder:
    """Validate ``config`` and build the decoder; on ``device="meta"`` nothing is allocated."""
    plan = resolve_model_config(config)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"), _NoInitOnMeta():
            return Decoder(config, plan)
    decoder = Decoder(config, plan)
    decoder.init_weights()
    return decoder.to(device) if device is not None else decoder


# in-place random fills that module constructors call (``reset_parameters``) as tensor methods
_TENSOR_FILLS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_})


class _NoInitOnMeta(TorchFunctionMode):
    """Skip weight initialisation of meta tensors while a decoder is built on the meta device.

    A meta tensor holds no values, so initialising it does nothing, but it is not free: torch runs
    a meta ``normal_``/``uniform_`` through its Python reference implementations, whose first call
    imports ``torch._dynamo`` (about 4 s, more than ``import torch`` itself), and ``moeframe
    inspect``/``convert`` build the decoder on the meta device only to count and name its tensors.
    ``materialize`` initialises every weight afterwards (``init_weights``), so nothing is lost."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        kwargs = kwargs or {}
        first = args[0] if args else kwargs.get("tensor")
        is_init = getattr(func, "__module__", None) == "torch.nn.init" or func in _TENSOR_FILLS
        if is_init and isinstance(first, torch.Tensor) and first.is_meta:
            return first
        return func(*args, **kwargs)


def materialize(decoder: Decoder, device: str | torch.device = "cpu") -> Decoder:
    """Allocate a meta-device decoder on ``device`` and initialise it."""
    decoder.to_empty(device=device)
    decoder.init_weights()
    return decoder


def kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the whole model's KV cache holds per token (every layer), from each layer's attention
    plugin's own count; nothing is built."""
    plan = resolve_model_config(config)
    values = 0
    for layer_id in range(config.n_layers):
        attention = plan.layer(layer_id).attention
        values += attention.cls.kv_cache_values_per_token(config, attention.options)
    return values * dtype.itemsize


def count_parameters(decoder: nn.Module) -> int:
    """Unique parameters (tied weights counted once); works on the meta device."""
    return sum(p.numel() for p in decoder.parameters())
