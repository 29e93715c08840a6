"""The local backend's optional safety checker: a transformers image classifier (FLUX_MCP_SAFETY_MODEL).

The hosted endpoint runs its own safety filter when ``enable_safety_checker`` is true. Locally there
is none unless the user names one: any ``AutoModelForImageClassification`` checkpoint (a Hugging Face
id already downloaded, or a local directory), e.g. an NSFW detector whose labels include "nsfw".
``SafetyClassifier.load`` loads it once (float32, on the pipeline's device); ``check`` scores a batch
of decoded images:

- the NSFW score of an image is the summed softmax probability of the labels named in
  FLUX_MCP_SAFETY_LABELS (matched case-insensitively against the model's own labels; for a
  multi-label model, the highest sigmoid among them);
- an image is flagged when that score reaches FLUX_MCP_SAFETY_THRESHOLD.

What happens to a flagged image follows fal's checker as its users report it (its docs say only
"runs a safety filter on outputs"): the image is replaced by a black one of the same size, ``nsfw``
is true, and the caller adds a note. ``blacked_out`` makes that image.

What it does not know: the classifier's opinion is all there is. It knows only the labels its model
was trained with, misses what that model misses and flags what it wrongly flags; it never sees the
prompt or the inputs. This module knows nothing about MCP, diffusers, the request model or the
result store; torch and transformers are imported only when a model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..config import Settings
from ..errors import BackendUnavailable

__all__ = ["SafetyClassifier", "Verdict", "blacked_out"]


@dataclass(frozen=True)
class Verdict:
    """The classifier's answer for one image."""

    nsfw: bool
    #: The NSFW score (0-1) compared with the threshold.
    score: float
    #: The model's top label among the NSFW ones.
    label: str


class SafetyClassifier:
    """A loaded image classifier and the rule that turns its scores into flags."""

    def __init__(self, model: Any, processor: Any, settings: Settings) -> None:
        self.model = model
        self.processor = processor
        self.name = settings.safety_model
        self.threshold = settings.safety_threshold
        wanted = set(settings.safety_labels)
        labels = {int(i): str(label) for i, label in model.config.id2label.items()}
        #: (class index, label) of the model's labels that count as NSFW.
        self.flagged = [(i, label) for i, label in sorted(labels.items()) if label.strip().lower() in wanted]
        if not self.flagged:
            raise BackendUnavailable(
                f"the safety model {self.name!r} has none of the labels in FLUX_MCP_SAFETY_LABELS "
                f"({', '.join(settings.safety_labels)}); its labels are {', '.join(labels.values())}. "
                "Set FLUX_MCP_SAFETY_LABELS to the ones that mean NSFW."
            )
        self.multi_label = model.config.problem_type == "multi_label_classification"

    @classmethod
    def load(cls, settings: Settings, device: Any) -> SafetyClassifier:
        """The classifier named by FLUX_MCP_SAFETY_MODEL, on ``device``; BackendUnavailable if it cannot load."""
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        source = Path(settings.safety_model).expanduser()
        name = str(source) if source.is_dir() else settings.safety_model
        try:
            processor = AutoImageProcessor.from_pretrained(name)
            model = AutoModelForImageClassification.from_pretrained(name).to(device).eval()
        except (OSError, ValueError, RuntimeError, TypeError, KeyError, ImportError) as exc:
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise BackendUnavailable(
                f"cannot load the safety model FLUX_MCP_SAFETY_MODEL={settings.safety_model!r}: {reason}. "
                "It must be a local directory or a downloaded Hugging Face id of a transformers "
                "image-classification model (config.json, preprocessor_config.json, weights), e.g. "
                "`hf download Falconsai/nsfw_image_detection`; or unset FLUX_MCP_SAFETY_MODEL to run "
                "without a local check."
            ) from exc
        return cls(model, processor, settings)

    def check(self, images: list[Image.Image]) -> list[Verdict]:
        """One verdict per image, in order (one batched forward pass)."""
        import torch

        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        with torch.inference_mode():
            logits = self.model(pixel_values=pixel_values).logits.float()
        indices = [i for i, _ in self.flagged]
        if self.multi_label:
            scores = logits.sigmoid()[:, indices].max(dim=1).values
        else:
            scores = logits.softmax(dim=-1)[:, indices].sum(dim=1)
        verdicts = []
        for row, score in zip(logits[:, indices], scores.tolist(), strict=True):
            label = self.flagged[int(row.argmax())][1]
            verdicts.append(Verdict(score >= self.threshold, score, label))
        return verdicts


def blacked_out(image: Image.Image) -> Image.Image:
    """A black RGB image of the same size: what a flagged output becomes."""
    return Image.new("RGB", image.size)
