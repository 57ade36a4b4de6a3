"""Config: YAML + overrides, validation messages, unknown keys, --help, presets, resolved-config round trip."""

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


def test_published_recipes():
    ddpo = load_config(["--config", str(ROOT / "configs/llama8b-ddpo.yaml")])
    dorpo = load_config(["--config", str(ROOT / "configs/llama8b-dorpo.yaml")])
    for cfg in (ddpo, dorpo):
        assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.optim.lr) == (128, 256, 5e-6)
        assert (cfg.data.pairs, cfg.data.min_gap, cfg.data.max_pairs_per_prompt) == ("gap", 5, 100)
        assert (cfg.eval.n_samples, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.top_k) == (4, 1.0, 0.95, 50)
        assert cfg.eval.repetition_penalty == 1.1
    assert (ddpo.loss.objective, ddpo.optim.epochs, ddpo.loss.beta) == ("ddpo", 3, 0.1)
    assert (dorpo.loss.objective, dorpo.optim.epochs, dorpo.loss.beta) == ("dorpo", 4, 0.25)
    gpt2 = load_config(["--config", str(ROOT / "configs/gpt2-dpo-writingprompts.yaml")])
    assert (gpt2.model.name, gpt2.data.pairs, gpt2.loss.beta, gpt2.optim.epochs, gpt2.data.max_length) == (
        "gpt2-small", "best_vs_worst", 0.1, 5, 512)
    assert (gpt2.eval.temperature, gpt2.eval.top_k, gpt2.eval.top_p, gpt2.eval.repetition_penalty) == (0.7, 50, 0.95, 1.1)


def test_overrides_are_typed():
    cfg = load_config(["--loss.beta", "0.25", "--optim.max_steps=7", "--model.lora_target_modules", "q_proj,v_proj",
                       "--checkpoint.export_final", "false", "--ref_cache.dir", "null"])
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
        (["--loss.objective", "ppo"], "loss.objective must be one of dpo, ddpo, orpo, dorpo, sft; got 'ppo'"),
        (["--optim.lr", "abc"], "--optim.lr must be a number, got 'abc'"),
        (["--data.max_length", "64", "--data.max_prompt_length", "128"], "must exceed data.max_prompt_length"),
        (["--parallel.zero_stage", "4"], "parallel.zero_stage must be 0, 1, 2 or 3, got 4"),
        (["--parallel.offload_params", "true"], "needs parallel.zero_stage 3"),
        (["--loss.objective", "dorpo", "--deviation.enabled", "false"], "needs deviation weights"),
        (["--loss.objective", "dpo", "--loss.nll_on_prompt", "true"], "dpo has none"),
    ],
)
def test_bad_values_get_fix_it_messages(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
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
        for key in values:
            assert f"--{section}.{key} " in text


def test_cli_help_and_error_exit_codes():
    env_py = sys.executable
    out = subprocess.run([env_py, "-m", "engine.config", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--deviation.rejected_weight_floor" in out.stdout
    bad = subprocess.run([env_py, "-m", "engine.config", "--loss.beta", "-1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "loss.beta must be > 0, got -1" in bad.stderr
