import pytest

from fedlegend.config import ConfigError, build_config, dump_config, load_config


def test_defaults_and_overrides():
    cfg = build_config({}, {"run.rounds": 5, "fleet.devices": 80})
    assert cfg.run.rounds == 5 and cfg.fleet.devices == 80 and cfg.partition.alpha == 10.0


def test_unknown_key_named():
    with pytest.raises(ConfigError, match=r"train\.lr_rate: unknown key"):
        build_config({"train": {"lr_rate": 0.1}})


def test_out_of_range_named():
    with pytest.raises(ConfigError, match=r"partition\.alpha"):
        build_config({"partition": {"alpha": -1}})
    with pytest.raises(ConfigError, match=r"method\.legend\.rho"):
        build_config({"method": {"legend": {"rho": 2}}})


def test_roundtrip_toml(tmp_path):
    cfg = build_config({}, {"run.seed": 3, "method.legend.epsilon_s": 2.5})
    p = tmp_path / "c.toml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_default_toml_in_sync():
    from pathlib import Path

    from fedlegend.config import Config, annotated_defaults

    path = Path(__file__).parent.parent / "configs" / "default.toml"
    assert path.read_text().strip() == annotated_defaults().strip(), \
        "regenerate: python -c 'from fedlegend.config import annotated_defaults; print(annotated_defaults())' > configs/default.toml"
    assert load_config(path) == Config()


def test_cli_reports_bad_config(tmp_path, capsys):
    from fedlegend.cli import main

    bad = tmp_path / "c.toml"
    bad.write_text("[fleet]\ndevicez = 3\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "fleet.devicez: unknown key" in capsys.readouterr().err
    assert main(["run", "--method", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_backward_cost_out_of_range_named():
    with pytest.raises(ConfigError, match=r"fleet\.backward_cost"):
        build_config({"fleet": {"backward_cost": 0}})
