"""Latent / text-embedding caching (``controlset cache-latents``) and training on cached shards, on CPU
with the tiny random base and real-photo shards."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
import torch

from _training_fixtures import write_shards
from schemas.errors import UsageError
from training.cache import CACHE_MEMBERS, LATENTS_MEMBER, TEXT_EMBEDS_MEMBER, decode_npy
from training.config import TrainConfig
from training.data import SampleSpec, decode_sample, iter_raw_samples

pytestmark = pytest.mark.timeout(300)

RES = 64


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    from controlset.cli import main

    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, seed in (("tiny", 0), ("other", 1)):
        out[name] = str(root / name)
        assert main(["base", "tiny", out[name], "--seed", str(seed)]) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, bases) -> dict:
    """Original shards (one corrupt sample), and two caching runs of them:
    one through the command line, one through the function."""
    from controlset.cli import main
    from training.cache import cache_shards

    root = tmp_path_factory.mktemp("cache")
    src = write_shards(str(root / "src"), n_shards=2, per_shard=4, corrupt=1, prefix="train")
    a, b = str(root / "a"), str(root / "b")
    rc = main(["cache-latents", "--base", bases["tiny"], "--shards", str(root / "src" / "train-*.tar"),
               "--output-dir", a, "--resolution", str(RES), "--batch-size", "3", "--condition", "canny"])
    assert rc == 0
    cache_shards(bases["tiny"], src, b, resolution=RES, batch_size=3, conditions=["canny"], workers=1)
    return {"src": src, "a": a, "b": b}


def _samples(path: str) -> list[dict]:
    return list(iter_raw_samples(path, lambda u, e: (_ for _ in ()).throw(e)))


def _cfg(base, shards, out, **kw) -> TrainConfig:
    opts = dict(base=base, shards=shards, output_dir=str(out), resolution=RES, train_batch_size=2, max_train_steps=3,
                checkpointing_steps=10, dataloader_num_workers=0, shuffle_buffer=4, learning_rate=1e-4,
                validation_steps=0, report_to="none", export=False, cached_latents="on")
    opts.update(kw)
    return TrainConfig(**opts)


def _losses(out) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


# -- the cached shards -------------------------------------------------------


def test_cached_shards_keep_every_member_and_add_the_cache(data):
    for src in data["src"]:
        out = os.path.join(data["a"], os.path.basename(src))
        before = {s["__key__"]: s for s in _samples(src)}
        after = _samples(out)
        assert len(before) == 4 and len(after) == (3 if src == data["src"][0] else 4)  # the corrupt jpg is left out
        for s in after:
            orig = before[s["__key__"]]
            kept = {k: v for k, v in s.items() if not k.startswith("__") and k not in CACHE_MEMBERS}
            assert kept == {k: v for k, v in orig.items() if not k.startswith("__")}  # byte for byte
            assert set(s) - set(orig) == set(CACHE_MEMBERS)
        with tarfile.open(out) as tf:
            assert {m.mtime for m in tf.getmembers()} == {1577836800}
    with open(os.path.join(data["a"], "cache.json")) as f:
        summary = json.load(f)
    assert summary["samples_read"] == 8 and summary["samples_written"] == 7
    assert summary["samples_skipped"] == {"undecodable jpg": 1}
    assert [s["written"] for s in summary["shards"]] == [3, 4]
    assert not [n for n in os.listdir(data["a"]) if ".tmp-" in n]  # temporary files were renamed away


def test_cache_output_is_deterministic(data):
    names = sorted(os.listdir(data["a"]))
    assert names == sorted(os.listdir(data["b"])) == ["cache.json", "train-000000.tar", "train-000001.tar"]
    for n in names:
        with open(os.path.join(data["a"], n), "rb") as fa, open(os.path.join(data["b"], n), "rb") as fb:
            assert fa.read() == fb.read(), n


def test_cached_values_are_the_encoders_outputs(data, bases):
    from training.cache import base_fingerprint
    from training.models import encode_prompts, load_base

    base = load_base(bases["tiny"])
    spec = SampleSpec(conditions=(), resolution=RES, random_flip=False, center_crop=True, proportion_empty_prompts=0)
    samples = _samples(os.path.join(data["a"], "train-000001.tar"))
    meta = json.loads(samples[0]["latents.json"])
    assert meta["resolution"] == RES and meta["crop"] == "center" and meta["stored_dtype"] == "float16"
    assert meta["base_fingerprint"] == base_fingerprint(base) != base_fingerprint(load_base(bases["other"]))
    pixels = torch.from_numpy(np.stack([decode_sample(s, spec, np.random.default_rng(0))["pixel_values"] for s in samples]))
    with torch.no_grad():
        plain = base.vae.encode(pixels).latent_dist
        mirrored = base.vae.encode(pixels.flip(-1)).latent_dist
        text = encode_prompts(base, [s["txt"].decode() for s in samples], torch.device("cpu"))
    for i, s in enumerate(samples):
        lat = decode_npy(s[LATENTS_MEMBER])
        emb = decode_npy(s[TEXT_EMBEDS_MEMBER])
        assert lat.dtype == np.float16 and lat.shape == (2, 8, RES // 8, RES // 8)
        assert emb.dtype == np.float16 and emb.shape == tuple(text.shape[1:])
        lat = torch.from_numpy(lat).float()
        for j, dist in enumerate((plain, mirrored)):
            torch.testing.assert_close(lat[j, :4], dist.mean[i], rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(lat[j, 4:], dist.logvar[i], rtol=2e-3, atol=2e-3)
        assert not torch.allclose(lat[0, :4], lat[1, :4], atol=1e-2)  # the mirror is a different image
        torch.testing.assert_close(torch.from_numpy(emb).float(), text[i], rtol=2e-3, atol=2e-3)


def test_cached_sample_flips_latents_with_the_condition(data):
    raw = _samples(os.path.join(data["a"], "train-000001.tar"))[0]
    stored = decode_npy(raw[LATENTS_MEMBER])
    plain_cond = decode_sample(raw, SampleSpec(resolution=RES, random_flip=False, center_crop=True), np.random.default_rng(0))
    spec = SampleSpec(resolution=RES, cached=True, proportion_empty_prompts=0.5)
    flips = empties = 0
    for seed in range(16):
        s = decode_sample(raw, spec, np.random.default_rng(seed))
        assert "pixel_values" not in s  # the image is not decoded
        flipped = np.array_equal(s["conditioning"], plain_cond["conditioning"][:, :, ::-1])
        assert flipped or np.array_equal(s["conditioning"], plain_cond["conditioning"])
        assert np.array_equal(s["latents"], stored[1 if flipped else 0])
        assert s["empty_prompt"] == (s["caption"] == "")
        flips += flipped
        empties += s["empty_prompt"]
    assert 0 < flips < 16 and 0 < empties < 16


# -- training on them --------------------------------------------------------


def _counting_load_base(monkeypatch) -> dict:
    """Make the trainer's base count VAE-encoder and text-encoder forwards."""
    import training.train as tt

    calls = {"vae": 0, "text": 0}
    real = tt.load_base

    def load(*a, **kw):
        base = real(*a, **kw)
        base.vae.encoder.register_forward_hook(lambda *_: calls.__setitem__("vae", calls["vae"] + 1))
        base.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
        return base

    monkeypatch.setattr(tt, "load_base", load)
    return calls


def test_training_on_cached_latents_skips_the_encoders(data, bases, tmp_path, monkeypatch):
    from training.train import train

    shards = [os.path.join(data["a"], "train-00000{0,1}.tar")]
    calls = _counting_load_base(monkeypatch)
    train(_cfg(bases["tiny"], shards, tmp_path / "cached"))
    assert calls == {"vae": 0, "text": 1}  # only the empty prompt's embedding, once
    cached = _losses(tmp_path / "cached")
    assert len(cached) == 3 and all(np.isfinite(cached))

    # The same run encoding every step (same shards, flips, prompt dropout and
    # generator draws, centre crops): the same losses up to float16 storage.
    calls.update(vae=0, text=0)
    train(_cfg(bases["tiny"], shards, tmp_path / "encoded", cached_latents="off", center_crop=True))
    assert calls["vae"] == 3 and calls["text"] == 3
    np.testing.assert_allclose(cached, _losses(tmp_path / "encoded"), rtol=1e-4)


def test_cached_latents_modes_and_mismatches(data, bases, tmp_path):
    import argparse

    from training.config import add_arguments, config_from_args
    from training.train import train

    cached = [os.path.join(data["a"], "train-*.tar")]
    with pytest.raises(UsageError, match="cache-latents"):
        train(_cfg(bases["tiny"], data["src"], tmp_path / "on"))
    with pytest.raises(UsageError, match="another base model"):
        train(_cfg(bases["other"], cached, tmp_path / "base", cached_latents="auto"))
    with pytest.raises(UsageError, match="--resolution 64"):
        train(_cfg(bases["tiny"], cached, tmp_path / "res", resolution=32))
    with pytest.raises(UsageError, match="auto, on or off"):
        _cfg(bases["tiny"], cached, tmp_path / "bad", cached_latents="yes").validate()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--cached-latents", "off"])).cached_latents == "off"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("cached_latents: on\n")  # YAML 1.1 reads a bare `on` as true
    assert config_from_args(parser.parse_args(["--config", str(yaml_file)])).cached_latents == "on"


def test_cache_refuses_to_write_over_its_input(data, bases):
    from controlset.cli import main

    src_dir = os.path.dirname(data["src"][0])
    assert main(["cache-latents", "--base", bases["tiny"], "--shards", data["src"][0], "--output-dir", src_dir,
                 "--resolution", str(RES)]) == 2


def test_exact_resume_with_cached_latents(data, bases, tmp_path):
    from training.train import train

    shards = [os.path.join(data["a"], "train-*.tar")]
    kw = dict(max_train_steps=3, checkpointing_steps=2, unlock_at=2, dataloader_num_workers=2)
    train(_cfg(bases["tiny"], shards, tmp_path / "whole", **kw))
    train(_cfg(bases["tiny"], shards, tmp_path / "parts", **{**kw, "max_train_steps": 2}))
    train(_cfg(bases["tiny"], shards, tmp_path / "parts", **kw, resume_from_checkpoint="latest"))
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "parts")
