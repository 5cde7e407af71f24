"""TensorBoard images, histograms, projector files and hparams on disk."""

import os

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins import projector
from tensorboard.plugins.hparams import plugin_data_pb2

from supcon_tf.data.augment import augment_batch, draw_uniforms
from supcon_tf.training import visuals

HOT = np.array(visuals.HOT_COLOUR, dtype=np.uint8)
COLD = np.array(visuals.COLD_COLOUR, dtype=np.uint8)


def _load_events(log_dir):
    accumulator = event_accumulator.EventAccumulator(
        log_dir, size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    return accumulator


def _plugin_name(accumulator, tag):
    return accumulator.SummaryMetadata(tag).plugin_data.plugin_name


def _decoded_image(accumulator, tag):
    """The single PNG of an image summary as uint8 `[height, width, 3]`."""
    (event,) = accumulator.Tensors(tag)
    width, height, png = tf.make_ndarray(event.tensor_proto)
    image = tf.io.decode_png(png).numpy()
    assert image.shape[:2] == (int(height), int(width))
    return image


def _random_views(batch_size, num_views, height, width, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((batch_size, num_views, height, width, 3))


def test_grid_shape_and_separators():
    views = _random_views(3, 2, 5, 4)

    grid = visuals.view_pairs_grid(views)

    assert grid.shape == (3 * 5 + 2, 2 * 4 + 1, 3)
    assert grid.dtype == np.uint8
    assert np.all(grid[5] == 255)
    assert np.all(grid[11] == 255)
    assert np.all(grid[:, 4] == 255)


def test_grid_rows_hold_each_example_views():
    views = _random_views(3, 3, 4, 6)
    expected = np.rint(views * 255).astype(np.uint8)

    grid = visuals.view_pairs_grid(views)

    for row in range(3):
        for view in range(3):
            top, left = row * 5, view * 7
            tile = grid[top : top + 4, left : left + 6]
            np.testing.assert_array_equal(tile, expected[row, view])
    # Pixel (3, 5) of example 2, view 1 and pixel (0, 0) of example 0,
    # view 2, at the grid positions that the layout gives them.
    np.testing.assert_array_equal(grid[13, 12], expected[2, 1, 3, 5])
    np.testing.assert_array_equal(grid[0, 14], expected[0, 2, 0, 0])


def test_grid_clips_and_limits_rows():
    views = np.zeros((10, 2, 2, 2, 3))
    views[0, 0] = 1.7
    views[0, 1] = -0.5

    grid = visuals.view_pairs_grid(views, max_pairs=4)

    assert grid.shape == (4 * 3 - 1, 2 * 3 - 1, 3)
    assert np.all(grid[0:2, 0:2] == 255)
    assert np.all(grid[0:2, 3:5] == 0)


@pytest.mark.parametrize("shape", [(2, 2, 4, 4), (2, 2, 4, 4, 1), (2, 4, 4, 3)])
def test_grid_rejects_bad_shape(shape):
    with pytest.raises(ValueError, match="num_views, height, width, 3"):
        visuals.view_pairs_grid(np.zeros(shape))


def test_grid_rejects_zero_pairs():
    with pytest.raises(ValueError, match="max_pairs must be 1 or more"):
        visuals.view_pairs_grid(np.zeros((1, 2, 2, 2, 3)), max_pairs=0)


def test_write_view_pairs_of_augmented_batch(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    seeds = tf.constant([[1, 2], [3, 4], [5, 6]], tf.int64)
    uniforms = tf.stack([draw_uniforms(seed, 2, "supcon") for seed in seeds])
    views = augment_batch(images, uniforms, "supcon")
    writer = tf.summary.create_file_writer(str(tmp_path))

    visuals.write_view_pairs(writer, views, step=7)
    writer.close()

    accumulator = _load_events(str(tmp_path))
    assert _plugin_name(accumulator, "augment/view_pairs") == "images"
    assert accumulator.Tensors("augment/view_pairs")[0].step == 7
    image = _decoded_image(accumulator, "augment/view_pairs")
    np.testing.assert_array_equal(image, visuals.view_pairs_grid(views))


def test_confusion_diagonal_is_hot_only_there():
    matrix = np.diag([5, 3, 7])

    image = visuals.confusion_matrix_image(matrix, ["a", "b", "c"])

    assert image.shape == (48, 48, 3)
    assert image.dtype == np.uint8
    for row in range(3):
        for column in range(3):
            cell = image[
                row * 16 : (row + 1) * 16, column * 16 : column * 16 + 16
            ]
            colour = HOT if row == column else COLD
            assert np.all(cell == colour), (row, column)


def test_confusion_rows_normalised_by_true_count():
    # Row 0 is split 1:3, row 1 has no examples, row 2 is all class 0.
    matrix = np.array([[1, 3, 0], [0, 0, 0], [4, 0, 0]])

    image = visuals.confusion_matrix_image(matrix, "xyz", cell_size=2)

    cold, hot = COLD.astype(float), HOT.astype(float)
    quarter = np.rint(cold + 0.25 * (hot - cold)).astype(np.uint8)
    three_quarters = np.rint(cold + 0.75 * (hot - cold)).astype(np.uint8)
    assert image.shape == (6, 6, 3)
    np.testing.assert_array_equal(image[1, 1], quarter)
    np.testing.assert_array_equal(image[0, 3], three_quarters)
    np.testing.assert_array_equal(image[0, 5], COLD)
    assert np.all(image[2:4] == COLD)
    np.testing.assert_array_equal(image[5, 0], HOT)


@pytest.mark.parametrize(
    ("matrix", "names", "message"),
    [
        (np.zeros((2, 3)), "ab", "must be square"),
        (np.zeros((2, 2)), "abc", "class_names has 3"),
        (np.array([[1, -1], [0, 1]]), "ab", "counts >= 0, got min -1"),
    ],
)
def test_confusion_rejects_bad_matrix(matrix, names, message):
    with pytest.raises(ValueError, match=message):
        visuals.confusion_matrix_image(matrix, names)


def test_write_confusion_matrix_image_and_table(tmp_path):
    matrix = np.array([[2, 1], [0, 3]])
    writer = tf.summary.create_file_writer(str(tmp_path))

    visuals.write_confusion_matrix(writer, matrix, ["cat", "dog|wolf"], 4)
    writer.close()

    accumulator = _load_events(str(tmp_path))
    tag = "eval/confusion_matrix"
    assert _plugin_name(accumulator, tag) == "images"
    image = _decoded_image(accumulator, tag)
    expected = visuals.confusion_matrix_image(matrix, ["cat", "dog"])
    np.testing.assert_array_equal(image, expected)
    (event,) = accumulator.Tensors(f"{tag}_table")
    table = tf.make_ndarray(event.tensor_proto).item().decode()
    assert table.splitlines() == [
        "| true \\ predicted | cat | dog/wolf |",
        "|---|---|---|",
        "| cat | 2 | 1 |",
        "| dog/wolf | 0 | 3 |",
    ]


def _read_config(path):
    config = projector.ProjectorConfig()
    with open(path) as stream:
        text_format.Parse(stream.read(), config)
    return config


def test_projector_files(tmp_path):
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(5, 4)).astype(np.float32)
    labels = np.array([0, 2, 1, 2, 0])
    images = rng.integers(0, 256, (5, 6, 4, 3), dtype=np.uint8)
    log_dir = str(tmp_path / "run")

    path = visuals.write_projector(
        log_dir, embeddings, labels, ["plane", "car", "bird"], images
    )

    assert path == os.path.join(log_dir, "projector_config.pbtxt")
    config = _read_config(path)
    (embedding,) = config.embeddings
    assert embedding.tensor_name == "test_embeddings/.ATTRIBUTES/VARIABLE_VALUE"
    reader = tf.train.load_checkpoint(config.model_checkpoint_path)
    np.testing.assert_array_equal(
        reader.get_tensor(embedding.tensor_name), embeddings
    )

    with open(os.path.join(log_dir, embedding.metadata_path)) as stream:
        lines = stream.read().splitlines()
    assert lines == [
        "label\tclass",
        "0\tplane",
        "2\tbird",
        "1\tcar",
        "2\tbird",
        "0\tplane",
    ]

    assert list(embedding.sprite.single_image_dim) == [4, 6]
    png = tf.io.read_file(os.path.join(log_dir, embedding.sprite.image_path))
    sprite = tf.io.decode_png(png).numpy()
    # Five thumbnails fill a 3 x 3 grid row by row. The rest is black.
    assert sprite.shape == (18, 12, 3)
    np.testing.assert_array_equal(sprite[0:6, 0:4], images[0])
    np.testing.assert_array_equal(sprite[6:12, 4:8], images[4])
    assert np.all(sprite[6:12, 8:12] == 0)
    assert np.all(sprite[12:18] == 0)


def test_projector_without_images_custom_name(tmp_path):
    embeddings = np.eye(3, dtype=np.float64)

    path = visuals.write_projector(
        str(tmp_path), embeddings, [1, 0, 1], ["a\tb", "c"], tensor_name="z"
    )

    config = _read_config(path)
    (embedding,) = config.embeddings
    assert embedding.tensor_name == "z/.ATTRIBUTES/VARIABLE_VALUE"
    assert not embedding.sprite.image_path
    assert not os.path.exists(tmp_path / "sprite.png")
    reader = tf.train.load_checkpoint(config.model_checkpoint_path)
    np.testing.assert_array_equal(
        reader.get_tensor(embedding.tensor_name), np.eye(3)
    )
    lines = (tmp_path / "metadata.tsv").read_text().splitlines()
    assert lines == ["label\tclass", "1\tc", "0\ta b", "1\tc"]


@pytest.mark.parametrize(
    ("labels", "images", "name", "message"),
    [
        ([0, 1], None, "e", "got 2 labels for 3 embeddings"),
        ([0, 1, 2], None, "e", r"labels must be class ids in \[0, 2\)"),
        ([0, 1, 0], np.zeros((2, 4, 4, 3), np.uint8), "e", "one image per"),
        ([0, 1, 0], np.zeros((3, 4, 4, 2), np.uint8), "e", "1, 3 or 4 chan"),
        ([0, 1, 0], np.zeros((3, 4, 4, 3)), "e", "got dtype float64"),
        ([0, 1, 0], None, "a/b", "tensor_name must be non-empty"),
    ],
)
def test_projector_rejects_bad_input(tmp_path, labels, images, name, message):
    with pytest.raises(ValueError, match=message):
        visuals.write_projector(
            str(tmp_path), np.zeros((3, 2)), labels, "ab", images, name
        )

    assert list(tmp_path.iterdir()) == []


def test_sprite_single_image_and_grayscale():
    image = np.arange(6, dtype=np.uint8).reshape(1, 2, 3, 1)

    sprite = visuals.sprite_image(image)

    np.testing.assert_array_equal(sprite, image[0])


def test_write_histograms(tmp_path):
    named = {
        "weights/dense/kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
        "grad_norm/dense": tf.constant([0.5, 1.5]),
    }
    writer = tf.summary.create_file_writer(str(tmp_path))

    visuals.write_histograms(writer, named, 9)
    writer.close()

    accumulator = _load_events(str(tmp_path))
    for tag, values in named.items():
        values = np.asarray(values)
        assert _plugin_name(accumulator, tag) == "histograms"
        (event,) = accumulator.Tensors(tag)
        assert event.step == 9
        buckets = tf.make_ndarray(event.tensor_proto)
        # Each bucket row is (left edge, right edge, count).
        assert buckets[:, 2].sum() == values.size
        assert buckets[0, 0] == pytest.approx(values.min())
        assert buckets[-1, 1] == pytest.approx(values.max())


def test_write_hparams(tmp_path):
    hparams = {
        "learning_rate": 0.5,
        "encoder": "small_cnn",
        "num_views": np.int64(2),
        "cosine_decay": True,
        "crop_scale": (0.2, 1.0),
    }

    visuals.write_hparams(str(tmp_path), hparams, {"eval/top1": 0.75}, step=3)

    accumulator = _load_events(str(tmp_path))
    tags = set(accumulator.Tags()["tensors"])
    assert "_hparams_/experiment" in tags
    assert "_hparams_/session_start_info" in tags
    content = accumulator.SummaryMetadata(
        "_hparams_/session_start_info"
    ).plugin_data.content
    values = plugin_data_pb2.HParamsPluginData.FromString(
        content
    ).session_start_info.hparams
    assert values["learning_rate"].number_value == 0.5
    assert values["encoder"].string_value == "small_cnn"
    assert values["num_views"].number_value == 2
    assert values["cosine_decay"].bool_value is True
    assert values["crop_scale"].string_value == "(0.2, 1.0)"

    content = accumulator.SummaryMetadata(
        "_hparams_/experiment"
    ).plugin_data.content
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content
    ).experiment
    assert [info.name.tag for info in experiment.metric_infos] == ["eval/top1"]
    assert {info.name for info in experiment.hparam_infos} == set(hparams)

    (event,) = accumulator.Tensors("eval/top1")
    assert event.step == 3
    assert tf.make_ndarray(event.tensor_proto) == pytest.approx(0.75)
