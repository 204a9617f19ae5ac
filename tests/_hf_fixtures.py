"""Tiny, seeded random-weight model folders of the real transformers
architectures the depth, seg and caption annotators load (DPT-hybrid with a
BiT backbone, UperNet with a ConvNeXt backbone, BLIP captioning with a BERT
tokenizer), written with ``save_pretrained`` so the annotators load them as
local model folders, never from the network."""

from __future__ import annotations

import inspect
import os

import numpy as np

WORDS = (
    "a an the of on in with and is are man woman cat dog person people sitting standing "
    "red blue green white black small large wooden table chair street car tree sky water "
    "grass building window room photo picture close up view field road flowers cup coffee "
    "plate food face hair wearing holding looking space suit astronaut flag rocket"
).split()


def _reseed_(model, seed: int, std: float) -> None:
    """Re-draw every floating parameter N(0, std) (norm weights around 1) so
    tiny random models give varied, well-conditioned outputs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g) * std
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def make_dpt_hybrid(folder: str, image_size: int = 64, seed: int = 0) -> str:
    """DPTForDepthEstimation, hybrid (BiT backbone) like Intel/dpt-hybrid-midas."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(
        is_hybrid=True,
        image_size=image_size,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        backbone_out_indices=[0, 1, 2, 3],
        backbone_config={
            "global_padding": "same",
            "layer_type": "bottleneck",
            "depths": [1, 1, 1],
            "hidden_sizes": [8, 16, 32, 64],
            "num_groups": 2,
            "out_features": ["stage1", "stage2", "stage3"],
            "embedding_dynamic_padding": True,
        },
        backbone_featmap_shape=[1, 32, image_size // 16, image_size // 16],
        neck_hidden_sizes=[8, 16, 32, 32],
        reassemble_factors=[1, 1, 1, 0.5],
        fusion_hidden_size=16,
        use_auxiliary_head=False,
    )
    model = DPTForDepthEstimation(config).eval()
    _reseed_(model, seed, 0.1)
    model.save_pretrained(folder)
    DPTImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        keep_aspect_ratio=False,
        ensure_multiple_of=1,
        resample=3,
    ).save_pretrained(folder)
    return folder


def make_upernet_convnext(folder: str, size: int = 384, seed: int = 0) -> str:
    """UperNetForSemanticSegmentation with a ConvNeXt backbone, 150 ADE20K labels."""
    import torch
    from transformers import ConvNextConfig, ConvNextImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    from annotators.seg import ADE20K_CLASSES

    torch.manual_seed(seed)
    config = UperNetConfig(
        backbone_config=ConvNextConfig(
            hidden_sizes=[8, 16, 32, 64],
            depths=[1, 1, 1, 1],
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        hidden_size=16,
        pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=False,
        num_labels=ADE20K_CLASSES,
        id2label={i: f"class{i}" for i in range(ADE20K_CLASSES)},
        label2id={f"class{i}": i for i in range(ADE20K_CLASSES)},
    )
    model = UperNetForSemanticSegmentation(config).eval()
    _reseed_(model, seed, 0.2)
    model.save_pretrained(folder)
    ConvNextImageProcessor(
        size={"shortest_edge": size},
        crop_pct=0.875,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        resample=3,
    ).save_pretrained(folder)
    return folder


def make_segformer(folder: str, seed: int = 0, size: int = 64) -> str:
    """A tiny SegFormer with 150 ADE20K classes (an ADE20K model other than
    UperNet, whose logits stay at a quarter of the input size)."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    from annotators.seg import ADE20K_CLASSES

    torch.manual_seed(seed)
    config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
        decoder_hidden_size=16, num_labels=ADE20K_CLASSES,
        id2label={i: f"class{i}" for i in range(ADE20K_CLASSES)},
        label2id={f"class{i}": i for i in range(ADE20K_CLASSES)},
    )
    SegformerForSemanticSegmentation(config).eval().save_pretrained(folder)
    SegformerImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


BLIP_STD = 0.1


def make_blip(folder: str, image_size: int = 64, seed: int = 0) -> str:
    """BlipForConditionalGeneration + BlipProcessor with a BERT tokenizer
    built from a small vocabulary file (BLIP's bos token is ``[DEC]``)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    os.makedirs(folder, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = specials + list(dict.fromkeys(WORDS))
    vocab_file = os.path.join(folder, "vocab_src.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    if "vocab_file" in inspect.signature(BertTokenizer.__init__).parameters:  # transformers 4
        tokenizer = BertTokenizer(vocab_file=vocab_file, do_lower_case=True, bos_token="[DEC]")
    else:  # transformers 5 takes the vocabulary itself
        with open(vocab_file) as f:
            table = {tok: i for i, tok in enumerate(f.read().split())}
        tokenizer = BertTokenizer(vocab=table, do_lower_case=True, bos_token="[DEC]")
    os.remove(vocab_file)
    ids = {t: vocab.index(t) for t in specials}
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            encoder_hidden_size=32,
            max_position_embeddings=64,
            bos_token_id=ids["[DEC]"],
            sep_token_id=ids["[SEP]"],
            pad_token_id=ids["[PAD]"],
            eos_token_id=ids["[SEP]"],
        ),
        vision_config=dict(
            hidden_size=32,
            image_size=image_size,
            patch_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
        ),
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config).eval()
    _reseed_(model, seed, BLIP_STD)
    model.save_pretrained(folder)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder


def photos(size: int = 96) -> list[np.ndarray]:
    """Real photos from skimage.data, resized so the batch mixes sizes:
    two of ``size`` x ``size`` and one non-square."""
    import cv2
    from skimage import data

    astronaut = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    chelsea = data.chelsea()
    chelsea = cv2.resize(chelsea[:, 75:375], (size, size), interpolation=cv2.INTER_AREA)
    coffee = cv2.resize(data.coffee(), (size * 3 // 2, size), interpolation=cv2.INTER_AREA)
    return [np.ascontiguousarray(im) for im in (astronaut, coffee, chelsea)]
