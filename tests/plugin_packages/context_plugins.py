"""A third-party plugin package written against plugin API 2, for the tests: installed by
``tests/test_context.py`` as the distribution ``moeframe-context-plugins`` (a ``.dist-info`` with
entry points beside this module), so the registry finds it like any pip-installed package.

- router ``token_hash``: DeepSeek-V4's hash routing. Each layer owns a fixed table from token id
  to K distinct experts (drawn from the layer index, so layers differ); the gate weights are the
  learned sigmoid affinities of those experts, normalised. It needs the token ids, which only
  the forward context carries, and its layer index, which only API 2 hands the constructor.
- residual ``two_stream``: a two-stream residual in the manner of hyper-connections: the
  sublayers read a learned mix of the streams and write into each stream with a learned scale;
  the streams are mixed by a Sinkhorn-normalised (doubly stochastic) 2x2 matrix per sublayer.
  ``reduce`` averages the streams with learned weights held by the last layer.

Shapes: S streams (2), other letters as in ``moeframe.model.base``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import ForwardContext, PluginOptions, ResidualBase, RouterBase, RouterOutput


@dataclass
class TokenHashOptions(PluginOptions):
    """``seed``: added to the layer index to draw the layer's table."""

    seed: int = 0


class TokenHashRouter(RouterBase):
    Options = TokenHashOptions
    plugin_api = "2"

    def __init__(self, config, options: TokenHashOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.table_seed = options.seed + layer_id
        self.top_k = config.n_activated_experts
        self.num_experts = config.n_routed_experts
        self.route_scale = config.route_scale
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))
        self.register_buffer("tid2eid", torch.empty(config.vocab_size, config.n_activated_experts, dtype=torch.int64))

    def init_weights(self, std: float) -> None:
        with torch.no_grad():
            nn.init.normal_(self.weight, mean=0.0, std=std)
            g = torch.Generator().manual_seed(self.table_seed)
            table = torch.rand(self.tid2eid.shape[0], self.num_experts, generator=g).argsort(-1)[:, : self.top_k]
            self.tid2eid.copy_(table)

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext) -> RouterOutput:
        if ctx is None or ctx.token_ids_BT is None:
            raise ValueError("router token_hash routes by token id: it needs ctx.token_ids_BT")
        indices_TK = self.tid2eid[ctx.token_ids_BT.flatten()]
        with torch.autocast(x_TD.device.type, enabled=False):  # gate weights in fp32, also under autocast
            scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()
        weights_TK = scores_TE.gather(1, indices_TK)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_TD.device)
        counts_E.scatter_add_(0, indices_TK.flatten(), torch.ones_like(indices_TK.flatten()))
        return RouterOutput(weights_TK * self.route_scale, indices_TK, counts_E)


@dataclass
class TwoStreamOptions(PluginOptions):
    """``sinkhorn_iters``: normalisation rounds of the stream-mixing matrices."""

    sinkhorn_iters: int = 3


def sinkhorn(logits_SS: torch.Tensor, iters: int) -> torch.Tensor:
    """A doubly stochastic matrix from logits (rows and columns alternately normalised)."""
    m_SS = logits_SS.exp()
    for _ in range(iters):
        m_SS = m_SS / m_SS.sum(dim=1, keepdim=True)
        m_SS = m_SS / m_SS.sum(dim=0, keepdim=True)
    return m_SS


class TwoStreamResidual(ResidualBase):
    Options = TwoStreamOptions
    plugin_api = "2"
    num_streams = 2

    def __init__(self, config, options: TwoStreamOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        S = self.num_streams
        self.iters = options.sinkhorn_iters
        # per sublayer (0: attention, 1: ffn): read weights, write scales, stream mixing logits
        self.read_2S = nn.Parameter(torch.empty(2, S))
        self.write_2S = nn.Parameter(torch.empty(2, S))
        self.mix_2SS = nn.Parameter(torch.empty(2, S, S))
        self.out_S = nn.Parameter(torch.empty(S)) if layer_id == config.n_layers - 1 else None

    def init_weights(self, std: float) -> None:
        with torch.no_grad():
            self.read_2S.copy_(torch.tensor([[0.3, -0.3], [-0.2, 0.2]]))
            self.write_2S.copy_(torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
            self.mix_2SS.copy_(2.0 * torch.eye(self.num_streams).expand(2, -1, -1))
            if self.out_S is not None:
                self.out_S.zero_()

    def expand(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x_BTD.unsqueeze(2).expand(-1, -1, self.num_streams, -1).contiguous()

    def reduce(self, h_BTSD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        w_S = self.out_S.softmax(0) if self.out_S is not None else h_BTSD.new_full((self.num_streams,), 0.5)
        return torch.einsum("btsd,s->btd", h_BTSD, w_S.to(h_BTSD.dtype))

    def _sublayer(self, i: int, h_BTSD: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x_BTD = torch.einsum("btsd,s->btd", h_BTSD, self.read_2S[i].softmax(0).to(h_BTSD.dtype))
        y_BTD = run(x_BTD)
        mixed_BTSD = torch.einsum("ij,btjd->btid", sinkhorn(self.mix_2SS[i], self.iters).to(h_BTSD.dtype), h_BTSD)
        return mixed_BTSD + self.write_2S[i].to(y_BTD.dtype)[:, None] * y_BTD.unsqueeze(2)

    def forward(
        self,
        h_BTSD: torch.Tensor,
        attention: Callable[[torch.Tensor], torch.Tensor],
        ffn: Callable[[torch.Tensor], torch.Tensor],
        ctx: ForwardContext,
    ) -> torch.Tensor:
        return self._sublayer(1, self._sublayer(0, h_BTSD, attention), ffn)


ENTRY_POINTS = """\
[moeframe.router]
token_hash = context_plugins:TokenHashRouter
[moeframe.residual]
two_stream = context_plugins:TwoStreamResidual
"""


def install(site, name: str = "moeframe-context-plugins", version: str = "0.1.0") -> None:
    """Install this module into ``site`` as a distribution (what pip would leave there)."""
    from pathlib import Path

    site = Path(site)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (site / "context_plugins.py").write_text(Path(__file__).read_text())
