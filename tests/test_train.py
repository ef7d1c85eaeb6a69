"""Training (issue 9): the scratch training step equals diffusers' (loss, every gradient, AdamW
state and parameters after 3 accumulated, clipped steps); the digits trainer learns; bad input
exits 2 with one line."""
import csv
import json

import pytest
import torch
import torch.nn.functional as F

from sdparity import main as cli
from scratch_sd import train
from sdparity import digits

TINY_RUN = ["--steps", "30", "--batch-size", "32", "--lr", "4e-3", "--width", "8", "--samples-per-digit", "1", "--ddpm-steps", "2",
            "--sde-steps", "2", "--min-accuracy", "0", "--quiet"]


# --------------------------------------------------------------------------- training parity
@pytest.fixture(scope="module")
def train_rows():
    from parity.train_check import run_train_checks

    return run_train_checks("fp32")


def test_training_step_equals_diffusers(train_rows):
    failed = [f"{r['tensor']} [{r['case']}]: {r['reason']}" for r in train_rows if not r["passed"]]
    assert not failed, "\n".join(failed)
    for r in train_rows:
        assert r["component"] == "train" and r["dtype"] == "fp32"
        assert r["rel_l2"] <= 1e-5 and r["psnr_db"] >= 90, r


def test_training_check_covers_every_parameter_and_both_targets(train_rows):
    from parity import zoo
    from parity.train_check import group_of
    from scratch_sd.config import tiny

    names = [n for n, _ in zoo.reference_unet(tiny()).named_parameters()]
    for kind in ("epsilon", "v_prediction"):
        rows = [r for r in train_rows if r["case"].startswith(f"prediction_type={kind}")]
        tensors = {r["tensor"] for r in rows}
        assert {"loss", "grad:worst_parameter", "loss_per_step", "grad_norm_per_step", "params_after_3_steps",
                "adam_exp_avg_after_3_steps", "adam_exp_avg_sq_after_3_steps"} <= tensors
        groups = {r["tensor"][5:]: int(r["case"].rsplit("=", 1)[1]) for r in rows
                  if r["tensor"].startswith("grad:") and r["tensor"] not in ("grad:worst_parameter", "grad:all")}
        assert next(r for r in rows if r["tensor"] == "grad:all")["case"].endswith(f"parameters={len(names)}")
        assert set(groups) == {group_of(n) for n in names}
        assert sum(groups.values()) == len(names)  # every parameter's gradient was judged
        norms = next(r for r in rows if r["tensor"] == "grad_norm_per_step")
        assert norms["shape"] == "3"


def test_training_check_fails_when_the_scratch_step_is_wrong(monkeypatch):
    """A wrong target (noise + x0 instead of v) must show up in the loss and every gradient row."""
    from parity.train_check import run_train_checks

    real = train.training_target

    def broken(scheduler, x0, noise, timesteps):
        return real(scheduler, x0, noise, timesteps) + 1e-3 * x0

    monkeypatch.setattr(train, "training_target", broken)
    rows = run_train_checks("fp32", prediction_types=("v_prediction",))
    loss = next(r for r in rows if r["tensor"] == "loss")
    assert not loss["passed"] and loss["rel_l2"] > 1e-5
    assert not next(r for r in rows if r["tensor"] == "grad:worst_parameter")["passed"]


# --------------------------------------------------------------------------- the training step
def test_adamw_defaults_are_diffusers_fine_tuning_defaults():
    opt = train.adamw([torch.nn.Parameter(torch.zeros(2))])
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"], g["eps"]) == (1e-5, (0.9, 0.999), 1e-2, 1e-8)


def test_targets_follow_prediction_type():
    from scratch_sd.schedulers import get_scheduler

    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    eps = get_scheduler("ddpm", {"prediction_type": "epsilon"})
    assert torch.equal(train.training_target(eps, x0, noise, t), noise)
    v = get_scheduler("ddpm", {"prediction_type": "v_prediction"})
    abar = v.alphas_cumprod[t][:, None, None, None]
    torch.testing.assert_close(train.training_target(v, x0, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * x0)
    x = get_scheduler("ddpm", {"prediction_type": "sample"})
    assert torch.equal(train.training_target(x, x0, noise, t), x0)


def test_accumulation_equals_the_full_batch_and_clipping_bounds_the_step():
    torch.manual_seed(0)
    data, target = torch.randn(8, 5), torch.randn(8, 3)

    def run(micro, clip):
        model = torch.nn.Linear(5, 3)
        torch.nn.init.zeros_(model.weight)
        torch.nn.init.zeros_(model.bias)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # from zero, the parameters are minus the step's gradient
        r = train.train_step(model, opt, micro, lambda b: F.mse_loss(model(b[0]), b[1]), clip)
        return torch.cat([model.weight.detach().flatten(), model.bias.detach().flatten()]), r

    full, r_full = run([(data, target)], None)
    halves, r_half = run([(data[:4], target[:4]), (data[4:], target[4:])], None)
    torch.testing.assert_close(halves, full)  # mean of the micro-batch gradients = full-batch gradient
    assert abs(r_half.grad_norm - r_full.grad_norm) < 1e-5
    assert abs(float(torch.linalg.vector_norm(full)) - r_full.grad_norm) < 1e-5
    clipped, r_clip = run([(data, target)], 1e-3)
    assert r_clip.grad_norm == pytest.approx(r_full.grad_norm)  # reported before clipping
    assert float(torch.linalg.vector_norm(clipped)) == pytest.approx(1e-3, rel=1e-4)
    torch.testing.assert_close(clipped / 1e-3, full / r_full.grad_norm, rtol=1e-4, atol=1e-6)  # same direction


def test_bf16_autocast_runs_the_unet_forward_in_bf16():
    from scratch_sd.schedulers import get_scheduler

    model = digits.ClassConditionedUNet(digits.digits_unet_config(8))
    seen = []
    model.unet.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss = train.noise_prediction_loss(model, get_scheduler("ddpm", digits.DDPM_SCHEDULER_CONFIG),
                                       torch.randn(2, 1, 16, 16), torch.tensor([1, 2]),
                                       autocast_dtype=torch.bfloat16)
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)


# --------------------------------------------------------------------------- digits trainer
def _loss_by_objective(path):
    rows = list(csv.DictReader(open(path)))
    out = {}
    for r in rows:
        out.setdefault(r["objective"], []).append(float(r["loss"]))
    return out


def test_short_digits_training_loss_falls_and_writes_every_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--objective", "both", *TINY_RUN, "--out", str(out)]) == 0
    for name in ("loss.csv", "loss.png", "checkpoint.safetensors", "samples_grid.png", "summary.json", "summary.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    losses = _loss_by_objective(out / "loss.csv")
    assert set(losses) == {"ddpm", "vesde"}
    for name, loss in losses.items():
        assert len(loss) == 30
        first, last = sum(loss[:6]) / 6, sum(loss[-6:]) / 6
        assert last < 0.8 * first, f"{name}: loss did not fall ({first:.4f} -> {last:.4f})"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classifier"]["real_heldout"] > 0.9  # the classifier itself knows the digits
    for r in summary["objectives"].values():
        assert r["num_samples"] == 10 and 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 30
    stdout = capsys.readouterr().out
    assert "ddpm: accuracy" in stdout and "vesde: accuracy" in stdout

    # resume continues the saved state up to the new total
    again = tmp_path / "again"
    assert cli.main(["train", "--objective", "ddpm", *TINY_RUN, "--steps", "32", "--resume",
                     str(out / "checkpoint.safetensors"), "--out", str(again)]) == 0
    assert len(_loss_by_objective(again / "loss.csv")["ddpm"]) == 2
    assert json.loads((again / "summary.json").read_text())["objectives"]["ddpm"]["steps"] == 32


def test_checkpoint_round_trip_restores_model_ema_and_optimizer(tmp_path):
    from scratch_sd.storage import load_state_dict, save_state_dict

    cfg = digits.DigitsTrainConfig(steps=2, batch_size=4, seed=3)
    images, labels = torch.rand(16, 1, 16, 16) * 2 - 1, torch.arange(16) % 10
    a = digits.DigitsTrainer(digits.DDPMObjective(), digits.digits_unet_config(8), cfg)
    a.train(images, labels)
    save_state_dict(a.state_dict("ddpm."), tmp_path / "c.safetensors")
    b = digits.DigitsTrainer(digits.DDPMObjective(), digits.digits_unet_config(8), cfg)
    b.load_state_dict(load_state_dict(tmp_path / "c.safetensors"), "ddpm.")
    assert b.step == 2
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    a.train(images, labels, steps=3)
    b.train(images, labels, steps=3)
    assert a.history[-1]["loss"] == b.history[-1]["loss"]  # same data, noise and optimiser state
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_samplers_return_images_of_the_requested_shape():
    model = digits.ClassConditionedUNet(digits.digits_unet_config(8)).eval()
    labels = torch.tensor([0, 7])
    for objective, steps in ((digits.DDPMObjective(), 3), (digits.DDPMObjective(sampler="ddpm"), 3),
                             (digits.VESDEObjective(correct_steps=1), 3)):
        x = objective.sample(model, labels, (1, 16, 16), steps=steps, guidance=2.0,
                             generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, words", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--objective", "gan"], "unknown objective 'gan'"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--resume", "/nonexistent/ckpt.safetensors"], "No such checkpoint file"),
])
def test_bad_input_exits_2_with_one_line(args, words, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_resume_checkpoint_of_another_shape_exits_2(tmp_path, capsys):
    from scratch_sd.storage import save_state_dict

    other = digits.DigitsTrainer(digits.DDPMObjective(), digits.digits_unet_config(16), digits.DigitsTrainConfig())
    ckpt = tmp_path / "other.safetensors"
    save_state_dict(other.state_dict("ddpm."), ckpt)
    out = tmp_path / "out"
    assert cli.main(["train", "--objective", "ddpm", "--width", "8", "--resume", str(ckpt), "--out", str(out),
                     "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit the ddpm digits model" in err and "mis-shaped" in err, err
    # a checkpoint without the requested objective is refused too
    assert cli.main(["train", "--objective", "vesde", "--width", "16", "--resume", str(ckpt), "--out", str(out),
                     "--quiet"]) == 2
    assert "has no vesde state" in capsys.readouterr().err
    assert not out.exists()
