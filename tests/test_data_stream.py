"""Streaming shards (issue 12): ov3common.shards (the one tar reader) and ov3common.data.ShardStreams — order
determinism, every sample once per epoch, exact resume from any position, pipe: URLs, damaged shards, the
encoder's bad-input policy, the latent cache's VAE check, recap_from_alt on Recap-layout shards, and a SIGKILL of
2 ranks x 2 workers mid-epoch."""

import hashlib
import itertools
import json
import sys
import time

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from encoder.data import (
    Collate,
    DataConfig,
    ImageTextDecoder,
    Tokenize,
    random_resized_crop,
    shard_list,
)
from encoder.latent_cache import CACHE_FORMAT, LatentCache, vae_identity
from encoder.train import Config, train
from encoder.vae import FrozenVAE, build_random_vae
from ov3common.config import ConfigError, load_config
from ov3common.data import SampleStream, ShardStreams, StreamLoader, StreamSpec
from ov3common.log import read_jsonl
from ov3common.shards import expand_urls, index_tar, iter_tar, read_member, shard_name
from ov3common.toyworld import ToyConfig, generate
from ov3common.toyworld.poison import expected_counts, write_poisoned_shard
from ov3common.toyworld.render import jpeg_bytes
from ov3common.toyworld.tokenizer import save_tokenizer
from tests.helpers import run_tree, run_with_kills
from tests.test_encoder_train import TINY, stages

SIZES = [5, 7, 3, 6, 4, 8, 2, 5]


def write_shards(folder, sizes=SIZES, members=None):
    from webdataset import TarWriter

    folder.mkdir(parents=True, exist_ok=True)
    for si, n in enumerate(sizes):
        with TarWriter(str(folder / f"s{si:03d}.tar")) as w:
            for i in range(n):
                w.write({"__key__": f"k{si}_{i}", "txt": f"t{si}_{i}".encode(), "jpg": b"x" * (10 + i),
                         **(members(si, i) if members else {})})
    return [str(folder / f"s{si:03d}.tar") for si in range(len(sizes))]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("stream") / "sh")


def keys(stream, n=None):
    return [r.sample.key for r in itertools.islice(stream, n)]


def test_urls_braces_globs_and_names(shards, tmp_path):
    folder = shards[0].rsplit("/", 1)[0]
    assert expand_urls(f"{folder}/s{{000..003}}.tar") == shards[:4]
    assert expand_urls(f"{folder}/s00[4-7].tar::{folder}/s000.tar") == shards[4:] + shards[:1]
    assert expand_urls(f"{folder}/nothing_*.tar") == []
    assert expand_urls("pipe:aws s3 cp s3://b/x{0,1}.tar -") == ["pipe:aws s3 cp s3://b/x0.tar -",
                                                                 "pipe:aws s3 cp s3://b/x1.tar -"]
    assert shard_name("pipe:aws s3 cp s3://b/00042.tar -") == "00042" and shard_name(shards[1]) == "s001"


def test_iter_tar_select_stop_and_random_access(shards):
    full = list(iter_tar(shards[1]))
    assert [s.key for s in full] == [f"k1_{i}" for i in range(7)] and [s.index for s in full] == list(range(7))
    assert full[3].members == {"txt": b"t1_3", "jpg": b"x" * 13}
    part = list(iter_tar(shards[1], select=lambda i: i in (2, 5), stop=6))
    assert [(s.index, s.key) for s in part] == [(2, "k1_2"), (5, "k1_5")]
    idx = index_tar(shards[1])
    off, size = idx[3][1]["jpg"]
    assert idx[3][0] == "k1_3" and read_member(shards[1], off, size) == b"x" * 13


def test_pipe_cat_url(shards):
    local = [(s.key, s.members) for s in iter_tar(shards[2])]
    piped = [(s.key, s.members) for s in iter_tar(f"pipe:cat {shards[2]}")]
    assert piped == local and len(local) == 3
    assert [s.key for s in iter_tar(f"pipe:cat {shards[5]}", select=lambda i: i >= 6)] == ["k5_6", "k5_7"]
    assert [s.key for s in iter_tar(f"pipe:cat {shards[5]}", stop=2)] == ["k5_0", "k5_1"]  # closed early: no error
    errors = []
    assert list(iter_tar("pipe:cat /nonexistent/shard.tar", on_error=lambda *e: errors.append(e))) == []
    assert errors and errors[0][0] == "unreadable_shard"
    # a whole stream over pipe: URLs reads what the local paths give
    spec_l = StreamSpec(tuple(shards), streams=2, seed=1, buffer=4)
    spec_p = StreamSpec(tuple(f"pipe:cat {u}" for u in shards), streams=2, seed=1, buffer=4)
    assert keys(SampleStream(spec_p, 1, 0)) == keys(SampleStream(spec_l, 1, 0))


def test_truncated_and_missing_shards_keep_what_was_read(shards, tmp_path):
    data = open(shards[5], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    errors = []
    got = [s.key for s in iter_tar(str(cut), on_error=lambda *e: errors.append(e[0]))]
    assert 0 < len(got) < 8 and got == [f"k5_{i}" for i in range(len(got))] and errors == ["truncated_shard"]
    errors.clear()
    assert index_tar(str(tmp_path / "missing.tar"), on_error=lambda *e: errors.append(e[0])) == []
    assert errors == ["unreadable_shard"]


@pytest.mark.parametrize("buffer", [0, 4, 50])
def test_every_sample_exactly_once_per_epoch(shards, buffer):
    spec = StreamSpec(tuple(shards), streams=3, seed=7, buffer=buffer)
    for epoch in (0, 1):
        seen = [k for s in range(3) for k in keys(SampleStream(spec, s, epoch))]
        assert sorted(seen) == sorted(f"k{si}_{i}" for si, n in enumerate(SIZES) for i in range(n))
    one = keys(SampleStream(spec, 0, 0))
    assert one == keys(SampleStream(spec, 0, 0)) and one != keys(SampleStream(spec, 0, 1))  # epochs differ
    if buffer > 1:
        assert one != sorted(one, key=lambda k: (spec.shards(0, 0).index(int(k[1:].split("_")[0])), k))


def test_resampled_draws_shards_with_replacement(shards):
    spec = StreamSpec(tuple(shards), streams=2, seed=0, buffer=4, resampled=True)
    draws = [spec.draw(0, 0, c) for c in range(40)]
    assert len(set(draws)) < len(draws) and set(draws) <= set(range(len(shards)))
    assert len(keys(SampleStream(spec, 0, 0), 200)) == 200  # never ends


@pytest.mark.parametrize("resampled,buffer", [(False, 0), (False, 5), (False, 40), (True, 6)])
def test_resume_from_any_position_is_exact(shards, resampled, buffer):
    spec = StreamSpec(tuple(shards), streams=2, seed=3, buffer=buffer, resampled=resampled)
    full = keys(SampleStream(spec, 1, 2), 30)
    for k in range(len(full)):
        s = SampleStream(spec, 1, 2)
        it = iter(s)
        head = [next(it).sample.key for _ in range(k)]
        state = json.loads(json.dumps({**s.state(), "buffer": s.state()["buffer"].tolist()}))  # survives JSON
        assert len(state["buffer"]) <= max(buffer, 0)  # grows with the buffer, not with the data
        assert head + keys(SampleStream(spec, 1, 2, state=state), len(full) - k) == full, k


def _key_decode(sample, epoch, cursor):
    return sample.key


def _collate(items):
    return {"key": list(items), "n": len(items)}


def _merge(chunks):
    return {"key": [k for c in chunks for k in c["key"]]}


def run_loader(shards, world, workers, streams, per_rank_batch, epoch=0, state_at=None, start="forkserver"):
    """The step batches of every rank (keys), and the rank states after ``state_at`` steps."""
    spec = StreamSpec(tuple(shards), streams=streams, seed=5, buffer=3)
    out, states = [], []
    for rank in range(world):
        ds = ShardStreams(spec, rank, world, per_rank_batch * world // streams, _key_decode, _collate, epoch)
        loader = StreamLoader(ds, workers, _merge, worker_start=start)
        batches = []
        for b in loader:
            batches.append(b["key"])
            if state_at is not None and len(batches) == state_at:
                states.append({k: dict(v) for k, v in loader.state.items()})
        out.append(batches)
    return out, states


def test_order_depends_on_streams_not_on_processes_or_workers(shards):
    one, _ = run_loader(shards, world=1, workers=0, streams=4, per_rank_batch=4)
    workers, _ = run_loader(shards, world=1, workers=2, streams=4, per_rank_batch=4)
    ranks, _ = run_loader(shards, world=2, workers=2, streams=4, per_rank_batch=2)
    assert one == workers and one[0]
    steps = min(len(r) for r in ranks)  # lockstep: the ranks stop together
    assert [a + b for a, b in zip(ranks[0][:steps], ranks[1][:steps])] == one[0][:steps]
    again, _ = run_loader(shards, world=1, workers=2, streams=4, per_rank_batch=4, start="fork")
    other, _ = run_loader(shards, world=1, workers=0, streams=2, per_rank_batch=4)
    assert again == workers and other != one  # nor on the workers' start method


def _slow_decode(sample, epoch, cursor):
    time.sleep(60)


def test_a_stuck_worker_fails_the_run_after_the_timeout(shards):
    ds = ShardStreams(StreamSpec(tuple(shards), streams=2, seed=5, buffer=3), 0, 1, 1, _slow_decode, _collate)
    with pytest.raises(RuntimeError, match="timed out after 2 seconds"):
        next(iter(StreamLoader(ds, 1, _merge, worker_start="fork", timeout=2)))


def test_loader_resume_with_workers(shards):
    (full,), _ = run_loader(shards, world=1, workers=2, streams=4, per_rank_batch=4)
    _, (state,) = run_loader(shards, world=1, workers=2, streams=4, per_rank_batch=4, state_at=2)
    spec = StreamSpec(tuple(shards), streams=4, seed=5, buffer=3)
    rest = [b["key"] for b in StreamLoader(ShardStreams(spec, 0, 1, 1, _key_decode, _collate, 0, state), 2, _merge)]
    assert full[:2] + rest == full


# --------------------------------------------------------------------------------------------- encoder data
def _recap_shards(folder, n_shards=2, per=6, bad_json_every=3):
    """Recap-DataComp layout (img2dataset --caption_col org_caption --save_additional_columns '["re_caption"]'):
    KEY.jpg, KEY.txt alt-text, KEY.json {"re_caption", "caption", "url", ...}; some JSONs unparsable."""


    def members(si, i):
        j = si * per + i
        meta = {"caption": f"alt {j}", "re_caption": f"A long recaption of image {j}. It has two sentences.",
                "url": f"http://x/{j}.jpg", "key": f"{j:09d}", "status": "success"}
        raw = json.dumps(meta).encode() if bad_json_every == 0 or j % bad_json_every else b'{"re_caption": "cut'
        img = Image.new("RGB", (40 + j, 32), (j * 9 % 255, 80, 160))
        return {"jpg": jpeg_bytes(img), "txt": f"alt {j}".encode(), "json": raw}

    return write_shards(folder, [per] * n_shards, members)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(str(d))
    return str(d)


def decoder_for(tokenizer_dir, **data):
    return ImageTextDecoder(Tokenize(tokenizer_dir, 32), 32, DataConfig(**data), seed=0)


def test_recap_preset_fields_and_unparsable_json_keeps_the_sample(tmp_path, tokenizer_dir):
    urls = _recap_shards(tmp_path / "recap")
    dec = decoder_for(tokenizer_dir, preset="recap_datacomp", crop="center")
    items = [dec(s) for u in urls for s in iter_tar(u)]
    assert all("bad" not in x for x in items) and len(items) == 12
    fell = [x for x in items if "recap_from_alt" in x["converted"]]
    assert len(fell) == 4 and all("meta_dropped" in x["converted"] for x in fell)  # every 3rd JSON is cut
    good = next(x for x in items if not x["converted"])
    j = int(good["alt_text"].split()[-1])
    assert good["alt_text"] == f"alt {j}"
    assert torch.equal(good["recap"], dec.tokenize(f"A long recaption of image {j}. It has two sentences."))
    # the old default field (json:recaption) on Recap shards: every sample falls back, and says so
    old = decoder_for(tokenizer_dir, preset="custom", alt_field="txt", recap_field="json:recaption", crop="center")
    assert all("recap_from_alt" in old(s)["converted"] for s in iter_tar(urls[0]))


def test_random_resized_crop_is_torchvision_with_a_per_sample_seed(tmp_path, tokenizer_dir):


    img = Image.linear_gradient("L").convert("RGB").resize((96, 64))
    a = random_resized_crop(img, 32, (0.4, 1.0), (3 / 4, 4 / 3), "s/0")
    assert a.size == (32, 32) and a.tobytes() == random_resized_crop(img, 32, (0.4, 1.0), (3 / 4, 4 / 3), "s/0").tobytes()
    assert a.tobytes() != random_resized_crop(img, 32, (0.4, 1.0), (3 / 4, 4 / 3), "s/1").tobytes()

    seed = int.from_bytes(hashlib.blake2b(b"s/0", digest_size=8).digest(), "little") >> 1
    torch.manual_seed(seed)
    ref = RandomResizedCrop(32, (0.4, 1.0), (3 / 4, 4 / 3), InterpolationMode.BILINEAR, antialias=True)(img)
    assert ref.tobytes() == a.tobytes()


def test_poisoned_shard_follows_the_policy(tmp_path, tokenizer_dir):
    manifest = write_poisoned_shard(str(tmp_path / "poison.tar"), n_good=8, resolution=32)
    dec = decoder_for(tokenizer_dir, preset="toy", crop="random_resized")
    batch = Collate(0)([dec(s) for s in iter_tar(str(tmp_path / "poison.tar"))])
    expected = expected_counts(manifest)
    expected["keep"] += expected.pop("bad_json")  # the one change: an unparsable KEY.json keeps the sample
    assert batch["n"] == expected.pop("keep") and batch["skipped"] == expected
    conv = batch["converted"]
    assert conv["meta_dropped"] == 1 and {"cmyk", "16bit", "alpha", "palette", "grayscale"} <= set(conv)
    assert batch["image"].shape[1:] == (3, 32, 32) and len(set(batch["index"].tolist())) == batch["n"]


def test_latent_cache_refuses_another_vae(tmp_path):
    ident = vae_identity("", FrozenVAE(build_random_vae(seed=0), scaling_factor=1.0))
    (tmp_path / "meta.json").write_text(json.dumps({"format": CACHE_FORMAT, "vae": ident, "resolutions": [32]}))
    LatentCache(str(tmp_path), ident, [32], "center")  # the same VAE: accepted
    other_weights = vae_identity("", FrozenVAE(build_random_vae(seed=1), scaling_factor=1.0))
    other_scale = vae_identity("", FrozenVAE(build_random_vae(seed=0), scaling_factor=0.3611))
    for other, field in ((other_weights, "weights_fingerprint"), (other_scale, "scaling_factor")):
        with pytest.raises(ValueError, match=f"built with another VAE \\({field}"):
            LatentCache(str(tmp_path), other, [32], "center")
    with pytest.raises(ValueError, match="no \\[64\\] px"):
        LatentCache(str(tmp_path), ident, [32, 64], "center")
    with pytest.raises(ValueError, match="data.crop"):
        LatentCache(str(tmp_path), ident, [32], "random_resized")


def test_recap_from_alt_logged_early_on_recap_layout_shards(tmp_path, tokenizer_dir, capfd):
    """Recap-DataComp-layout shards (field re_caption) trained with a recaption field that is not there: the
    fallback rate is logged at step N with a warning; with the recap_datacomp preset it is small and not warned."""

    tr = _recap_shards(tmp_path / "tr", n_shards=2, per=8, bad_json_every=0)
    va = _recap_shards(tmp_path / "va", n_shards=1, per=4, bad_json_every=0)
    base = [*TINY, stages((32, 3, 4)), "export_dir=none", "data.root=''", f"data.tokenizer={tokenizer_dir}",
            f"data.train_shards={tr[0].rsplit('/', 1)[0]}/s{{000..001}}.tar", f"data.val_shards={va[0]}",
            "data.recap_check_steps=2", "data.val_size=4", "data.crop=center"]
    cfg = load_config(Config, "configs/encoder/toy.yaml", [*base, f"out_dir={tmp_path / 'wrong'}", "data.preset=custom",
                                     "data.alt_field=txt", "data.recap_field=json:recaption"])
    train(cfg)
    row = next(r for r in read_jsonl(tmp_path / "wrong" / "metrics.jsonl") if "data/recap_from_alt_rate" in r)
    assert row["step"] == 2 and row["data/recap_from_alt_rate"] == 1.0 and row["data/kept_first_steps"] == 8
    assert row["data/recap_from_alt_warning"] == 1
    err = capfd.readouterr().err
    assert "WARNING" in err and "100.0% of the samples of the first 2 steps" in err
    train(load_config(Config, "configs/encoder/toy.yaml", [*base, f"out_dir={tmp_path / 'right'}", "data.preset=recap_datacomp"]))
    row = next(r for r in read_jsonl(tmp_path / "right" / "metrics.jsonl") if "data/recap_from_alt_rate" in r)
    assert row["data/recap_from_alt_rate"] == 0.0 and row["data/recap_from_alt_warning"] == 0
    assert "have no recaption" not in capfd.readouterr().err


def test_val_shards_required_and_no_toy_fallback(tmp_path):
    tr = _recap_shards(tmp_path / "tr", n_shards=1, per=2)
    with pytest.raises(ConfigError, match="data.val_shards: required"):
        shard_list(DataConfig(train_shards=tr[0]), "val")
    with pytest.raises(ConfigError, match="data.train_shards: empty"):
        shard_list(DataConfig(), "train")
    assert shard_list(DataConfig(train_shards=tr[0], val_shards=tr[0]), "val") == tr


# --------------------------------------------------------------------------------------------- SIGKILL, 2 x 2
def _reshard(toy_root, folder, n=8):
    """The toy world's 96 training samples in ``n`` shards (2 ranks x 2 workers need >= 4)."""
    from webdataset import TarWriter

    samples = [s for u in sorted((toy_root / "wds" / "train").glob("*.tar")) for s in iter_tar(str(u))]
    folder.mkdir(parents=True)
    per = -(-len(samples) // n)
    for i in range(n):
        with TarWriter(str(folder / f"part-{i:03d}.tar")) as w:
            for s in samples[i * per : (i + 1) * per]:
                w.write({"__key__": s.key, **s.members})
    return f"{folder}/part-{{000..{n - 1:03d}}}.tar"


@pytest.mark.slow
def test_sigkill_two_ranks_two_workers_resume_same_keys(tmp_path):
    root = tmp_path / "toy"
    generate(str(root), ToyConfig(resolution=32, n_train=96, n_val=32, n_test=4, shard_size=32, class_train=1,
                                  class_val=1, pope_images=4, seedbench_per_category=1), workers=1, progress=False)
    pattern = _reshard(root, tmp_path / "parts")

    def cmd(out):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "encoder.train", f"out_dir={out}", f"data.root={root}", f"data.train_shards={pattern}", *TINY,
                stages((16, 8, 8), (32, 8, 8)), "data.num_workers=2", "data.shuffle_buffer=5",
                "train.strategy=ddp", "train.ckpt_every=3", "train.log_indices=true", "export_dir=none",
                "train.threads=1"]

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    res = run_tree(cmd(ref), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    kills = run_with_kills(cmd(killed), killed / "metrics.jsonl", kills=2, min_step=2, max_step=6, seed=5,
                           timeout=900)
    assert len(kills) == 2
    for rank in (0, 1):
        a = [(r["step"], r["epoch"], r["key"]) for r in read_jsonl(ref / f"indices_rank{rank}.jsonl")]
        b = [(r["step"], r["epoch"], r["key"]) for r in read_jsonl(killed / f"indices_rank{rank}.jsonl")]
        assert [s for s, _, _ in a] == list(range(1, 17)) and a == b, rank
    keys0 = [k for rank in (0, 1) for r in read_jsonl(ref / f"indices_rank{rank}.jsonl") if r["epoch"] == 0
             for k in r["key"]]
    assert len(keys0) == len(set(keys0))  # no sample twice within the epoch


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch(tmp_path):
    """96 samples, batch 8: step 12 ends epoch 0. A run checkpointed there resumes into epoch 1 with the keys of
    an uninterrupted run (the resumed loader is empty at first: that is the epoch's end, not an error)."""

    root = tmp_path / "toy"
    generate(str(root), ToyConfig(resolution=32, n_train=96, n_val=32, n_test=4, shard_size=32, class_train=1,
                                  class_val=1, pope_images=4, seedbench_per_category=1), workers=1, progress=False)
    base = [f"data.root={root}", *TINY, "export_dir=none", "train.log_indices=true", "data.val_size=8"]
    full = stages((16, 12, 8), (16, 4, 8))

    def run(out, st, every):
        return train(load_config(Config, "configs/encoder/toy.yaml", [*base, f"out_dir={out}", st,
                                                                      f"train.ckpt_every={every}"]))

    run(tmp_path / "ref", full, 100)
    run(tmp_path / "cut", stages((16, 12, 8)), 12)  # stops (and checkpoints) at the end of epoch 0
    run(tmp_path / "cut", full, 100)  # resumes from step 12
    ref = [(r["epoch"], r["key"]) for r in read_jsonl(tmp_path / "ref" / "indices.jsonl")]
    got = [(r["epoch"], r["key"]) for r in read_jsonl(tmp_path / "cut" / "indices.jsonl")]
    assert len(ref) == 16 and got == ref and {e for e, _ in ref[12:]} == {1}
