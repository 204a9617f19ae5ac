"""ControlNet export in the original ControlNet / AUTOMATIC1111 layout.

The original ControlNet (``cldm``) stores the control network under
``control_model.*`` with LDM names (``input_blocks``, ``zero_convs``,
``input_hint_block``, ``middle_block_out`` ...). This is the inverse of the
mapping diffusers applies when it reads such files
(``convert_controlnet_checkpoint`` in ``diffusers.loaders.single_file_utils``).
"""

from __future__ import annotations

import os
import re

import torch

PREFIX = "control_model."

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def diffusers_key_to_ldm(key: str, layers_per_block: int, n_cond_blocks: int) -> str:
    """One diffusers ControlNet key -> its LDM name (without the prefix)."""
    simple = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
        "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * (n_cond_blocks + 1)}.",
        "controlnet_mid_block.": "middle_block_out.0.",
        "class_embedding.linear_1.": "label_emb.0.0.",
        "class_embedding.linear_2.": "label_emb.0.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
    }
    for new, old in simple.items():
        if key.startswith(new):
            return old + key[len(new) :]
    if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        first = 1 + block * (layers_per_block + 1)
        if kind == "resnets":
            return f"input_blocks.{first + layer}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{first + layer}.1.{rest}"
        return f"input_blocks.{first + layers_per_block}.0.{rest.replace('conv.', 'op.', 1)}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, idx, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * idx}.{_resnet(rest)}"
        return f"middle_block.{2 * idx + 1}.{rest}"
    raise KeyError(f"no LDM name known for ControlNet key {key!r}")


def controlnet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet state dict -> ``control_model.*`` LDM keys."""
    lpb = config["layers_per_block"]
    n_cond = sum(1 for k in state_dict if re.match(r"controlnet_cond_embedding\.blocks\.\d+\.weight$", k))
    return {PREFIX + diffusers_key_to_ldm(k, lpb, n_cond): v for k, v in state_dict.items()}


def save_a1111(controlnet, path: str, dtype: torch.dtype | None = torch.float16) -> str:
    """Write ``controlnet`` as one safetensors file in the original layout
    (fp16 by default, as the published ControlNet files)."""
    from safetensors.torch import save_file

    sd = controlnet.state_dict()
    ldm = controlnet_to_ldm(sd, controlnet.config)
    if dtype is not None:
        ldm = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ldm.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in ldm.items()}, path, metadata={"format": "pt", "layout": "ldm-controlnet"})
    return path
