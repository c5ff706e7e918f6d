"""Every CLI reports an input error (MGMError) as one line and exit status 2, and lets a bug through.

--debug adds the traceback to the one line; any other exception is never turned into an exit status.
"""

from __future__ import annotations

import socket

import pytest

from mgm_ref.errors import CheckpointError, MGMError, run_cli


def _fail(exc):
    def run(*_a, **_k):
        raise exc

    return run


def test_run_cli_reports_mgm_errors_and_lets_bugs_through(capsys):
    assert run_cli("tool", _fail(CheckpointError("no config.json"))) == 2
    assert capsys.readouterr().err == "tool: error: no config.json\n"
    assert run_cli("tool", _fail(CheckpointError("no config.json")), debug=True) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "CheckpointError" in err and err.endswith("tool: error: no config.json\n")
    with pytest.raises(KeyError):
        run_cli("tool", _fail(KeyError("a bug")))
    assert run_cli("tool", lambda: None) == 0 and run_cli("tool", lambda: 3) == 3


def test_mgm_build(tmp_path, capsys, monkeypatch):
    from build_engines import cli

    argv = [
        "repo",
        "--model_dir",
        str(tmp_path / "none"),
        "--engine_dir",
        str(tmp_path),
        "--output_dir",
        str(tmp_path / "repo"),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mgm-build repo: error: ") and "no config.json" in err and "Traceback" not in err
    assert cli.main([*argv, "--debug"]) == 2 and "Traceback" in capsys.readouterr().err
    assert cli.main(["--debug", *argv]) == 2 and "Traceback" in capsys.readouterr().err
    import triton_models.repo_builder as rb

    monkeypatch.setattr(rb, "build_repo", _fail(KeyError("a bug")))
    with pytest.raises(KeyError):
        cli.main(argv)


def test_python_m_entry_points_use_the_same_error_path(tmp_path, capsys):
    from build_engines import llm, vision

    assert (
        vision.main(
            ["--model_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o"), "--backend", "onnxruntime"]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("mgm-build vision: error: ")
    assert llm.main(["--model_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("mgm-build llm: error: ")


def test_mgm_client(capsys, monkeypatch):
    from client import cli

    argv = ["--url", "127.0.0.1:1", "--prompt", "hi", "--ready_timeout", "0.2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mgm-client: error: ") and "Traceback" not in err
    assert cli.main([*argv, "--debug"]) == 2 and "Traceback" in capsys.readouterr().err
    monkeypatch.setattr(cli, "run", _fail(KeyError("a bug")))
    with pytest.raises(KeyError):
        cli.main(argv)


def test_mgm_bench(tmp_path, capsys, monkeypatch):
    from client.bench import cli, serve
    from client.bench.common import BenchError

    argv = ["serve", "--output_dir", str(tmp_path)]
    monkeypatch.setattr(serve, "run_serve", _fail(BenchError("no concurrency level could be measured")))
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "mgm-bench: error: no concurrency level could be measured\n"
    monkeypatch.setattr(serve, "run_serve", _fail(KeyError("a bug")))
    with pytest.raises(KeyError):
        cli.main(argv)


def test_mgm_web_port_in_use(capsys):
    from client.web import server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert server.main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mgm-web: error: cannot listen on 127.0.0.1:{port}") and "Traceback" not in err


def test_mgm_ref_cli(tmp_path, capsys, monkeypatch):
    from mgm_ref import cli

    argv = ["--model-path", str(tmp_path), "--image-file", str(tmp_path / "missing.png"), "--prompt", "hi"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and capsys.readouterr().err.startswith("mgm_ref.cli: error: ")
    monkeypatch.setattr(cli, "run", _fail(MGMError("x")))
    with pytest.raises(SystemExit):
        cli.main([*argv, "--debug"])
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setattr(cli, "run", _fail(KeyError("a bug")))
    with pytest.raises(KeyError):
        cli.main(argv)


def test_mgm_build_llm_option_error_is_one_line(tiny_checkpoints, tmp_path, capsys):
    from build_engines import cli

    rc = cli.main(
        [
            "llm",
            "--model_dir",
            str(tiny_checkpoints("llama")),
            "--output_dir",
            str(tmp_path / "o"),
            "--max_input_len",
            "1024",
            "--max_seq_len",
            "512",
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2 and "Traceback" not in err and err.startswith("mgm-build llm: error: --max_seq_len 512 must exceed")
    ), err
