"""Tests for supcon_tf.data.augment."""

import colorsys

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf.data import augment

SIZE = 32


def _images(batch_size=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch_size, SIZE, SIZE, 3)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _supcon_identity(batch_size, num_views=1, **columns):
    """Uniforms for "supcon" that change nothing, except for `columns`.

    Column 0 at 1.0 is a full-image crop, column 5 at 0.9 skips the colour
    jitter, and 0.5 means no flip, no grayscale and a square crop.
    """
    uniforms = np.full((batch_size, num_views, 11), 0.5, np.float32)
    uniforms[..., 0] = 1.0
    uniforms[..., 5] = 0.9
    for column, value in columns.items():
        uniforms[..., int(column[1:])] = value
    return uniforms


def _random_uniforms(batch_size, num_views, mode, seed=1):
    shape = (batch_size, num_views, augment.num_uniforms(mode))
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("mode", augment.AUGMENT_MODES)
def test_output_shape_dtype_range(mode):
    views = augment.augment_batch(_images(), _random_uniforms(3, 2, mode), mode)

    assert views.shape == (3, 2, SIZE, SIZE, 3)
    assert views.dtype == tf.float32
    assert float(tf.reduce_min(views)) >= 0.0
    assert float(tf.reduce_max(views)) <= 1.0


@pytest.mark.parametrize("mode", augment.AUGMENT_MODES)
def test_static_shape_in_graph(mode):
    num_columns = augment.num_uniforms(mode)
    function = tf.function(lambda x, u: augment.augment_batch(x, u, mode))
    concrete = function.get_concrete_function(
        tf.TensorSpec([5, 24, 16, 3], tf.uint8),
        tf.TensorSpec([5, 2, num_columns], tf.float32),
    )

    assert concrete.output_shapes.as_list() == [5, 2, 24, 16, 3]


def test_num_uniforms_per_mode():
    assert augment.num_uniforms("supcon") == 11
    assert augment.num_uniforms("keras_example") == 4
    assert augment.num_uniforms("none") == 0


def test_invalid_mode_message():
    with pytest.raises(ValueError, match="'simclr'.*supcon, keras_example"):
        augment.augment_batch(_images(), np.zeros((3, 1, 0)), "simclr")
    with pytest.raises(ValueError, match="'simclr'"):
        augment.num_uniforms("simclr")


def test_draw_uniforms_stateless():
    seed = tf.constant([3, 7], tf.int64)

    first = augment.draw_uniforms(seed, 2, "supcon")
    second = augment.draw_uniforms(seed, 2, "supcon")
    other = augment.draw_uniforms(tf.constant([3, 8], tf.int64), 2, "supcon")

    assert first.shape == (2, 11)
    assert first.dtype == tf.float32
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    assert float(tf.reduce_min(first)) >= 0.0
    assert float(tf.reduce_max(first)) < 1.0


def test_none_mode_exact():
    images = _images()

    views = augment.augment_batch(images, np.zeros((3, 2, 0)), "none")

    expected = images.astype(np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(views[:, 0], expected)
    np.testing.assert_array_equal(views[:, 1], expected)


@pytest.mark.parametrize("mode", ["supcon", "keras_example"])
def test_same_uniforms_same_views(mode):
    images = _images()
    uniforms = _random_uniforms(3, 2, mode)

    first = augment.augment_batch(images, uniforms, mode)
    second = augment.augment_batch(images, uniforms, mode)

    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("mode", ["supcon", "keras_example"])
def test_identical_images_get_different_views(mode):
    images = np.repeat(_images(1), 2, axis=0)

    views = augment.augment_batch(images, _random_uniforms(2, 1, mode), mode)

    assert np.abs(views[0] - views[1]).max() > 0.1


def test_supcon_identity_uniforms():
    images = _images()

    views = augment.augment_batch(images, _supcon_identity(3), "supcon")

    expected = images.astype(np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(views[:, 0], expected)


def test_supcon_forced_flip_exact():
    images = _images()

    views = augment.augment_batch(images, _supcon_identity(3, u4=0.0), "supcon")

    mirrored = images[:, :, ::-1].astype(np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(views[:, 0], mirrored)


def test_supcon_forced_grayscale():
    images = _images()

    views = augment.augment_batch(
        images, _supcon_identity(3, u10=0.0), "supcon"
    ).numpy()

    np.testing.assert_array_equal(views[..., 0], views[..., 1])
    np.testing.assert_array_equal(views[..., 0], views[..., 2])
    luma = images.astype(np.float64) @ [0.299, 0.587, 0.114] / 255.0
    np.testing.assert_allclose(views[:, 0, ..., 0], luma, atol=1e-6)


def _ramp_image():
    """Channel 0 is 8 * column and channel 1 is 8 * row."""
    ramp = np.arange(SIZE) * 8
    image = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    image[0, :, :, 0] = ramp[None, :]
    image[0, :, :, 1] = ramp[:, None]
    return image


@pytest.mark.parametrize(
    "area, ratio_column, left, top",
    [(0.25, 0.5, 0.0, 0.0), (0.25, 0.5, 1.0, 1.0), (0.5, 1.0, 0.3, 0.8)],
)
def test_supcon_crop_box_position(area, ratio_column, left, top):
    uniforms = _supcon_identity(
        1, u0=(area - 0.2) / 0.8, u1=ratio_column, u2=left, u3=top
    )

    views = augment.augment_batch(_ramp_image(), uniforms, "supcon").numpy()

    ratio = np.exp(np.log(4 / 3) * (2 * ratio_column - 1))
    width = np.sqrt(area * SIZE * SIZE * ratio)
    height = np.sqrt(area * SIZE * SIZE / ratio)
    columns = views[0, 0, 0, :, 0] * 255 / 8
    rows = views[0, 0, :, 0, 1] * 255 / 8
    box_left = left * (SIZE - width)
    box_top = top * (SIZE - height)
    # The first and last samples sit within half a pixel of the box edges.
    np.testing.assert_allclose(
        columns[[0, -1]], [box_left, box_left + width - 1], atol=0.5
    )
    np.testing.assert_allclose(
        rows[[0, -1]], [box_top, box_top + height - 1], atol=0.5
    )
    assert np.all(np.diff(columns) > 0)
    assert np.all(np.diff(rows) > 0)


def test_supcon_brightness_and_contrast():
    images = _images()
    scaled = images.astype(np.float64) / 255.0

    brighter = augment.augment_batch(
        images, _supcon_identity(3, u5=0.0, u6=1.0), "supcon"
    )
    lower_contrast = augment.augment_batch(
        images, _supcon_identity(3, u5=0.0, u7=0.0), "supcon"
    )

    np.testing.assert_allclose(
        brighter[:, 0], np.clip(scaled * 1.4, 0, 1), atol=1e-5
    )
    mean_luma = (scaled @ [0.299, 0.587, 0.114]).mean(axis=(1, 2))
    expected = 0.6 * scaled + 0.4 * mean_luma[:, None, None, None]
    np.testing.assert_allclose(lower_contrast[:, 0], expected, atol=1e-5)


def test_supcon_hue_shift():
    colours = np.array([[255, 0, 0], [30, 200, 90]], np.uint8)
    images = np.broadcast_to(colours[:, None, None], (2, 4, 4, 3))

    views = augment.augment_batch(
        images, _supcon_identity(2, u5=0.0, u9=1.0), "supcon"
    )

    for i, colour in enumerate(colours / 255.0):
        hue, saturation, value = colorsys.rgb_to_hsv(*colour)
        expected = colorsys.hsv_to_rgb((hue + 0.1) % 1.0, saturation, value)
        np.testing.assert_allclose(views[i, 0, 2, 2], expected, atol=1e-5)


def test_keras_example_identity_at_midpoint():
    images = _images()
    uniforms = np.full((3, 2, 4), 0.5, np.float32)

    views = augment.augment_batch(images, uniforms, "keras_example")

    np.testing.assert_allclose(views[:, 1], images / 255.0, atol=1e-5)


def test_keras_example_forced_flip():
    images = _images()
    uniforms = np.full((3, 1, 4), 0.5, np.float32)
    uniforms[..., 0] = 0.0

    views = augment.augment_batch(images, uniforms, "keras_example")

    np.testing.assert_allclose(
        views[:, 0], images[:, :, ::-1] / 255.0, atol=1e-5
    )


def test_keras_example_width_scale_keeps_centre_row():
    # Content scaled 1.2x wider: output column x samples the input at
    # centre + (x - centre) / 1.2, and rows are unchanged.
    image = _ramp_image()
    uniforms = np.array([[[0.5, 0.5, 1.0, 0.5]]], np.float32)

    views = augment.augment_batch(image, uniforms, "keras_example").numpy()

    centre = (SIZE - 1) / 2
    expected_columns = centre + (np.arange(SIZE) - centre) / 1.2
    np.testing.assert_allclose(
        views[0, 0, 5, :, 0] * 255 / 8, expected_columns, atol=1e-3
    )
    np.testing.assert_allclose(
        views[0, 0, :, 5, 1] * 255 / 8, np.arange(SIZE), atol=1e-3
    )


def test_keras_example_rotation_about_centre():
    image = _ramp_image()
    uniforms = np.array([[[0.5, 1.0, 0.5, 0.5]]], np.float32)

    views = augment.augment_batch(image, uniforms, "keras_example").numpy()

    # Column 1 at 1.0 rotates by 0.02 turns. Output pixel (row 15, col 25)
    # samples the input at centre + rotation(-angle) @ (dx, dy).
    angle = 2 * np.pi * 0.02
    centre = (SIZE - 1) / 2
    dx, dy = 25 - centre, 15 - centre
    input_x = centre + np.cos(angle) * dx + np.sin(angle) * dy
    input_y = centre - np.sin(angle) * dx + np.cos(angle) * dy
    np.testing.assert_allclose(
        views[0, 0, 15, 25, :2] * 255 / 8, [input_x, input_y], atol=1e-3
    )
