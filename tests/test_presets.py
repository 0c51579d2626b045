"""Presets (issue 12, item 5): `--preset NAME` is configs/NAME.toml as the base; --config and flags
override it; an unknown name lists the presets."""

from __future__ import annotations

import pytest

from fedlegend import cli
from fedlegend.config import PRESETS_DIR, Config, ConfigError, load_config, preset_names, preset_path


def test_every_preset_file_is_a_valid_config():
    names = preset_names()
    assert {"default", "trec", "vitaminc", "paper"} <= set(names), names
    for name in names:
        assert isinstance(load_config(preset=name), Config), name


def test_default_preset_is_the_defaults():
    assert load_config(preset="default") == Config()


def test_encoder_presets_name_their_model_and_data():
    trec = load_config(preset="trec")
    assert (trec.model.name, trec.data.name, trec.data.test_size) == ("minilm-l6", "trec", 500)
    vit = load_config(preset="vitaminc")
    assert (vit.model.name, vit.data.name) == ("mpnet-base", "vitaminc")
    assert vit.data.eval_subset is not None and vit.data.max_length <= 128   # sized for a 2-core CPU


def test_legend_rank_budget_fits_each_encoder_preset():
    """LEGEND's eq. 11 budget must cover the preset model's depth (MPNet: 12 layers need psi >= 78)."""
    import json

    from fedlegend.assets import resolve_model
    from fedlegend.methods.legend import rank_distribution

    for name in ("default", "trec", "vitaminc"):
        cfg = load_config(preset=name)
        layers = json.loads((resolve_model(cfg.model.name).path / "config.json").read_text())["num_hidden_layers"]
        ranks = rank_distribution(layers, cfg.method.legend.rank_budget, cfg.method.legend.rank_step)
        assert len(ranks) == layers and min(ranks) >= 1, name


def test_flags_and_config_file_override_the_preset(tmp_path):
    cfg = load_config(preset="trec", overrides={"run.rounds": 2, "fleet.devices": 3})
    assert (cfg.run.rounds, cfg.fleet.devices, cfg.data.name) == (2, 3, "trec")
    own = tmp_path / "mine.toml"
    own.write_text("[data]\nmax_length = 20\n[run]\nrounds = 7\n")
    cfg = load_config(own, {"run.rounds": 3}, preset="trec")
    # the file replaces one key of [data] and keeps the preset's others; the flag wins over both
    assert (cfg.data.max_length, cfg.data.name, cfg.data.test_size, cfg.run.rounds) == (20, "trec", 500, 3)


def test_unknown_preset_lists_the_presets(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(preset="trek")
    msg = str(err.value)
    assert "unknown preset 'trek'" in msg and "trec" in msg and "vitaminc" in msg and str(PRESETS_DIR) in msg
    with pytest.raises(ConfigError, match="no presets"):
        preset_path("trec", folder=tmp_path)


def test_bad_key_in_a_preset_names_the_preset_file(tmp_path, monkeypatch):
    (tmp_path / "broken.toml").write_text("[run]\nroundz = 3\n")
    monkeypatch.setattr("fedlegend.config.PRESETS_DIR", tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(preset="broken")
    assert "run.roundz: unknown key" in str(err.value) and str(tmp_path / "broken.toml") in str(err.value)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("command", ["run", "compare"])
def test_cli_preset_with_an_override_flag(command, tmp_path, monkeypatch):
    """`fedlegend run|compare --preset trec --rounds 2`: the engine gets the preset's data and the flag's rounds."""
    seen = {}

    def fake_run(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        raise _Stop

    monkeypatch.setattr("fedlegend.rundir.run_experiment", fake_run)
    monkeypatch.setattr("fedlegend.compare.run_compare", fake_run)
    with pytest.raises(_Stop):
        cli.main([command, "--preset", "trec", "--rounds", "2", "--out", str(tmp_path / "o"), "--quiet"])
    cfg = seen["cfg"]
    assert (cfg.data.name, cfg.data.test_size, cfg.run.rounds) == ("trec", 500, 2)


def test_cli_unknown_preset_is_one_error_line(tmp_path, capsys):
    assert cli.main(["run", "--preset", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "fedlegend: error: unknown preset 'nope'; presets: " in err and "Traceback" not in err
