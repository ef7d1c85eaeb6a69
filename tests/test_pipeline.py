"""The scratch pipeline against diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline.

Same weights (the zoo's seeded reference networks, converted by our key tables), the scheduler of
the same name built from the same config on each side, the same seed through a CPU
torch.Generator, fp32 on CPU. The bar (issue 5): final images in [0, 1] pixel units,
PSNR >= 80 dB and max_abs <= 1e-4.
"""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import scratch_from
from parity.metrics import compare
from parity.pipelines import reference_pipeline, scratch_pipeline, scratch_pipeline_from_preset
from scratch_sd.images import preprocess_image
from scratch_sd.loading import weight_files
from scratch_sd.pipeline import PIPELINE_SCHEDULERS, PromptTruncated, ScratchPipeline, make_scheduler
from sdparity.generate import MAX_ABS, MIN_PSNR_DB
from sdparity.main import main as cli_main

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]
STEPS = 4
STRENGTH = 0.75  # 4 steps x 0.75: 3 denoising steps


# --------------------------------------------------------------------------- fixtures and helpers
class Models:
    """A References and scratch networks holding its weights: both pipelines over the same weights."""

    def __init__(self, refs, nets: dict):
        self.refs, self.nets = refs, nets
        self.cfg, self.tokenizer = refs.cfg, refs.tokenizer

    def scratch(self, scheduler: str = "pndm") -> ScratchPipeline:
        return scratch_pipeline(self.nets, self.refs.tokenizer, scheduler, self.refs.scheduler_config, self.refs.cfg)

    def diffusers(self, scheduler: str = "pndm", img2img: bool = False):
        return reference_pipeline(self.refs, scheduler, "img2img" if img2img else "txt2img")


@pytest.fixture(scope="module")
def tiny_models(tiny_refs):
    return Models(tiny_refs, scratch_from(tiny_refs))


def picture(width: int = 64, height: int = 64, phase: float = 0.0) -> PIL.Image.Image:
    """A deterministic RGB test image: smooth gradients plus a ring, so every channel varies."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.sqrt((x - width / 2) ** 2 + (y - height / 2) ** 2)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(r / 3 + phase)], axis=-1)
    return PIL.Image.fromarray((rgb * 255).round().astype(np.uint8))


def run_both(models, scheduler: str, img2img: bool = False, **kwargs):
    """(scratch, diffusers) outputs for the same call; `seed` becomes fresh generators on each side."""
    seed = kwargs.pop("seed", 0)
    gens = kwargs.pop("generators", None)

    def generator():
        if gens is not None:
            return [torch.Generator().manual_seed(seed + i) for i in range(gens)]
        return torch.Generator().manual_seed(seed)

    kwargs.setdefault("output_type", "np")
    ours = models.scratch(scheduler)(**kwargs, generator=generator(), progress=False).images
    ref_pipe = models.diffusers(scheduler, img2img=img2img)
    ref_pipe.set_progress_bar_config(disable=True)
    theirs = ref_pipe(**kwargs, generator=generator()).images
    return ours, theirs


def assert_same_images(ours, theirs, what: str = ""):
    ours, theirs = torch.as_tensor(np.asarray(ours)), torch.as_tensor(np.asarray(theirs))
    e = compare(theirs, ours)
    assert e.finite, f"{what}: non-finite output"
    assert e.psnr_db >= MIN_PSNR_DB and e.max_abs <= MAX_ABS, (
        f"{what}: PSNR {e.psnr_db:.1f} dB (>= {MIN_PSNR_DB}), max_abs {e.max_abs:.3g} (<= {MAX_ABS}), "
        f"mean_abs {e.mean_abs:.3g}")
    return e


def assert_distinct(images, what: str = ""):
    """Every image of the batch differs from every other (batching, seeds and prompts are real)."""
    flat = torch.as_tensor(np.asarray(images)).flatten(1)
    assert float(flat.std()) > 0.01, f"{what}: images are flat (std {float(flat.std()):.3g})"
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            d = float((flat[i] - flat[j]).abs().max())
            assert d > 1e-3, f"{what}: images {i} and {j} are the same (max diff {d:.3g})"


# --------------------------------------------------------------------------- the Done-when matrix (tiny)
@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
@pytest.mark.parametrize("scheduler", PIPELINE_SCHEDULERS)
def test_matches_diffusers(tiny_models, scheduler, mode, guidance_scale):
    kwargs = dict(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=guidance_scale)
    if mode == "img2img":
        kwargs.update(image=picture(), strength=STRENGTH)
    ours, theirs = run_both(tiny_models, scheduler, img2img=mode == "img2img", **kwargs)
    assert ours.shape == (4, 64, 64, 3) and ours.dtype == np.float32
    assert_same_images(ours, theirs, f"{scheduler} {mode} g={guidance_scale}")
    if mode == "txt2img":  # img2img from one image with one generator: duplicates share the posterior sample
        assert_distinct(ours, f"{scheduler} {mode}")


def test_guidance_changes_the_image(tiny_models):
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=STEPS, output_type="np", progress=False)
    pipe = tiny_models.scratch("ddim")
    on = pipe(**kwargs, guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images
    off = pipe(**kwargs, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    assert float(np.abs(on - off).max()) > 1e-3


def test_negative_prompts(tiny_models):
    ours, theirs = run_both(tiny_models, "euler", prompt=PROMPTS, negative_prompt=["blurry", "low quality, dark"],
                            num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=7.5)
    assert_same_images(ours, theirs, "negative prompts")
    plain, _ = run_both(tiny_models, "euler", prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=STEPS)
    assert float(np.abs(ours - plain).max()) > 1e-3, "the negative prompt had no effect"


def test_one_negative_prompt_applies_to_every_prompt(tiny_models):
    pipe = tiny_models.scratch("ddim")
    kwargs = dict(prompt=PROMPTS, num_inference_steps=2, output_type="np", progress=False)
    one = pipe(**kwargs, negative_prompt="blurry", generator=torch.Generator().manual_seed(0)).images
    each = pipe(**kwargs, negative_prompt=["blurry", "blurry"], generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(one, each)


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "ddpm"])
def test_generator_list_txt2img(tiny_models, scheduler):
    ours, theirs = run_both(tiny_models, scheduler, prompt=PROMPTS, num_images_per_prompt=2,
                            num_inference_steps=STEPS, generators=4)
    assert_same_images(ours, theirs, f"{scheduler} generator list")
    assert_distinct(ours)


def test_generator_list_img2img_two_odd_sized_images(tiny_models):
    """Two init images of 75x70 (Lanczos-resized to 72x64), one generator per batch element."""
    images = [picture(75, 70), picture(75, 70, phase=2.0)]
    ours, theirs = run_both(tiny_models, "dpmpp_2m", img2img=True, prompt=PROMPTS, image=images, strength=STRENGTH,
                            num_images_per_prompt=2, num_inference_steps=STEPS, generators=4)
    assert ours.shape == (4, 64, 72, 3)
    assert_same_images(ours, theirs, "img2img generator list")
    assert_distinct(ours)


def test_img2img_one_generator_list_of_images(tiny_models):
    images = [picture(), picture(phase=1.0)]
    ours, theirs = run_both(tiny_models, "lms", img2img=True, prompt=PROMPTS, image=images, strength=0.5,
                            num_images_per_prompt=2, num_inference_steps=STEPS)
    assert_same_images(ours, theirs, "img2img two images, one generator")


def test_ddim_eta_uses_the_generator(tiny_models):
    ours, theirs = run_both(tiny_models, "ddim", prompt=PROMPTS, num_images_per_prompt=2,
                            num_inference_steps=STEPS, eta=0.7)
    assert_same_images(ours, theirs, "ddim eta 0.7")
    plain, _ = run_both(tiny_models, "ddim", prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=STEPS)
    assert float(np.abs(ours - plain).max()) > 1e-3, "eta had no effect"


def test_explicit_latents_and_size(tiny_models):
    """Non-square size (latents 6x10, not a multiple of the UNet's 8) and caller-given latents."""
    latents = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(3))
    ours, theirs = run_both(tiny_models, "pndm", prompt=PROMPTS[0], num_images_per_prompt=2, height=48, width=80,
                            num_inference_steps=STEPS, latents=latents)
    assert ours.shape == (2, 48, 80, 3)
    assert_same_images(ours, theirs, "explicit latents 48x80")


def test_output_types(tiny_models):
    pipe = tiny_models.scratch("euler")
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=2, progress=False)
    out = {t: pipe(**kwargs, output_type=t, generator=torch.Generator().manual_seed(0)).images
           for t in ("pil", "np", "pt", "latent")}
    assert isinstance(out["pil"], list) and out["pil"][0].size == (64, 64) and out["pil"][0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out["pil"][0]), (out["np"][0] * 255).round().astype(np.uint8))
    assert out["pt"].shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(out["pt"].permute(0, 2, 3, 1).numpy(), out["np"])
    assert out["latent"].shape == (1, 4, 8, 8)
    ref = tiny_models.diffusers("euler")
    ref.set_progress_bar_config(disable=True)
    theirs = ref(prompt=PROMPTS[0], num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images
    e = compare(theirs, out["latent"])
    assert e.rel_l2 <= 1e-5, f"latents differ: rel_l2 {e.rel_l2:.3g}, max_abs {e.max_abs:.3g}"
    pil_ref = ref(prompt=PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    diff = np.abs(np.asarray(pil_ref, np.int16) - np.asarray(out["pil"][0], np.int16))
    assert diff.max() <= 1, f"PIL outputs differ by {diff.max()} levels"


def test_long_prompt_is_truncated_with_a_warning_naming_the_dropped_text(tiny_models):
    words = [f"w{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(90)]
    prompt = " ".join(words)
    ids = tiny_models.tokenizer(prompt).input_ids  # bos, ~230 tokens, eos: keep bos + 75 + eos
    dropped = tiny_models.tokenizer.decode(ids[76:-1])
    with pytest.warns(PromptTruncated) as record:
        ours, theirs = run_both(tiny_models, "ddim", prompt=prompt, num_inference_steps=2)
    message = str(record[0].message)
    assert len(ids) > 77 and "77 tokens" in message and message.endswith(repr(dropped))
    assert dropped.endswith(words[-1]) and " ".join(words[:10]) not in message
    assert_same_images(ours, theirs, "long prompt")


def test_callback_sees_every_step(tiny_models):
    seen = []
    pipe = tiny_models.scratch("pndm")
    out = pipe(PROMPTS, num_inference_steps=3, output_type="latent", progress=False,
               callback=lambda i, t, latents, noise_pred: seen.append((i, int(t), latents.shape, noise_pred.shape)),
               generator=torch.Generator().manual_seed(0))
    steps = [int(t) for t in pipe.scheduler.timesteps]  # PNDM (skip_prk_steps) runs 3 + 1 timesteps
    assert [s[0] for s in seen] == list(range(len(steps))) and [s[1] for s in seen] == steps
    assert all(s[2] == (2, 4, 8, 8) and s[3] == (2, 4, 8, 8) for s in seen)
    assert out.latents.shape == (2, 4, 8, 8)


def test_progress_bar_can_be_turned_off(tiny_models, capsys):
    pipe = tiny_models.scratch("ddim")
    pipe(PROMPTS[0], num_inference_steps=2, output_type="latent", progress=False)
    assert capsys.readouterr().err == ""
    pipe(PROMPTS[0], num_inference_steps=2, output_type="latent", progress=True)
    assert "2/2" in capsys.readouterr().err


def test_preprocess_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    ref = VaeImageProcessor(vae_scale_factor=8)
    for images in (picture(75, 70), [picture(64, 64), picture(64, 64, 1.0)]):
        torch.testing.assert_close(preprocess_image(images), ref.preprocess(images), rtol=0, atol=0)
    grey = picture().convert("L")
    assert preprocess_image(grey).shape == (1, 3, 64, 64)


# --------------------------------------------------------------------------- construction
def test_from_preset_gives_the_zoo_weights(tiny_models):
    pipe = scratch_pipeline_from_preset("tiny", scheduler="ddim", seed=0)
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=2, output_type="np", progress=False)
    a = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    b = tiny_models.scratch("ddim")(**kwargs, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(a, b)


def test_from_pretrained_diffusers_folder(tiny_models, tmp_path):
    """A diffusers folder written by diffusers/transformers' save_pretrained loads and matches."""
    from parity.zoo import folder_tokenizer

    ref = tiny_models.diffusers("euler")
    ref.save_pretrained(tmp_path / "model")
    pipe = ScratchPipeline.from_pretrained(tmp_path / "model")  # our tokenizer over the folder's tokenizer.json
    assert type(pipe.tokenizer).__module__ == "scratch_sd.tokenizer"
    loaded = ScratchPipeline.from_pretrained(tmp_path / "model", tokenizer=folder_tokenizer)  # a loader of the folder
    assert type(loaded.tokenizer).__module__.startswith("transformers")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    kwargs = dict(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=STEPS, output_type="np")
    ours = pipe(**kwargs, progress=False, generator=torch.Generator().manual_seed(0)).images
    ref.set_progress_bar_config(disable=True)
    assert_same_images(ours, ref(**kwargs, generator=torch.Generator().manual_seed(0)).images, "from_pretrained")
    other = ScratchPipeline.from_pretrained(tmp_path / "model", scheduler="lms", tokenizer=tiny_models.tokenizer)
    assert type(other.scheduler).__name__ == "LMSDiscreteScheduler" and other.tokenizer is tiny_models.tokenizer


def test_weight_files_prefers_safetensors_then_the_fp16_variant(tmp_path):
    (tmp_path / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    assert weight_files(tmp_path, "unet") == [tmp_path / "diffusion_pytorch_model.fp16.safetensors"]
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    assert weight_files(tmp_path, "unet") == [tmp_path / "diffusion_pytorch_model.bin"]
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "part-2.safetensors", "b": "part-1.safetensors", "c": "part-2.safetensors"}}))
    assert weight_files(tmp_path, "unet") == [tmp_path / "part-1.safetensors", tmp_path / "part-2.safetensors"]
    assert weight_files(tmp_path, "unet", variant="fp16") == [tmp_path / "diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(FileNotFoundError, match="text_encoder weights"):
        weight_files(tmp_path, "text_encoder")


def test_outdated_scheduler_config_is_fixed_as_diffusers_does(tiny_models):
    from scratch_sd.schedulers import SD15_SCHEDULER_CONFIG

    old = make_scheduler("ddim", {**SD15_SCHEDULER_CONFIG, "steps_offset": 0, "clip_sample": True})
    with pytest.warns(UserWarning, match="steps_offset"):
        pipe = ScratchPipeline(None, None, None, None, old, tiny_models.cfg)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.clip_sample is False


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(image="init", strength=0.0), r"strength.*\(0, 1\]"),
    (dict(image="init", strength=1.5), r"strength.*\(0, 1\]"),
    (dict(image="init", strength=-0.2), r"strength.*\(0, 1\]"),
    (dict(image="init", strength=0.1, num_inference_steps=4), "no denoising step"),
    (dict(height=60), "divisible by 8"),
    (dict(width=100, height=64), "divisible by 8"),
    (dict(prompt=PROMPTS, negative_prompt=["one"]), "negative_prompt` has 1 entries but `prompt` has 2"),
    (dict(prompt=PROMPTS, negative_prompt=[]), "negative_prompt` has 0 entries"),
    (dict(prompt=PROMPTS, num_images_per_prompt=2, generator="3 generators"), "generators of length 3"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(prompt=[]), "prompt"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents"),
])
def test_bad_inputs_are_clear_value_errors(tiny_models, kwargs, match):
    kwargs = dict(kwargs)
    if kwargs.get("image") == "init":
        kwargs["image"] = picture()
    if kwargs.get("generator") == "3 generators":
        kwargs["generator"] = [torch.Generator() for _ in range(3)]
    kwargs.setdefault("prompt", PROMPTS[0])
    kwargs.setdefault("num_inference_steps", 2)
    with pytest.raises(ValueError, match=match):
        tiny_models.scratch("ddim")(**kwargs, progress=False)


def test_unknown_scheduler(tiny_models):
    with pytest.raises(ValueError, match=r"unknown scheduler 'heun'; known: ddpm, ddim, pndm"):
        make_scheduler("heun")
    with pytest.raises(ValueError, match="unknown scheduler"):
        tiny_models.scratch("ddim").set_scheduler("sde_ve")
    with pytest.raises(ValueError, match="unknown scheduler"):
        scratch_pipeline_from_preset("tiny", scheduler="nope")


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def cached_models(tiny_models, monkeypatch):
    """The CLI builds its references through parity.references.build_references: hand it the session's
    tiny references (the scratch side converts their weights, as the module's scratch networks do)."""
    import parity.references

    monkeypatch.setattr(parity.references, "build_references",
                        lambda preset_name="tiny", model=None, components=None, seed=0, **_: tiny_models.refs)
    return tiny_models


def test_cli_generate_writes_the_png(cached_models, tmp_path, capsys):
    out = tmp_path / "sub" / "fox.png"
    rc = cli_main(["generate", "--prompt", PROMPTS[0], "--steps", "2", "--scheduler", "euler", "--no-progress",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    with PIL.Image.open(out) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    assert [p.name for p in out.parent.iterdir()] == ["fox.png"]  # no temporary file left behind
    assert "wrote" in capsys.readouterr().out
    ref = tmp_path / "sub" / "fox_diffusers.png"
    assert cli_main(["generate", "--prompt", PROMPTS[0], "--steps", "2", "--scheduler", "euler", "--no-progress",
                     "--impl", "diffusers", "--out", str(ref)]) == 0
    with PIL.Image.open(out) as a, PIL.Image.open(ref) as b:
        levels = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
    assert levels <= 1, f"scratch and diffusers PNGs differ by {levels} levels"


def test_cli_generate_compare_prints_psnr(cached_models, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    rc = cli_main(["generate", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--negative-prompt", "blurry",
                   "--num-images", "2", "--steps", "3", "--scheduler", "dpmpp_2m", "--compare", "--no-progress",
                   "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "PSNR" in text and "max_abs" in text and "PASS" in text and text.count("image ") == 4
    with PIL.Image.open(out) as im:
        assert im.size == (3 * 64 + 2 * 4, 4 * 64 + 3 * 4)


def test_cli_generate_img2img_compare(cached_models, tmp_path, capsys):
    init = tmp_path / "init.png"
    picture(80, 72).save(init)
    out = tmp_path / "img.png"
    rc = cli_main(["generate", "--prompt", PROMPTS[0], "--init-image", str(init), "--strength", "0.5",
                   "--height", "64", "--width", "64", "--steps", "4", "--scheduler", "lms", "--compare",
                   "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "img2img strength 0.5" in text and "PASS" in text


@pytest.mark.parametrize("args, match", [
    (["--init-image", "INIT", "--strength", "1.5"], "strength"),
    (["--init-image", "INIT", "--strength", "0"], "strength"),
    (["--height", "60"], "--height must be a positive multiple of 8"),
    (["--init-image", "MISSING"], "No such init image"),
    (["--prompt", "b", "--negative-prompt", "x", "--negative-prompt", "y", "--negative-prompt", "z"],
     "negative_prompt` has 3 entries"),
    (["--scheduler", "heun"], "unknown scheduler 'heun'"),
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--steps", "0"], "--steps"),
    (["--num-images", "0"], "--num-images"),
    (["--model", "MISSING"], "No such model"),
    (["--preset", "sd99"], "invalid choice"),
])
def test_cli_bad_inputs_exit_2_with_one_line_and_no_file(tmp_path, capsys, args, match):
    init = tmp_path / "init.png"
    picture().save(init)
    args = [{"INIT": str(init), "MISSING": str(tmp_path / "missing.png")}.get(a, a) for a in args]
    out = tmp_path / "out.png"
    rc = cli_main(["generate", "--prompt", "a", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and match in err, err
    assert not out.exists()


def test_cli_out_must_be_png(tmp_path, capsys):
    assert cli_main(["generate", "--prompt", "a", "--out", str(tmp_path / "x.jpg")]) == 2
    assert ".png" in capsys.readouterr().err


def test_cli_existing_out_is_refused_unless_force(cached_models, tmp_path, capsys):
    out = tmp_path / "fox.png"
    out.write_bytes(b"precious")
    argv = ["generate", "--prompt", PROMPTS[0], "--steps", "2", "--scheduler", "euler", "--no-progress",
            "--out", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "exists" in err and "--force" in err, err
    assert out.read_bytes() == b"precious"  # refused before any work: the file is kept
    assert cli_main([*argv, "--force"]) == 0, capsys.readouterr().err
    with PIL.Image.open(out) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    assert [p.name for p in tmp_path.iterdir()] == ["fox.png"]  # replaced in place, no temporary left


def test_comparison_picture_scales_the_heat_map_to_the_largest_difference():
    from sdparity.generate import comparison_picture

    ref = np.zeros((2, 8, 8, 3), np.float32)
    out = ref.copy()
    out[0, 0, 0, 0], out[1, 1, 1, 2] = 0.5, 0.25
    pic, scale = comparison_picture(out, ref)
    tiles = np.asarray(pic)
    assert scale == 0.5 and tiles.shape == (8 + 4 + 8, 3 * 8 + 2 * 4, 3)
    assert tuple(tiles[0, 24]) == (255, 255, 255)  # image 0's heat map: the largest difference is white
    assert tuple(tiles[12 + 1, 24 + 1]) == (255, 128, 0)  # image 1: half of it is orange, not white
    assert tuple(tiles[12, 24]) == (0, 0, 0)


# --------------------------------------------------------------------------- sd15 (slow)
@pytest.fixture(scope="module")
def sd15_models():
    from parity.references import build_references

    refs = build_references("sd15")
    return Models(refs, scratch_from(refs))


SD15_CASES = [
    pytest.param("dpmpp_2m", "img2img", marks=pytest.mark.ci),
    pytest.param("pndm", "txt2img"),
    pytest.param("euler_ancestral", "txt2img"),
    pytest.param("ddim", "img2img"),
]


@pytest.mark.slow
@pytest.mark.parametrize("scheduler, mode", SD15_CASES)
def test_sd15_matches_diffusers_256(sd15_models, scheduler, mode):
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=3, guidance_scale=7.5, height=256, width=256)
    if mode == "img2img":
        kwargs = dict(prompt=PROMPTS[0], image=picture(256, 256), strength=0.67, num_inference_steps=3,
                      guidance_scale=7.5)
    ours, theirs = run_both(sd15_models, scheduler, img2img=mode == "img2img", **kwargs)
    assert ours.shape == (1, 256, 256, 3)
    assert_same_images(ours, theirs, f"sd15 {scheduler} {mode}")
