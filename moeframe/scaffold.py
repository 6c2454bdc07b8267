"""``moeframe new-plugin KIND NAME [-o DIR]``: write a plugin package that works as generated.

The skeleton is a complete, installable distribution: a ``pyproject.toml`` declaring the entry
point ``NAME`` in the kind's group, a ``src/`` package whose plugin subclasses the kind's base
class, declares the plugin API it targets and already does something sensible (a working
minimal implementation, not a stub that raises), tests that call the kind's contract check from
:mod:`moeframe.testing`, and a README. ``pip install`` it and ``python -m pytest`` passes; then
the author changes the implementation and keeps the tests green.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from string import Template

from moeframe import __version__, registry
from moeframe.errors import ConfigError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# The class-name suffix of each kind, and the module the plugin lives in.
_SUFFIX = {"attention": "Attention", "router": "Router", "experts": "Experts", "norm": "Norm",
           "residual": "Residual", "precision": "Precision", "strategy": "Strategy", "hf_family": "Family"}

# -- the plugin module, one per kind (string.Template: $name, $cls, $module, $dist) -------------

_ATTENTION = '''"""Attention plugin ``$name``: causal multi-head attention with RoPE (a starting point)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import (AttentionBase, ForwardContext, ModelConfig, PluginOptions, apply_rope, document_mask,
                             rope_cos_sin)


@dataclass
class ${cls}Options(PluginOptions):
    """The options a config can give: ``attention: {name: $name, qkv_bias: true}``."""

    qkv_bias: bool = False

    def validate(self, config: ModelConfig) -> None:
        if config.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size; dim/n_heads = {config.head_dim}")


class $cls(AttentionBase):
    """``forward(x_BTD, ctx) -> y_BTD``, causal, documents (``ctx.document_ids_BT``) kept apart."""

    Options = ${cls}Options
    plugin_api = "$api"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: ${cls}Options, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.n_heads, self.head_dim, self.rope_theta = config.n_heads, config.head_dim, config.rope_theta
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=options.qkv_bias)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, Optional[str]]:
        # its names in HF checkpoints, below the attention module (what `moeframe convert` writes)
        return {"wqkv.weight": "qkv_proj.weight", "wqkv.bias": "qkv_proj.bias", "wo.weight": "o_proj.weight"}

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.decoding:
            raise NotImplementedError("$name has no KV cache yet: implement new_cache() to decode incrementally")
        B, T, D = x_BTD.shape
        q, k, v = self.wqkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cos_sin(ctx.positions_T, self.head_dim, self.rope_theta, x_BTD.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.document_ids_BT is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(ctx.document_ids_BT))
        return self.wo(out.transpose(1, 2).reshape(B, T, D))
'''

_ROUTER = '''"""Router plugin ``$name``: softmax top-k with renormalised weights (a starting point)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from moeframe.plugin import ForwardContext, ModelConfig, PluginOptions, RouterBase, RouterOutput, gate_logits_fp32


@dataclass
class ${cls}Options(PluginOptions):
    """The options a config can give: ``router: {name: $name, temperature: 1.0}``."""

    temperature: float = 1.0

    def validate(self, config: ModelConfig) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class $cls(RouterBase):
    """``forward(x_TD, ctx) -> RouterOutput``: K experts per token, weights summing to route_scale.
    ``x_TD`` is the block's normalised residual, flattened (B*T rows); ``ctx`` is the forward context
    (``ctx.token_ids_BT.flatten()`` are the rows' token ids, ``ctx.layer_id`` the layer, ``ctx.step``)."""

    Options = ${cls}Options
    plugin_api = "$api"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: ${cls}Options, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.top_k, self.route_scale, self.temperature = config.n_activated_experts, config.route_scale, options.temperature
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, Optional[str]]:
        # its names in HF checkpoints, below the router's module (what `moeframe convert` writes)
        return {"weight": "weight"}

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext) -> RouterOutput:
        # routing in fp32, also under autocast (bf16-mixed re-casts F.linear): bf16 scores flip near-tied choices
        scores_TE = (gate_logits_fp32(x_TD, self.weight) / self.temperature).softmax(dim=-1)
        top_TK = scores_TE.topk(self.top_k, dim=-1)
        weights_TK = top_TK.values / top_TK.values.sum(dim=-1, keepdim=True)
        counts_E = torch.bincount(top_TK.indices.flatten(), minlength=scores_TE.shape[1])
        return RouterOutput(weights_TK * self.route_scale, top_TK.indices, counts_E, aux_loss=None)
'''

_EXPERTS = '''"""Experts plugin ``$name``: SwiGLU experts, one loop over the experts (a starting point)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import ExpertsBase, ForwardContext, ModelConfig, PluginOptions


@dataclass
class ${cls}Options(PluginOptions):
    """This plugin takes no options yet; add typed fields here."""


class $cls(ExpertsBase):
    """``y_t = sum_k weights[t, k] * expert_{indices[t, k]}(x_t)``; stacked weights in the
    checkpoint layout: w1, w3 [E, F, D], w2 [E, D, F]."""

    Options = ${cls}Options
    plugin_api = "$api"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: ${cls}Options, num_experts: int, dim: int, hidden_dim: int,
                 layer_id: int) -> None:
        super().__init__(config, options, num_experts, dim, hidden_dim, layer_id)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, Optional[str]]:
        # one SwiGLU per expert in HF checkpoints: {e} is the expert index along dim 0
        return {"w1": "{e}.gate_proj.weight", "w3": "{e}.up_proj.weight", "w2": "{e}.down_proj.weight"}

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        y_TD = torch.zeros_like(x_TD)
        for e in indices_TK.unique().tolist():
            token_N, slot_N = (indices_TK == e).nonzero(as_tuple=True)
            x_ND = x_TD[token_N]
            h_NF = F.silu(x_ND @ self.w1[e].T) * (x_ND @ self.w3[e].T)
            y_ND = (h_NF @ self.w2[e].T) * weights_TK[token_N, slot_N, None].to(x_TD.dtype)
            y_TD = y_TD.index_add(0, token_N, y_ND)
        return y_TD
'''

_NORM = '''"""Norm plugin ``$name``: layer normalisation without bias (a starting point)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import ForwardContext, NormBase, PluginOptions


@dataclass
class ${cls}Options(PluginOptions):
    """This plugin takes no options beyond the model's ``norm_eps``; add typed fields here."""


class $cls(NormBase):
    """``(x - mean) / std * g`` over the last dimension, computed in fp32 whatever the input."""

    Options = ${cls}Options
    plugin_api = "$api"  # the moeframe plugin API this class is written against

    def __init__(self, dim: int, eps: float, options: ${cls}Options, layer_id: Optional[int] = None) -> None:
        super().__init__(dim, eps, options, layer_id)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, Optional[str]]:
        return {"weight": "weight"}  # its name in HF checkpoints, below the norm's module

    def forward(self, x: torch.Tensor, ctx: Optional[ForwardContext] = None) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), None, self.eps).to(x.dtype)
'''

_PRECISION = '''"""Precision plugin ``$name``: bf16 weight storage for linear layers (a starting point).

A Lightning ``Precision``: ``convert_module`` swaps every ``nn.Linear`` outside the modules the
model keeps in high precision (``Decoder.high_precision_modules()``: embedding, head, routers,
norms) for a layer that stores its weight in bf16 and computes in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import Precision
from torch import nn


class BF16WeightLinear(nn.Module):
    """A linear layer whose weight is stored in bf16 (half the memory) and upcast to compute."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def converted_names(model: nn.Module) -> list[str]:
    """Qualified names of the linear layers this plugin converts in ``model``."""
    keep: list[str] = []
    for prefix, sub in model.named_modules():
        if hasattr(sub, "high_precision_modules"):  # the moeframe Decoder, wherever it sits
            keep += [f"{prefix}.{k}" if prefix else k for k in sub.high_precision_modules()]
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(n == k or n.startswith(k + ".") for k in keep)]


class $cls(Precision):
    plugin_api = "$api"  # the moeframe plugin API this class is written against

    def convert_module(self, module: nn.Module) -> nn.Module:
        for name in converted_names(module):
            parent, _, child = name.rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            setattr(owner, child, BF16WeightLinear(getattr(owner, child)))
        return module
'''

_STRATEGY = '''"""Strategy plugin ``$name``: DDP over gloo with a short collective timeout (a starting point).

A Lightning ``Strategy`` subclass whose no-argument construction is the preset; moeframe
registers it into Lightning's StrategyRegistry, so ``--trainer.strategy $name`` selects it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy


class $cls(DDPStrategy):
    plugin_api = "$api"  # the moeframe plugin API this class is written against

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        kwargs.setdefault("timeout", timedelta(minutes=5))  # a lost rank fails fast, not after 30 min
        super().__init__(**kwargs)
'''

_HF_FAMILY = '''"""HF checkpoint family ``$name``: folders whose config.json says ``model_type: $name`` (a starting point).

A family knows the HF module tree and the model-wide config fields; every part (attention,
router, experts, norm) names its own tensors and options (``hf_tensor_names``, ``hf_config``,
``options_from_hf`` on its class). This one lays a moeframe decoder out in the Llama/DeepSeek
tree (``model.layers.i.self_attn``, ``.mlp.experts.e``, ...) and records which plugin each part
is, so any parts that declare their names convert. Adapt ``config_*`` to a real family's fields.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any, Optional

from moeframe.plugin import ConfigError, HFFamily, HFTensor, ModelConfig, registry, resolve_model_config

_PARTS = ("attention", "router", "experts", "norm")
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn": "self_attn", "ffn": "mlp"}
_CORE = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight"}


class $cls(HFFamily):
    display_name = "$name"
    model_type = "$name"
    plugin_api = "$api"  # the moeframe plugin API this class is written against

    def config_from_hf(self, hf: dict[str, Any], path: str, mtp: bool) -> ModelConfig:
        try:
            core = {f.name: hf["moeframe"][f.name] for f in fields(ModelConfig) if f.name not in _PARTS}
            parts = {kind: {"name": hf[f"{kind}_type"],
                            **registry.load(kind, hf[f"{kind}_type"]).options_from_hf(self.name, hf)} for kind in _PARTS}
        except KeyError as exc:
            raise ConfigError(f"{path}: missing field {exc.args[0]!r} for a $name checkpoint") from None
        return ModelConfig(**core, **parts)

    def config_to_hf(self, config: ModelConfig, mtp: bool) -> dict[str, Any]:
        if config.mtp_depth and mtp:
            raise ConfigError("$name checkpoints have no multi-token-prediction layers; export with mtp=False")
        plan = resolve_model_config(config)
        out: dict[str, Any] = {"model_type": self.model_type,
                               "moeframe": {f.name: getattr(config, f.name) for f in fields(ModelConfig) if f.name not in _PARTS}}
        for kind in _PARTS:
            choice = getattr(plan, kind)
            out[f"{kind}_type"] = choice.name
            out.update(choice.cls.hf_config(self.name, config, choice.options))
        return out

    def module_prefix(self, module: str, config: ModelConfig) -> Optional[str]:
        if module == "norm":
            return "model.norm"
        m = re.fullmatch(r"layers\\.(\\d+)\\.([a-z_]+)(\\..+)?", module)
        if m is None or m.group(2) not in _BLOCK:
            return None
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}{m.group(3) or ''}"

    def core_tensor(self, key: str, config: ModelConfig) -> Optional[HFTensor]:
        return HFTensor(_CORE[key], quantizable=False) if key in _CORE else None
'''

_RESIDUAL = '''"""Residual plugin ``$name``: the pre-norm residual with a learned scale per sublayer
(a starting point; several streams, as in hyper-connections, are a state of shape [B, T, n, D])."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from moeframe.plugin import ForwardContext, ModelConfig, PluginOptions, ResidualBase


@dataclass
class ${cls}Options(PluginOptions):
    """The options a config can give: ``residual: {name: $name, init_scale: 1.0}``."""

    init_scale: float = 1.0


class $cls(ResidualBase):
    """``h = x + a * attention(x)``, ``out = h + f * ffn(h)``; ``a`` and ``f`` are learned scalars."""

    Options = ${cls}Options
    plugin_api = "$api"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: ${cls}Options, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.init_scale = options.init_scale
        self.scale_2 = nn.Parameter(torch.empty(2))

    def init_weights(self, std: float) -> None:
        with torch.no_grad():
            self.scale_2.fill_(self.init_scale)

    def forward(self, h_BTD: torch.Tensor, attention: Callable[[torch.Tensor], torch.Tensor],
                ffn: Callable[[torch.Tensor], torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        h_BTD = h_BTD + self.scale_2[0].to(h_BTD.dtype) * attention(h_BTD)
        return h_BTD + self.scale_2[1].to(h_BTD.dtype) * ffn(h_BTD)
'''

_MODULES = {"attention": _ATTENTION, "router": _ROUTER, "experts": _EXPERTS, "norm": _NORM,
            "residual": _RESIDUAL, "precision": _PRECISION, "strategy": _STRATEGY, "hf_family": _HF_FAMILY}

# -- the tests: the kind's contract check from moeframe.testing ----------------------------------

_TEST_HEAD = '''"""Plugin ``$name``: registered through its entry point, and moeframe's $kind contract."""

from __future__ import annotations

from moeframe.plugin import registry
from moeframe.testing import $check, tiny_config
from $module.plugin import $cls


def test_registered_through_the_entry_point() -> None:
    assert registry.load("$kind", "$name") is $cls
    assert registry.resolve("$kind", "$name").distribution == "$dist"
'''

_TESTS = {
    "attention": '''

def test_attention_contract() -> None:
    # cache=False until the plugin implements new_cache(); then drop it to check cached decoding too
    check_attention_contract(tiny_config(attention={"name": "$name"}), cache=False)
''',
    "router": '''

def test_router_contract() -> None:
    check_router_contract(tiny_config(router={"name": "$name"}), weights_sum_to=1.0)
    check_router_contract(tiny_config(router={"name": "$name", "temperature": 0.5}, route_scale=2.5), weights_sum_to=2.5)
''',
    "experts": '''

def test_experts_contract() -> None:
    check_experts_contract(tiny_config(experts={"name": "$name"}))
''',
    "norm": '''

def test_norm_contract() -> None:
    check_norm_contract(tiny_config(norm={"name": "$name"}))
''',
    "hf_family": '''

def test_hf_family_contract() -> None:
    # a tiny model exported to a $name folder and imported back: every tensor and the logits equal
    check_hf_family_contract(tiny_config(), family="$name")
''',
    "residual": '''

def test_residual_contract() -> None:
    check_residual_contract(tiny_config(residual={"name": "$name"}))
''',
    "strategy": '''

def test_strategy_contract() -> None:
    # registers into Lightning's StrategyRegistry and trains 2 steps on 2 CPU processes
    run = check_strategy_contract("$name", devices=2, max_steps=2)
    assert sorted(run.losses) == [0, 1]
''',
}

_CHECKS = {"attention": "check_attention_contract", "router": "check_router_contract",
           "experts": "check_experts_contract", "norm": "check_norm_contract", "residual": "check_residual_contract",
           "precision": "check_precision_contract", "strategy": "check_strategy_contract",
           "hf_family": "check_hf_family_contract"}

_PYPROJECT = '''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "A moeframe $kind plugin: $name."
readme = "README.md"
requires-python = ">=3.10"
# written against moeframe $moeframe_version, plugin API $api (declared as `plugin_api` on the class)
dependencies = ["moeframe>=$moeframe_version"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The entry-point name is the name configs use; the group is the plugin kind.
[project.entry-points."$group"]
$name = "$module.plugin:$cls"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
addopts = "--import-mode=importlib"
'''

_README = '''# $dist

A moeframe $kind plugin, registered as `$name` in the entry-point group `$group`
(class `$module.plugin.$cls`, moeframe plugin API $api).

```bash
pip install -e ".[test]"      # registers the entry point
moeframe plugins              # lists $name with this distribution and its version
python -m pytest              # moeframe.testing.$check on the plugin as the registry builds it
```

$usage
Generated by `moeframe new-plugin $kind $name`; edit `src/$module/plugin.py` and keep the tests green.
'''

_USAGE = {
    "attention": "Select it in a model config: `attention: {name: $name}`.\n",
    "router": "Select it in a model config: `router: {name: $name, temperature: 1.0}`.\n",
    "experts": "Select it in a model config: `experts: {name: $name}`.\n",
    "norm": "Select it in a model config: `norm: {name: $name}`.\n",
    "residual": "Select it in a model config: `residual: {name: $name}` (or for some layers in `layers`).\n",
    "precision": "It is a Lightning `Precision`: select it by name, `moeframe fit -c run.yaml --trainer.plugins $name`.\n",
    "strategy": "Select it on the command line: `moeframe fit -c run.yaml --trainer.strategy $name`.\n",
    "hf_family": "`moeframe convert` reads folders whose config.json has `model_type: $name`; export with `--family $name`.\n",
}


def _class_name(name: str, kind: str) -> str:
    camel = "".join(part.capitalize() for part in name.split("_") if part)
    suffix = _SUFFIX[kind]
    return camel if camel.lower().endswith(suffix.lower()) else camel + suffix


def _check_name(kind: str, name: str) -> None:
    if kind not in registry.KINDS:
        raise ConfigError(f"unknown plugin kind {kind!r}; the kinds are: {', '.join(registry.KINDS)}")
    if not _NAME.match(name):
        raise ConfigError(f"plugin name {name!r} must be lowercase letters, digits and underscores, starting with a "
                          f"letter: it is the entry-point name configs use and the module moeframe_{name}")
    taken = registry.available(kind).get(name)
    if taken:
        raise ConfigError(f"{kind} plugin {name!r} is already provided by {taken[0].distribution} {taken[0].version}; "
                          "two distributions claiming one name are refused at load time: choose another name")


def render(kind: str, name: str) -> dict[str, str]:
    """The files of the package for ``kind``/``name``: relative path -> text."""
    _check_name(kind, name)
    module = f"moeframe_{name}"
    values = {"name": name, "kind": kind, "cls": _class_name(name, kind), "module": module,
              "dist": f"moeframe-{name.replace('_', '-')}", "group": registry.KINDS[kind].group,
              "api": registry.PLUGIN_API, "check": _CHECKS[kind], "moeframe_version": __version__}
    values["usage"] = Template(_USAGE[kind]).substitute(values)
    tests = _PRECISION_TESTS if kind == "precision" else _TEST_HEAD + _TESTS[kind]
    return {
        "pyproject.toml": Template(_PYPROJECT).substitute(values),
        "README.md": Template(_README).substitute(values),
        f"src/{module}/__init__.py": f'"""moeframe {kind} plugin {name!r}."""\n',
        f"src/{module}/plugin.py": Template(_MODULES[kind]).substitute(values),
        f"tests/test_{name}.py": Template(tests).substitute(values),
    }


_PRECISION_TESTS = '''"""Plugin ``$name``: registered through its entry point, and moeframe's precision contract."""

from __future__ import annotations

from moeframe.plugin import build_decoder, registry
from moeframe.testing import check_precision_contract, tiny_config
from $module.plugin import $cls, converted_names


def test_registered_through_the_entry_point() -> None:
    assert registry.load("precision", "$name") is $cls
    assert registry.resolve("precision", "$name").distribution == "$dist"


def test_precision_contract() -> None:
    # what the plugin claims to convert: the linear layers outside the high-precision modules
    claimed = set(converted_names(build_decoder(tiny_config())))
    converted = check_precision_contract($cls(), claims=lambda name, module: name in claimed)
    assert converted == sorted(claimed)
'''


def write_package(kind: str, name: str, out_dir: Path) -> list[Path]:
    """Write the package for ``kind``/``name`` into ``out_dir`` (new or empty); return the files."""
    files = render(kind, name)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} already exists and is not empty; choose another folder with -o")
    written = []
    for rel, text in files.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def new_plugin_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="moeframe new-plugin",
        description="Write a plugin package skeleton (pyproject with the entry point, a working minimal plugin, "
                    "tests calling moeframe.testing, README) that passes its own tests as generated.")
    parser.add_argument("kind", choices=list(registry.KINDS), help="plugin kind")
    parser.add_argument("name", help="the plugin's name: what configs select (lowercase, digits, underscores)")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="package folder to create (default: ./moeframe-NAME)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else Path(f"moeframe-{args.name.replace('_', '-')}")
    written = write_package(args.kind, args.name, out)
    for path in written:
        print(f"wrote {path}")
    print(f"\nnext: pip install -e '{out}[test]' && python -m pytest {out}")
    return 0
