"""Subcommands ``train``, ``cache-latents``, ``generate``, ``base`` and ``compare`` of the controlset command line."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    """Add the trainer's subcommands to the ``controlset`` parser."""
    from training.config import add_arguments

    p = subparsers.add_parser(
        "train",
        help="train a ControlNet on controlset shards",
        description="Train a ControlNet on controlset shards (locked, then optionally with the SD decoder "
        "unlocked). Flags follow diffusers' train_controlnet.py; --config FILE.yaml may set any of them. "
        "Multi-GPU: torchrun --nproc-per-node N -m controlset train ...",
    )
    add_arguments(p)
    p.set_defaults(func=_train)

    k = subparsers.add_parser(
        "cache-latents",
        help="write shards that also carry VAE latents and text embeddings, so training skips both encoders",
        description="Read controlset shards and write new ones (same file names, in --output-dir) that keep every "
        "member and add latents.npy (the VAE latent distribution of the centre crop and of its mirror), "
        "text_embeds.npy (the caption's text-encoder output) and latents.json (resolution, crop, base "
        "fingerprint). Train on them with controlset train --cached-latents auto|on. See docs/training.md.",
    )
    k.add_argument("--base", required=True, help="the Stable Diffusion base training will use (diffusers folder or single file)")
    k.add_argument("--base-config", help="for a single-file --base: local diffusers folder with the configs")
    k.add_argument("--base-original-config", help="for a single-file --base: the original LDM inference yaml")
    k.add_argument("--shards", required=True, nargs="+", help="input shards: paths, globs, {000..099} patterns, fsspec URLs")
    k.add_argument("--output-dir", required=True, help="folder (or fsspec URL) for the cached shards and cache.json")
    k.add_argument("--resolution", type=int, default=512, help="training resolution (the centre crop is cached)")
    k.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (the VAE sees twice as many)")
    k.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
                   help="encoder precision (auto: bf16 on GPU, fp32 on CPU); stored as float16 either way")
    k.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    k.add_argument("--condition", nargs="+", default=[],
                   help="condition(s) training will read; samples without them are left out")
    k.add_argument("--workers", type=int, default=4, help="threads decoding images")
    k.set_defaults(func=_cache_latents)

    g = subparsers.add_parser("generate", help="generate images with a trained ControlNet")
    g.add_argument("--controlnet", required=True, help="diffusers ControlNet folder (e.g. OUTPUT_DIR/controlnet)")
    g.add_argument("--base", required=True, help="Stable Diffusion base: diffusers folder or single .safetensors")
    g.add_argument("--base-config", help="for a single-file --base: local diffusers folder with the configs")
    g.add_argument("--unet", help="replacement UNet folder (OUTPUT_DIR/unet of a run with an unlocked decoder)")
    g.add_argument("--condition", required=True, nargs="+", help="condition image(s), stacked in this order")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt")
    g.add_argument("--output", default="generated.png", help="output PNG (numbered when --num-images > 1)")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--num-inference-steps", type=int, default=30)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--controlnet-conditioning-scale", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    g.set_defaults(func=_generate)

    b = subparsers.add_parser("base", help="base models for training (tiny random model for tests)")
    bsub = b.add_subparsers(dest="base_command", metavar="KIND", required=True)
    t = bsub.add_parser(
        "tiny", help="write a tiny RANDOMLY INITIALISED SD-shaped model (for tests and demos; draws noise)"
    )
    t.add_argument("dir", help="output folder (diffusers format)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--preset", choices=("tiny", "small"), default="tiny",
                   help="tiny: CPU tests; small: a few million parameters for short GPU experiments")
    t.set_defaults(func=_base_tiny)

    c = subparsers.add_parser(
        "compare",
        help="compare ControlNet with its alternatives on a small task (fidelity curves, report)",
        description="Pre-train a small base on a conditioned task, train each listed conditioning method from it "
        "with the same seed and data, measure condition fidelity every K steps, and write report.md, "
        "results.json, convergence.png and sample grids. See docs/comparison.md.",
    )
    c.add_argument("--config", required=True, help="compare YAML file (e.g. bench/compare_gpu.yaml)")
    c.add_argument("--output-dir", help="overrides the file's output_dir")
    c.set_defaults(func=_compare)


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from training.config import config_from_args
    from training.train import train

    summary = train(config_from_args(args))
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary))
    return 0


def _cache_latents(args: argparse.Namespace, extra: list[str]) -> int:
    from training.cache import cache_shards

    conditions = [c.strip() for item in args.condition for c in item.split(",") if c.strip()]
    summary = cache_shards(
        args.base, args.shards, args.output_dir, resolution=args.resolution, batch_size=args.batch_size,
        mixed_precision=args.mixed_precision, device=args.device, conditions=conditions, workers=args.workers,
        base_config=args.base_config, base_original_config=args.base_original_config,
    )
    summary.pop("shards")  # per-shard counts are in OUTPUT_DIR/cache.json
    print(json.dumps(summary))
    return 0


def _generate(args: argparse.Namespace, extra: list[str]) -> int:
    from training.generate import generate

    paths = generate(
        args.controlnet, args.base, args.condition, args.prompt, args.output,
        negative_prompt=args.negative_prompt, num_images=args.num_images, steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, conditioning_scale=args.controlnet_conditioning_scale, seed=args.seed,
        unet=args.unet, device=args.device, precision=args.precision, base_config=args.base_config,
    )
    for p in paths:
        print(p)
    return 0


def _base_tiny(args: argparse.Namespace, extra: list[str]) -> int:
    from training.tiny import TINY_NOTE, write_tiny_base

    write_tiny_base(args.dir, seed=args.seed, preset=args.preset)
    print(f"{args.dir}: {TINY_NOTE}", file=sys.stderr)
    print(args.dir)
    return 0


def _compare(args: argparse.Namespace, extra: list[str]) -> int:
    from training.compare import load_config, run_compare

    cfg = load_config(args.config)
    command = f"controlset compare --config {args.config}" + (f" --output-dir {args.output_dir}" if args.output_dir else "")
    summary = run_compare(cfg, output_dir=args.output_dir, command=command)
    out = args.output_dir or cfg.get("output_dir") or "compare-out"
    table = {r["label"]: {"final_fidelity": r["final_fidelity"], "steps_to_threshold": r["steps_to_threshold"]}
             for r in summary["methods"]}
    print(json.dumps({"device": summary["device"], "date": summary["date"], "command": command,
                      "report": f"{out}/report.md", "results": f"{out}/results.json",
                      "references": summary["references"], "methods": table}))
    return 0
