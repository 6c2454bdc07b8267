"""Plugin options as a user meets them: did-you-mean and sentence-type errors, every option in the
run's ``config.yaml``, and ``moeframe plugins show KIND NAME`` (a third-party plugin included)."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from moeframe import registry
from moeframe.cli import main
from moeframe.config import ConfigError, resolve_model_config, with_plugin_defaults
from moeframe.model.base import PluginOptions, parse_options
from moeframe.testing import tiny_config

from .conftest import REPO

TINY_RUN = REPO / "configs" / "pretrain" / "tiny.yaml"
FAST = [
    "--data.init_args.max_bytes",
    "200000",
    "--data.init_args.seq_len",
    "32",
    "--data.init_args.batch_size",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.val_check_interval",
    "2",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


@dataclass
class _Options(PluginOptions):
    elementwise_affine: bool = True
    num_groups: int = 1
    scale: float = 1.0
    window: int | None = None
    mode: Literal["fast", "exact"] = "exact"
    schedule: list[list[float]] = field(default_factory=list)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"elementwise_affine": "maybe"}, "option 'elementwise_affine' must be true or false, got 'maybe'"),
        ({"num_groups": 2.5}, "option 'num_groups' must be a whole number, got 2.5"),
        ({"num_groups": True}, "option 'num_groups' must be a whole number, got true"),
        ({"scale": "big"}, "option 'scale' must be a number, got 'big'"),
        ({"window": "wide"}, "option 'window' must be a whole number or null, got 'wide'"),
        ({"mode": "quick"}, "option 'mode' must be one of 'fast', 'exact', got 'quick'"),
        ({"schedule": 3}, "option 'schedule' must be a list, got 3"),
    ],
)
def test_a_wrong_option_type_reads_as_a_sentence(values: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_options("norm", "groupnorm", _Options, values)
    assert str(err.value) == f"norm plugin 'groupnorm': {message}"


@pytest.mark.bad_input
def test_a_misspelt_option_gets_a_did_you_mean() -> None:
    with pytest.raises(
        ValueError,
        match=r"has no option 'num_group'\. Did you mean 'num_groups'\? Its options are: "
        r"elementwise_affine, num_groups, scale, window, mode, schedule",
    ):
        parse_options("norm", "groupnorm", _Options, {"num_group": 2})
    with pytest.raises(
        ConfigError,
        match="model.router: router plugin 'topk' has no option 'aux_los_coef'. Did you mean 'aux_loss_coef'?",
    ):
        resolve_model_config(tiny_config(router={"name": "topk", "aux_los_coef": 0.1}))
    with pytest.raises(ValueError, match=r"has no option 'zzz'\. Its options are"):  # nothing close: no guess
        parse_options("norm", "groupnorm", _Options, {"zzz": 2})


@pytest.mark.bad_input
def test_a_misspelt_option_on_the_command_line_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "fit",
            "-c",
            str(TINY_RUN),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.init_args.config.attention",
            "{name: mha, n_kv_head: 2}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "attention plugin 'mha' has no option 'n_kv_head'. Did you mean 'n_kv_heads'?" in err


def test_plugin_defaults_are_written_out_and_parse_back_to_the_same_options() -> None:
    config = tiny_config(attention={"name": "mla", "kv_lora_rank": 16}, router={"name": "aux_free"})
    model = {k: getattr(config, k) for k in ("dim", "attention", "router", "experts", "norm")}
    full = with_plugin_defaults(model)
    assert full["dim"] == config.dim
    assert full["attention"]["kv_lora_rank"] == 16 and full["attention"]["q_lora_rank"] == 1536  # MLAOptions' default
    assert full["attention"]["decode"] == "absorbed" and full["router"]["bias_update_schedule"] == []
    assert full["norm"] == {"name": "rmsnorm"}  # no options: nothing to add
    assert with_plugin_defaults(full) == full
    given, written = (
        resolve_model_config(config),
        resolve_model_config(tiny_config(**{k: full[k] for k in ("attention", "router", "experts", "norm")})),
    )
    for kind in ("attention", "router", "experts", "norm"):
        assert getattr(given, kind).options == getattr(written, kind).options
    # what does not resolve is left for validation to report with its own message
    assert with_plugin_defaults({"attention": {"name": "nope", "x": 1}}) == {"attention": {"name": "nope", "x": 1}}


def test_per_layer_overrides_that_name_a_plugin_are_written_out_with_its_defaults() -> None:
    """A layer range that switches plugin records all of that plugin's options; one that only changes
    options of the model's plugin stays as given (the model-level field records the rest)."""
    layers = [
        {"first": 1, "last": 1, "router": {"name": "aux_free"}},
        {"first": 0, "last": 0, "router": {"aux_loss_coef": 0.05}},
    ]
    full = with_plugin_defaults({"router": {"name": "topk"}, "layers": layers})

    def option_names(kind: str, name: str) -> set[str]:
        return {"name"} | {f.name for f in dataclasses.fields(registry.load(kind, name).Options)}

    assert set(full["router"]) == option_names("router", "topk")
    switched, tuned = full["layers"]
    assert switched["first"] == 1 and set(switched["router"]) == option_names("router", "aux_free")
    assert tuned == layers[1]
    config = tiny_config(n_layers=2, **full)
    plan = resolve_model_config(config)
    assert plan.layer(1).router.name == "aux_free" and plan.layer(0).router.options.aux_loss_coef == 0.05


@pytest.mark.slow
def test_config_yaml_records_every_plugin_option_and_old_checkpoints_still_resume(tmp_path: Path) -> None:
    common = ["fit", "-c", str(TINY_RUN), "--trainer.default_root_dir", str(tmp_path), *FAST]
    assert main([*common, "--trainer.max_steps", "1"]) == 0
    recorded = yaml.safe_load((tmp_path / "logs" / "version_0" / "config.yaml").read_text())
    model = recorded["model"]["init_args"]["config"]
    # tiny.yaml says `attention: {name: mha}` and `experts: {name: grouped}`: the defaults are recorded
    assert model["attention"] == {"name": "mha", "n_kv_heads": None, "qkv_bias": False}
    assert model["experts"] == {"name": "grouped", "use_grouped_mm": True, "cpu_bf16_group_multiple": 32}
    assert model["router"] == {"name": "topk", "aux_loss_coef": 0.01, "norm_topk_prob": True}
    last = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    stored = ckpt["hyper_parameters"]["config"]
    assert stored["experts"] == model["experts"]  # the checkpoint's hyperparameters too
    # a checkpoint written before the defaults were recorded names only what its config gave
    stored["attention"], stored["experts"] = {"name": "mha"}, {"name": "grouped"}
    from moeframe.training.reliability import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint(ckpt, last)  # as a run writes it (with its checksum)
    assert main([*common, "--trainer.max_steps", "2", "--ckpt_path", str(last)]) == 0
    resumed = torch.load(tmp_path / "logs" / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 2


# -- moeframe plugins show --------------------------------------------------------------------------

THIRD_PARTY = '''
    from dataclasses import dataclass

    import torch
    from moeframe.plugin import NormBase, PluginOptions


    @dataclass
    class ScaledNormOptions(PluginOptions):
        """``learn_scale``: a trainable gain per channel."""

        learn_scale: bool = True
        # how much of the input passes unnormalised
        residual_mix: float = 0.0


    class ScaledNorm(NormBase):
        """A normalisation a third party wrote."""

        Options = ScaledNormOptions

        def __init__(self, dim, eps, options):
            super().__init__(dim, eps, options)

        def forward(self, x):
            return x
'''


@pytest.fixture
def installed_third_party_norm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A distribution installed the way pip leaves one: a module and its .dist-info on sys.path."""
    site = tmp_path / "site"
    info = site / "moeframe_scaled-0.3.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moeframe-scaled\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text("[moeframe.norm]\nscaled = moeframe_scaled:ScaledNorm\n")
    (site / "moeframe_scaled.py").write_text(textwrap.dedent(THIRD_PARTY))
    monkeypatch.syspath_prepend(str(site))
    registry.clear_cache()
    yield
    registry.clear_cache()


def test_plugins_show_describes_an_installed_third_party_plugin(
    installed_third_party_norm: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plugins", "show", "norm", "scaled"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "norm plugin 'scaled': moeframe_scaled:ScaledNorm from moeframe-scaled 0.3.0 (plugin API 1)"
    assert out[1] == "  A normalisation a third party wrote."
    assert out[3:] == [
        "  learn_scale: true or false; default true",
        "      a trainable gain per channel.",
        "  residual_mix: a number; default 0.0",
        "      how much of the input passes unnormalised",
    ]
    assert main(["plugins", "show", "norm", "scaled", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["distribution"] == "moeframe-scaled"
    assert [(o["name"], o["type"], o["default"]) for o in shown["options"]] == [
        ("learn_scale", "true or false", True),
        ("residual_mix", "a number", 0.0),
    ]


def test_plugins_show_first_party_and_lightning_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "show", "attention", "mla"]) == 0
    out = capsys.readouterr().out
    assert "  q_lora_rank: a whole number or null; default 1536\n      null for a plain query projection" in out
    assert "  decode: one of 'absorbed', 'expanded'; default absorbed" in out
    assert main(["plugins", "show", "precision", "fp8"]) == 0  # a Lightning precision: its constructor
    assert "  scale_format: one of 'fp32', 'pow2'; default fp32" in capsys.readouterr().out


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["router", "aux_fre"], "unknown router plugin 'aux_fre'. Did you mean 'aux_free'?"),
        (["layer", "mla"], "unknown plugin kind 'layer'; the kinds are: attention"),
    ],
)
def test_plugins_show_bad_names_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "show", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
