"""The local safety checker (FLUX_MCP_SAFETY_MODEL) with tiny random ViT classifiers saved to disk.

Each classifier's head has zero weights and a chosen bias, so its probabilities are the softmax of
that bias whatever the image: one model always says "nsfw", another always "normal". They run
through ``SafetyClassifier`` directly and through ``LocalBackend`` with the tiny klein pipeline.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from flux_mcp.backends import BackendResult, InputImage
from flux_mcp.backends.local import LocalBackend
from flux_mcp.backends.safety import SafetyClassifier, blacked_out
from flux_mcp.backends.tiny import make_example_image
from flux_mcp.config import Settings
from flux_mcp.errors import BackendUnavailable, ConfigError
from flux_mcp.schema import EditRequest

from .conftest import edit_once

pytestmark = [pytest.mark.local, pytest.mark.usefixtures("one_torch_thread")]

FLAGGED = "flagged by the safety checker"
NO_CHECK = "no safety check ran on the local backend"


# -- fixtures and helpers ----------------------------------------------------------------------


def save_classifier(directory: Path, bias: list[float], labels: list[str], multi_label: bool = False) -> Path:
    """A tiny ViT image classifier whose answer is softmax(bias) (or sigmoid) for every image."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else None,
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()  # the image no longer matters: the bias decides
        model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(directory)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def always_nsfw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_classifier(tmp_path_factory.mktemp("nsfw") / "clf", [0.0, 10.0], ["normal", "nsfw"])


@pytest.fixture(scope="module")
def always_normal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_classifier(tmp_path_factory.mktemp("normal") / "clf", [10.0, 0.0], ["normal", "nsfw"])


def request(**fields: Any) -> EditRequest:
    base: dict[str, Any] = {
        "prompt": "a red house on a hill",
        "image_urls": ["house.png"],
        "num_inference_steps": 4,
        "seed": 7,
        "guidance_scale": 1.0,
        "acceleration": "none",
        "enable_safety_checker": True,
    }
    return EditRequest(**(base | fields))


def png_input() -> InputImage:
    out = io.BytesIO()
    make_example_image(64, 64).save(out, format="PNG")
    return InputImage(source="house.png", data=out.getvalue(), content_type="image/png", width=64, height=64)


class Messages:
    """A progress sink that keeps the messages."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    async def __call__(self, progress: float, total: float | None, message: str) -> None:
        self.messages.append(message)


async def edit(backend: LocalBackend, req: EditRequest, progress: Messages | None = None) -> BackendResult:
    return await edit_once(backend, req, [png_input()], progress or Messages())


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def classifier(directory: Path, **settings: Any) -> SafetyClassifier:
    return SafetyClassifier.load(Settings(safety_model=str(directory), **settings), torch.device("cpu"))


# -- through the local backend -----------------------------------------------------------------


@pytest.mark.anyio
async def test_flagged_images_come_back_black_with_a_note(
    make_backend: Callable[..., LocalBackend], always_nsfw: Path
) -> None:
    backend = make_backend(safety_model=str(always_nsfw))
    assert backend.capabilities()["safety_checker"] == str(always_nsfw)
    progress = Messages()
    result = await edit(backend, request(num_images=2, output_format="jpeg"), progress)
    assert [image.nsfw for image in result.images] == [True, True]
    for image in result.images:
        assert (image.width, image.height) == (64, 64)
        assert pixels(image.data).max() == 0  # black, in the requested format
    flagged = [note for note in result.notes if FLAGGED in note]
    assert len(flagged) == 2 and "seed 7" in flagged[0] and "seed 8" in flagged[1]
    assert "nsfw: 1.00 >= 0.5" in flagged[0] and "black image" in flagged[0]
    assert not any(NO_CHECK in note for note in result.notes)
    assert result.details["safety_model"] == str(always_nsfw)
    assert "running the safety checker" in progress.messages

    # The flag off: the classifier is not consulted, the image is the model's own.
    progress = Messages()
    unchecked = await edit(backend, request(enable_safety_checker=False), progress)
    (image,) = unchecked.images
    assert image.nsfw is None and pixels(image.data).max() > 0
    assert not any(FLAGGED in note or NO_CHECK in note for note in unchecked.notes)
    assert "running the safety checker" not in progress.messages
    assert "safety_model" not in unchecked.details


@pytest.mark.anyio
async def test_clean_images_are_marked_safe_and_left_alone(
    make_backend: Callable[..., LocalBackend], always_normal: Path
) -> None:
    backend = make_backend(safety_model=str(always_normal))
    checked = await edit(backend, request())
    unchecked = await edit(backend, request(enable_safety_checker=False))
    assert checked.images[0].nsfw is False and unchecked.images[0].nsfw is None
    assert np.array_equal(pixels(checked.images[0].data), pixels(unchecked.images[0].data))
    assert pixels(checked.images[0].data).max() > 0
    assert not any(FLAGGED in note or NO_CHECK in note for note in checked.notes)


@pytest.mark.anyio
async def test_without_a_safety_model_the_result_says_no_check_ran(
    make_backend: Callable[..., LocalBackend],
) -> None:
    backend = make_backend()
    assert backend.capabilities()["safety_checker"] is False
    result = await edit(backend, request())
    assert result.images[0].nsfw is None
    assert any(NO_CHECK in note and "FLUX_MCP_SAFETY_MODEL" in note for note in result.notes)


@pytest.mark.anyio
async def test_a_broken_safety_model_is_a_clear_error(
    make_backend: Callable[..., LocalBackend], tmp_path: Path
) -> None:
    broken = tmp_path / "broken-classifier"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(BackendUnavailable, match="FLUX_MCP_SAFETY_MODEL") as error:
        await edit(make_backend(safety_model=str(broken)), request())
    message = str(error.value)
    assert "image-classification model" in message and "unset FLUX_MCP_SAFETY_MODEL" in message

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "vit", "num_labels": 2}))
    with pytest.raises(BackendUnavailable, match="FLUX_MCP_SAFETY_MODEL"):
        await edit(make_backend(safety_model=str(no_weights)), request())


# -- the classifier's rule ---------------------------------------------------------------------


def test_scores_of_the_nsfw_labels_are_summed_against_the_threshold(tmp_path: Path) -> None:
    labels = ["neutral", "porn", "sexy", "drawings"]
    directory = save_classifier(tmp_path / "four", [1.0, 0.0, 0.0, 1.0], labels)
    probabilities = torch.tensor([1.0, 0.0, 0.0, 1.0]).softmax(-1)
    expected = float(probabilities[1] + probabilities[2])  # about 0.21
    images = [make_example_image(64, 64), make_example_image(80, 48)]

    lenient = classifier(directory).check(images)
    assert [v.nsfw for v in lenient] == [False, False]
    assert lenient[0].score == pytest.approx(expected, abs=1e-5)
    strict = classifier(directory, safety_threshold=0.2).check(images)
    assert [v.nsfw for v in strict] == [True, True] and strict[0].label in ("porn", "sexy")
    only_porn = classifier(directory, safety_labels=("porn",), safety_threshold=0.2).check(images[:1])
    assert only_porn[0].nsfw is False and only_porn[0].score == pytest.approx(expected / 2, abs=1e-5)


def test_a_multi_label_model_uses_the_highest_sigmoid(tmp_path: Path) -> None:
    directory = save_classifier(
        tmp_path / "multi", [2.0, -1.0, 0.5], ["safe", "nsfw", "gore"], multi_label=True
    )
    (verdict,) = classifier(directory, safety_labels=("nsfw", "gore")).check([make_example_image(64, 64)])
    assert verdict.label == "gore" and verdict.score == pytest.approx(float(torch.tensor(0.5).sigmoid()))
    assert verdict.nsfw is True  # sigmoid(0.5) = 0.62 >= 0.5


def test_a_model_without_the_configured_labels_is_refused(always_nsfw: Path) -> None:
    with pytest.raises(BackendUnavailable, match="FLUX_MCP_SAFETY_LABELS") as error:
        classifier(always_nsfw, safety_labels=("porn", "hentai"))
    assert "its labels are normal, nsfw" in str(error.value)


def test_blacked_out_keeps_the_size() -> None:
    black = blacked_out(make_example_image(72, 40))
    assert black.size == (72, 40) and black.mode == "RGB" and black.getextrema() == ((0, 0),) * 3


def test_safety_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "FLUX_MCP_SAFETY_MODEL": " Falconsai/nsfw_image_detection ",
            "FLUX_MCP_SAFETY_LABELS": " NSFW, Porn ,,",
            "FLUX_MCP_SAFETY_THRESHOLD": "0.8",
        }
    )
    assert settings.safety_model == "Falconsai/nsfw_image_detection"
    assert settings.safety_labels == ("nsfw", "porn") and settings.safety_threshold == 0.8
    defaults = Settings.from_env({})
    assert defaults.safety_model == "" and defaults.safety_threshold == 0.5
    assert defaults.safety_labels == ("nsfw", "porn", "hentai", "sexy")
    with pytest.raises(ConfigError, match="FLUX_MCP_SAFETY_LABELS"):
        Settings.from_env({"FLUX_MCP_SAFETY_LABELS": " , ,"})
    with pytest.raises(ConfigError, match="FLUX_MCP_SAFETY_THRESHOLD"):
        Settings.from_env({"FLUX_MCP_SAFETY_THRESHOLD": "1.5"})
