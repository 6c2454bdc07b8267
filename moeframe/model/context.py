"""The forward context: what the decoder knows about the current forward pass, handed to every
model-part plugin (attention, router, experts, norm, residual) of plugin API 2.

Why one object: ideas that cross a component boundary need information the hidden states do not
carry. DeepSeek-V4 routes its first layers by token id (a hash table per layer), an attention
variant may depend on the layer's index, a router may anneal with the training step. Passing each
item as its own argument would change every signature whenever a plugin needs one more; one typed
object that grows by fields keeps the signatures stable. Nothing is global: the decoder builds the
context per forward from its arguments and narrows it per block (``for_layer``).

What each field holds (shapes as in ``moeframe.model.base``):

- ``layer_id``: the block's index (MTP blocks continue after the last layer); None outside the
  blocks (the final norm).
- ``token_ids_BT``: the token ids whose embeddings enter this block. For MTP depth k these are the
  ids k positions ahead (the ones the MTP block embeds), so ``token_ids_BT[:, t]`` always belongs to
  the row the block computes at ``t``. While decoding with a cache, only the new tokens.
- ``positions_T``: the positions of the T tokens (``cache.length ...`` while decoding).
- ``document_ids_BT``: packed-document ids, or None (never given while decoding).
- ``cache``: this block's attention cache while decoding incrementally, else None (``decoding``).
- ``step``: optimizer steps done so far; ``tokens_seen``: training tokens consumed so far (both 0
  outside training). Plain ints: under ``compile: block`` a plugin that reads them makes dynamo
  guard on them (one recompile, then they are treated as dynamic).

Routers and experts see flat tokens ``x_TD`` (the batch flattened, B·T rows); ``token_ids_BT.flatten()``
lines up with those rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from moeframe.registry import declared_plugin_api

__all__ = ["ForwardContext", "uses_context"]


@dataclass(frozen=True)
class ForwardContext:
    """Everything a model-part plugin may need beyond its input tensor (see the module docstring)."""

    positions_T: torch.Tensor
    token_ids_BT: torch.Tensor | None = None
    document_ids_BT: torch.Tensor | None = None
    layer_id: int | None = None
    cache: Any | None = None  # an AttentionCache (typed loosely: base.py imports this module)
    step: int = 0
    tokens_seen: int = 0

    @property
    def decoding(self) -> bool:
        """True while decoding incrementally with a KV cache."""
        return self.cache is not None

    @property
    def seq_len(self) -> int:
        """Tokens per sequence in this forward (T); routers use it to regroup flat ``x_TD``."""
        return int(self.positions_T.shape[0])

    def for_layer(self, layer_id: int | None, cache: Any | None = None) -> ForwardContext:
        """The same forward seen from one block: its index and its own cache."""
        return dataclasses.replace(self, layer_id=layer_id, cache=cache)

    def shifted(self, k: int) -> ForwardContext:
        """The context of MTP depth k: the first T-k positions, the ids of the tokens k ahead."""
        T = self.seq_len
        ids = None if self.token_ids_BT is None else self.token_ids_BT[:, k:]
        docs = None if self.document_ids_BT is None else self.document_ids_BT[:, : T - k]
        return dataclasses.replace(self, positions_T=self.positions_T[: T - k], token_ids_BT=ids, document_ids_BT=docs)


def uses_context(plugin: object) -> bool:
    """Whether a plugin instance is written for plugin API 2 (takes the context).

    API-1 plugins (``plugin_api = "1"`` or nothing declared) keep their old signatures for this
    release; the decoder calls them the old way (see ``moeframe.model.compat``)."""
    return declared_plugin_api(type(plugin)) != "1"
