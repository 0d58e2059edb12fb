"""Which models are served under which names: --model, --embedding-model, --alias and the models config (TOML)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_server.pool.registry import ModelSpec, Registry, RegistryError, build_registry, model_argument
from mlx_server.settings import Settings, parse_settings
from mlx_server.vocabulary import InvalidRequestError, ModelKind, Sampling

CONFIG = """
default = "main"
ttl = 600

[models.small]
source = "/models/small"
aliases = ["claude-haiku-*"]
ttl = 30

[models.main]
source = "/models/main"
aliases = ["claude-sonnet-*", "claude-opus-*"]
pinned = true
context_length = 16384
kv_bits = 8
kv_budget = "2G"
temperature = 0.7
top_k = 20

[models.embed]
source = "/models/embed"
kind = "embedding"
"""


def registry_of(*arguments: str, config: str | None = None, tmp_path: Path | None = None) -> Registry:
    extra: list[str] = []
    if config is not None:
        assert tmp_path is not None
        path = tmp_path / "models.toml"
        path.write_text(config)
        extra = ["--models-config", str(path)]
    return build_registry(parse_settings([*arguments, *extra], environment={}))


def default_name(registry: Registry, kind: ModelKind) -> str:
    spec: ModelSpec | None = registry.default(kind)
    assert spec is not None
    return spec.name


class TestTheCommandLine:
    def test_without_a_model_the_bundled_one_is_served(self) -> None:
        registry = build_registry(Settings())
        (spec,) = registry.models
        assert spec.source is None and spec.kind == "chat" and spec.name.startswith("SmolLM2")

    @pytest.mark.parametrize(
        ("argument", "expected"),
        [
            ("main=/models/qwen", ("main", "/models/qwen")),
            ("/models/qwen", (None, "/models/qwen")),
            ("mlx-community/Qwen3-4B-4bit", (None, "mlx-community/Qwen3-4B-4bit")),
            ("small=mlx-community/Qwen3-0.6B", ("small", "mlx-community/Qwen3-0.6B")),
            ("/odd/path=with/equals", (None, "/odd/path=with/equals")),
        ],
    )
    def test_name_equals_source(self, argument: str, expected: tuple[str | None, str]) -> None:
        assert model_argument(argument) == expected

    def test_names_default_to_the_directory_file_or_repo(self) -> None:
        registry = build_registry(
            parse_settings(
                ["--model", "/m/Qwen3-4B", "--model", "/m/llama.Q4_0.gguf", "--model", "org/Repo-1"], environment={}
            )
        )
        assert [spec.name for spec in registry.models] == ["Qwen3-4B", "llama.Q4_0", "Repo-1"]

    def test_the_first_of_each_kind_is_its_default(self) -> None:
        registry = build_registry(
            parse_settings(
                ["--model", "main=/m/a", "--model", "small=/m/b", "--embedding-model", "e=/m/c"], environment={}
            )
        )
        assert default_name(registry, "chat") == "main" and default_name(registry, "embedding") == "e"

    def test_the_environment_holds_several_models(self) -> None:
        settings = parse_settings([], environment={"MLX_SERVER_MODEL": "a=/m/a,b=/m/b", "MLX_SERVER_ALIAS": "x*=b"})
        registry = build_registry(settings)
        assert [spec.name for spec in registry.models] == ["a", "b"] and registry.aliases == (("x*", "b"),)


class TestRouting:
    @pytest.fixture
    def registry(self) -> Registry:
        arguments = ["--model", "main=/m/a", "--model", "small=/m/b", "--embedding-model", "embed=/m/c"]
        return build_registry(parse_settings([*arguments, "--alias", "claude-haiku-*=small"], environment={}))

    @pytest.mark.parametrize(
        ("requested", "served"),
        [("small", "small"), ("main", "main"), ("claude-haiku-4-5", "small"), ("claude-sonnet-4-5", "main"),
         ("gpt-4o", "main"), ("", "main")],
    )  # fmt: skip
    def test_by_name_then_alias_then_the_default(self, registry: Registry, requested: str, served: str) -> None:
        assert registry.resolve(requested, "chat").name == served

    def test_embeddings_route_among_embedding_models(self, registry: Registry) -> None:
        assert registry.resolve("text-embedding-3-small", "embedding").name == "embed"

    def test_a_chat_request_to_an_embedding_model_is_refused(self, registry: Registry) -> None:
        with pytest.raises(InvalidRequestError, match="embedding model: send it to /v1/embeddings"):
            registry.resolve("embed", "chat")
        with pytest.raises(InvalidRequestError, match="chat model"):
            registry.resolve("main", "embedding")

    def test_without_an_embedding_model_embeddings_are_refused(self) -> None:
        with pytest.raises(InvalidRequestError, match="no embedding model is served here"):
            build_registry(Settings()).resolve("anything", "embedding")


class TestTheModelsConfig:
    def test_models_aliases_and_settings(self, tmp_path: Path) -> None:
        registry = registry_of("--alias", "gpt-*=small", config=CONFIG, tmp_path=tmp_path)
        names = [spec.name for spec in registry.models]
        assert names == ["main", "small", "embed"], "default = main comes first"
        main, small, embed = registry.models
        assert (main.pinned, main.context_length, main.kv_bits, main.kv_budget) == (True, 16384, 8, 2 * 1024**3)
        assert main.sampling == Sampling(temperature=0.7, top_k=20) and main.ttl == 600
        assert small.ttl == 30 and embed.kind == "embedding"
        assert ("claude-haiku-*", "small") in registry.aliases
        assert registry.resolve("gpt-4o", "chat").name == "small"

    def test_command_line_models_come_first(self, tmp_path: Path) -> None:
        registry = registry_of(
            "--model", "cli=/m/cli", config=CONFIG.replace('default = "main"', ""), tmp_path=tmp_path
        )
        assert default_name(registry, "chat") == "cli"

    @pytest.mark.parametrize(
        ("arguments", "config", "message"),
        [
            (["--model", "a=/m/x", "--model", "a=/m/y"], None, "two models are named 'a'"),
            (["--alias", "claude-*=nothing"], None, "points to 'nothing', which is not a served model"),
            (["--alias", "no-equals"], None, "expected PATTERN=NAME"),
            ([], "[models.x]\nkind = 'chat'", "needs a source"),
            ([], "[models.x]\nsource = '/m'\nkind = 'vision'", "kind must be chat or embedding"),
            ([], "[models.x]\nsource = '/m'\ncolour = 'red'", "unknown keys colour"),
            ([], "[models.x]\nsource = '/m'\nkv_bits = 3", "kv_bits must be 4 or 8"),
            ([], "[models.x]\nsource = '/m'\naliases = 'y'", "aliases must be a list"),
            ([], "default = 'nope'", "names no model"),
            ([], "this is = not toml [", "is not valid TOML"),
        ],
    )
    def test_what_cannot_be_served_is_a_sentence(
        self, tmp_path: Path, arguments: list[str], config: str | None, message: str
    ) -> None:
        with pytest.raises(RegistryError, match=message):
            registry_of(*arguments, config=config, tmp_path=tmp_path)

    @pytest.mark.parametrize(
        ("config", "message"),
        [
            ("ttl = 'ten'", "ttl must be a finite number, not 'ten'"),
            ("ttl = -1", "ttl must be 0 or more seconds"),
            ("ttl = inf", "ttl must be a finite number"),
            ("models = 5", "models must be a table"),
            ("colour = 'red'", "unknown keys colour"),
            ("[models.x]\nsource = '/m'\ntemperature = 'hot'", r"\[models.x\]: temperature must be a finite number"),
            ("[models.x]\nsource = '/m'\ntemperature = -3", "temperature must be at least 0 and at most 2"),
            ("[models.x]\nsource = '/m'\ntop_p = 0", "top_p must be above 0 and at most 1"),
            ("[models.x]\nsource = '/m'\ntop_k = 2.5", "top_k must be a whole number"),
            ("[models.x]\nsource = '/m'\nrepetition_penalty = nan", "repetition_penalty must be a finite number"),
            ("[models.x]\nsource = '/m'\nkv_budget = 'inf'", "kv_budget: must be a positive, finite size"),
            ("[models.x]\nsource = '/m'\nkv_budget = '-5G'", "kv_budget: must be a positive, finite size"),
            ("[models.x]\nsource = '/m'\nkv_budget = true", "kv_budget must be a size"),
            ("[models.x]\nsource = '/m'\npinned = 'no'", "pinned must be true or false, not 'no'"),
            ("[models.x]\nsource = '/m'\ncontext_length = -5", "context_length must be a whole number of at least 1"),
            ("[models.x]\nsource = '/m'\ncontext_length = 1.5", "context_length must be a whole number"),
            ("[models.x]\nsource = '/m'\nkv_bits = true", "kv_bits must be 4 or 8"),
            ("[models.x]\nsource = 5", "source must be a path or a repo id"),
            ("[models.x]\nsource = '/m'\nttl = 'ten'", r"\[models.x\]: ttl must be a finite number"),
        ],
    )
    def test_every_value_is_checked_for_type_and_range_with_a_sentence_naming_its_key(
        self, tmp_path: Path, config: str, message: str
    ) -> None:
        with pytest.raises(RegistryError, match=message):
            registry_of(config=config, tmp_path=tmp_path)

    @pytest.mark.parametrize("size", ["inf", "nan", "-1G", "0", "-inf", "1e400"])
    def test_byte_sizes_refuse_inf_nan_and_negatives(self, size: str) -> None:
        with pytest.raises(SystemExit):
            parse_settings(["--memory-budget", size], environment={})
        with pytest.raises(SystemExit):
            parse_settings([], environment={"MLX_SERVER_KV_BUDGET": size})

    def test_a_missing_file_is_named(self, tmp_path: Path) -> None:
        with pytest.raises(RegistryError, match=r"nope\.toml"):
            build_registry(parse_settings(["--models-config", str(tmp_path / "nope.toml")], environment={}))
