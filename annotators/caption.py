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


def fuse_vision_attention(vision_model: Any) -> int:
    """Run the self-attention of BLIP's ViT through ``scaled_dot_product_attention``.

    transformers' BLIP has only its eager attention (explicit scores,
    softmax, product); for the 577-token ViT-L at 384 px the batch's
    attention matrices are the largest tensors of the encoder and cost
    several passes over memory per layer. The fused kernel computes the same
    ``softmax(q k^T * scale) v`` without materialising them (and with an
    fp32 softmax inside, where eager bf16 would round the scores to bf16).
    Only modules with BLIP's exact attention layout (``qkv``, ``projection``,
    ``num_heads``, ``scale``) are switched; returns how many. For inference
    only: attention dropout is not applied and no attention maps are returned.
    """
    import types

    count = 0
    for module in vision_model.modules():
        if type(module).__name__ == "BlipAttention" and all(
            hasattr(module, a) for a in ("qkv", "projection", "num_heads", "scale")
        ):
            module.forward = types.MethodType(_fused_attention_forward, module)
            count += 1
    return count


def _fused_attention_forward(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> tuple:
    import torch.nn.functional as F

    bsz, n, dim = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(bsz, n, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
    ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
    return self.projection(ctx.transpose(1, 2).reshape(bsz, n, dim)), None


class CaptionModel:
    """A loaded BLIP captioner on one device (shared per process).

    Reduced precision (``dtype`` bf16/fp16) casts the weights: generation
    is bound by the per-token launch of some 500 small kernels, and
    autocast over fp32 weights adds a cast before most of them. ``fused``
    (default: on a GPU) switches the ViT's attention to the fused kernel,
    see :func:`fuse_vision_attention`.
    """

    def __init__(self, model: str, device: Any, dtype: Any, fused: bool | None = None) -> None:
        from transformers import AutoProcessor, BlipForConditionalGeneration

        from annotators._torch import prepare_model
        from annotators.hf_models import BatchPreprocessor, load_pretrained

        self.device, self.dtype = device, dtype
        self.processor = load_pretrained(AutoProcessor, model, what="caption processor")
        self.tokenizer = self.processor.tokenizer
        self.preprocess = BatchPreprocessor(self.processor.image_processor)
        net = load_pretrained(BlipForConditionalGeneration, model, what="caption model")
        self.net = prepare_model(net, device, dtype)
        if fused if fused is not None else device.type == "cuda":
            fuse_vision_attention(self.net.vision_model)

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
        num_beams: beam width (1 = greedy). Default 3, BLIP's published
            captioning setting (beam 3, at most 20 / at least 5 tokens), the
            one the BLIP captions of ControlNet-era training sets came from;
            beam search also avoids most of greedy BLIP-large's repeated
            words. ``num_beams=1`` is the fast choice (about a quarter more
            images/s at 20 tokens, batch 64 on a GPU): generation is bound
            by per-token overhead, and beams add their bookkeeping and
            cache reordering to every token.
        max_new_tokens, min_new_tokens: limits on generated tokens (not
            counting the prefix); defaults 20 and 5 as BLIP's.
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
    #: generate's per-token host work is shared by the whole batch: on an
    #: H200, BLIP-large greedy did 479 images/s at 256 against 247 at 64
    #: (peak 6.9 GiB; 18.8 GiB with 3 beams). A pipeline on a smaller GPU
    #: that runs out of memory halves the batch and keeps the size that fits.
    default_batch_size = 256

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

    def preflight(self) -> None:
        from annotators.hf_models import preflight_pretrained, resolve_model_name

        preflight_pretrained(resolve_model_name(self._options["model"], CAPTION_MODELS), what="caption model")

    def import_code(self) -> None:
        import torch  # noqa: F401
        from transformers import AutoProcessor, BlipForConditionalGeneration  # noqa: F401

    def setup(self) -> None:
        if getattr(self, "_model", None) is None:
            o = self._options
            self._model = _caption_model(o["model"], o["device"], o["precision"])

    def annotate_batch(self, images, keys=None):
        import torch

        from annotators.hf_models import model_batches

        self.setup()
        m, o = self._model, self._options
        images = [check_image(im) for im in images]
        prompt = m.prompt_ids(o["prefix"])
        texts: list[str | None] = [None] * len(images)
        with torch.inference_mode():
            for idx, pixels in model_batches(images, m.preprocess, m.device, m.dtype):
                kwargs: dict[str, Any] = {}
                if prompt is not None:
                    # a fresh tensor: BLIP's generate overwrites the first id in place
                    ids = prompt.repeat(len(idx), 1).to(m.device)
                    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                tokens = m.net.generate(
                    pixel_values=pixels,
                    num_beams=o["num_beams"],
                    max_new_tokens=o["max_new_tokens"],
                    min_new_tokens=o["min_new_tokens"],
                    repetition_penalty=o["repetition_penalty"],
                    do_sample=False,
                    use_cache=True,  # self- and cross-attention keys/values computed once
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
