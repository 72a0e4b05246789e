"""Bad input costs a clear message naming the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest

from mlsae_core.cli import main
from mlsae_core.config import (
    ConfigError,
    DataConfig,
    RunSpec,
    SAEConfig,
    TrainConfig,
    from_dict,
    spec_from_dict,
    spec_to_dict,
)
from tests.test_cli import corpus_dir, tiny_model_dir, train_args  # noqa: F401 - fixtures


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-k", "0"], "k=0 is not allowed: an integer >= 1"),
        (["-k", "100"], "k=100 is not allowed: at most n_latents = expansion_factor*d = 64"),
        (["--expansion_factor", "0"], "expansion_factor=0 is not allowed: an integer >= 1"),
        (["--layers", "0", "3"], "layers=[3] is not allowed: the model has 3 layers (0..2)"),
        (["--max_length", "4096"], "max_length=4096 is not allowed"),
        (["--max_tokens", "0"], "max_tokens=0 is not allowed"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--lr", "-1"], "lr=-1.0 is not allowed"),
        (["--batch_size", "0"], "batch_size=0 is not allowed"),
    ],
)
def test_bad_train_flags(tiny_model_dir, corpus_dir, tmp_path, capsys, extra, message):  # noqa: F811
    assert main(train_args(tiny_model_dir, corpus_dir, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "o" / "config.json").exists()


def test_missing_or_empty_corpus(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    assert main(train_args(tiny_model_dir, tmp_path / "nope", tmp_path / "o")) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(train_args(tiny_model_dir, tmp_path / "empty", tmp_path / "o")) == 2
    assert "empty" in capsys.readouterr().err


def test_unsupported_model_family(tmp_path, corpus_dir, capsys):  # noqa: F811
    from transformers import BertConfig, BertForMaskedLM

    from tests.tiny import tiny_tokenizer

    BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, vocab_size=64)).save_pretrained(tmp_path / "b")  # fmt: skip
    tiny_tokenizer().save_pretrained(tmp_path / "b")
    assert main(train_args(tmp_path / "b", corpus_dir, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "GPT-NeoX" in err and "Llama" in err and "GPT-2" in err, err


def test_config_unknown_keys_and_ranges():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['kk'\] in sweep.*allowed keys"):
        from_dict(SAEConfig, {"kk": 3}, where="sweep")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['kk'\] in SAEConfig"):
        SAEConfig(kk=3)
    with pytest.raises(ConfigError, match="k=True is not allowed: an integer"):
        SAEConfig(k=True)  # a YAML `true` is not a count
    with pytest.raises(
        ConfigError, match=r"test_fraction=1.5 is not allowed: a number >= 0 and < 1"
    ):
        DataConfig(test_fraction=1.5)
    with pytest.raises(ConfigError, match="accumulate_grad_batches=0"):
        TrainConfig(accumulate_grad_batches=0)
    with pytest.raises(ConfigError, match="auxk=-1"):
        SAEConfig(auxk=-1)
    assert SAEConfig(auxk=0).auxk is None  # the CLI's `--auxk 0`: no AuxK loss
    with pytest.raises(ConfigError, match="lr=0.0 is not allowed: a number > 0"):
        dataclasses.replace(TrainConfig(), lr=0.0)  # replace re-validates


def test_nested_settings_from_a_mapping():
    """A RunSpec from its JSON form (sections as mappings) validates every section."""
    spec = RunSpec(layers=[2, 0], sae=SAEConfig(k=4))
    assert spec_from_dict(spec_to_dict(spec)) == spec and spec.layers == (2, 0)
    bad = {**spec_to_dict(spec), "data": {"max_length": 1}}
    with pytest.raises(
        ConfigError, match=r"spec: data.max_length=1 is not allowed: an integer >= 2"
    ):
        spec_from_dict(bad)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['x'\] in train of spec"):
        spec_from_dict({**spec_to_dict(spec), "train": {"x": 1}})


def test_pickled_model_is_refused(tmp_path, corpus_dir, capsys):  # noqa: F811
    """A model directory with only pytorch_model.bin (pickle) is never unpickled."""
    from tests.tiny import tiny_transformer

    t = tiny_transformer("llama", n_layers=3, d=32)
    import torch

    (tmp_path / "m").mkdir()
    t.model.config.save_pretrained(tmp_path / "m")
    torch.save(t.model.state_dict(), tmp_path / "m" / "pytorch_model.bin")  # a pickle
    t.tokenizer.save_pretrained(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.safetensors"))
    assert main(train_args(tmp_path / "m", corpus_dir, tmp_path / "o")) == 2
    assert "safetensors only (no pickle)" in capsys.readouterr().err


def test_eval_delta_dtype_is_checked():
    from mlsae_core.config import EvalConfig

    assert EvalConfig(delta_dtype="float32").delta_dtype == "float32"
    with pytest.raises(ConfigError, match="delta_dtype='fp16'.*auto, float32, bfloat16"):
        EvalConfig(delta_dtype="fp16")


def test_the_sweep_model_refuses_unknown_keys_by_section():
    """The sweep file is one pydantic model of the settings classes: an unknown key is refused
    by the model itself, named with its section and the keys that section allows."""
    from pathlib import Path

    from mlsae_pipeline.sweep import parse_sweep

    base = {"models": ["tiny-llama"]}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\] in train of sweep file x.yaml; "
                       r"allowed keys are \['accumulate_grad_batches'"):  # fmt: skip
        parse_sweep({**base, "train": {"lrr": 1}}, Path("x.yaml"))
    with pytest.raises(ConfigError, match=r"sweep file x.yaml: checks.dead_max=2 is not allowed: "
                       r"a number >= 0 and <= 1"):  # fmt: skip
        parse_sweep({**base, "checks": {"dead_max": 2}}, Path("x.yaml"))
    with pytest.raises(ConfigError, match="sweep file x.yaml: k=0 is not allowed: an integer >= 1"):
        parse_sweep({**base, "grid": {"k": [4, 0]}}, Path("x.yaml"))  # SAEConfig's own range


def test_a_sweep_name_is_not_shadowed_by_a_directory_of_that_name(tmp_path, monkeypatch) -> None:
    """MLSAE_SWEEP=smoke run from a folder holding a `smoke/` directory (e.g. a storage root
    named after the sweep) still means data/sweeps/smoke.yaml."""
    from mlsae_pipeline.sweep import SWEEPS_DIR, sweep_path

    (tmp_path / "smoke").mkdir()
    monkeypatch.chdir(tmp_path)
    assert sweep_path("smoke") == SWEEPS_DIR / "smoke.yaml"
