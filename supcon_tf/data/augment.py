"""Random views of image batches, vectorised over the batch.

All randomness comes from `uniforms`, float32 `[batch_size, num_views, U]`
numbers in [0, 1) that the caller draws with `draw_uniforms` from a stateless
seed per example. The same example and seed therefore get the same views
however the batch is split across replicas. Column `k` of the last axis
drives one random choice, as listed below. "u < p" means the choice happens
with probability p.

`"supcon"`, the CIFAR augmentation of the SupCon paper (Khosla et al. 2020)
as its PyTorch reference code builds it from torchvision transforms,
U = 11:

    0  random resized crop: area fraction 0.2 + 0.8 * u
    1  crop aspect ratio (width / height): exp(ln(4/3) * (2 * u - 1))
    2  crop left edge, as a fraction of the free width
    3  crop top edge, as a fraction of the free height
    4  horizontal flip if u < 0.5
    5  colour jitter if u < 0.8
    6  brightness factor 1 + 0.4 * (2 * u - 1)
    7  contrast factor 1 + 0.4 * (2 * u - 1)
    8  saturation factor 1 + 0.4 * (2 * u - 1)
    9  hue shift 0.1 * (2 * u - 1), in turns
    10 grayscale if u < 0.2

`"keras_example"`, the augmentation of the keras.io SupCon example, U = 4:

    0  horizontal flip if u < 0.5
    1  rotation by 0.02 * (2 * u - 1) turns
    2  content width scale 0.8 + 0.4 * u
    3  content height scale 0.8 + 0.4 * u

`"none"`, U = 0: every view is `images / 255`.

Uniforms at 0.5 make "keras_example" an identity map. For "supcon", column 0
at 1.0, column 5 at 0.9 and the rest at 0.5 do the same.
"""

import math

import tensorflow as tf

AUGMENT_MODES = ("supcon", "keras_example", "none")

_NUM_UNIFORMS = {"supcon": 11, "keras_example": 4, "none": 0}

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale uses them.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def num_uniforms(mode: str) -> int:
    """Return U, the number of uniforms per view that `mode` consumes."""
    if mode not in AUGMENT_MODES:
        raise ValueError(
            f"Invalid augmentation mode {mode!r}: choose one of "
            f"{', '.join(AUGMENT_MODES)}."
        )
    return _NUM_UNIFORMS[mode]


def draw_uniforms(seed: tf.Tensor, num_views: int, mode: str) -> tf.Tensor:
    """Draw the uniforms for all views of one example.

    Args:
        seed: int64 `[2]` stateless seed of the example.
        num_views: Number of views.
        mode: One of `AUGMENT_MODES`.

    Returns:
        float32 `[num_views, num_uniforms(mode)]` in [0, 1).
    """
    shape = [num_views, num_uniforms(mode)]
    return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)


def augment_batch(
    images: tf.Tensor, uniforms: tf.Tensor, mode: str
) -> tf.Tensor:
    """Make `num_views` random views of each image.

    Args:
        images: uint8 `[batch_size, height, width, 3]`.
        uniforms: float32 `[batch_size, num_views, num_uniforms(mode)]` in
            [0, 1], laid out as the module docstring lists.
        mode: One of `AUGMENT_MODES`.

    Returns:
        float32 `[batch_size, num_views, height, width, 3]` in [0, 1].
    """
    num_columns = num_uniforms(mode)
    images = tf.convert_to_tensor(images)
    uniforms = tf.convert_to_tensor(uniforms, tf.float32)
    batch_size, height, width = _dims(images)[:3]
    num_views = _dims(uniforms)[1]
    if mode == "none":
        views = tf.repeat(images, num_views, axis=0)
        views = tf.cast(views, tf.float32) / 255.0
    else:
        flat_uniforms = tf.reshape(uniforms, [-1, num_columns])
        make_views = _supcon_views if mode == "supcon" else _keras_views
        views = make_views(images, flat_uniforms, num_views)
    return tf.reshape(views, [batch_size, num_views, height, width, 3])


def _dims(tensor: tf.Tensor) -> list:
    """Return each dimension as a Python int where static, else as a tensor."""
    dynamic = tf.shape(tensor)
    return [
        dim if dim is not None else dynamic[i]
        for i, dim in enumerate(tensor.shape.as_list())
    ]


def _supcon_views(images, uniforms, num_views):
    """Apply the "supcon" recipe.

    Args:
        images: uint8 `[batch_size, height, width, 3]`.
        uniforms: float32 `[batch_size * num_views, 11]`, example-major.
        num_views: Number of views per image.

    Returns:
        float32 `[batch_size * num_views, height, width, 3]` in [0, 1].
    """
    views = _random_resized_crop(images, uniforms[:, :4], num_views) / 255.0
    views = _flip_where(uniforms[:, 4] < 0.5, views)
    jittered = _color_jitter(views, uniforms[:, 6:10])
    views = tf.where(_per_image(uniforms[:, 5] < 0.8), jittered, views)
    gray = tf.tile(_grayscale(views), [1, 1, 1, 3])
    views = tf.where(_per_image(uniforms[:, 10] < 0.2), gray, views)
    return tf.clip_by_value(views, 0.0, 1.0)


def _per_image(mask: tf.Tensor) -> tf.Tensor:
    """Reshape a `[n]` mask to `[n, 1, 1, 1]` for `tf.where` on images."""
    return tf.reshape(mask, [-1, 1, 1, 1])


def _flip_where(mask: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    return tf.where(_per_image(mask), tf.reverse(images, axis=[2]), images)


def _random_resized_crop(images, uniforms, num_views):
    """Crop a random box of each view and resize it back to the image size.

    The box has a random area fraction in [0.2, 1] and a log-uniform aspect
    ratio in [3/4, 4/3], and is clipped to the image. Box edges in pixels map
    to `crop_and_resize` sample points so that output pixel centres fall on
    the box like a half-pixel-centre resize of the cropped region.

    Args:
        images: uint8 `[batch_size, height, width, 3]`.
        uniforms: float32 `[batch_size * num_views, 4]`, example-major.
        num_views: Number of views per image.

    Returns:
        float32 `[batch_size * num_views, height, width, 3]` in [0, 255].
    """
    height, width = _dims(images)[1:3]
    height_f = tf.cast(height, tf.float32)
    width_f = tf.cast(width, tf.float32)
    area = (0.2 + 0.8 * uniforms[:, 0]) * height_f * width_f
    aspect_ratio = tf.exp(math.log(4.0 / 3.0) * (2.0 * uniforms[:, 1] - 1.0))
    crop_width = tf.minimum(tf.sqrt(area * aspect_ratio), width_f)
    crop_height = tf.minimum(tf.sqrt(area / aspect_ratio), height_f)
    left = uniforms[:, 2] * (width_f - crop_width)
    top = uniforms[:, 3] * (height_f - crop_height)
    y1, y2 = _sample_span(top, crop_height, height_f)
    x1, x2 = _sample_span(left, crop_width, width_f)
    boxes = tf.stack([y1, x1, y2, x2], axis=1)
    batch_size = _dims(images)[0]
    box_indices = tf.repeat(tf.range(batch_size), num_views)
    return tf.image.crop_and_resize(
        images, boxes, box_indices, crop_size=[height, width]
    )


def _sample_span(start, length, size):
    """Return normalised first and last sample points along one axis.

    `crop_and_resize` puts `size` samples evenly from `first * (size - 1)` to
    `last * (size - 1)`. A half-pixel-centre resize of the pixels
    `[start, start + length)` samples at `start + (i + 0.5) * length / size
    - 0.5`. Clipping to [0, 1] keeps samples inside the image, where
    `crop_and_resize` would otherwise return zeros.
    """
    half_step = 0.5 * length / size
    first = (start + half_step - 0.5) / (size - 1.0)
    last = (start + length - half_step - 0.5) / (size - 1.0)
    return tf.clip_by_value(first, 0.0, 1.0), tf.clip_by_value(last, 0.0, 1.0)


def _grayscale(images: tf.Tensor) -> tf.Tensor:
    """Return the luma of `[n, height, width, 3]` images as `[..., 1]`."""
    return tf.reduce_sum(images * _LUMA_WEIGHTS, axis=-1, keepdims=True)


def _color_jitter(images: tf.Tensor, uniforms: tf.Tensor) -> tf.Tensor:
    """Adjust brightness, contrast, saturation and hue, in that fixed order.

    torchvision's ColorJitter applies the four in a random order per call.
    This keeps one order so that the whole batch runs as one set of ops. Each
    step blends as torchvision does for float images and clips to [0, 1].

    Args:
        images: float32 `[n, height, width, 3]` in [0, 1].
        uniforms: float32 `[n, 4]`: brightness, contrast, saturation, hue.

    Returns:
        float32 `[n, height, width, 3]` in [0, 1].
    """
    factors = 1.0 + 0.4 * (2.0 * uniforms[:, :3] - 1.0)
    brightness, contrast, saturation = [
        _per_image(factors[:, i]) for i in range(3)
    ]
    images = tf.clip_by_value(images * brightness, 0.0, 1.0)
    mean_luma = tf.reduce_mean(_grayscale(images), [1, 2, 3], keepdims=True)
    images = _blend(images, mean_luma, contrast)
    images = _blend(images, _grayscale(images), saturation)
    return _shift_hue(images, 0.1 * (2.0 * uniforms[:, 3] - 1.0))


def _blend(images, other, factor):
    """Return `factor * images + (1 - factor) * other`, clipped to [0, 1]."""
    return tf.clip_by_value(factor * images + (1.0 - factor) * other, 0.0, 1.0)


def _shift_hue(images: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """Rotate the hue of each image by `shift[i]` turns.

    Args:
        images: float32 `[n, height, width, 3]` in [0, 1].
        shift: float32 `[n]`.
    """
    hue, saturation, value = tf.unstack(tf.image.rgb_to_hsv(images), axis=-1)
    hue = tf.math.floormod(hue + tf.reshape(shift, [-1, 1, 1]), 1.0)
    hsv = tf.stack([hue, saturation, value], axis=-1)
    return tf.clip_by_value(tf.image.hsv_to_rgb(hsv), 0.0, 1.0)


def _keras_views(images, uniforms, num_views):
    """Apply the "keras_example" recipe as one projective transform per view.

    The keras.io example uses RandomWidth and RandomHeight, which change the
    image size. Here the content is rescaled along each axis instead, so that
    every view keeps the input's height and width.

    Args:
        images: uint8 `[batch_size, height, width, 3]`.
        uniforms: float32 `[batch_size * num_views, 4]`, example-major.
        num_views: Number of views per image.

    Returns:
        float32 `[batch_size * num_views, height, width, 3]` in [0, 1].
    """
    height, width = _dims(images)[1:3]
    views = tf.cast(tf.repeat(images, num_views, axis=0), tf.float32)
    transforms = _keras_transforms(uniforms, height, width)
    views = tf.raw_ops.ImageProjectiveTransformV3(
        images=views,
        transforms=transforms,
        output_shape=tf.stack([height, width]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return tf.clip_by_value(views / 255.0, 0.0, 1.0)


def _keras_transforms(uniforms, height, width):
    """Build the output-to-input pixel maps of flip, scale and rotation.

    Each map is `input = M @ (output - centre) + centre` in (x, y) pixel
    coordinates with pixel centres at integers, and
    `M = rotation(-angle) @ diag(flip / scale_x, 1 / scale_y)`, where
    `flip` is -1 for a mirrored view.

    Args:
        uniforms: float32 `[n, 4]`, as the module docstring lists.
        height: Image height.
        width: Image width.

    Returns:
        float32 `[n, 8]` transforms for `ImageProjectiveTransformV3`.
    """
    flip = tf.where(uniforms[:, 0] < 0.5, -1.0, 1.0)
    angle = 2.0 * math.pi * 0.02 * (2.0 * uniforms[:, 1] - 1.0)
    inverse_scale_x = flip / (0.8 + 0.4 * uniforms[:, 2])
    inverse_scale_y = 1.0 / (0.8 + 0.4 * uniforms[:, 3])
    cos, sin = tf.cos(angle), tf.sin(angle)
    m00, m01 = cos * inverse_scale_x, sin * inverse_scale_y
    m10, m11 = -sin * inverse_scale_x, cos * inverse_scale_y
    centre_x = (tf.cast(width, tf.float32) - 1.0) / 2.0
    centre_y = (tf.cast(height, tf.float32) - 1.0) / 2.0
    offset_x = centre_x - m00 * centre_x - m01 * centre_y
    offset_y = centre_y - m10 * centre_x - m11 * centre_y
    zeros = tf.zeros_like(angle)
    return tf.stack(
        [m00, m01, offset_x, m10, m11, offset_y, zeros, zeros], axis=1
    )
