"""Trainer tests on CPU: the tiny random SD-shaped base and real-photo shards."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from _training_fixtures import write_shards
from schemas.errors import UsageError
from training.config import TrainConfig, add_arguments, config_from_args
from training.data import DataState, SampleSpec, ShardStream, decode_sample, expand_shards, make_loader

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    """The tiny random base, written through the CLI function."""
    from controlset.cli import main

    out = str(tmp_path_factory.mktemp("base") / "tiny")
    assert main(["base", "tiny", out]) == 0
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("shards")
    train = write_shards(str(root), n_shards=3, per_shard=5, corrupt=1, prefix="train")
    val = write_shards(str(root), n_shards=1, per_shard=2, seed=7, prefix="val")
    return {"root": str(root), "train": train, "val": val}


def _cfg(tiny_base, shards, out, **kw) -> TrainConfig:
    base = dict(
        base=tiny_base, shards=[os.path.join(shards["root"], "train-{000000..000002}.tar")], output_dir=str(out),
        resolution=64, train_batch_size=2, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2,
        unlock_at=3, dataloader_num_workers=2, shuffle_buffer=4, learning_rate=1e-4, validation_steps=6,
        validation_shards=shards["val"], num_validation_images=2, validation_inference_steps=2, report_to="none",
        use_ema=True, ema_decay=0.5,
    )
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(tiny_base, shards, tmp_path_factory) -> dict:
    """Six steps: locked for three, then unlocked; checkpoints every two."""
    from training.train import train

    out = tmp_path_factory.mktemp("run") / "full"
    summary = train(_cfg(tiny_base, shards, out))
    return {"out": str(out), "summary": summary}


# -- base and config ---------------------------------------------------------


def test_tiny_base_is_labelled_and_loads(tiny_base):
    from diffusers import StableDiffusionPipeline

    with open(os.path.join(tiny_base, "README.md")) as f:
        assert "RANDOM" in f.read()
    with open(os.path.join(tiny_base, "model_index.json")) as f:
        assert "RANDOM" in json.load(f)["_controlset_note"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    ids = pipe.tokenizer("a cat, 2 dogs!").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.unk_token_id not in ids[1:-1]
    assert pipe.vae.config.block_out_channels and 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8


def test_yaml_config_and_flags(tmp_path):
    import argparse

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("learning-rate: 3.0e-5\nunlock_at: never\ntrain_batch_size: 8\ncondition: canny,depth\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(cfg_file), "--train-batch-size", "2", "--base", "b", "--shards", "x.tar"])
    cfg = config_from_args(args)
    assert cfg.learning_rate == 3e-5 and cfg.unlock_at is None
    assert cfg.train_batch_size == 2  # the flag wins over the file
    assert cfg.condition == ["canny", "depth"]
    assert config_from_args(parser.parse_args(["--unlock-at", "100"])).unlock_at == 100
    cfg_file.write_text("no_such_option: 1\n")
    with pytest.raises(UsageError, match="no_such_option"):
        config_from_args(parser.parse_args(["--config", str(cfg_file)]))


def test_single_file_base_offline_fails_clearly(tmp_path):
    from safetensors.torch import save_file

    from training.models import load_base

    path = str(tmp_path / "model.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, path)
    with pytest.raises(UsageError, match="--base-config"):
        load_base(path)


# -- data --------------------------------------------------------------------


def test_expand_shards(shards):
    root = shards["root"]
    assert expand_shards(os.path.join(root, "train-*.tar")) == shards["train"]
    assert expand_shards(os.path.join(root, "train-{000000..000002}.tar")) == shards["train"]
    assert expand_shards("file://" + shards["train"][0]) == ["file://" + shards["train"][0]]
    with pytest.raises(UsageError):
        expand_shards(os.path.join(root, "nothing-*.tar"))


def test_joint_crop_flip_ranges_and_prompt_dropout(shards):
    import webdataset as wds

    raw = next(iter(wds.WebDataset(shards["val"][0], shardshuffle=False)))
    raw["same.png"] = raw["jpg"]  # a "condition" equal to the image shows the joint transform
    raw = {k: v for k, v in raw.items()}
    spec = SampleSpec(conditions=("same", "canny"), resolution=64, proportion_empty_prompts=0.5)
    crops, empties = set(), 0
    for i in range(40):
        s = decode_sample(raw, spec, np.random.default_rng(i))
        assert s["pixel_values"].shape == (3, 64, 64) and s["conditioning"].shape == (6, 64, 64)
        assert s["pixel_values"].min() >= -1 and s["pixel_values"].max() <= 1
        assert s["conditioning"].min() >= 0 and s["conditioning"].max() <= 1
        # Same crop and flip on image and condition: they agree pixel for pixel.
        assert np.abs((s["pixel_values"] + 1) / 2 - s["conditioning"][:3]).max() < 1e-5
        crops.add(s["pixel_values"].tobytes())
        empties += s["caption"] == ""
    assert len(crops) > 4  # 80x64 images: 17 offsets x 2 flips
    assert 8 <= empties <= 32


def _take(stream_kwargs, n, state=None):
    stream = ShardStream(**stream_kwargs, state=state)
    out, ds = [], state or DataState()
    for batch in make_loader(stream):
        out.append((batch["keys"], batch["pixel_values"].numpy().copy(), batch["captions"]))
        ds.update(batch)
        if len(out) == n:
            break
    return out, ds


def test_stream_resumes_exactly_with_workers(shards):
    kw = dict(shards=shards["train"], spec=SampleSpec(resolution=32), batch_size=2, seed=3, num_workers=2, shuffle_buffer=4)
    whole, whole_state = _take(kw, 9)
    first, state = _take(kw, 5)
    state = DataState.from_dict(json.loads(json.dumps(state.to_dict())))
    rest, _ = _take(kw, 4, state)
    assert [b[0] for b in whole] == [b[0] for b in first + rest]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(whole, first + rest))
    assert whole_state.skipped >= 1  # the corrupt sample was skipped and counted
    # More batches than samples in one pass: the stream goes on into the next epoch.
    assert len({k for b in whole for k in b[0]}) == 14


def test_streams_split_by_node(shards):
    keys = []
    for rank in range(2):
        kw = dict(shards=shards["train"], spec=SampleSpec(resolution=32), batch_size=1, seed=0, num_workers=0,
                  shuffle_buffer=1, rank=rank, world_size=2)
        keys.append({k for b in _take(kw, 5)[0] for k in b[0]})
    assert not keys[0] & keys[1]


# -- models and the schedule -------------------------------------------------


def test_loss_decreases_on_a_repeated_batch(tiny_base, shards):
    from training.models import build_method, encode_images, encode_prompts, load_base

    torch.manual_seed(0)
    base = load_base(tiny_base)
    method = build_method("controlnet", base)
    method.set_phase("locked")
    batch = next(iter(make_loader(ShardStream(shards["train"], SampleSpec(resolution=64, proportion_empty_prompts=0), 2, num_workers=0))))
    latents = encode_images(base, batch["pixel_values"], torch.Generator().manual_seed(0))
    text = encode_prompts(base, batch["captions"], torch.device("cpu"))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300, 700])
    noisy = base.noise_scheduler.add_noise(latents, noise, t)
    params = [p for g in method.param_groups("locked") for p in g["params"]]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(method(noisy, t, text, batch["conditioning"]), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0]


def test_trainable_sets_of_the_phases(tiny_base):
    from training.models import build_method, load_base

    method = build_method("controlnet", load_base(tiny_base))
    method.set_phase("locked")
    locked = {n for n, p in method.named_parameters() if p.requires_grad}
    assert locked == {n for n, _ in method.named_parameters() if n.startswith("controlnet.")}
    method.set_phase("unlocked")
    unlocked = {n for n, p in method.named_parameters() if p.requires_grad}
    added = {n.split(".")[1] for n in unlocked - locked}
    assert added == {"up_blocks", "conv_norm_out", "conv_out"}
    assert all(n.startswith("unet.") for n in unlocked - locked)
    mid = build_method("controlnet", load_base(tiny_base), only_mid_control=True)
    mid.set_phase("locked")
    assert not any(p.requires_grad for p in mid.controlnet.controlnet_down_blocks.parameters())
    assert mid.controlnet.controlnet_mid_block.weight.requires_grad


# -- the training run --------------------------------------------------------


def test_metrics_and_unlock_in_a_run(full_run, tiny_base):
    from safetensors.torch import load_file

    rows = _metrics(full_run["out"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["lr_controlnet"] == 1e-4
    assert [r["phase"] for r in rows] == ["locked"] * 3 + ["unlocked"] * 3
    assert rows[3].get("event") == "unlocked" and rows[3]["lr_unet_decoder"] == 2e-6
    assert rows[3]["trainable_params"] > rows[2]["trainable_params"]
    assert rows[-1]["skipped_samples"] >= 1
    # Only the decoder half of the UNet moved; the encoder stayed as loaded.
    before = load_file(os.path.join(tiny_base, "unet", "diffusion_pytorch_model.safetensors"))
    after = load_file(os.path.join(full_run["out"], "unet", "diffusion_pytorch_model.safetensors"))
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= {"up_blocks", "conv_norm_out", "conv_out"}
    # Keep-last-2 checkpoints; validation grid written (2 rows of condition | sample).
    assert sorted(os.listdir(full_run["out"])).count("checkpoint-6") == 1
    assert [os.path.basename(p) for p in __import__("training.train", fromlist=["x"]).list_checkpoints(full_run["out"])] == ["checkpoint-4", "checkpoint-6"]
    from PIL import Image

    grid = Image.open(os.path.join(full_run["out"], "validation", "step-000006.png"))
    assert grid.size == (128, 128)


def test_interrupted_run_matches_uninterrupted(full_run, tiny_base, shards, tmp_path):
    from training.train import train

    out = tmp_path / "interrupted"
    train(_cfg(tiny_base, shards, out, max_train_steps=3, validation_steps=0, export=False))
    # The resumed run crosses --unlock-at 3 after resuming.
    summary = train(_cfg(tiny_base, shards, out, resume_from_checkpoint="latest", validation_steps=0))
    assert summary["step"] == 6 and summary["phase"] == "unlocked"
    a, b = _metrics(full_run["out"]), _metrics(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["phase"] for r in a] == [r["phase"] for r in b]
    # The EMA (with its warm-up count) continues exactly too.
    from safetensors.torch import load_file

    ema_a = load_file(os.path.join(full_run["out"], "checkpoint-6", "ema.safetensors"))
    ema_b = load_file(os.path.join(out, "checkpoint-6", "ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    with open(os.path.join(out, "checkpoint-6", "state.json")) as f:
        assert json.load(f)["ema_updates"] == 6
    # Resuming again from a checkpoint in the unlocked phase (step 4) continues identically too.
    again = tmp_path / "again"
    os.makedirs(again)
    shutil.copytree(os.path.join(full_run["out"], "checkpoint-4"), again / "checkpoint-4")
    train(_cfg(tiny_base, shards, again, resume_from_checkpoint="latest", validation_steps=0, export=False))
    assert [r["loss"] for r in _metrics(again)] == [r["loss"] for r in a[4:]]


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tiny_base, shards, tmp_path):
    """A new run beside an earlier run's checkpoints would have its own rotated
    away and ``latest`` would resume the old run: refused unless overwritten."""
    from training.train import list_checkpoints, train

    out = tmp_path / "reused"
    os.makedirs(out / "checkpoint-8")
    (out / "checkpoint-8" / "state.json").write_text(json.dumps({"step": 8, "phase": "locked"}))
    kw = dict(max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=1, validation_steps=0, export=False,
              dataloader_num_workers=0)
    with pytest.raises(UsageError, match="checkpoint-8.*--resume-from-checkpoint latest.*--overwrite-output-dir"):
        train(_cfg(tiny_base, shards, out, **kw))
    train(_cfg(tiny_base, shards, out, overwrite_output_dir=True, **kw))
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-2"]
    assert [r["step"] for r in _metrics(out)] == [1, 2]


def test_resume_checks_method_and_trained_weights(full_run, tiny_base, shards, tmp_path):
    from safetensors.torch import load_file, save_file

    from training.train import train

    out = tmp_path / "resume"
    shutil.copytree(os.path.join(full_run["out"], "checkpoint-4"), out / "checkpoint-4")
    kw = dict(resume_from_checkpoint="latest", validation_steps=0, export=False, dataloader_num_workers=0)
    # controlnet_gaussian has the same weight names as controlnet: only state.json tells them apart.
    with pytest.raises(UsageError, match="--method controlnet, not --method controlnet_gaussian"):
        train(_cfg(tiny_base, shards, out, method="controlnet_gaussian", **kw))
    # A weight the (unlocked) phase trains is missing: it must not silently restart from the base.
    path = out / "checkpoint-4" / "trainable.safetensors"
    weights = load_file(path)
    dropped = next(k for k in weights if k.startswith("unet.up_blocks."))
    save_file({k: v for k, v in weights.items() if k != dropped}, path)
    with pytest.raises(UsageError, match="lacks 1 weight"):
        train(_cfg(tiny_base, shards, out, **kw))


def test_unsupported_prediction_type_is_refused(tiny_base, shards, tmp_path):
    from diffusers import DDPMScheduler

    from training.models import denoising_target
    from training.train import train

    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(denoising_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    assert torch.equal(denoising_target(v, latents, noise, t), v.get_velocity(latents, noise, t))
    with pytest.raises(UsageError, match="'sample'"):
        denoising_target(DDPMScheduler(prediction_type="sample"), latents, noise, t)
    # The trainer stops at start, before any step.
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    cfg_path = base / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "prediction_type": "sample"}))
    with pytest.raises(UsageError, match="prediction_type 'sample'"):
        train(_cfg(str(base), shards, tmp_path / "out", validation_steps=0, export=False))
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


def test_ema_warms_up():
    """diffusers-style warm-up: the initial (zero) weights fade out quickly."""
    from training.train import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9999)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()
    assert ema.updates == 1 and torch.allclose(ema.shadow[0], torch.full((3,), 0.9))
    assert ema.current_decay() == pytest.approx(2 / 11)
    for _ in range(999):
        ema.update()
    # Without the warm-up, 0.9999 ** 1000 = 90% of the average would still be the zeros.
    assert ema.shadow[0].min() > 0.99
    assert ema.current_decay() == pytest.approx(1001 / 1010)


def test_fp16_skipped_step_is_detected():
    from training.train import optimizer_step

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((p * torch.tensor([1.0, float("inf")])).sum()).backward()
    assert not optimizer_step(opt, scaler) and torch.equal(p.detach(), torch.zeros(2))
    opt.zero_grad()
    scaler.scale(p.sum()).backward()
    assert optimizer_step(opt, scaler) and torch.equal(p.detach(), torch.full((2,), -1.0))
    opt.zero_grad()
    off = torch.amp.GradScaler("cpu", enabled=False)
    off.scale(p.sum()).backward()
    assert optimizer_step(opt, off)


def test_xattn_adapter_with_gradient_checkpointing(tiny_base):
    """The condition tokens reach the recomputed blocks in the backward pass:
    same gradients with and without checkpointing."""
    from training.models import build_method, load_base

    torch.manual_seed(0)
    method = build_method("xattn_adapter", load_base(tiny_base))
    method.set_phase("locked")
    with torch.no_grad():  # non-zero outputs, so gradients reach the encoder and the keys/values too
        for a in method.adapters.values():
            a.to_out.weight.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    noisy, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, method.unet.config.cross_attention_dim, generator=g)
    cond, t = torch.rand(2, 3, 64, 64, generator=g), torch.tensor([10, 500])
    params = [p for grp in method.param_groups("locked") for p in grp["params"]]

    def grads() -> list[torch.Tensor]:
        method.zero_grad(set_to_none=True)
        method(noisy, t, text, cond).pow(2).mean().backward()
        return [p.grad.clone() for p in params]

    plain = grads()
    method.enable_gradient_checkpointing()
    method.train()
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    assert any(g.abs().sum() > 0 for g in checkpointed[:4])  # the condition encoder learns


def test_exports_load_back(full_run):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    out = full_run["out"]
    cn = ControlNetModel.from_pretrained(os.path.join(out, "controlnet"))
    ref = cn.state_dict()
    ldm = load_file(os.path.join(out, "controlnet.safetensors"))
    assert ldm and all(k.startswith("control_model.") for k in ldm)
    assert "control_model.zero_convs.0.0.weight" in ldm and "control_model.middle_block_out.0.weight" in ldm
    assert "control_model.input_hint_block.14.weight" in ldm
    back = convert_controlnet_checkpoint(ldm, cn.config)
    assert set(back) == set(ref)
    for k, v in ref.items():
        assert torch.equal(back[k].float(), v.half().float()), k
    # diffusers' single-file loader reads the file (architecture from the exported config, offline).
    single = ControlNetModel.from_single_file(
        os.path.join(out, "controlnet.safetensors"), config=os.path.join(out, "controlnet"), local_files_only=True,
        torch_dtype=torch.float32,
    )
    assert all(torch.equal(single.state_dict()[k], ref[k].half().float()) for k in ref)
    # The ControlNet trained: its zero convolutions are no longer zero.
    assert ref["controlnet_mid_block.weight"].abs().sum() > 0
    # With --use-ema the export holds the averaged weights, not the last step's.
    last = load_file(os.path.join(out, "checkpoint-6", "trainable.safetensors"))
    ema = load_file(os.path.join(out, "checkpoint-6", "ema.safetensors"))
    w = ref["controlnet_mid_block.weight"]
    assert not torch.equal(w, last["controlnet.controlnet_mid_block.weight"])
    names = [n for n in last if n.startswith("controlnet.")]
    assert len(ema) == len(names)


def test_generate_cli(full_run, tiny_base, shards, tmp_path):
    import cv2
    from PIL import Image

    from _training_fixtures import photo_crops
    from controlset.cli import main

    image, _ = photo_crops(1, size=(64, 48))[0]
    cond = tmp_path / "canny.png"
    Image.fromarray(cv2.Canny(image, 100, 200)).save(cond)
    target = tmp_path / "out.png"
    rc = main(["generate", "--controlnet", os.path.join(full_run["out"], "controlnet"), "--base", tiny_base,
               "--unet", os.path.join(full_run["out"], "unet"), "--condition", str(cond), "--prompt", "a cat",
               "--num-inference-steps", "2", "--output", str(target)])
    assert rc == 0
    assert Image.open(target).size == (64, 48)
    bad = main(["generate", "--controlnet", os.path.join(full_run["out"], "controlnet"), "--base", tiny_base,
                "--condition", str(cond), str(cond), "--prompt", "x", "--output", str(target)])
    assert bad == 2  # two conditions for a one-condition ControlNet: a usage error


def test_ddp_two_cpu_processes(tiny_base, shards, tmp_path):
    """torchrun with 2 gloo processes: data split by rank, DDP rebuilt at unlock, per-rank data state saved."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "controlset", "train", "--base", tiny_base, "--shards", *shards["train"], "--output-dir", str(out),
           "--resolution", "64", "--train-batch-size", "2", "--max-train-steps", "3", "--checkpointing-steps", "3",
           "--unlock-at", "2", "--dataloader-num-workers", "0", "--validation-steps", "0", "--report-to", "none",
           "--no-export"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["phase"] == "unlocked"
    assert all(np.isfinite(r["loss"]) for r in rows)
    ckpt = out / "checkpoint-3"
    states = [json.loads(torch.load(ckpt / f"rank-{r}.pt", weights_only=True)["data"]) for r in (0, 1)]
    assert set(states[0]["streams"]) == {"0"} and set(states[1]["streams"]) == {"1"}
    # skipped_samples counts every rank's skipped samples (the corrupt one is read by rank 1 here).
    assert states[1]["skipped"] >= 1
    assert rows[-1]["skipped_samples"] == states[0]["skipped"] + states[1]["skipped"]


def test_bf16_run_exports_full_precision_unet(tiny_base, shards, tmp_path):
    """Frozen UNet parts are stored in bf16 while training; the exported UNet
    is the base's exact encoder plus the trained fp32 decoder."""
    from safetensors.torch import load_file

    from training.train import train

    out = tmp_path / "bf16"
    train(_cfg(tiny_base, shards, out, max_train_steps=2, unlock_at=1, mixed_precision="bf16", validation_steps=0,
               dataloader_num_workers=0, gradient_accumulation_steps=2, channels_last=True))
    rows = _metrics(out)
    assert [r["phase"] for r in rows] == ["locked", "unlocked"] and all(np.isfinite(r["loss"]) for r in rows)
    before = load_file(os.path.join(tiny_base, "unet", "diffusion_pytorch_model.safetensors"))
    after = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in after.values()} == {torch.float32}
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"up_blocks", "conv_norm_out", "conv_out"}


def test_init_from_existing_controlnet(full_run, tiny_base):
    from diffusers import ControlNetModel

    from training.models import build_method, load_base

    path = os.path.join(full_run["out"], "controlnet")
    method = build_method("controlnet", load_base(tiny_base), controlnet_path=path)
    ref = ControlNetModel.from_pretrained(path).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in method.controlnet.state_dict().items())
    with pytest.raises(UsageError, match="condition channels"):
        build_method("controlnet", load_base(tiny_base), controlnet_path=path, conditioning_channels=6)
