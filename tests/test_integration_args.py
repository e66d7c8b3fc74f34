"""register(), --optim parsing on TrainingArguments and subclasses, --optim_args validation, defaults."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
from contextlib import redirect_stdout

import _tiny  # offline env, one thread
import pytest

import hf_metaoptimize
from hf_metaoptimize.integrations import registry
from hf_metaoptimize.integrations.deepspeed_config import check_deepspeed_config
from hf_metaoptimize.integrations.optim_args import OPTIM_ARGS, OptimArgsError, optimizer_kwargs, parse_optim_args

hf_metaoptimize.register()

from transformers import (  # noqa: E402
    HfArgumentParser,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
    trainer_optimizer,  # noqa: E402
)
from transformers.training_args import OptimizerNames  # noqa: E402


def parse(cls, *argv):
    (args,) = HfArgumentParser(cls).parse_args_into_dataclasses(["--output_dir", "unused", *argv])
    return args


def test_register_is_idempotent_and_installs_everything():
    before = (
        list(OptimizerNames._member_names_),
        Trainer.log,
        Trainer.create_scheduler,
        Trainer._clip_grad_norm,
        TrainingArguments.__post_init__,
    )
    hf_metaoptimize.register()
    hf_metaoptimize.register()
    after = (
        list(OptimizerNames._member_names_),
        Trainer.log,
        Trainer.create_scheduler,
        Trainer._clip_grad_norm,
        TrainingArguments.__post_init__,
    )
    assert before == after
    assert OptimizerNames("metaoptimize") is OptimizerNames.METAOPTIMIZE
    assert OptimizerNames("metaoptimize_lion") is OptimizerNames.METAOPTIMIZE_LION
    assert [m.value for m in OptimizerNames].count("metaoptimize") == 1
    assert trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames.METAOPTIMIZE] is registry._handler
    # the wrappers are not stacked
    assert not getattr(Trainer.log.__wrapped__, registry.WRAPPED, False)
    assert getattr(Trainer._clip_grad_norm, registry.WRAPPED, False)
    assert not getattr(Trainer._clip_grad_norm.__wrapped__, registry.WRAPPED, False)


def _trl_configs():
    trl = pytest.importorskip("trl")
    return {
        "SFTConfig": trl.SFTConfig,
        "DPOConfig": trl.DPOConfig,
        "GRPOConfig": trl.GRPOConfig,
        "RewardConfig": trl.RewardConfig,
    }


CPU = ("--use_cpu", "--bf16", "false")  # TRL configs default to bf16, which this CPU machine refuses


def build(cls, how, tmp_path, **values):
    """`cls` built from `values` the way `how` says: HfArgumentParser, TRL's parser (CLI or YAML config), a dict,
    or a direct call. Values are strings, as on a command line."""
    values = {"output_dir": str(tmp_path / "out"), "use_cpu": "true", "bf16": "false", **values}
    typed = {
        k: (
            float(v)
            if k.startswith(("adam_", "learning_rate"))
            else int(v)
            if k.endswith("steps")
            else v == "true"
            if v in ("true", "false")
            else v
        )
        for k, v in values.items()
    }
    if how == "direct":
        return cls(**typed)
    if how == "dict":  # a JSON config: typed values
        (args,) = HfArgumentParser(cls).parse_dict(typed)
        return args
    argv = [x for k, v in values.items() for x in (f"--{k}", v)]
    if how == "cli":
        (args,) = HfArgumentParser(cls).parse_args_into_dataclasses(argv)
        return args
    from trl import TrlParser

    if how == "trl_yaml":
        config = tmp_path / "config.yaml"
        config.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
        argv = ["--config", str(config)]
    (args,) = TrlParser(cls).parse_args_and_config(argv)
    return args


HOWS = ["cli", "dict", "direct"]
TRL_HOWS = ["trl_cli", "trl_yaml", "dict", "direct"]
CASES = [(TrainingArguments, h) for h in HOWS] + [(Seq2SeqTrainingArguments, h) for h in HOWS]
CASES += [(name, h) for name in ("SFTConfig", "DPOConfig", "GRPOConfig", "RewardConfig") for h in TRL_HOWS]


@pytest.mark.parametrize("cls,how", CASES, ids=[f"{c if isinstance(c, str) else c.__name__}-{h}" for c, h in CASES])
def test_one_defaults_rule_for_every_arguments_class_and_parser(cls, how, tmp_path):
    """The rule looks at values only: the Trainer's default linear schedule is constant for MetaOptimize, the AdamW
    default beta2 is Lion's own rho, whatever class holds the arguments and however they were built (TRL's
    sft.py parses SFTConfig with TrlParser, with or without a YAML config)."""
    if isinstance(cls, str):
        cls = _trl_configs()[cls]
    args = build(cls, how, tmp_path, optim="metaoptimize")
    assert args.optim == OptimizerNames.METAOPTIMIZE
    assert args.lr_scheduler_type == "constant"  # the Trainer's default linear: constant
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)
    args = build(cls, how, tmp_path, optim="metaoptimize_lion", lr_scheduler_type="linear")
    assert (args.adam_beta2, args.lr_scheduler_type) == (0.99, "constant")  # Lion's rho; linear is the default
    args = build(cls, how, tmp_path, optim="metaoptimize_lion", adam_beta2="0.95", lr_scheduler_type="cosine")
    assert (args.adam_beta2, args.lr_scheduler_type) == (0.95, "cosine")  # other values are kept
    args = build(cls, how, tmp_path, optim="metaoptimize", warmup_steps="10")
    assert args.lr_scheduler_type == "constant_with_warmup"
    # other optimizers are untouched
    assert build(cls, how, tmp_path, optim="adamw_torch").lr_scheduler_type == "linear"


def test_trl_sft_script_arguments_get_the_constant_schedule(tmp_path):
    """What trl/scripts/sft.py does: TrlParser over (ScriptArguments, SFTConfig, ModelConfig)."""
    trl = pytest.importorskip("trl")
    parser = trl.TrlParser((trl.ScriptArguments, trl.SFTConfig, trl.ModelConfig))
    _, sft, _ = parser.parse_args_and_config(
        ["--output_dir", str(tmp_path), "--dataset_name", "d", "--optim", "metaoptimize", *CPU]
    )
    assert sft.lr_scheduler_type == "constant" and sft.optim == OptimizerNames.METAOPTIMIZE


def test_parse_dict_and_dataclass_defined_after_register():
    @dataclasses.dataclass
    class LaterConfig(TrainingArguments):  # e.g. a TRL config imported after register()
        extra: int = 1

    later = LaterConfig("x", optim="metaoptimize")
    assert later.lr_scheduler_type == "constant"
    assert parse(LaterConfig, "--optim", "metaoptimize", "--extra", "2").lr_scheduler_type == "constant"


def test_set_optimizer_and_set_lr_scheduler():
    args = TrainingArguments("x").set_optimizer(name="metaoptimize_lion", learning_rate=1e-4)
    assert (args.optim, args.lr_scheduler_type, args.adam_beta2) == (OptimizerNames.METAOPTIMIZE_LION, "constant", 0.99)
    args = TrainingArguments("x").set_optimizer(name="metaoptimize_lion", beta2=0.95)
    assert args.adam_beta2 == 0.95
    args = TrainingArguments("x").set_lr_scheduler(name="cosine").set_optimizer(name="metaoptimize")
    assert args.lr_scheduler_type == "cosine"


def test_arguments_built_before_register_get_the_same_rule_from_the_handler():
    """Arguments whose __post_init__ ran before register() (the rule could not run then): the handler applies it."""
    args = TrainingArguments("x")
    object.__setattr__(args, "optim", OptimizerNames.METAOPTIMIZE_LION)
    cls, kwargs = registry.build_optimizer_cls_and_kwargs(args, _tiny.tiny_gpt2())
    assert kwargs["betas"] == (0.9, 0.99) and args.lr_scheduler_type == "constant"


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"optimizer": {"type": "AdamW"}}, '"optimizer" section'),
        ({"optimizer": {}}, '"optimizer" section'),  # transformers tests the key's presence, not its truth
        ({"optimizer": None}, '"optimizer" section'),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "zero_force_ds_cpu_optimizer"),
    ],
)
def test_deepspeed_configs_that_would_replace_the_optimizer_are_refused(config, needle, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=needle):  # before DeepSpeed is imported: while parsing
        parse(
            TrainingArguments, "--optim", "metaoptimize", "--optim_args", "granularity=tensor", "--deepspeed", str(path)
        )
    check_deepspeed_config(
        {
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
            "zero_force_ds_cpu_optimizer": False,
        }
    )
    check_deepspeed_config({"zero_optimization": {"stage": 3}})


def test_arguments_pickle_and_serialise_plainly():
    args = TrainingArguments("x", optim="metaoptimize_lion")
    assert type(args.adam_beta2) is float
    assert pickle.loads(pickle.dumps(args)).optim == OptimizerNames.METAOPTIMIZE_LION
    assert '"optim": "metaoptimize_lion"' in args.to_json_string()


@pytest.mark.parametrize(
    "optim_args, needle",
    [
        ("meta_lrr=1e-3", "unknown --optim_args key 'meta_lrr' (did you mean 'meta_lr'?)"),
        ("base=adam", "base='adam' is not valid"),
        ("meta_lr=fast", "meta_lr='fast' is not valid"),
        ("gamma=1.5", "gamma='1.5' is out of range"),
        ("meta_lr=-1", "meta_lr='-1' is out of range"),
        ("granularity", "'granularity' is not of the form key=value"),
        ("skip_nonfinite=maybe", "skip_nonfinite='maybe' is not valid"),
        ("meta_eps=1e-6", "meta_eps only applies to meta=adam"),
        ("log_step_min=1", "log_step_min='1' is out of range"),
    ],
)
def test_bad_optim_args_fail_while_parsing(optim_args, needle):
    with pytest.raises(OptimArgsError) as info:
        parse(TrainingArguments, "--optim", "metaoptimize", "--optim_args", optim_args)
    message = str(info.value)
    assert needle in message
    for key in OPTIM_ARGS:  # the valid keys are listed
        assert f"  {key} (" in message


def test_optim_args_cast_and_kwargs_mapping():
    assert parse_optim_args("base=lion, meta=adam,granularity=tensor,meta_lr=1e-2,gamma=1,skip_nonfinite=no") == {
        "base": "lion",
        "meta": "adam",
        "granularity": "tensor",
        "meta_lr": 0.01,
        "gamma": 1.0,
        "skip_nonfinite": False,
    }
    args = parse(
        TrainingArguments,
        "--optim",
        "metaoptimize",
        "--adam_beta1",
        "0.8",
        "--adam_beta2",
        "0.95",
        "--adam_epsilon",
        "1e-6",
        "--weight_decay",
        "0.1",
        "--learning_rate",
        "3e-4",
        "--optim_args",
        "meta=adam,meta_eps=1e-7,meta_beta2=0.99,gamma=0.999",
    )
    kw = optimizer_kwargs(args)
    assert kw["lr"] == 3e-4 and kw["base"] == "adamw" and kw["betas"] == (0.8, 0.95) and kw["eps"] == 1e-6
    assert kw["weight_decay"] == 0.1 and kw["meta"] == "adam" and kw["meta_betas"] == (0.9, 0.99)
    assert kw["meta_eps"] == 1e-7 and kw["gamma"] == 0.999 and kw["granularity"] == "scalar"

    lion = optimizer_kwargs(parse(TrainingArguments, "--optim", "metaoptimize_lion", "--adam_epsilon", "1e-6"))
    assert lion["base"] == "lion" and lion["betas"] == (0.9, 0.99) and "eps" not in lion
    sgd = optimizer_kwargs(parse(TrainingArguments, "--optim", "metaoptimize", "--optim_args", "base=sgd"))
    assert sgd["betas"] == (0.9,) and "eps" not in sgd
    rms = optimizer_kwargs(parse(TrainingArguments, "--optim", "metaoptimize", "--optim_args", "base=rmsprop"))
    assert rms["betas"] == (0.99,) and rms["eps"] == 1e-8
    layer = optimizer_kwargs(parse(TrainingArguments, "--optim", "metaoptimize", "--optim_args", "granularity=layer"))
    assert layer["granularity"] == "block"
    assert "fused" not in layer
    fused = optimizer_kwargs(parse(TrainingArguments, "--optim", "metaoptimize", "--optim_args", "fused=true"))
    assert fused["fused"] is True
    off = optimizer_kwargs(parse(TrainingArguments, "--optim", "metaoptimize", "--optim_args", "fused=false"))
    assert off["fused"] is False  # said, so kept (the default, unset, is the automatic choice)


@pytest.mark.parametrize("optim_args", ["", "base=lion", "base=sgd", "base=rmsprop,meta=adam", "granularity=element"])
def test_kwargs_build_a_real_optimizer(optim_args):
    args = parse(TrainingArguments, "--optim", "metaoptimize", "--optim_args", optim_args, "--weight_decay", "0.01")
    cls, kwargs = registry.build_optimizer_cls_and_kwargs(args, _tiny.tiny_gpt2())
    assert cls is hf_metaoptimize.MetaOptimize
    optimizer = cls(_tiny.tiny_gpt2().parameters(), **kwargs)
    assert optimizer.param_groups[0]["lr"] == args.learning_rate


def test_metaoptimize_training_arguments_typed_flags():
    from hf_metaoptimize import MetaOptimizeTrainingArguments

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        HfArgumentParser(MetaOptimizeTrainingArguments).parse_args_into_dataclasses(["--help"])
    text = " ".join(out.getvalue().split())
    for flag in ("--metaoptimize_meta_lr", "--metaoptimize_granularity", "--metaoptimize_gamma", "--metaoptimize_meta"):
        assert flag in text
    assert "{scalar,layer,tensor,element}" in text and "(default: 0.02)" in text and "--metaoptimize_cooldown" in text

    args = parse(MetaOptimizeTrainingArguments, "--metaoptimize_granularity", "layer", "--metaoptimize_meta_lr", "0.01")
    assert args.optim == OptimizerNames.METAOPTIMIZE and args.lr_scheduler_type == "constant"
    kw = optimizer_kwargs(args)
    assert kw["granularity"] == "block" and kw["meta_lr"] == 0.01
    # typed field and --optim_args agreeing is fine; disagreeing is an error
    parse(MetaOptimizeTrainingArguments, "--metaoptimize_meta_lr", "0.01", "--optim_args", "meta_lr=0.01")
    with pytest.raises(OptimArgsError, match="meta_lr is set twice"):
        parse(MetaOptimizeTrainingArguments, "--metaoptimize_meta_lr", "0.01", "--optim_args", "meta_lr=0.02")
    assert optimizer_kwargs(parse(MetaOptimizeTrainingArguments, "--metaoptimize_fused", "true"))["fused"] is True
    assert optimizer_kwargs(parse(MetaOptimizeTrainingArguments, "--optim_args", "fused=true"))["fused"] is True
    with pytest.raises(OptimArgsError, match=r"--metaoptimize_gamma 2.0 is out of range"):  # the flag it came from
        parse(MetaOptimizeTrainingArguments, "--metaoptimize_gamma", "2")
    with pytest.raises(OptimArgsError, match=r"--metaoptimize_meta_lr 'abc' is not valid"):
        MetaOptimizeTrainingArguments("x", metaoptimize_meta_lr="abc")
    direct = MetaOptimizeTrainingArguments("x", metaoptimize_base="lion")
    assert direct.lr_scheduler_type == "constant" and direct.adam_beta2 == 0.99


def test_training_args_bin_round_trip(tmp_path):
    import torch

    from hf_metaoptimize.integrations.transformers import load_training_args

    args = parse(TrainingArguments, "--optim", "metaoptimize_lion", "--optim_args", "meta_lr=0.01")
    torch.save(args, tmp_path / "training_args.bin")
    loaded = load_training_args(tmp_path / "training_args.bin")
    assert loaded.optim == OptimizerNames.METAOPTIMIZE_LION and loaded.optim_args == "meta_lr=0.01"


@pytest.mark.parametrize("version", ["4.57.1", "5.1.0", "6.0.0"])
def test_unsupported_transformers_versions_are_refused(version, monkeypatch):
    monkeypatch.delenv(registry.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=f"found transformers {version}"):
        registry.check_transformers_version(version)
    registry.check_transformers_version("5.24.0")
    registry.check_transformers_version("5.2.0.dev0")
    monkeypatch.setenv(registry.ALLOW_UNTESTED_ENV, "1")
    if version.startswith("6"):
        registry.check_transformers_version(version)  # allowed (with a warning) for newer versions only


def test_installed_transformers_has_the_private_table_we_rely_on():
    """CI guard: the private dispatch table and its context object look as register() expects."""
    ctx_fields = {f.name for f in dataclasses.fields(trainer_optimizer.OptimizerContext)}
    assert {"args", "model", "optimizer_kwargs", "adam_kwargs", "optim_args"} <= ctx_fields
    assert isinstance(trainer_optimizer._OPTIMIZER_HANDLERS, dict)
    args = parse(TrainingArguments, "--optim", "metaoptimize")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, _tiny.tiny_gpt2())
    assert cls is hf_metaoptimize.MetaOptimize and kwargs["base"] == "adamw"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--optim_args", "meta=adam,meta_eps=0"], "meta_eps='0' is out of range"),
        (["--optim_args", "base=lion", "--adam_epsilon", "1e-6"], None),  # ignored with a warning, not an error
        (["--adam_beta1", "1.5"], "invalid betas=(1.5, 0.999)"),  # the optimizer's own rule, while parsing
        (["--weight_decay", "-0.1"], "invalid weight_decay=-0.1"),
    ],
)
def test_the_optimizers_rules_apply_while_parsing(argv, needle):
    if needle is None:
        parse(TrainingArguments, "--optim", "metaoptimize", *argv)
        return
    with pytest.raises(OptimArgsError, match=re.escape(needle)):
        parse(TrainingArguments, "--optim", "metaoptimize", *argv)
