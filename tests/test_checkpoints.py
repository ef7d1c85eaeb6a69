"""Real checkpoints (issue 8): diffusers folders, original single files, scratch checkpoints,
`sdparity convert`, and bad files.

Every file here is written by the tests. Three readers are triangulated: the zoo's reference
modules are exported by our exporter, then read back by our loader AND by diffusers'
`StableDiffusionPipeline.from_single_file` (offline, with a local config folder); all three
must hold the same tensors bit for bit. tiny runs by default; sd15-shaped files are slow.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import struct
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import one_error as error_line, run_cli
from scratch_sd import loading, storage
from scratch_sd.config import CLIPTextConfig, SDConfig, UNetConfig, UnsupportedConfig, VAEConfig, preset
from scratch_sd.convert import single_file as sf
from scratch_sd.convert.common import ConversionError
from scratch_sd.names import NETWORKS

CLEAN_ERRORS = (storage.CheckpointError, ConversionError, UnsupportedConfig)


# --------------------------------------------------------------------------- helpers
def micro_cfg() -> SDConfig:
    """Smaller than tiny and matching no preset (so its heads come from SD 1.x's rule or metadata)."""
    return SDConfig(name="micro",
                    text=CLIPTextConfig(vocab_size=600, width=64, layers=1, heads=2, mlp_width=64),
                    vae=VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_groups=32),
                    unet=UNetConfig(block_out_channels=(32, 32), layers_per_block=1, attention_levels=(True, False),
                                    num_heads=8, cross_attention_dim=64, norm_groups=32, sample_size=8),
                    image_size=16)


def random_scratch_state(cfg: SDConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in sf.scratch_shapes(cfg).items()}


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:6]}"
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k].to(a[k].dtype))]
    assert not bad, f"{what}: {len(bad)} of {len(a)} tensors differ, e.g. {bad[:4]}"


def write_header(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_scratch(tiny_refs):
    """The scratch networks converted from diffusers' tiny references (name -> module)."""
    from conftest import scratch_from

    return scratch_from(tiny_refs)


@pytest.fixture(scope="module")
def tiny_state(tiny_scratch):
    return sf.join({n: net.state_dict() for n, net in tiny_scratch.items()})


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_refs, tiny_scratch, tiny_state):
    """tiny: our exporter's .safetensors (with config metadata) and .ckpt, a plain .safetensors
    (no metadata: config inferred from shapes), and a diffusers folder written by save_pretrained."""
    from parity import zoo
    from scratch_sd.schedulers import SD15_SCHEDULER_CONFIG

    d = tmp_path_factory.mktemp("tiny")
    out = {"exported": loading.export_single_file(tiny_scratch, d / "tiny.safetensors", tiny_refs.cfg),
           "ckpt": loading.export_single_file(tiny_scratch, d / "tiny.ckpt", tiny_refs.cfg)}
    save_file(sf.write(tiny_state, tiny_refs.cfg), str(d / "plain.safetensors"))
    out["plain"] = d / "plain.safetensors"
    folder = d / "folder"
    for name, ref in tiny_refs.networks.items():
        ref.save_pretrained(folder / name)
    zoo.write_clip_tokenizer_files(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG))
    out["folder"] = folder
    return out


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    cfg = micro_cfg()
    state = random_scratch_state(cfg)
    d = tmp_path_factory.mktemp("micro")
    save_file(sf.write(state, cfg), str(d / "micro.safetensors"))  # no metadata
    loading.export_single_file(state, d / "micro.ckpt", cfg)
    return {"cfg": cfg, "state": state, "ldm": sf.write(state, cfg), "safetensors": d / "micro.safetensors",
            "ckpt": d / "micro.ckpt", "dir": d}


# --------------------------------------------------------------------------- the composed table
@pytest.mark.parametrize("name", ["tiny", "sd15"])
def test_single_file_table_is_one_to_one_complete_and_infers_the_config(name):
    """On meta tensors (no memory): the whole-file table is the three LDM tables composed, covers
    every scratch key and every LDM key, and the file's shapes alone give back the preset."""
    from scratch_sd.convert import clip, unet, vae

    cfg = preset(name)
    table = sf.ldm_table(cfg)
    theirs = clip.ldm_table(cfg.text).theirs_keys() + vae.ldm_table(cfg.vae).theirs_keys() + \
        unet.ldm_table(cfg.unet).theirs_keys()
    assert sorted(table.theirs_keys()) == sorted(theirs) and len(set(theirs)) == len(theirs)
    ours = sf.scratch_shapes(cfg)
    assert sorted(table.ours_keys()) == sorted(ours)
    ldm = sf.write({k: torch.empty(s, device="meta") for k, s in ours.items()}, cfg)
    assert set(ldm) == set(theirs)
    assert all(k.startswith(tuple(sf.PREFIXES.values())) for k in ldm)
    reading = sf.read(ldm)
    assert reading.cfg == cfg and reading.cfg.name == name
    assert {k: v.shape for k, v in reading.state.items()} == ours


def test_round_trip_is_identity_and_loads_strictly(tiny_refs, tiny_scratch, tiny_state):
    cfg = tiny_refs.cfg
    ldm = sf.write(tiny_state, cfg)
    back = sf.read(ldm)
    assert_same_tensors(tiny_state, back.state, "scratch -> LDM -> scratch")
    assert_same_tensors(ldm, sf.write(back.state, cfg), "LDM -> scratch -> LDM")
    for name in sf.COMPONENTS:  # strict load into fresh networks
        net = loading.network(name, cfg, back.component(name))
        assert_same_tensors(tiny_scratch[name].state_dict(), net.state_dict(), name)


def test_config_comes_from_metadata_else_from_shapes(micro, files):
    """No preset matches micro: heads are not in a file, so inference assumes SD 1.x (CLIP head
    size 64 -> 1 head), while our exporter's metadata keeps the true 2 heads."""
    inferred = loading.read_model(micro["safetensors"])
    assert inferred.cfg.text.heads == 1 and inferred.cfg.unet.num_heads == (8, 8)
    assert any("assumed as SD 1.x" in n for n in inferred.notes)
    meta = loading.read_model(files["exported"])
    assert meta.cfg == preset("tiny") and any("metadata" in n for n in meta.notes)
    d = micro["dir"] / "with_meta.safetensors"
    loading.export_single_file(micro["state"], d, micro["cfg"])
    assert loading.read_model(d).cfg == micro["cfg"]  # heads=2 survives
    plain = loading.read_model(files["plain"])
    assert plain.cfg == preset("tiny") and any("tiny preset" in n for n in plain.notes)


# --------------------------------------------------------------------------- named rules
def sd15_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_non_weight_keys_are_dropped_by_named_rules_only(micro):
    extras = {"betas": torch.zeros(1000), "alphas_cumprod": sd15_alphas_cumprod(), "posterior_variance": torch.zeros(1000),
              "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
              "first_stage_model.loss.logvar": torch.zeros(())}
    reading = sf.read({**micro["ldm"], **extras})
    assert_same_tensors(micro["state"], reading.state, "with extras")
    assert reading.ignored == {
        "DDPM_SCHEDULE": ["alphas_cumprod", "betas", "posterior_variance"],
        "EMA_BOOKKEEPING": ["model_ema.decay", "model_ema.num_updates"],
        "CLIP_POSITION_IDS": ["cond_stage_model.transformer.text_model.embeddings.position_ids"],
        "VAE_TRAINING_LOSS": ["first_stage_model.loss.logvar"]}
    assert sf.schedule_matches_sd15(extras) is True
    with pytest.raises(ConversionError, match=r"no rule covers: model\.extra_thing"):
        sf.read({**micro["ldm"], "model.extra_thing": torch.zeros(1)})


def test_ema_weights_are_chosen_by_name(micro):
    ldm, state = micro["ldm"], micro["state"]
    ema = {sf.ema_key(k): v + 1 for k, v in ldm.items() if k.startswith(sf.UNET)}
    both = {**ldm, **ema}
    plain = sf.read(both)
    assert_same_tensors(state, plain.state, "default reads the non-EMA UNet")
    assert len(plain.ignored["EMA_NOT_SELECTED"]) == len(ema) and any("--ema" in n for n in plain.notes)
    chosen = sf.read(both, ema=True)
    want = {k: v + 1 if k.startswith("unet.") else v for k, v in state.items()}
    assert_same_tensors(want, chosen.state, "--ema reads the EMA UNet")
    assert len(chosen.ignored["NON_EMA_NOT_SELECTED"]) == len(ema)
    ema_only = {k: v for k, v in both.items() if not k.startswith(sf.UNET)}
    with pytest.raises(ConversionError, match="only EMA UNet weights.*--ema"):
        sf.read(ema_only)
    with pytest.raises(ConversionError, match="--ema: the file has no EMA weights"):
        sf.read(ldm, ema=True)
    # EMA-only with a config (from metadata): the table puts the dots back.
    assert_same_tensors(want, sf.read(ema_only, ema=True, cfg=micro["cfg"]).state, "EMA-only")


def test_old_text_encoder_keys_without_text_model_level(micro):
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in micro["ldm"].items()}
    assert_same_tensors(micro["state"], sf.read(old).state, "old CLIP keys")


# --------------------------------------------------------------------------- triangulation
def diffusers_reads(path: Path, cfg, tmp: Path, ema: bool = False) -> dict:
    """diffusers' own single-file loader, offline, with a local config folder."""
    from parity import local_model

    local_model._quiet()
    local_model.write_config_folder(tmp, cfg)
    return local_model.references_from_single_file(path, tmp, ema)


@pytest.mark.parametrize("kind", ["exported", "ckpt", "plain"])
def test_triangulation_exporter_our_loader_and_diffusers_agree(kind, files, tiny_refs, tiny_state, tmp_path):
    """zoo reference -> our exporter -> file -> (our loader | diffusers' from_single_file): both
    readers hold exactly the exported tensors."""
    path = files[kind]
    ours = loading.read_model(path)
    assert ours.kind == "single" and ours.cfg == tiny_refs.cfg
    assert_same_tensors(tiny_state, ours.state, f"our loader on {path.name}")
    refs = diffusers_reads(path, ours.cfg, tmp_path / "config")
    for name, ref in refs.items():
        assert_same_tensors(tiny_refs.networks[name].state_dict(), ref.state_dict(),
                            f"diffusers' from_single_file {name} on {path.name}")


def test_triangulation_with_ema(micro, tmp_path):
    """diffusers' extract_ema and our --ema pick the same copy (micro: a non-preset config)."""
    ldm = micro["ldm"]
    both = {**ldm, **{sf.ema_key(k): v * 2 for k, v in ldm.items() if k.startswith(sf.UNET)},
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3, dtype=torch.int32)}
    path = tmp_path / "ema.safetensors"
    save_file(both, str(path))
    for ema in (False, True):
        ours = loading.read_model(path, ema=ema)
        refs = diffusers_reads(path, ours.cfg, tmp_path / f"config{ema}", ema=ema)
        from scratch_sd.convert import unet as cu

        theirs = cu.from_diffusers(refs["unet"].state_dict(), ours.cfg.unet)
        assert_same_tensors(ours.component("unet"), theirs, f"UNet ema={ema}")
        scale = 2 if ema else 1
        assert torch.equal(ours.component("unet")["conv_in.weight"], micro["state"]["unet.conv_in.weight"] * scale)


def test_folder_is_read_as_diffusers_reads_it(files, tiny_refs, tiny_state):
    from parity import local_model

    model = loading.read_model(files["folder"])
    assert model.kind == "diffusers" and model.cfg == tiny_refs.cfg and model.cfg.name == "tiny"
    assert_same_tensors(tiny_state, model.state, "folder")
    built = local_model.build_references(files["folder"], quiet=True)  # raises if the two readers disagree
    assert set(built.networks) == set(NETWORKS) and built.scheduler_config["_class_name"] == "PNDMScheduler"
    assert len(built.tokenizer("a photo").input_ids) > 2


def test_folder_with_shards_and_fp16_variant(files, tiny_refs, tiny_state, tmp_path):
    from parity import local_model

    folder = tmp_path / "folder"
    shutil.copytree(files["folder"], folder)
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(unet)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, ks in shards.items():
        save_file({k: unet[k] for k in ks}, str(folder / "unet" / shard), metadata={"format": "pt"})
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    vae = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    save_file({k: v.half() for k, v in vae.items()}, str(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors"),
              metadata={"format": "pt"})
    model = loading.read_model(folder)
    want = {k: v.half() if k.startswith("vae.") else v for k, v in tiny_state.items()}
    assert_same_tensors(want, model.state, "sharded UNet + fp16 VAE")
    assert any("fp16" in n for n in model.notes)
    built = local_model.build_references(folder, quiet=True)
    assert next(built.networks["vae"].parameters()).dtype == torch.float32


# --------------------------------------------------------------------------- sdparity convert
def test_convert_single_to_folder_to_single_and_scratch(files, tiny_state, tmp_path, capsys):
    from parity import local_model

    folder, single = tmp_path / "sd", tmp_path / "back.safetensors"
    rc, out, _ = run_cli(["convert", files["plain"], "--to", "diffusers", "--out", folder], capsys)
    assert rc == 0 and "wrote" in out and (folder / "model_index.json").is_file()
    assert_same_tensors(tiny_state, loading.read_model(folder).state, "single -> folder")
    local_model.build_references(folder, quiet=True)  # diffusers/transformers load the folder to the same weights
    rc, _, _ = run_cli(["convert", folder, "--to", "single", "--out", single], capsys)
    assert rc == 0
    assert_same_tensors(load_file(str(files["plain"])), load_file(str(single)), "single -> folder -> single")
    scratch = tmp_path / "s.safetensors"
    rc, _, _ = run_cli(["convert", single, "--to", "scratch", "--out", scratch, "--dtype", "bf16"], capsys)
    assert rc == 0 and loading.kind_of(scratch) == "scratch"
    back = loading.read_model(scratch)
    assert_same_tensors({k: v.bfloat16() for k, v in tiny_state.items()}, back.state, "-> scratch bf16")
    assert all(v.dtype == torch.bfloat16 for v in back.state.values())
    rc, _, _ = run_cli(["convert", scratch, "--to", "single", "--out", tmp_path / "s.ckpt"], capsys)
    assert rc == 0 and loading.read_model(tmp_path / "s.ckpt").cfg == preset("tiny")


def test_convert_failures_leave_nothing_behind(files, micro, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(files["plain"].read_bytes()[:5000])
    outdir = tmp_path / "out"
    outdir.mkdir()
    for to, target in (("diffusers", outdir / "sd"), ("single", outdir / "x.safetensors"),
                       ("scratch", outdir / "y.safetensors")):
        rc, _, err = run_cli(["convert", bad, "--to", to, "--out", target], capsys)
        assert rc == 2 and "bad.safetensors" in error_line(err)
    # a failure after files were written: a tokenizer folder that holds no tokenizer
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli(["convert", micro["safetensors"], "--to", "diffusers", "--out", outdir / "sd",
                          "--tokenizer", empty], capsys)
    assert rc == 2 and "no tokenizer" in error_line(err)
    assert list(outdir.iterdir()) == [], f"left behind: {list(outdir.iterdir())}"
    # an existing target is kept unless --force
    target = outdir / "keep.safetensors"
    target.write_bytes(b"precious")
    rc, _, err = run_cli(["convert", micro["safetensors"], "--to", "single", "--out", target], capsys)
    assert rc == 2 and "--force" in error_line(err) and target.read_bytes() == b"precious"
    rc, _, _ = run_cli(["convert", micro["safetensors"], "--to", "single", "--out", target, "--force"], capsys)
    assert rc == 0 and loading.read_model(target).cfg == loading.read_model(micro["safetensors"]).cfg


# --------------------------------------------------------------------------- sdparity check --model
def check_rows(out: Path) -> list[dict]:
    import csv

    with open(out / "parity.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("kind", ["folder", "plain"])
def test_check_runs_the_gate_on_a_local_model(kind, files, tmp_path, capsys):
    """The gate on a tiny folder and a tiny single file (short runs: 64 px, 2 steps, 1 seed)."""
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["check", "--model", files[kind], "--size", "64", "--steps", "2", "--num-seeds", "1",
                               "--no-plots", "--quiet", "--out", out], capsys)
    rows = [r for r in check_rows(out) if r["status"] == "compared"]
    assert rc == 0 and stdout.startswith("PASS"), stdout + err
    assert {"text_encoder", "vae", "unet", "pipeline"} <= {r["component"] for r in rows}
    assert all(r["passed"] == "True" for r in rows) and all(r["preset"].startswith("model:") for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "exported"])
def test_check_whole_default_gate_on_a_local_model(kind, files, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["check", "--model", files[kind], "--no-plots", "--quiet", "--out", out], capsys)
    assert rc == 0 and stdout.startswith("PASS"), stdout + err
    assert {"text_encoder", "vae", "unet", "scheduler", "pipeline"} <= {r["component"] for r in check_rows(out)}


# --------------------------------------------------------------------------- bad files
class NotAWeight:
    """Pickled into a .ckpt: torch.load(weights_only=True) must refuse to rebuild it."""

    def __init__(self):
        self.payload = "anything"


def _bad_files(micro, files, d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a phrase the one-line error must contain)."""
    ldm, src = micro["ldm"], micro["safetensors"]
    cases = {}

    def st(name, state, phrase):
        save_file(state, str(d / f"{name}.safetensors"))
        cases[name] = (d / f"{name}.safetensors", phrase)

    (d / "truncated.safetensors").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    cases["truncated"] = (d / "truncated.safetensors", "truncated")
    blob = bytearray(src.read_bytes())
    blob[8:40] = b"\xff" * 32
    (d / "corrupt.safetensors").write_bytes(bytes(blob))
    cases["corrupt"] = (d / "corrupt.safetensors", "corrupt safetensors header")
    header, data = split_safetensors(src)
    header["model.diffusion_model.out.2.bias"]["dtype"] = "Q4"
    write_header(d / "dtype.safetensors", header, data)
    cases["unknown dtype"] = (d / "dtype.safetensors", "unsupported dtype 'Q4'")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotAWeight()}, str(d / "evil.ckpt"))
    cases["pickle"] = (d / "evil.ckpt", "refused or unreadable pickle")
    st("sdxl", {**ldm, "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight":
                torch.zeros(77, 768), "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)}, "SDXL")
    # SD 2.x files load (tests/test_sd2_single_file.py); a broken one is still one line
    st("sd2 incomplete", {k: v for k, v in ldm.items() if not k.startswith(sf.TEXT)} |
       {"cond_stage_model.model.token_embedding.weight": torch.zeros(10, 8)},
       "lacks cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight")
    k = next(k for k in ldm if k.endswith("attn2.to_k.weight"))
    st("context wider than the text", {**ldm, k: torch.zeros(ldm[k].shape[0], 1024)},
       "cross_attention_dim 1024 != text width")
    k = "model.diffusion_model.input_blocks.0.0.weight"
    st("inpainting", {**ldm, k: torch.zeros(ldm[k].shape[0], 9, 3, 3)}, "inpainting")
    st("missing", {k: v for k, v in ldm.items() if k != "first_stage_model.decoder.conv_out.bias"},
       "first_stage_model.decoder.conv_out.bias")
    k = "model.diffusion_model.input_blocks.1.1.proj_out.weight"
    st("misshaped", {**ldm, k: torch.zeros(3, 3, 1, 1)}, k)
    st("unknown keys", {**ldm, "model.extra.weight": torch.zeros(2)}, "model.extra.weight")
    folder = d / "novae"
    shutil.copytree(files["folder"], folder, ignore=shutil.ignore_patterns("vae"))
    cases["folder without vae"] = (folder, "lacks vae/")
    return cases


BAD = ["truncated", "corrupt", "unknown dtype", "pickle", "sdxl", "sd2 incomplete", "context wider than the text", "inpainting", "missing",
       "misshaped", "unknown keys", "folder without vae"]


@pytest.fixture(scope="module")
def bad_files(micro, files, tmp_path_factory):
    return _bad_files(micro, files, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", BAD)
def test_bad_model_is_one_line_exit_2(case, bad_files, tmp_path, capsys):
    path, phrase = bad_files[case]
    target = tmp_path / "never.safetensors"
    rc, _, err = run_cli(["convert", path, "--to", "scratch", "--out", target], capsys)
    assert rc == 2 and phrase in error_line(err), err
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["sdxl", "folder without vae", "pickle"])
def test_check_refuses_bad_models_before_any_work(case, bad_files, tmp_path, capsys):
    path, phrase = bad_files[case]
    rc, _, err = run_cli(["check", "--model", path, "--out", tmp_path / "run", "--quiet"], capsys)
    assert rc == 2 and phrase in error_line(err) and not (tmp_path / "run" / "parity.csv").exists()


# --------------------------------------------------------------------------- fuzzing
@contextmanager
def deadline(seconds: int):
    def fail(*_):
        raise TimeoutError(f"a read took over {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _mutate(blob: bytes, rng: random.Random, suffix: str) -> bytes:
    b = bytearray(blob)
    kind = rng.choice(("truncate", "flip", "header"))
    if kind == "truncate":
        return bytes(b[: rng.randrange(len(b))])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if suffix == ".ckpt":  # garbage spliced into the zip / pickle
        i = rng.randrange(len(b))
        return bytes(b[:i]) + rng.randbytes(rng.randint(1, 16)) + bytes(b[i:])
    n = struct.unpack("<Q", b[:8])[0]
    header, data = json.loads(b[8:8 + n]), bytes(b[8 + n:])
    key = rng.choice([k for k in header if k != "__metadata__"])
    field, value = rng.choice([
        ("dtype", "F8"), ("dtype", "Q4"), ("dtype", 7), ("dtype", "I64"), ("shape", [-1]), ("shape", ["a"]),
        ("shape", [10 ** 20]), ("shape", [2, 2]), ("data_offsets", [0]), ("data_offsets", [5, 2]),
        ("data_offsets", [0, 10 ** 12]), ("data_offsets", None), ("entry", None), ("metadata", 3),
        ("metadata", {"sd_parity_config": "{"}), ("length", 2 ** 64 - 1), ("length", n + 1)])
    if field == "entry":
        header[key] = value
    elif field == "metadata":
        header["__metadata__"] = value
    elif field != "length":
        header[key][field] = value
    raw = json.dumps(header).encode()
    return struct.pack("<Q", value if field == "length" else len(raw)) + raw + data


def test_fuzzed_checkpoints_fail_cleanly(micro, tmp_path):
    """~100 seeded truncations, bit flips and header corruptions of a small .safetensors and .ckpt:
    each read either succeeds (different values) or raises a clean, one-line checkpoint error."""
    rng = random.Random(8)
    sources = {".safetensors": micro["safetensors"].read_bytes(), ".ckpt": micro["ckpt"].read_bytes()}
    outcomes: dict[str, int] = {}
    start = time.perf_counter()
    for i in range(100):
        suffix = (".safetensors", ".ckpt")[i % 2]
        path = tmp_path / f"case{suffix}"
        path.write_bytes(_mutate(sources[suffix], rng, suffix))
        with deadline(10):
            try:
                model = loading.read_model(path)
                assert model.state and all(isinstance(v, torch.Tensor) for v in model.state.values())
                outcomes["loaded"] = outcomes.get("loaded", 0) + 1
            except CLEAN_ERRORS as exc:
                assert "\n" not in str(exc) and str(exc), f"case {i}: {exc!r}"
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
    assert sum(outcomes.values()) == 100 and outcomes.get("CheckpointError", 0) > 30, outcomes
    assert time.perf_counter() - start < 120


# --------------------------------------------------------------------------- sd15-shaped files
@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    """sd15: the zoo's seeded reference weights, converted by our tables, exported in fp16 (2 GB)."""
    from parity import zoo

    cfg = preset("sd15")
    refs = zoo.reference_components(cfg, 0)
    state = sf.join({n: loading.converter(n).from_diffusers(m.state_dict(), loading.sub_config(n, cfg))
                     for n, m in refs.items()})
    path = loading.export_single_file(state, tmp_path_factory.mktemp("sd15") / "sd15.safetensors", cfg, dtype="fp16")
    return cfg, refs, path


@pytest.mark.slow
@pytest.mark.ci
def test_sd15_file_round_trip(sd15_file):
    cfg, refs, path = sd15_file
    model = loading.read_model(path)
    assert model.cfg == cfg
    for name, ref in refs.items():
        want = loading.converter(name).from_diffusers(ref.state_dict(), loading.sub_config(name, cfg))
        assert_same_tensors({k: v.half() for k, v in want.items()}, model.component(name), f"sd15 {name}")
    plain = sf.read(load_file(str(path)))  # without the metadata: shapes give sd15 back
    assert plain.cfg == cfg and plain.cfg.name == "sd15"


@pytest.mark.slow
def test_sd15_triangulation_with_diffusers(sd15_file, tmp_path):
    cfg, refs, path = sd15_file
    theirs = diffusers_reads(path, cfg, tmp_path / "config")
    for name, ref in refs.items():
        want = {k: v.half() for k, v in ref.state_dict().items()}
        assert_same_tensors(want, theirs[name].state_dict(), f"diffusers from_single_file sd15 {name}")
