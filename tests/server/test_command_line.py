"""scripts/mlx-server.py as a command: --help, environment equivalents, clear start-up errors, BLAS choice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_server.settings import parse_settings

from .conftest import ENTRY_POINT, run_python


def _run(*arguments: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ENTRY_POINT), *arguments],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class TestHelp:
    def test_help_lists_every_option(self) -> None:
        """--help names each flag and the environment variable convention."""
        result = _run("--help")
        assert result.returncode == 0
        for flag in (
            "--model",
            "--host",
            "--port",
            "--keep-quantized",
            "--dequantize",
            "--default-max-tokens",
            "--blas",
            "--log-file",
            "--export-mlx",
        ):
            assert flag in result.stdout
        assert "MLX_SERVER_" in result.stdout


class TestSettings:
    def test_defaults_are_local_only(self) -> None:
        """127.0.0.1:8081 by default: nothing listens on other interfaces unless asked."""
        settings = parse_settings([], environment={})
        assert (settings.host, settings.port) == ("127.0.0.1", 8081)

    def test_environment_equivalents(self) -> None:
        """Every flag can come from MLX_SERVER_<FLAG>; the command line wins."""
        environment = {
            "MLX_SERVER_PORT": "9001",
            "MLX_SERVER_HOST": "0.0.0.0",
            "MLX_SERVER_KEEP_QUANTIZED": "1",
            "MLX_SERVER_DEFAULT_MAX_TOKENS": "77",
            "MLX_SERVER_MODEL": "/models/x.gguf",
            "MLX_SERVER_EXPORT_MLX": "/tmp/out",
            "MLX_SERVER_LOG_FILE": "/tmp/server.log",
            "MLX_SERVER_BLAS": "/usr/lib/libblas.so",
        }
        settings = parse_settings([], environment=environment)
        assert settings.port == 9001 and settings.host == "0.0.0.0" and settings.dequantize is False
        assert settings.default_max_tokens == 77 and settings.models == ("/models/x.gguf",)
        assert settings.export_mlx == Path("/tmp/out") and settings.log_file == Path("/tmp/server.log")
        assert settings.blas == "/usr/lib/libblas.so"
        assert parse_settings(["--port", "9002"], environment=environment).port == 9002

    def test_weight_format_is_chosen_at_load_unless_a_flag_says(self) -> None:
        """No flag: None (device and memory decide); either flag forces; both at once is a usage error."""
        assert parse_settings([], environment={}).dequantize is None
        assert parse_settings(["--dequantize"], environment={}).dequantize is True
        assert parse_settings(["--keep-quantized"], environment={}).dequantize is False
        assert parse_settings([], environment={"MLX_SERVER_DEQUANTIZE": "1"}).dequantize is True
        with pytest.raises(SystemExit):
            parse_settings(["--keep-quantized", "--dequantize"], environment={})

    @pytest.mark.parametrize("arguments", [["--port", "70000"], ["--port", "x"], ["--default-max-tokens", "0"]])
    def test_bad_values_exit_with_usage(self, arguments: list[str]) -> None:
        """Invalid flags stop with argparse's usage message and status 2."""
        with pytest.raises(SystemExit) as stopped:
            parse_settings(arguments, environment={})
        assert stopped.value.code == 2


class TestStartupErrors:
    def test_missing_model_is_a_clear_error(self, tmp_path: Path) -> None:
        """A model that cannot be loaded ends the process with one clear line, no traceback."""
        result = _run("--model", str(tmp_path / "nope.gguf"), "--port", "0")
        assert result.returncode == 2
        assert "Cannot load the model: GGUF file not found" in result.stderr
        assert "Traceback" not in result.stderr

    @pytest.mark.parametrize(
        ("config", "arguments", "said"),
        [
            ('ttl = "ten"', [], "ttl must be a finite number, not 'ten'"),
            ("models = 5", [], "models must be a table"),
            ('[models.m]\nsource = "x"\nkv_budget = "inf"', [], "kv_budget: must be a positive, finite size"),
            (None, ["--memory-budget", "inf"], "must be a positive, finite size"),
        ],
    )
    def test_no_bad_configuration_ends_start_up_with_a_traceback(
        self, tmp_path: Path, config: str | None, arguments: list[str], said: str
    ) -> None:
        """Each bad value is one sentence naming its key, before any model loads."""
        if config is not None:
            path = tmp_path / "models.toml"
            path.write_text(config)
            arguments = [*arguments, "--models-config", str(path)]
        result = _run(*arguments, "--port", "0")
        assert result.returncode == 2
        assert said in result.stderr and "Traceback" not in result.stderr

    @pytest.mark.e2e
    def test_export_command(self, tmp_path: Path) -> None:
        """--export-mlx writes an MLX model directory and exits."""
        destination = tmp_path / "exported"
        result = _run("--export-mlx", str(destination), timeout=300)
        assert result.returncode == 0, result.stderr
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in destination.iterdir()}


class TestBlas:
    def _probe(self, env: dict[str, str]) -> str:
        code = (
            "import os; from mlx_server.blas import preload_optimized_blas; "
            "info = preload_optimized_blas(os.environ.get('MLX_SERVER_BLAS')); "
            "print(info.name, info.optimized, info.warning)"
        )
        return run_python(code, env).stdout.strip()

    @pytest.mark.skipif(
        not Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3").exists(), reason="OpenBLAS is not installed"
    )
    def test_openblas_is_found(self) -> None:
        """Debian's OpenBLAS is found and loaded."""
        assert self._probe({}).startswith("OpenBLAS True")

    def test_bad_override_warns_with_the_install_hint(self) -> None:
        """An override that is not a BLAS falls back with a warning that says how to fix it."""
        output = self._probe({"MLX_SERVER_BLAS": "/nonexistent/libblas.so"})
        assert output.startswith("reference False") and "apt-get install libopenblas0-pthread" in output

    def test_too_late_after_mlx_import(self) -> None:
        """Once MLX is imported, preloading reports it cannot choose any more."""
        code = (
            "import mlx.core; from mlx_server.blas import preload_optimized_blas; "
            "print(preload_optimized_blas().warning)"
        )
        assert "imported before" in run_python(code).stdout
