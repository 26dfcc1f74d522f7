"""The 15 corruptions: shapes, determinism, severity ordering, hand-computed values, PIL agreement."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cema_ray.data.corruptions import CORRUPTIONS, corrupt
from cema_ray.errors import ConfigError, DataError

torch.set_num_threads(1)

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform")
DETERMINISTIC = tuple(c for c in CORRUPTIONS if c not in RANDOM)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(n: int = 4, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Natural-ish images: gradients plus a bright square, so blurs and noise both change them."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = np.empty((n, size, size, channels), np.float64)
    for i in range(n):
        for c in range(channels):
            a, b = g.uniform(0.2, 0.8, 2)
            out[i, :, :, c] = 40 + 150 * (a * xx + b * yy) / (a + b)
        top, left = g.integers(2, size // 2, 2)
        out[i, top:top + size // 3, left:left + size // 3] = 230
    return torch.from_numpy(out.astype(np.uint8))


def test_standard_order():
    assert len(CORRUPTIONS) == 15
    assert CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 40)])
def test_shape_dtype_and_damage_for_gray_and_rgb(name, channels, size):
    x = smooth_images(3, size, channels)
    y = corrupt(x, name, 5, gen())
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert (y.int() - x.int()).abs().float().mean() > 0.5  # severity 5 visibly changes every corruption


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_seed_same_output(name):
    x = smooth_images(3)
    assert torch.equal(corrupt(x, name, 3, gen(7)), corrupt(x, name, 3, gen(7)))


@pytest.mark.parametrize("name", RANDOM)
def test_different_seed_different_output(name):
    x = smooth_images(3)
    assert not torch.equal(corrupt(x, name, 4, gen(1)), corrupt(x, name, 4, gen(2)))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_ignore_the_seed(name):
    x = smooth_images(2)
    assert torch.equal(corrupt(x, name, 4, gen(1)), corrupt(x, name, 4, gen(2)))


@pytest.mark.parametrize("name", ["gaussian_noise", "motion_blur", "fog", "elastic_transform"])
def test_random_draws_are_per_image(name):
    x = smooth_images(1).repeat(2, 1, 1, 1)
    y = corrupt(x, name, 5, gen(3))
    assert not torch.equal(y[0], y[1])


def damage(x: torch.Tensor, name: str, severity: int) -> float:
    return (corrupt(x, name, severity, gen(5)).float() - x.float()).abs().mean().item()


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "contrast",
                                  "brightness", "fog", "zoom_blur"])
def test_damage_grows_with_severity(name):
    x = smooth_images(8)
    d = [damage(x, name, s) for s in range(1, 6)]
    assert all(a < b for a, b in zip(d, d[1:])), d


def test_pixelate_damage_grows_from_severity_1_to_5():
    # Not monotone step by step: BOX resampling of 30 vs 28 vs 27 px aliases differently (so does PIL).
    x = smooth_images(8)
    assert damage(x, "pixelate", 1) < damage(x, "pixelate", 3) < damage(x, "pixelate", 5)


def test_contrast_hand_computed():
    # One 1x2 gray image, values 0 and 255: mean 0.5; CIFAR severity 1 c = 0.75 -> 0.125, 0.875.
    x = torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 2, 1)
    y = corrupt(x, "contrast", 1, gen())
    assert y.flatten().tolist() == [int(0.125 * 255), int(0.875 * 255)]  # floor: 31, 223


def test_brightness_gray_adds_c_and_rgb_keeps_hue():
    gray = torch.tensor([0, 100, 250], dtype=torch.uint8).reshape(1, 1, 3, 1)
    # CIFAR severity 5: V + 0.3, clipped.
    expected = [int(min(v / 255 + 0.3, 1.0) * 255) for v in (0, 100, 250)]
    assert corrupt(gray, "brightness", 5, gen()).flatten().tolist() == expected
    rgb = torch.tensor([[[[200, 100, 50]]]], dtype=torch.uint8)  # V = 200/255 -> 200/255 + 0.3 > 1 -> 1
    out = corrupt(rgb, "brightness", 5, gen()).flatten().tolist()
    assert out == [255, int(100 * 255 / 200), int(50 * 255 / 200)]  # RGB scaled by V'/V = 255/200


def test_gaussian_noise_uses_cifar_constant_up_to_32px_and_imagenet_above():
    for size, sigma in ((32, 0.04), (48, 0.08)):  # severity 1 of CIFAR-10-C and of ImageNet-C
        x = torch.full((4, size, size, 3), 128, dtype=torch.uint8)
        noise = (corrupt(x, "gaussian_noise", 1, gen()).float() - 128) / 255
        assert abs(noise.std().item() - sigma) < 0.15 * sigma  # floor and clipping move it a little


def test_pixelate_matches_pil_box_resize():
    x = smooth_images(3, 32, 3, seed=1)
    for severity, c in enumerate([0.95, 0.9, 0.85, 0.75, 0.65], start=1):
        s = int(32 * c)
        ref = np.stack([np.asarray(Image.fromarray(a).resize((s, s), Image.BOX).resize((32, 32), Image.BOX))
                        for a in x.numpy()])
        np.testing.assert_array_equal(corrupt(x, "pixelate", severity, gen()).numpy(), ref)


def test_jpeg_matches_pil_at_the_cifar_quality():
    x = smooth_images(2, 32, 3, seed=2)
    buf = io.BytesIO()
    Image.fromarray(x[0].numpy()).save(buf, format="JPEG", quality=40)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    np.testing.assert_array_equal(corrupt(x, "jpeg_compression", 5, gen())[0].numpy(), ref)


def test_defocus_kernel_preserves_constant_images():
    x = torch.full((2, 32, 32, 3), 77, dtype=torch.uint8)
    for name in ("defocus_blur", "zoom_blur", "motion_blur", "pixelate"):
        assert torch.equal(corrupt(x, name, 5, gen()), x), name


def test_empty_batch_passes_through():
    x = torch.zeros((0, 32, 32, 3), dtype=torch.uint8)
    assert corrupt(x, "fog", 3, gen()).shape == (0, 32, 32, 3)


@pytest.mark.parametrize("name", ["Gaussian_noise", "speckle", "clean", ""])
def test_unknown_name_is_rejected_with_the_known_list(name):
    with pytest.raises(ConfigError, match="unknown corruption") as err:
        corrupt(smooth_images(1), name, 1, gen())
    assert "gaussian_noise" in str(err.value)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, "3"])
def test_bad_severity_is_rejected(severity):
    with pytest.raises(ConfigError, match="1, 2, 3, 4, 5"):
        corrupt(smooth_images(1), "fog", severity, gen())


def test_bad_images_are_rejected():
    with pytest.raises(DataError, match="uint8"):
        corrupt(smooth_images(1).float(), "fog", 1, gen())
    with pytest.raises(DataError, match="channels"):
        corrupt(torch.zeros((1, 8, 8, 4), dtype=torch.uint8), "fog", 1, gen())


# ------------------------------------------------------------ glass and motion blur against the reference loops

def reference_glass_sweep(img: np.ndarray, offsets: np.ndarray, delta: int) -> np.ndarray:
    """hendrycks/robustness make_cifar_c.py's loop, transcribed line for line on an (H, W, C) uint8 array.

    The only change: ``dx, dy`` come from ``offsets`` (in visit order) instead of ``np.random.randint``.
    """
    x = img.copy()
    h_size, w_size = x.shape[:2]
    index = 0
    for h in range(h_size - delta, delta, -1):
        for w in range(w_size - delta, delta, -1):
            dx, dy = offsets[index]
            index += 1
            h_prime, w_prime = h + dy, w + dx
            # swap
            x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
    return x


@pytest.mark.parametrize("channels,size,delta", [(3, 32, 1), (1, 28, 1), (3, 40, 2), (3, 40, 4), (1, 21, 3)])
def test_glass_sweep_equals_the_reference_loop_bit_for_bit(channels, size, delta):
    from cema_ray.data.corruptions import glass_offsets, glass_sweep_sources
    x = smooth_images(3, size, channels, seed=size + delta)
    x = (x.int() + torch.randint(0, 20, x.shape, generator=gen(delta))).clamp(0, 255).to(torch.uint8)
    offsets = glass_offsets(3, size, size, delta, 2, gen(11))
    ours = x.permute(0, 3, 1, 2).reshape(3, channels, -1)
    expected = x.numpy()
    for sweep in offsets:
        ours = ours.gather(2, glass_sweep_sources(sweep, size, size, delta)[:, None, :].expand_as(ours))
        expected = np.stack([reference_glass_sweep(img, sweep[i].reshape(-1, 2).numpy(), delta)
                             for i, img in enumerate(expected)])
    ours = ours.reshape(3, channels, size, size).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(ours, expected)
    assert not np.array_equal(expected, x.numpy())


def test_glass_blur_is_the_reference_pipeline_on_cifar_and_imagenet_constants():
    from cema_ray.data import corruptions as C
    for size, table in ((32, C._CIFAR), (40, C._IMAGENET)):
        x = smooth_images(2, size, 3, seed=size)
        sigma, delta, iterations = table["glass_blur"][4]
        g = gen(5)
        ours = corrupt(x, "glass_blur", 5, g)
        offsets = C.glass_offsets(2, size, size, delta, iterations, gen(5))
        first = torch.floor(C._gaussian_blur(x.permute(0, 3, 1, 2).float() / 255, sigma).clamp(0, 1) * 255 + 1e-3)
        imgs = first.to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for sweep in offsets:
            imgs = np.stack([reference_glass_sweep(img, sweep[i].reshape(-1, 2).numpy(), delta)
                             for i, img in enumerate(imgs)])
        second = C._gaussian_blur(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, sigma)
        assert torch.equal(ours, C._to_uint8(second))


def reference_motion_blur(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick 6 effect.c MotionBlurImage for one opaque image, transcribed in float64 (edge pixels)."""
    width = int(2 * np.ceil(radius) + 1)  # GetOptimalKernelWidth1D with radius > 0
    kernel = np.array([np.exp(-(i * i) / (2.0 * sigma * sigma)) / (np.sqrt(2 * np.pi) * sigma)
                       for i in range(width)])
    kernel /= kernel.sum()
    point_x, point_y = width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle))
    offsets = [(int(np.ceil(i * point_y / np.hypot(point_x, point_y) - 0.5)),
                int(np.ceil(i * point_x / np.hypot(point_x, point_y) - 0.5))) for i in range(width)]
    rows, cols = img.shape[:2]
    out = np.zeros(img.shape, np.float64)
    for y in range(rows):
        for x in range(cols):
            for k, (ox, oy) in zip(kernel, offsets):
                out[y, x] += k * img[min(max(y + oy, 0), rows - 1), min(max(x + ox, 0), cols - 1)]
    return out


@pytest.mark.parametrize("channels,size,radius,sigma", [(3, 32, 9, 2.5), (1, 28, 6, 1), (3, 12, 8, 2)])
def test_motion_blur_matches_imagemagick_formula(channels, size, radius, sigma):
    from cema_ray.data.corruptions import _motion_blur
    x = smooth_images(3, size, channels, seed=radius)
    angles = torch.tensor([-44.3, 3.7, 31.0])
    ours = _motion_blur(x.permute(0, 3, 1, 2).float() / 255, radius, sigma, angles).permute(0, 2, 3, 1).double()
    for i in range(3):
        expected = reference_motion_blur(x[i].double().numpy() / 255, radius, sigma, float(angles[i]))
        np.testing.assert_allclose(ours[i].numpy(), expected, rtol=0, atol=1e-5)  # float32 sums of <20 taps


def test_motion_blur_output_is_rounded_to_whole_levels():
    from cema_ray.data import corruptions as C
    x = smooth_images(2, 32, 3)
    angles = C._rand((2,), gen(4), x).cpu() * 90.0 - 45.0
    blurred = C._motion_blur(x.permute(0, 3, 1, 2).float() / 255, 9, 2.5, angles)
    expected = torch.round(blurred * 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(corrupt(x, "motion_blur", 5, gen(4)), expected)
