"""Tests of eval.py: the metrics against independent computations, the baselines, the plot, the CLI."""
import json
import math

import numpy as np
import torch
from PIL import Image

import eval as evaluation
import train
from data import SyntheticVideos, load_tokenizer
from model import VideoMAR, VideoMARConfig

TINY = ("--n_layer 1 --n_embd 32 --n_head 2 --diffloss_d 1 --diffloss_w 32 --num_sampling_steps 5 "
        "--height 16 --width 16 --batch_size 2 --log_interval 1 --sample_num_iter 2").split()


def test_psnr_of_a_known_noise_level():
    torch.manual_seed(0)
    x = 0.25 + 0.5 * torch.rand(3, 3, 16, 16)
    for sigma in (0.1, 0.03):
        sign = torch.randint(0, 2, x.shape).float() * 2 - 1  # +-sigma everywhere: the MSE is exactly sigma^2
        assert torch.allclose(evaluation.psnr(x + sigma * sign, x), torch.full((3,), -20 * math.log10(sigma)), atol=1e-3)
    assert torch.equal(evaluation.psnr(x, x), torch.full((3,), evaluation.MAX_PSNR))  # identical: capped, not inf


def ssim_at_one_position(x, y):
    """SSIM of two (3, 11, 11) images in numpy: the Gaussian window covers them exactly once."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    C1, C2, values = 0.01 ** 2, 0.03 ** 2, []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64)):
        mu_a, mu_b = (w * a).sum(), (w * b).sum()
        var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
        cov = (w * (a - mu_a) * (b - mu_b)).sum()
        values.append((2 * mu_a * mu_b + C1) * (2 * cov + C2) / ((mu_a ** 2 + mu_b ** 2 + C1) * (var_a + var_b + C2)))
    return np.mean(values)


def test_ssim_against_a_direct_computation():
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 11, 11), torch.rand(2, 3, 11, 11)
    y[1] = 0.7 * x[1] + 0.3 * y[1]  # a correlated pair too
    got = evaluation.ssim(x, y)
    for i in range(2):
        assert abs(got[i].item() - ssim_at_one_position(x[i].numpy(), y[i].numpy())) < 1e-4
    assert got[1] > got[0] + 0.3


def test_ssim_properties():
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 24, 20), torch.rand(4, 3, 24, 20)
    assert torch.allclose(evaluation.ssim(x, x), torch.ones(4), atol=1e-5)
    assert torch.allclose(evaluation.ssim(x, y), evaluation.ssim(y, x), atol=1e-6)
    assert (evaluation.ssim(x, 1 - x) < 0).all()  # an image against its negative: anti-correlated
    # constant images a and b: no variance, so SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b, C1 = 0.3, 0.5, 0.01 ** 2
    got = evaluation.ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert abs(got.item() - (2 * a * b + C1) / (a * a + b * b + C1)) < 1e-5
    # averaged over channels: one channel wrong out of three
    z = x.clone()
    z[:, 0] = y[:, 0]
    expected = (evaluation.ssim(x[:, :1], y[:, :1]) + 2) / 3
    assert torch.allclose(evaluation.ssim(x, z), expected, atol=1e-5)


def tiny_model(token_dim, text_dim):
    torch.manual_seed(0)
    config = VideoMARConfig(latent_channels=token_dim, n_layer=1, n_embd=32, n_head=2, diffloss_d=1, diffloss_w=32,
                            num_sampling_steps="3", text_dim=text_dim, text_len=8)
    return VideoMAR(config).eval()


class FakeText:
    def __call__(self, captions):
        return torch.randn(len(captions), 8, 16), torch.ones(len(captions), 8, dtype=torch.bool)


def test_copy_baseline(monkeypatch):
    tokenizer = load_tokenizer("patch:4x4x4")
    model = tiny_model(tokenizer.channels, 16)
    args = (model, tokenizer, FakeText(), 3, 9, 16, 16)
    result = evaluation.evaluate(*args, num_iter=1, batch_size=2)
    clips = torch.stack([SyntheticVideos(9, 16, 16, split="test")[i][0] for i in range(3)])
    truth = (clips + 1) / 2
    frame_1 = evaluation.psnr(truth[:, 0], truth[:, 1]).mean().item()
    assert result["frames"] == list(range(1, 9)) and len(result["model"]["psnr_per_frame"]) == 8
    assert abs(result["copy"]["psnr_per_frame"][0] - frame_1) < 1e-4  # frame 1 against frame 0
    assert abs(result["copy"]["psnr_last_third"] - np.mean(result["copy"]["psnr_per_frame"][-3:])) < 1e-4  # frames 6-8
    assert len(result["grid"]) == 6  # truth and generated of each of the 3 clips (keep=4)

    class Static(SyntheticVideos):  # nothing moves: copying the first frame is exact
        def __getitem__(self, i):
            clip, caption = super().__getitem__(i)
            return clip[:1].expand_as(clip), caption
    monkeypatch.setattr(evaluation, "SyntheticVideos", Static)
    result = evaluation.evaluate(*args, num_iter=1, batch_size=2)
    assert result["copy"]["psnr"] == evaluation.MAX_PSNR and abs(result["copy"]["ssim"] - 1) < 1e-5
    assert result["model"]["psnr"] < 30  # an untrained model does not reproduce the frame


def test_plot_is_written_with_its_size(tmp_path):
    path = tmp_path / "plot.png"
    evaluation.plot_curves(path, [1, 2, 3, 4], {"model": [20, 21, 19, 18], "copy": [15, 14, 13, 12]}, "t", size=(300, 200))
    image = Image.open(path)
    assert image.size == (300, 200)
    colours = {c for _, c in image.getcolors(300 * 200)}
    assert evaluation.COLOURS["model"] in colours and evaluation.COLOURS["copy"] in colours and (0, 0, 0) in colours


def test_cli_on_a_tiny_trained_checkpoint(tmp_path, capsys):
    assert train.main(TINY + ["--frames", "5,9", "--stage_iters", "2,2", "--out_dir", str(tmp_path)]) == 0
    assert "quality on 16 held-out clips" in capsys.readouterr().out
    out = tmp_path / "eval"
    args = ["--ckpt", str(tmp_path / "ckpt.pt"), "--n", "3", "--batch_size", "2", "--num_iter", "2", "--out", str(out)]
    assert evaluation.main(args) == 0
    printed = capsys.readouterr().out
    assert "| model |" in printed and "| null_text |" in printed and "| copy |" in printed
    result = json.loads((out / "eval.json").read_text())
    assert result["num_frames"] == 9 and result["frames"] == list(range(1, 9))
    for method in evaluation.METHODS:
        assert {"psnr", "ssim", "psnr_last_third", "ssim_last_third"} <= result[method].keys()
        assert len(result[method]["psnr_per_frame"]) == len(result[method]["ssim_per_frame"]) == 8
    assert Image.open(out / "psnr.png").size == (560, 360)
    assert Image.open(out / "grid.png").size == (9 * 18 - 2, 6 * 18 - 2)  # 3 clips x (truth, generated)
    # extrapolation: more frames and a larger grid than trained
    assert evaluation.main(args[:-1] + [str(out / "x"), "--frames", "13", "--height", "24", "--width", "24", "--n", "1"]) == 0
    result = json.loads((out / "x" / "eval.json").read_text())
    assert (result["height"], len(result["model"]["psnr_per_frame"])) == (24, 12)
    assert evaluation.main(args + ["--frames", "6"]) == 2  # not 1 + 4k frames
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_bad_input(tmp_path, capsys):
    assert evaluation.main(["--ckpt", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
