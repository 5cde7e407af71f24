"""TensorBoard images, histograms, embeddings and hparams, written on host.

Images are drawn with NumPy alone, because matplotlib and PIL are not
dependencies. Each writer function takes a `tf.summary` writer, such as
`SummaryWriters.train`, so a no-op writer on a non-chief worker makes it
write nothing. `write_projector` and `write_hparams` write files directly,
so call them on the chief only.
"""

import math
import os

import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector
from tensorboard.plugins.hparams import api as hp

# Colours of a confusion-matrix cell at row fraction 0 and 1, blended
# linearly in between: white for "never", dark blue for "always".
COLD_COLOUR = (255, 255, 255)
HOT_COLOUR = (8, 48, 107)

SEPARATOR_VALUE = 255
PROJECTOR_CHECKPOINT = "embeddings.ckpt"
PROJECTOR_METADATA = "metadata.tsv"
PROJECTOR_SPRITE = "sprite.png"


def view_pairs_grid(views: np.ndarray, max_pairs: int = 8) -> np.ndarray:
    """Tiles the augmented views of the first examples into one image.

    Args:
        views: float `[batch_size, num_views, height, width, 3]` in [0, 1],
            as `augment_batch` returns them. Values outside are clipped.
        max_pairs: Maximum number of examples (grid rows) to show.

    Returns:
        uint8 `[rows * (height + 1) - 1, num_views * (width + 1) - 1, 3]`
        with `rows = min(batch_size, max_pairs)`. Row `i` contains the views
        of example `i` from left to right, and 1-pixel white lines
        separate the tiles.

    Raises:
        ValueError: If `views` has another rank or channel count, or if
            `max_pairs` is below 1.
    """
    views = np.asarray(views)
    if views.ndim != 5 or views.shape[-1] != 3:
        raise ValueError(
            "views must have shape [batch_size, num_views, height, width, 3]"
            f", got {views.shape}."
        )
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be 1 or more, got {max_pairs}.")

    tiles = _to_uint8(views[:max_pairs])
    rows, num_views, height, width, _ = tiles.shape
    grid = np.full(
        (rows * (height + 1) - 1, num_views * (width + 1) - 1, 3),
        SEPARATOR_VALUE,
        dtype=np.uint8,
    )
    for row in range(rows):
        for view in range(num_views):
            top, left = row * (height + 1), view * (width + 1)
            grid[top : top + height, left : left + width] = tiles[row, view]
    return grid


def write_view_pairs(
    writer, views: np.ndarray, step: int, tag: str = "augment/view_pairs"
) -> None:
    """Writes `view_pairs_grid(views)` as one image summary.

    Args:
        writer: A `tf.summary` writer.
        views: float `[batch_size, num_views, height, width, 3]` in [0, 1].
        step: Global step of the summary.
        tag: Summary tag.
    """
    grid = view_pairs_grid(np.asarray(views))
    with writer.as_default():
        tf.summary.image(tag, grid[None], step=step, max_outputs=1)
    writer.flush()


def confusion_matrix_image(
    matrix: np.ndarray, class_names, cell_size: int = 16
) -> np.ndarray:
    """Draws a confusion matrix as a heat map, one square per cell.

    Each row is divided by its total, the count of examples of that true
    class, and the fraction picks a colour between `COLD_COLOUR` (0) and
    `HOT_COLOUR` (1). A class with no examples gets fraction 0 in every
    cell of its row.

    Args:
        matrix: `[num_classes, num_classes]` counts, rows = true class,
            columns = predicted class.
        class_names: `num_classes` names. The image has no text, so they
            only check the size; `write_confusion_matrix` writes them in a
            table next to the image.
        cell_size: Side of one cell in pixels.

    Returns:
        uint8 `[num_classes * cell_size, num_classes * cell_size, 3]`.

    Raises:
        ValueError: If `matrix` is not square, does not match
            `class_names`, has a negative count, or `cell_size` is below 1.
    """
    matrix = _check_confusion_matrix(matrix, class_names)
    if cell_size < 1:
        raise ValueError(f"cell_size must be 1 or more, got {cell_size}.")

    fractions = _row_fractions(matrix)
    cold = np.array(COLD_COLOUR, dtype=np.float64)
    hot = np.array(HOT_COLOUR, dtype=np.float64)
    colours = cold + fractions[..., None] * (hot - cold)
    cells = np.rint(colours).astype(np.uint8)
    return np.repeat(np.repeat(cells, cell_size, axis=0), cell_size, axis=1)


def write_confusion_matrix(
    writer,
    matrix: np.ndarray,
    class_names,
    step: int,
    tag: str = "eval/confusion_matrix",
) -> None:
    """Writes the heat map as an image and the counts as a text table.

    The text summary, tagged `tag + "_table"`, is a Markdown table with the
    class names, since the image has none.

    Args:
        writer: A `tf.summary` writer.
        matrix: `[num_classes, num_classes]` counts, rows = true class.
        class_names: `num_classes` names.
        step: Global step of the summary.
        tag: Tag of the image summary.
    """
    image = confusion_matrix_image(matrix, class_names)
    table = confusion_matrix_table(matrix, class_names)
    with writer.as_default():
        tf.summary.image(tag, image[None], step=step, max_outputs=1)
        tf.summary.text(f"{tag}_table", table, step=step)
    writer.flush()


def confusion_matrix_table(matrix: np.ndarray, class_names) -> str:
    """Returns the counts as a Markdown table, one row per true class."""
    matrix = _check_confusion_matrix(matrix, class_names)
    names = [_clean_name(name).replace("|", "/") for name in class_names]
    lines = [
        "| true \\ predicted | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for name, counts in zip(names, matrix, strict=True):
        cells = " | ".join(f"{count:g}" for count in counts)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def write_projector(
    log_dir: str,
    embeddings: np.ndarray,
    labels,
    class_names,
    images: np.ndarray | None = None,
    tensor_name: str = "test_embeddings",
) -> str:
    """Exports embeddings for the TensorBoard projector.

    Writes into `log_dir` a checkpoint `embeddings.ckpt` containing one
    variable, `metadata.tsv` with a `label<TAB>class` header and one line
    per embedding, `sprite.png` when `images` is given, and
    `projector_config.pbtxt`. The config names the checkpoint by its
    absolute path, because the projector opens it relative to the working
    directory of the TensorBoard server. The metadata and sprite paths are
    relative to `log_dir`.

    Args:
        log_dir: Run directory to write into. It is created if missing.
        embeddings: float `[num_examples, dim]`.
        labels: int `[num_examples]` class ids into `class_names`.
        class_names: Names of the classes.
        images: Optional uint8 `[num_examples, height, width, channels]`
            thumbnails with 1, 3 or 4 channels, tiled row by row into a
            square sprite grid.
        tensor_name: Name of the variable in the checkpoint. The projector
            lists the embedding under its checkpoint key,
            `<tensor_name>/.ATTRIBUTES/VARIABLE_VALUE`.

    Returns:
        Path of `projector_config.pbtxt`.

    Raises:
        ValueError: If the shapes do not match, a label is outside
            `class_names`, `images` is not uint8, or `tensor_name` is empty
            or contains "/".
    """
    embeddings, labels, images = _check_projector_inputs(
        embeddings, labels, class_names, images, tensor_name
    )
    os.makedirs(log_dir, exist_ok=True)

    checkpoint = tf.train.Checkpoint(**{tensor_name: tf.Variable(embeddings)})
    prefix = checkpoint.write(os.path.join(log_dir, PROJECTOR_CHECKPOINT))
    _write_metadata(
        os.path.join(log_dir, PROJECTOR_METADATA), labels, class_names
    )

    config = projector.ProjectorConfig()
    config.model_checkpoint_path = os.path.abspath(prefix)
    embedding = config.embeddings.add()
    embedding.tensor_name = f"{tensor_name}/.ATTRIBUTES/VARIABLE_VALUE"
    embedding.metadata_path = PROJECTOR_METADATA
    if images is not None:
        sprite = sprite_image(images)
        tf.io.write_file(
            os.path.join(log_dir, PROJECTOR_SPRITE), tf.io.encode_png(sprite)
        )
        embedding.sprite.image_path = PROJECTOR_SPRITE
        embedding.sprite.single_image_dim.extend(
            [images.shape[2], images.shape[1]]
        )
    projector.visualize_embeddings(log_dir, config)
    return os.path.join(log_dir, "projector_config.pbtxt")


def sprite_image(images: np.ndarray) -> np.ndarray:
    """Tiles thumbnails row by row into a square grid, padded with black.

    NOTE: The projector loads the sprite as one WebGL texture, so a sprite
    larger than the maximum texture size of the browser and GPU may not
    show. Pass fewer or smaller thumbnails in that case.

    Args:
        images: uint8 `[num_examples, height, width, channels]`.

    Returns:
        uint8 `[side * height, side * width, channels]` with
        `side = ceil(sqrt(num_examples))`.

    Raises:
        ValueError: If `images` is not uint8.
    """
    images = _check_uint8(images)
    count, height, width, channels = images.shape
    side = max(1, math.ceil(math.sqrt(count)))
    padded = np.zeros((side * side, height, width, channels), np.uint8)
    padded[:count] = images
    grid = padded.reshape(side, side, height, width, channels)
    grid = grid.transpose(0, 2, 1, 3, 4)
    return grid.reshape(side * height, side * width, channels)


def write_hparams(
    log_dir: str, hparams: dict, metrics: dict, step: int = 0
) -> None:
    """Writes one HParams dashboard entry: the settings and final metrics.

    The run at `log_dir` gets the experiment config (every hparam and
    metric name), the session's hparam values, and each metric as a
    scalar at `step`, which the dashboard reads as the session's result.

    NOTE: With several runs under one TensorBoard logdir, the dashboard
    (TensorBoard 2.21) takes the experiment config from the first run it
    finds, so give every run the same hparam names and metric tags.

    Args:
        log_dir: Run directory of the entry.
        hparams: Name to value. Bools, ints, floats and strings are written
            as they are, NumPy scalars as their Python value, and anything
            else as its `str()`.
        metrics: Metric tag to final float value, such as
            `{"eval/top1": 0.91}`.
        step: Step at which the metric scalars are written.
    """
    values = {name: _hparam_value(value) for name, value in hparams.items()}
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        hp.hparams_config(
            hparams=[hp.HParam(name) for name in values],
            metrics=[hp.Metric(tag) for tag in metrics],
        )
        hp.hparams(values)
        for tag, value in metrics.items():
            tf.summary.scalar(tag, float(value), step=step)
    writer.close()


def write_histograms(
    writer, named_tensors: dict[str, np.ndarray | tf.Tensor], step: int
) -> None:
    """Writes one histogram summary per entry.

    Args:
        writer: A `tf.summary` writer.
        named_tensors: Tag to NumPy array or tensor of any shape, such as
            `{"weights/dense/kernel": kernel, "grad_norm/dense": norms}`.
        step: Global step of the summaries.
    """
    with writer.as_default():
        for tag, values in named_tensors.items():
            tf.summary.histogram(tag, values, step=step)
    writer.flush()


def _to_uint8(images: np.ndarray) -> np.ndarray:
    scaled = np.clip(images.astype(np.float64), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)


def _check_confusion_matrix(matrix, class_names) -> np.ndarray:
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square, got shape {matrix.shape}.")
    if matrix.shape[0] != len(class_names):
        raise ValueError(
            f"matrix has {matrix.shape[0]} classes but class_names has "
            f"{len(class_names)}."
        )
    if np.any(matrix < 0):
        raise ValueError(
            f"matrix must contain counts >= 0, got min {matrix.min()}."
        )
    return matrix


def _row_fractions(matrix: np.ndarray) -> np.ndarray:
    totals = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    fractions = np.zeros(matrix.shape, dtype=np.float64)
    np.divide(matrix, totals, out=fractions, where=totals > 0)
    return fractions


def _clean_name(name) -> str:
    """Converts a class name to one line without tabs, for TSV and Markdown."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", errors="replace")
    return " ".join(str(name).split())


def _check_projector_inputs(embeddings, labels, class_names, images, name):
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    if embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must be [num_examples, dim], got {embeddings.shape}."
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"Expected one label per embedding, got {labels.shape[0]} labels "
            f"for {embeddings.shape[0]} embeddings."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(
            f"labels must be class ids in [0, {len(class_names)}) to index "
            f"class_names, got min {labels.min()} and max {labels.max()}."
        )
    if images is not None:
        images = _check_uint8(images)
        if (
            images.ndim != 4
            or images.shape[0] != embeddings.shape[0]
            or images.shape[3] not in (1, 3, 4)
        ):
            raise ValueError(
                "images must be [num_examples, height, width, channels] with "
                "one image per embedding and 1, 3 or 4 channels, got "
                f"{images.shape}."
            )
    if not name or "/" in name:
        raise ValueError(
            f"tensor_name must be non-empty and without '/', got {name!r}."
        )
    return embeddings, labels, images


def _check_uint8(images) -> np.ndarray:
    """Rejects other dtypes, which a cast would wrap or truncate silently."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 in [0, 255], got dtype {images.dtype}. "
            "Scale float images by 255 and round them first."
        )
    return images


def _write_metadata(path: str, labels: np.ndarray, class_names) -> None:
    lines = ["label\tclass"]
    lines += [f"{label}\t{_clean_name(class_names[label])}" for label in labels]
    with open(path, "w", encoding="utf-8") as stream:
        stream.write("\n".join(lines) + "\n")


def _hparam_value(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
