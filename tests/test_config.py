"""Config: YAML + overrides, validation messages, unknown keys, --help, presets, resolved-config round trip."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import Config, ConfigError, from_dict, help_text, load_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_are_the_tiny_cpu_preset():
    cfg = load_config([])
    assert cfg.model.name == "llama-tiny"
    assert cfg.loss.objective == "ddpo"
    assert cfg.data.source == "synthetic"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads(path):
    cfg = load_config(["--config", str(path)])
    assert isinstance(cfg, Config)


def _published(name):
    return load_config(["--config", str(ROOT / f"configs/{name}.yaml")])


def _check_published(cfg, objective, epochs, beta):
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.optim.lr) == (128, 256, 5e-6)
    assert (cfg.data.pairs, cfg.data.min_gap) == ("gap", 5)
    assert (cfg.eval.n_samples, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.top_k) == (4, 1.0, 0.95, 50)
    assert cfg.eval.repetition_penalty == 1.1
    assert (cfg.deviation.semantic_model, cfg.deviation.style_model) == (
        "jinaai/jina-embeddings-v3",
        "AnnaWegmann/Style-Embedding",
    )
    assert (cfg.loss.objective, cfg.optim.epochs, cfg.loss.beta) == (objective, epochs, beta)


def test_published_recipes():
    ddpo = _published("llama8b-ddpo")
    _check_published(ddpo, "ddpo", 3, 0.1)
    # The authors' scripts (see the comments in the file): no pair cap, PEFT's default LoRA, linear schedule.
    assert ddpo.recipe == "authors" and ddpo.data.max_pairs_per_prompt is None
    assert (ddpo.model.lora_target_modules, ddpo.model.lora_dropout) == (["q_proj", "v_proj"], 0.0)
    assert (ddpo.optim.schedule, ddpo.optim.warmup_ratio) == ("linear", 0.0)
    for name, objective, epochs, beta in (
        ("llama8b-ddpo-engine", "ddpo", 3, 0.1),
        ("llama8b-dorpo-engine", "dorpo", 4, 0.25),
    ):
        cfg = _published(name)
        _check_published(cfg, objective, epochs, beta)
        assert cfg.recipe == "engine" and cfg.data.max_pairs_per_prompt == 100
    gpt2 = _published("gpt2-dpo-writingprompts")
    assert (gpt2.model.name, gpt2.data.pairs, gpt2.loss.beta, gpt2.optim.epochs, gpt2.data.max_length) == (
        "gpt2-small",
        "best_vs_worst",
        0.1,
        5,
        512,
    )
    assert (gpt2.eval.temperature, gpt2.eval.top_k, gpt2.eval.top_p, gpt2.eval.repetition_penalty) == (
        0.7,
        50,
        0.95,
        1.1,
    )


def test_published_dorpo_recipe():
    dorpo = _published("llama8b-dorpo")
    _check_published(dorpo, "dorpo", 4, 0.25)
    assert dorpo.recipe == "authors" and dorpo.loss.nll_on_prompt and dorpo.data.truncation == "trl"
    assert (dorpo.data.max_length, dorpo.data.max_prompt_length) == (512, 128)
    assert dorpo.model.name == "meta-llama/Llama-3.1-8B"


def test_overrides_are_typed():
    cfg = load_config(
        [
            "--loss.beta",
            "0.25",
            "--optim.max_steps=7",
            "--model.lora_target_modules",
            "q_proj,v_proj",
            "--checkpoint.export_final",
            "false",
            "--ref_cache.dir",
            "null",
        ]
    )
    assert cfg.loss.beta == 0.25 and cfg.optim.max_steps == 7
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.checkpoint.export_final is False and cfg.ref_cache.dir is None
    # YAML 1.1 reads 5e-6 (no dot) as a string; it must still be a number, on the command line and in files.
    assert load_config(["--optim.lr", "5e-6", "--optim.max_steps", "1e3"]).optim.lr == 5e-6
    assert load_config(["--deviation.semantic_model", ""]).deviation.semantic_model == ""


def test_numbers_without_a_dot_and_bare_off_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 5e-6\nref_cache:\n  mode: off\n")
    cfg = load_config(["--config", str(p)])
    assert cfg.optim.lr == 5e-6 and cfg.ref_cache.mode == "off"
    assert load_config(["--ref_cache.mode", "off"]).ref_cache.mode == "off"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--loss.beta", "-1"], "loss.beta must be > 0, got -1"),
        (["--loss.objective", "ppo"], "loss.objective must be one of dpo, ddpo, orpo, dorpo, sft, reward; got 'ppo'"),
        (["--optim.lr", "abc"], "--optim.lr must be a number, got 'abc'"),
        (["--data.max_length", "64", "--data.max_prompt_length", "128"], "must exceed data.max_prompt_length"),
        (["--parallel.zero_stage", "4"], "parallel.zero_stage must be one of 0, 1, 2, 3; got 4"),
        (["--optim.warmup_ratio", "1"], "optim.warmup_ratio must be in [0, 1), got 1"),
        (["--optim.max_steps", "0"], "optim.max_steps must be >= 1 or null, got 0"),
        (["--model.lora_r", "-1"], "model.lora_r must be >= 0 (0 disables LoRA), got -1"),
        (["--data.gap_sampler", "greedy"], "data.gap_sampler must be one of authors, engine; got 'greedy'"),
        (["--recipe", "paper"], "recipe must be one of authors, engine; got 'paper'"),
        (
            ["--recipe", "authors", "--data.pairs", "divpo", "--data.max_pairs_per_prompt", "null"],
            "data.divpo_sampler authors needs data.max_pairs_per_prompt",
        ),
        (["--parallel.offload_params", "true"], "needs parallel.zero_stage 3"),
        (["--loss.objective", "dorpo", "--deviation.enabled", "false"], "needs deviation weights"),
        (["--loss.objective", "dpo", "--loss.nll_on_prompt", "true"], "dpo has none"),
    ],
)
def test_bad_values_get_fix_it_messages(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--loss.bogus", "1"], "unknown key --loss.bogus; valid keys of loss"),
        (["--nope.x", "1"], "unknown config section"),
        (["positional"], "unrecognised argument"),
    ],
)
def test_unknown_keys_are_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("loss:\n  objective: dpo\n  betta: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key.*loss.betta"):
        load_config(["--config", str(p)])
    with pytest.raises(ConfigError, match="unknown config section"):
        from_dict({"losses": {}})


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(["--loss.beta", "0.3", "--data.pairs", "gap"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["loss"]["beta"] == 0.3


def test_help_lists_every_field():
    text = help_text()
    cfg = Config()
    for section, values in cfg.to_dict().items():
        if not isinstance(values, dict):
            assert f"--{section} " in text  # a top-level key (the recipe)
            continue
        for key in values:
            assert f"--{section}.{key} " in text


def test_cli_help_and_error_exit_codes():
    env_py = sys.executable
    out = subprocess.run([env_py, "-m", "engine.config", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--deviation.count_duplicates" in out.stdout
    bad = subprocess.run([env_py, "-m", "engine.config", "--loss.beta", "-1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "loss.beta must be > 0, got -1" in bad.stderr


def _recipe_fields():
    """(section, field, RecipeValues) of every field the recipe drives."""
    import dataclasses

    cfg = Config()
    return [
        (s, f.name, f.metadata["recipe"])
        for s in ("model", "data", "deviation", "loss", "optim", "eval")
        for f in dataclasses.fields(getattr(cfg, s))
        if "recipe" in f.metadata
    ]


def test_recipe_sets_every_field_it_drives():
    fields = _recipe_fields()
    assert {f"{s}.{n}" for s, n, _ in fields} == {
        "data.cleaning",
        "data.length_filter",
        "data.gap_sampler",
        "data.divpo_sampler",
        "data.max_pairs_per_prompt",
        "data.truncation",
        "deviation.groups",
        "deviation.count_duplicates",
        "deviation.precision",
        "loss.nll_on_prompt",
    }
    argv = ["--loss.objective", "ddpo", "--data.pairs", "gap"]
    for recipe in ("authors", "engine"):
        cfg = load_config(["--recipe", recipe, *argv])
        for s, n, rv in fields:
            assert getattr(getattr(cfg, s), n) == rv.value(recipe, getattr(cfg, s)), (recipe, s, n)
    authors = load_config(["--recipe", "authors", *argv])
    engine = load_config(argv)
    assert all(
        getattr(getattr(authors, s), n) != getattr(getattr(engine, s), n) for s, n, _ in fields if n != "nll_on_prompt"
    )  # nll_on_prompt differs for orpo/dorpo/sft only
    # Values that depend on another field follow it.
    assert load_config(["--recipe", "authors", "--data.pairs", "divpo"]).data.max_pairs_per_prompt == 2
    assert load_config(["--recipe", "authors", "--data.pairs", "all"]).data.max_pairs_per_prompt == 100
    assert load_config(["--recipe", "authors", "--loss.objective", "sft"]).loss.nll_on_prompt is True
    # Built in Python, a Config applies its recipe to the sections' unset fields too.
    assert Config(recipe="authors").data.cleaning == "authors" and Config().data.cleaning == "engine"


def test_explicit_fields_win_over_the_recipe(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("recipe: authors\ndata:\n  gap_sampler: engine\n")
    cfg = load_config(["--config", str(p)])
    assert (cfg.recipe, cfg.data.gap_sampler, cfg.data.cleaning) == ("authors", "engine", "authors")
    cfg = load_config(["--config", str(p), "--recipe", "engine", "--deviation.groups", "paired"])
    assert (cfg.data.gap_sampler, cfg.data.cleaning, cfg.deviation.groups) == ("engine", "engine", "paired")
    # The resolved config records every value: reloading it gives the same config whatever recipe it names.
    cfg.save(tmp_path / "resolved.yaml")
    assert load_config(["--config", str(tmp_path / "resolved.yaml")]) == cfg
    assert load_config(["--config", str(tmp_path / "resolved.yaml"), "--recipe", "authors"]).data.cleaning == "engine"


def test_help_says_what_each_recipe_sets():
    text = " ".join(help_text().split())  # the help is wrapped for the terminal
    assert "--recipe (authors|engine, default 'engine')" in text
    assert (
        "--data.gap_sampler (authors|engine, set by recipe: authors -> 'authors' [models/utils.py:294-347]; "
        "engine -> 'engine')" in text
    )
    assert "by pairs (gap: None, all: 100, divpo: 2; otherwise None)" in text
    assert "Precedence, lowest first: recipe, YAML file, command line." in text
