"""User errors vs programming errors (issue 14, item 6).

A user error (errors.UserError: config, files, models, data) prints one line naming the file,
line or field and the fix, without a traceback; `fedlegend --debug` adds the traceback; any
other exception (a bug) keeps its traceback.
"""

from __future__ import annotations

import pytest

from fedlegend import cli
from fedlegend.assets import AssetError, resolve_model
from fedlegend.datasets import _from_file
from fedlegend.config import ConfigError, build_config, load_config
from fedlegend.data import DataError
from fedlegend.errors import MethodNameError, ModelError, UserError
from fedlegend.methods import check_method


def test_every_user_error_is_one_class_and_keeps_its_builtin_base():
    for cls, builtin in ((ConfigError, ValueError), (AssetError, RuntimeError), (DataError, ValueError),
                         (MethodNameError, ValueError), (ModelError, ValueError)):
        assert issubclass(cls, UserError) and issubclass(cls, builtin)
    with pytest.raises(MethodNameError, match="registered methods"):
        check_method("nope")
    with pytest.raises(ConfigError, match=r"method\.name: unknown method 'nope'"):   # through pydantic's validator
        build_config({}, {"method.name": "nope"})


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "good", "label": 1}\n{"text": "fine", "label": 0}\n\n{"text": "bad" "label": 1}\n')
    with pytest.raises(AssetError) as err:
        _from_file(str(p), "text", "label")
    msg = str(err.value)
    assert str(p) in msg and "line 4" in msg and "not valid JSON" in msg, msg
    assert "position" not in msg   # not pandas' byte offset
    p.write_text('{"text": "good", "label": 1}\n[1, 2]\n')
    with pytest.raises(AssetError, match="line 2: a JSON list"):
        _from_file(str(p), "text", "label")


def test_bad_csv_line_names_file_and_line(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("text,label\na,1\nb,0\nc,1,extra\n")
    with pytest.raises(AssetError) as err:
        _from_file(str(p), "text", "label")
    assert str(p) in str(err.value) and "line 4" in str(err.value)
    p.write_bytes(b"")
    with pytest.raises(AssetError, match="is empty"):
        _from_file(str(p), "text", "label")


def test_unknown_config_key_names_the_field(tmp_path):
    p = tmp_path / "cfg.toml"
    p.write_text("[run]\nroundz = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "run.roundz: unknown key" in str(err.value) and str(p) in str(err.value)


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(AssetError, match="model.path .* has no config.json"):
        resolve_model("local", str(tmp_path / "nowhere"))
    with pytest.raises(AssetError, match="needs model.path"):
        resolve_model("local", None)


def _cli(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.err


def test_cli_user_errors_print_one_message_no_traceback(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[run]\nroundz = 3\n")
    rc, err = _cli(capsys, "run", "--config", str(cfg), "--out", str(tmp_path / "o1"))
    assert rc == 2 and "run.roundz: unknown key" in err and "Traceback" not in err, err

    rc, err = _cli(capsys, "run", "--model", "local", "--model-path", str(tmp_path / "nowhere"),
                   "--out", str(tmp_path / "o2"), "--quiet")
    assert rc == 2 and "has no config.json" in err and str(tmp_path / "nowhere") in err and "Traceback" not in err

    rc, err = _cli(capsys, "run", "--method", "nope", "--out", str(tmp_path / "o3"))
    assert rc == 2 and "unknown method 'nope'" in err and "Traceback" not in err

    rc, err = _cli(capsys, "compare", "--methods", "legend,nope", "--out", str(tmp_path / "o4"))
    assert rc == 2 and "unknown method 'nope'" in err and "Traceback" not in err

    rc, err = _cli(capsys, "compare", "--seeds", "0,x", "--out", str(tmp_path / "o5"))
    assert rc == 2 and "--seeds" in err and "Traceback" not in err


def test_cli_bad_data_file_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0\n')
    rc, err = _cli(capsys, "run", "--data", "file", "--data-path", str(p), "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 2 and f"{p}, line 2" in err and "Traceback" not in err, err


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[run]\nroundz = 3\n")
    rc, err = _cli(capsys, "--debug", "run", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert rc == 2 and "Traceback" in err and "run.roundz: unknown key" in err


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("a bug"), TypeError("a bug")])
def test_programming_errors_keep_their_traceback(monkeypatch, tmp_path, capsys, exc):
    def broken(*a, **k):
        raise exc

    monkeypatch.setattr(cli, "load_config", broken)
    with pytest.raises(type(exc)):   # not caught: Python prints the traceback and exits 1
        cli.main(["run", "--out", str(tmp_path / "o")])
    assert "fedlegend: error" not in capsys.readouterr().err
