"""What a model part declares about its form in HF checkpoints: tensor names and config fields.

Plugins own their names. The converter (``moeframe.convert``) knows no attention, router or
experts by name: it asks each part of a built decoder for the HF names of its own tensors and
the HF ``config.json`` fields of its own options, and asks the checkpoint *family* (an
``moeframe.hf_family`` plugin, e.g. DeepSeek-V3) where in the HF module tree each part sits.
So a third-party attention that declares its names converts to and from HF folders like the
first-party ones do (torchtitan keeps the same split: names beside the model that owns them).

Every model-part base class (attention, router, experts, norm) and the core's dense FFN inherit
``HFNamed``; the defaults declare nothing, which the converter reports as "this plugin has no
HF form", naming the plugin and the method to implement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeframe.config import ModelConfig
    from moeframe.model.base import PluginOptions

__all__ = ["EXPERT", "HFNamed"]

# In a tensor-name template, the index of an expert: a tensor stacked over experts (dim 0) is
# stored in HF checkpoints as one tensor per expert, e.g. "{e}.gate_proj.weight".
EXPERT = "{e}"


class HFNamed:
    """Declarations a model part makes so that checkpoint families can convert it.

    All three are class methods: a family converts configs before any module exists.
    ``family`` is the registered name of the checkpoint family asking (``moeframe.hf_family``);
    most parts name their tensors the same in every family and ignore it.
    """

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None] | None:
        """This part's state-dict keys (relative to the part) -> HF keys (relative to the HF
        module the family places the part at). A template with ``{e}`` splits a tensor stacked
        over experts into one HF tensor per expert. ``None`` as a value: moeframe-only state
        that HF checkpoints do not carry (a counter). Returning ``None``: no HF form."""
        return None

    @classmethod
    def hf_fp32_tensors(cls, family: str) -> frozenset[str]:
        """This part's state-dict keys (relative to the part) that every export keeps in fp32 and
        never quantises to FP8 (HF's ``_keep_in_fp32_modules``; e.g. DSA's indexer head weights).
        Router tensors always are; default: none besides."""
        return frozenset()

    @classmethod
    def hf_config(cls, family: str, config: ModelConfig, options: PluginOptions) -> dict[str, Any]:
        """The HF ``config.json`` fields this part's options become (on export)."""
        return {}

    @classmethod
    def options_from_hf(cls, family: str, hf: dict[str, Any]) -> dict[str, Any]:
        """This part's options (a config mapping without ``name``) read from an HF ``config.json``."""
        return {}
