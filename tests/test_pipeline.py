"""Tests for supcon_tf.data.pipeline, with real distribution strategies."""

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf.data import augment, pipeline
from supcon_tf.data.sources import ArraySplit
from supcon_tf.errors import UsageError

NUM_EXAMPLES = 26
GLOBAL_BATCH_SIZE = 8
SEED = 5


def _split(num_examples=NUM_EXAMPLES):
    """Return a split whose first pixel is the example index."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_examples, 8, 8, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(num_examples)
    labels = np.arange(num_examples, dtype=np.int64) % 3
    return ArraySplit(images, labels)


def _train_fn(split, augment_mode="supcon", start_step=0, num_epochs=2):
    return pipeline.make_train_dataset_fn(
        split,
        global_batch_size=GLOBAL_BATCH_SIZE,
        num_views=2,
        augment=augment_mode,
        seed=SEED,
        num_epochs=num_epochs,
        start_step=start_step,
    )


def _batches(dataset):
    return [tuple(t.numpy() for t in element) for element in dataset]


def _mirrored_batches(dataset_fn):
    """Run `dataset_fn` under a two-replica MirroredStrategy.

    Returns:
        The elements of each step with the replicas concatenated in order,
        and the set of per-replica batch sizes seen.
    """
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    steps, sizes = [], set()
    for element in dataset:
        parts = [strategy.experimental_local_results(t) for t in element]
        assert all(len(part) == 2 for part in parts)
        sizes.update(len(p) for part in parts for p in part)
        steps.append(tuple(np.concatenate(part) for part in parts))
    return steps, sizes


def _assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for actual_step, expected_step in zip(actual, expected, strict=True):
        for a, e in zip(actual_step, expected_step, strict=True):
            np.testing.assert_array_equal(a, e)


def test_steps_per_epoch():
    assert pipeline.steps_per_epoch(26, 8) == 3
    assert pipeline.steps_per_epoch(8, 8) == 1


def test_steps_per_epoch_too_few_examples():
    with pytest.raises(UsageError, match=r"7 examples.*global batch of 8"):
        pipeline.steps_per_epoch(7, 8)


def test_train_order_contract_single_device():
    split = _split()

    batches = _batches(_train_fn(split, "none")(tf.distribute.InputContext()))

    assert len(batches) == 6  # 2 epochs of 26 // 8 steps.
    for step, (views, labels) in enumerate(batches):
        epoch, row = divmod(step, 3)
        order = tf.random.experimental.stateless_shuffle(
            tf.range(NUM_EXAMPLES, dtype=tf.int64),
            seed=tf.constant([SEED, epoch], tf.int64),
        ).numpy()
        indices = order[row * 8 : (row + 1) * 8]
        expected = split.images[indices].astype(np.float32) / np.float32(255)
        assert views.shape == (8, 2, 8, 8, 3)
        np.testing.assert_array_equal(views[:, 0], expected)
        np.testing.assert_array_equal(views[:, 1], expected)
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, split.labels[indices])


def test_train_views_follow_example_seed():
    split = _split()

    views, _ = _batches(_train_fn(split)(tf.distribute.InputContext()))[4]

    # Step 4 is row 1 of epoch 1.
    order = tf.random.experimental.stateless_shuffle(
        tf.range(NUM_EXAMPLES, dtype=tf.int64),
        seed=tf.constant([SEED, 1], tf.int64),
    ).numpy()
    for column in (0, 5):
        index = order[8 + column]
        seed = tf.constant([SEED, 1 * NUM_EXAMPLES + index], tf.int64)
        uniforms = augment.draw_uniforms(seed, 2, "supcon")
        expected = augment.augment_batch(
            split.images[index : index + 1], uniforms[None], "supcon"
        )
        np.testing.assert_array_equal(views[column], expected[0])


def test_train_static_element_shapes():
    dataset = _train_fn(_split())(tf.distribute.InputContext())

    views_spec, labels_spec = dataset.element_spec

    assert views_spec.shape.as_list() == [8, 2, 8, 8, 3]
    assert views_spec.dtype == tf.float32
    assert labels_spec.shape.as_list() == [8]
    assert labels_spec.dtype == tf.int32


def test_train_two_replicas_match_one():
    dataset_fn = _train_fn(_split())
    single = _batches(dataset_fn(tf.distribute.InputContext()))

    mirrored, sizes = _mirrored_batches(dataset_fn)

    assert sizes == {4}
    _assert_same_batches(mirrored, single)


def test_train_two_pipelines_give_halves():
    dataset_fn = _train_fn(_split())
    single = _batches(dataset_fn(tf.distribute.InputContext()))

    halves = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2,
            input_pipeline_id=pipeline_id,
            num_replicas_in_sync=2,
        )
        halves.append(_batches(dataset_fn(context)))

    assert len(halves[0]) == len(single)
    assert len(halves[1]) == len(single)
    for step, (views, labels) in enumerate(single):
        np.testing.assert_array_equal(halves[0][step][0], views[:4])
        np.testing.assert_array_equal(halves[1][step][0], views[4:])
        np.testing.assert_array_equal(halves[0][step][1], labels[:4])
        np.testing.assert_array_equal(halves[1][step][1], labels[4:])


@pytest.mark.parametrize("start_step", [1, 3, 4, 6])
def test_train_resume_equals_skip(start_step):
    split = _split()
    context = tf.distribute.InputContext()
    full = _batches(_train_fn(split)(context))

    resumed = _batches(_train_fn(split, start_step=start_step)(context))

    _assert_same_batches(resumed, full[start_step:])


def test_train_rejects_bad_arguments():
    split = _split()
    with pytest.raises(UsageError, match="start_step=7"):
        _train_fn(split, start_step=7)
    with pytest.raises(UsageError, match="--augment=simclr"):
        _train_fn(split, augment_mode="simclr")
    with pytest.raises(UsageError, match="global batch of 8"):
        _train_fn(_split(7))
    context = tf.distribute.InputContext(num_replicas_in_sync=3)
    with pytest.raises(UsageError, match="--global_batch_size=8"):
        _train_fn(split)(context)


def test_eval_padding_counts_each_example_once():
    split = _split(11)
    dataset_fn = pipeline.make_eval_dataset_fn(split, global_batch_size=4)
    single = _batches(dataset_fn(tf.distribute.InputContext()))

    mirrored, sizes = _mirrored_batches(dataset_fn)

    assert sizes == {2}
    _assert_same_batches(mirrored, single)
    images, labels, weights = (
        np.concatenate(p) for p in zip(*mirrored, strict=True)
    )
    assert len(weights) == 12
    np.testing.assert_array_equal(weights, [1.0] * 11 + [0.0])
    expected = split.images.astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(images[:11], expected)
    np.testing.assert_array_equal(labels[:11], split.labels)
    assert labels.dtype == np.int32
    assert weights.dtype == np.float32


def test_eval_two_pipelines_give_halves():
    split = _split(11)
    dataset_fn = pipeline.make_eval_dataset_fn(split, global_batch_size=4)
    single = _batches(dataset_fn(tf.distribute.InputContext()))

    halves = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2,
            input_pipeline_id=pipeline_id,
            num_replicas_in_sync=2,
        )
        halves.append(_batches(dataset_fn(context)))

    assert len(single) == 3
    assert len(halves[0]) == 3
    assert len(halves[1]) == 3
    for step, element in enumerate(single):
        for position in range(3):
            np.testing.assert_array_equal(
                halves[0][step][position], element[position][:2]
            )
            np.testing.assert_array_equal(
                halves[1][step][position], element[position][2:]
            )


def test_eval_rejects_empty_split():
    empty = ArraySplit(np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, np.int64))
    with pytest.raises(UsageError, match="test split is empty"):
        pipeline.make_eval_dataset_fn(empty, global_batch_size=4)
