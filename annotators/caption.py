"""BLIP captions (member ``txt``), batched ``generate`` on the GPU.

``Salesforce/blip-image-captioning-large`` by default (the base model by
alias or any BLIP captioning repo id / local folder), through
``BlipForConditionalGeneration`` and its processor. Images are pre-processed
on the device as the processor specifies; the whole batch is captioned by one
``generate`` call (beam search by default) with the same text prompt.

Settings: ``num_beams``, ``max_new_tokens``, ``min_new_tokens``,
``repetition_penalty`` and an optional text ``prefix`` the caption starts
with (BLIP's conditional captioning: the prefix is part of the returned
caption, as transformers returns it). They are recorded in every sample's
metadata under ``generation``.

Caption policy
    The annotator only sees images and keys, so it always writes the
    generated caption into ``txt``. Whoever knows a sample's input caption
    (the pipeline, from the source's ``txt`` or caption column) decides the
    final one with :func:`choose_caption` (or :meth:`Caption.choose`, which
    applies the annotator's ``policy`` option)::

        ann = captioner.annotate_batch(images, keys)[i]
        text, extra = captioner.choose(input_caption, ann.members["txt"])
        # write `text` as txt; merge `extra` into the caption annotator's meta

    Policies: ``"generated"`` (default) always uses BLIP's caption;
    ``"keep_input"`` keeps a non-empty input caption and falls back to BLIP's
    otherwise. Either way the metadata keeps both captions and which one was
    written.
"""

from __future__ import annotations

from typing import Any

from annotators.base import Annotation, Annotator, check_image
from annotators.registry import register_annotator

#: Short names accepted for ``model``, besides any repo id or local folder.
CAPTION_MODELS = {
    "blip-large": "Salesforce/blip-image-captioning-large",
    "blip-base": "Salesforce/blip-image-captioning-base",
}
DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-large"
CAPTION_POLICIES = ("generated", "keep_input")


def choose_caption(
    existing: str | None, generated: str, policy: str = "generated"
) -> tuple[str, dict[str, Any]]:
    """The caption to write for one sample, and metadata recording the choice.

    ``existing`` is the input caption (None or blank when the source had
    none), ``generated`` the annotator's caption. Returns ``(caption, meta)``
    with ``meta = {"caption_policy", "caption_source": "input" | "generated",
    "input_caption", "generated_caption"}``.
    """
    if policy not in CAPTION_POLICIES:
        raise ValueError(f"unknown caption policy {policy!r}; valid: {', '.join(CAPTION_POLICIES)}")
    has_input = existing is not None and existing.strip() != ""
    use_input = policy == "keep_input" and has_input
    caption = existing.strip() if use_input else generated  # type: ignore[union-attr]
    return caption, {
        "caption_policy": policy,
        "caption_source": "input" if use_input else "generated",
        "input_caption": existing if has_input else None,
        "generated_caption": generated,
    }


class CaptionModel:
    """A loaded BLIP captioner on one device (shared per process)."""

    def __init__(self, model: str, device: Any, dtype: Any) -> None:
        import torch
        from transformers import AutoProcessor, BlipForConditionalGeneration

        from annotators.hf_models import BatchPreprocessor, load_pretrained

        self.device, self.dtype = device, dtype
        self.processor = load_pretrained(AutoProcessor, model, what="caption processor")
        self.tokenizer = self.processor.tokenizer
        self.preprocess = BatchPreprocessor(self.processor.image_processor)
        net = load_pretrained(BlipForConditionalGeneration, model, what="caption model")
        # fp32 weights whatever the checkpoint holds; reduced precision runs under autocast
        self.net = net.to(device=device, dtype=torch.float32).eval()

    def prompt_ids(self, prefix: str):
        """Token ids of the text prefix as BlipProcessor builds them, or None."""
        if not prefix:
            return None
        enc = self.tokenizer(prefix, return_tensors="pt", return_token_type_ids=False)
        return enc["input_ids"]


def _caption_model(model: str, device: str | None, precision: str | None) -> CaptionModel:
    from annotators._torch import resolve_device, resolve_precision
    from annotators.hf_models import resolve_model_name, shared

    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    name = resolve_model_name(model, CAPTION_MODELS)
    return shared(("caption", name, str(dev), str(dtype)), lambda: CaptionModel(name, dev, dtype))


@register_annotator
class Caption(Annotator):
    """``txt``: a BLIP caption of the image.

    Options:
        model: Hub repo id, alias (``blip-large``, ``blip-base``) or local
            folder of a BLIP captioning model.
        device, precision: as for every neural annotator (None = auto).
        num_beams: beam width (1 = greedy); BLIP's own captioning uses 3.
        max_new_tokens, min_new_tokens: limits on generated tokens (not
            counting the prefix).
        repetition_penalty: passed to ``generate`` (1.0 = none).
        prefix: text the caption starts with (e.g. ``"a photograph of"``).
        policy: how :meth:`choose` treats an input caption
            (``"generated"`` or ``"keep_input"``, see :func:`choose_caption`).

    Per-sample meta: ``generation`` (the settings used) and
    ``generated_caption``.
    """

    name = "caption"
    version = "1"
    members = ("txt",)
    uses_gpu = True
    default_batch_size = 64

    def __init__(
        self,
        model: str = DEFAULT_CAPTION_MODEL,
        device: str | None = None,
        precision: str | None = None,
        num_beams: int = 3,
        max_new_tokens: int = 20,
        min_new_tokens: int = 5,
        repetition_penalty: float = 1.0,
        prefix: str = "",
        policy: str = "generated",
    ) -> None:
        if int(num_beams) < 1:
            raise ValueError(f"caption num_beams must be >= 1, got {num_beams!r}")
        if not 0 <= int(min_new_tokens) <= int(max_new_tokens) or int(max_new_tokens) < 1:
            raise ValueError(
                f"caption needs 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, "
                f"got {min_new_tokens!r}, {max_new_tokens!r}"
            )
        if float(repetition_penalty) <= 0:
            raise ValueError(f"caption repetition_penalty must be > 0, got {repetition_penalty!r}")
        if policy not in CAPTION_POLICIES:
            raise ValueError(f"caption policy must be one of {', '.join(CAPTION_POLICIES)}, got {policy!r}")
        super().__init__(
            model=str(model),
            device=device,
            precision=precision,
            num_beams=int(num_beams),
            max_new_tokens=int(max_new_tokens),
            min_new_tokens=int(min_new_tokens),
            repetition_penalty=float(repetition_penalty),
            prefix=str(prefix).strip(),
            policy=policy,
        )

    @property
    def policy(self) -> str:
        return self._options["policy"]

    def generation_settings(self) -> dict[str, Any]:
        """The settings passed to ``generate`` (recorded per sample)."""
        o = self._options
        return {
            "model": o["model"],
            "num_beams": o["num_beams"],
            "max_new_tokens": o["max_new_tokens"],
            "min_new_tokens": o["min_new_tokens"],
            "repetition_penalty": o["repetition_penalty"],
            "prefix": o["prefix"],
            "do_sample": False,
        }

    def choose(self, existing: str | None, generated: str) -> tuple[str, dict[str, Any]]:
        """:func:`choose_caption` with this annotator's policy."""
        return choose_caption(existing, generated, self.policy)

    def setup(self) -> None:
        if getattr(self, "_model", None) is None:
            o = self._options
            self._model = _caption_model(o["model"], o["device"], o["precision"])

    def annotate_batch(self, images, keys=None):
        import torch

        from annotators._torch import autocast
        from annotators.hf_models import model_batches

        self.setup()
        m, o = self._model, self._options
        images = [check_image(im) for im in images]
        prompt = m.prompt_ids(o["prefix"])
        texts: list[str | None] = [None] * len(images)
        with torch.inference_mode():
            for idx, pixels in model_batches(images, m.preprocess, m.device):
                kwargs: dict[str, Any] = {}
                if prompt is not None:
                    # a fresh tensor: BLIP's generate overwrites the first id in place
                    ids = prompt.repeat(len(idx), 1).to(m.device)
                    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                with autocast(m.device, m.dtype):
                    tokens = m.net.generate(
                        pixel_values=pixels,
                        num_beams=o["num_beams"],
                        max_new_tokens=o["max_new_tokens"],
                        min_new_tokens=o["min_new_tokens"],
                        repetition_penalty=o["repetition_penalty"],
                        do_sample=False,
                        **kwargs,
                    )
                decoded = m.tokenizer.batch_decode(tokens.cpu(), skip_special_tokens=True)
                for i, text in zip(idx, decoded):
                    texts[i] = text.strip()
        settings = self.generation_settings()
        return [
            Annotation(members={"txt": t}, meta={"generation": settings, "generated_caption": t})
            for t in texts
        ]
