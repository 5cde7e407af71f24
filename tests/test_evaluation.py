"""Feature cache, kNN, metrics and the cached probe against references."""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import evaluation, models, optim
from supcon_tf.config import OptimizerConfig
from supcon_tf.data import pipeline
from supcon_tf.data.sources import ArraySplit
from supcon_tf.errors import UsageError
from supcon_tf.evaluation import FeatureCache
from supcon_tf.training import steps

IMAGE_SHAPE = (8, 8, 3)
NUM_CLASSES = 3


def _split(num_examples, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_examples, *IMAGE_SHAPE), np.uint8)
    labels = rng.integers(0, NUM_CLASSES, num_examples).astype(np.int64)
    return ArraySplit(images=images, labels=labels)


def _build_encoder():
    return models.build_encoder(
        "small_cnn",
        image_shape=IMAGE_SHAPE,
        channel_mean=[0.4, 0.5, 0.6],
        channel_std=[0.2, 0.25, 0.3],
    )


@pytest.fixture(scope="module")
def encoder_weights():
    keras.utils.set_random_seed(7)
    encoder = _build_encoder()
    # Moves the batch-norm statistics away from (0, 1), so that inference
    # mode matters. Variances stay positive.
    rng = np.random.default_rng(0)
    return [
        w * rng.uniform(0.8, 1.2, w.shape) + rng.uniform(0.0, 0.1, w.shape)
        if w.ndim == 1
        else w
        for w in encoder.get_weights()
    ]


def _strategy(mirrored, num_replicas):
    if num_replicas == 1:
        return tf.distribute.get_strategy()
    return mirrored(num_replicas)


def _encoder_under(strategy, weights):
    with strategy.scope():
        encoder = _build_encoder()
        encoder.set_weights(weights)
    return encoder


def _reference_features(weights, split):
    encoder = _encoder_under(tf.distribute.get_strategy(), weights)
    return encoder(split.images / 255.0, training=False).numpy()


# extract_features and predict_cached


@pytest.mark.parametrize("num_replicas", [1, 2, 4])
def test_extract_features_matches_encoder(
    mirrored, encoder_weights, num_replicas
):
    split = _split(13)  # 13 examples: the last global batch of 4 is padded.
    strategy = _strategy(mirrored, num_replicas)
    encoder = _encoder_under(strategy, encoder_weights)

    cache = evaluation.extract_features(
        strategy, encoder, split, global_batch_size=4
    )

    assert cache.features.shape == (13, 32)
    assert cache.features.dtype == np.float32
    np.testing.assert_array_equal(cache.labels, split.labels)
    np.testing.assert_allclose(
        cache.features,
        _reference_features(encoder_weights, split),
        rtol=1e-5,
        atol=1e-6,
    )


def test_extract_features_on_disk(tmp_path, encoder_weights):
    split = _split(10)
    encoder = _encoder_under(tf.distribute.get_strategy(), encoder_weights)
    strategy = tf.distribute.get_strategy()

    cache = evaluation.extract_features(
        strategy,
        encoder,
        split,
        global_batch_size=4,
        max_memory_bytes=100,
        cache_dir=str(tmp_path),
    )

    assert isinstance(cache.features, np.memmap)
    assert os.path.dirname(cache.features.filename) == str(tmp_path)
    assert cache.features.filename.endswith(".npy")
    reference = _reference_features(encoder_weights, split)
    np.testing.assert_allclose(cache.features, reference, atol=1e-6)
    on_disk = np.load(cache.features.filename)
    np.testing.assert_array_equal(on_disk, cache.features)


def test_extract_features_over_limit_without_dir(encoder_weights):
    encoder = _encoder_under(tf.distribute.get_strategy(), encoder_weights)
    with pytest.raises(UsageError, match="max_memory_bytes=100"):
        evaluation.extract_features(
            tf.distribute.get_strategy(),
            encoder,
            _split(10),
            global_batch_size=4,
            max_memory_bytes=100,
        )


def test_predict_cached_two_replicas(mirrored):
    rng = np.random.default_rng(3)
    cache = FeatureCache(
        rng.standard_normal((11, 5)).astype(np.float32),
        rng.integers(0, NUM_CLASSES, 11).astype(np.int64),
    )
    keras.utils.set_random_seed(2)
    reference_head = models.build_classifier_head(
        "linear", input_dim=5, num_classes=NUM_CLASSES
    )
    strategy = mirrored(2)
    with strategy.scope():
        head = models.build_classifier_head(
            "linear", input_dim=5, num_classes=NUM_CLASSES
        )
        head.set_weights(reference_head.get_weights())

    logits = evaluation.predict_cached(
        strategy, head, cache, global_batch_size=4
    )

    assert logits.shape == (11, NUM_CLASSES)
    expected = reference_head(cache.features, training=False).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


# kNN on points of the unit circle, scored by hand.


def _circle(degrees, scale=1.0):
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return (scale * np.stack([np.cos(radians), np.sin(radians)], 1)).astype(
        np.float32
    )


# Train rows at 0, 60, -60 and 180 degrees, scaled so that only the
# normalisation makes them comparable. A query at 0 degrees has cosine
# similarities 1, 0.5, 0.5 and -1 with them.
TRAIN = FeatureCache(
    features=_circle([0, 60, -60, 180]) * np.array([[3.0], [0.5], [2.0], [1]]),
    labels=np.array([0, 1, 1, 2], dtype=np.int64),
)
QUERY = _circle([0], scale=4.0)


def test_knn_k1_nearest_row():
    scores = evaluation.knn_predict(TRAIN, QUERY, k=1, num_classes=3)
    expected = [[math.exp(1 / 0.07), 0.0, 0.0]]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_knn_k3_weights_beat_majority():
    # Two class-1 votes outnumber one class-0 vote, but at temperature 0.07
    # exp(1 / 0.07) is far above 2 * exp(0.5 / 0.07).
    scores = evaluation.knn_predict(TRAIN, QUERY, k=3, num_classes=3)
    expected = [[math.exp(1 / 0.07), 2 * math.exp(0.5 / 0.07), 0.0]]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert np.argmax(scores[0]) == 0


def test_knn_k3_high_temperature_majority():
    # At temperature 10 the weights are nearly equal, so the majority wins.
    scores = evaluation.knn_predict(
        TRAIN, QUERY, k=3, num_classes=3, temperature=10.0
    )
    expected = [[math.exp(0.1), 2 * math.exp(0.05), 0.0]]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert np.argmax(scores[0]) == 1


def test_knn_batches_agree():
    queries = _circle(np.arange(0, 360, 17), scale=2.0).astype(np.float64)
    whole = evaluation.knn_predict(
        TRAIN, queries, k=2, num_classes=3, batch_size=1024
    )
    batched = evaluation.knn_predict(
        TRAIN, queries, k=2, num_classes=3, batch_size=3
    )
    np.testing.assert_allclose(batched, whole, rtol=1e-5)
    assert whole.shape == (len(queries), 3)


def test_knn_rejects_k_above_train_size():
    with pytest.raises(UsageError, match="k=5 is invalid"):
        evaluation.knn_predict(TRAIN, QUERY, k=5, num_classes=3)


def test_knn_accuracy_top5_needs_a_vote():
    # Query 0 (0 deg, true class 0) has neighbour class 0. Query 1 (180 deg,
    # true class 3) has neighbour class 2 only: with k=1 and 6 classes,
    # class 3 has no votes, so it is no top-5 hit although fewer than 5
    # classes have positive scores.
    test = FeatureCache(_circle([0, 180]), np.array([0, 3], np.int64))
    metrics = evaluation.knn_accuracy(TRAIN, test, k=1, num_classes=6)
    assert metrics == {"top1": 0.5, "top5": 0.5}


def test_knn_accuracy_top5_counts_voted_class():
    # Query at 50 deg, true class 0: k=3 neighbours are 60 (class 1), 0
    # (class 0) and -60 (class 1); class 1 wins, class 0 is second.
    test = FeatureCache(_circle([50]), np.array([0], np.int64))
    metrics = evaluation.knn_accuracy(TRAIN, test, k=3, num_classes=3)
    assert metrics == {"top1": 0.0, "top5": 1.0}


# classification_metrics on hand-made scores.


def test_top5_rank_and_ties():
    scores = np.array(
        [
            [6, 5, 4, 3, 2, 1],  # label 4 ranks 5th: hit
            [6, 5, 4, 3, 2, 1],  # label 5 ranks 6th: miss
            [1, 1, 1, 1, 1, 1],  # all tied, label 4 ranks 5th: hit
            [1, 1, 1, 1, 1, 1],  # all tied, label 5 ranks 6th: miss
            [0, 0, 0, 0, 0, 9],  # label 5 ranks 1st
        ],
        dtype=np.float32,
    )
    labels = np.array([4, 5, 4, 5, 5])
    metrics = evaluation.classification_metrics(scores, labels, 6)
    assert metrics["top5"] == pytest.approx(3 / 5)
    assert metrics["top1"] == pytest.approx(1 / 5)


def test_confusion_and_per_class():
    logits = np.array(
        [
            [2.0, 1.0, 0.0, 0.0],  # true 0, predicted 0
            [0.0, 3.0, 0.0, 0.0],  # true 0, predicted 1
            [0.0, 3.0, 0.0, 0.0],  # true 1, predicted 1
            [5.0, 0.0, 1.0, 0.0],  # true 2, predicted 0
            [0.0, 0.0, 1.0, 0.0],  # true 2, predicted 2
            [0.0, 0.0, 1.0, 0.5],  # true 2, predicted 2
        ]
    )
    labels = np.array([0, 0, 1, 2, 2, 2])
    metrics = evaluation.classification_metrics(logits, labels, 4)
    assert metrics["confusion_matrix"] == [
        [1, 1, 0, 0],
        [0, 1, 0, 0],
        [1, 0, 2, 0],
        [0, 0, 0, 0],
    ]
    assert metrics["per_class_accuracy"] == [0.5, 1.0, 2 / 3, None]
    assert metrics["top1"] == pytest.approx(4 / 6)
    assert metrics["top5"] == 1.0


def test_metrics_reject_bad_labels():
    with pytest.raises(UsageError, match=r"Labels must be in \[0, 2\)"):
        evaluation.classification_metrics(np.zeros((1, 2)), np.array([2]), 2)


# The cached probe against the image pipeline with a frozen encoder.

GLOBAL_BATCH = 8
EPOCHS = 2
SEED = 5


def _linear_head(strategy, weights):
    with strategy.scope():
        head = models.build_classifier_head(
            "linear", input_dim=32, num_classes=NUM_CLASSES
        )
        head.set_weights(weights)
    optimizer = optim.make_optimizer(
        OptimizerConfig("sgd", learning_rate=0.5, momentum=0.9),
        strategy,
        head.trainable_variables,
    )
    return head, optimizer


@pytest.fixture(scope="module")
def probe_setup(encoder_weights):
    split = _split(37, seed=1)  # 4 full batches of 8 per epoch, 5 dropped.
    keras.utils.set_random_seed(3)
    head = models.build_classifier_head(
        "linear", input_dim=32, num_classes=NUM_CLASSES
    )
    return split, head.get_weights()


def _train_on_images(split, encoder_weights, head_weights):
    strategy = tf.distribute.get_strategy()
    encoder = _encoder_under(strategy, encoder_weights)
    head, optimizer = _linear_head(strategy, head_weights)
    replica_step = steps.make_classifier_step(
        encoder, head, optimizer, GLOBAL_BATCH, train_encoder=False
    )
    loop = steps.make_train_loop(strategy, replica_step)
    dataset_fn = pipeline.make_train_dataset_fn(
        split,
        global_batch_size=GLOBAL_BATCH,
        num_views=1,
        augment="none",
        seed=SEED,
        num_epochs=EPOCHS,
    )
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    losses = [
        float(loop(iterator, tf.constant(1))["loss"])
        for _ in range(EPOCHS * (37 // GLOBAL_BATCH))
    ]
    return losses, head.get_weights()


def _train_cached(strategy, split, weights, head_weights, steps_per_loop):
    encoder = _encoder_under(strategy, weights)
    cache = evaluation.extract_features(
        strategy, encoder, split, global_batch_size=GLOBAL_BATCH
    )
    head, optimizer = _linear_head(strategy, head_weights)
    logs = []
    result = evaluation.train_cached_probe(
        strategy,
        head,
        optimizer,
        cache,
        global_batch_size=GLOBAL_BATCH,
        epochs=EPOCHS,
        seed=SEED,
        steps_per_loop=steps_per_loop,
        on_log=lambda step, metrics: logs.append((step, metrics)),
    )
    return logs, result, head.get_weights()


def test_cached_probe_matches_image_training(probe_setup, encoder_weights):
    split, head_weights = probe_setup
    losses, weights = _train_on_images(split, encoder_weights, head_weights)

    logs, result, cached_weights = _train_cached(
        tf.distribute.get_strategy(), split, encoder_weights, head_weights, 1
    )

    assert [step for step, _ in logs] == list(range(1, 9))
    cached_losses = [metrics["loss"] for _, metrics in logs]
    np.testing.assert_allclose(cached_losses, losses, rtol=1e-5, atol=1e-5)
    # The two epochs differ in order, so their losses are not a repeat.
    assert not np.allclose(losses[:4], losses[4:], atol=1e-3)
    for cached, expected, initial in zip(
        cached_weights, weights, head_weights, strict=True
    ):
        np.testing.assert_allclose(cached, expected, atol=1e-5)
        assert not np.allclose(expected, initial, atol=1e-3)
    assert result["steps"] == 8
    assert result["final_loss"] == pytest.approx(losses[-1], abs=1e-5)
    assert result["examples_per_second"] > 0
    assert set(logs[0][1]) == {"loss", "accuracy", "examples_per_sec"}
    assert 0.0 <= logs[0][1]["accuracy"] <= 1.0


def test_cached_probe_two_replicas_and_loops(
    mirrored, probe_setup, encoder_weights
):
    split, head_weights = probe_setup
    single_logs, _, single_weights = _train_cached(
        tf.distribute.get_strategy(), split, encoder_weights, head_weights, 1
    )

    logs, result, weights = _train_cached(
        mirrored(2), split, encoder_weights, head_weights, 3
    )

    assert [step for step, _ in logs] == [3, 6, 8]
    single_losses = [metrics["loss"] for _, metrics in single_logs]
    expected = [np.mean(single_losses[0:3]), np.mean(single_losses[3:6])]
    expected.append(np.mean(single_losses[6:8]))
    losses = [metrics["loss"] for _, metrics in logs]
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-5)
    assert result["final_loss"] == pytest.approx(expected[-1], abs=1e-5)
    for replicated, single in zip(weights, single_weights, strict=True):
        np.testing.assert_allclose(replicated, single, atol=1e-5)


def test_cached_probe_rejects_small_split():
    cache = FeatureCache(np.zeros((5, 32), np.float32), np.zeros(5, np.int64))
    strategy = tf.distribute.get_strategy()
    head, optimizer = _linear_head(
        strategy, [np.zeros((32, 3), np.float32), np.zeros(3, np.float32)]
    )
    with pytest.raises(UsageError, match="fewer than one global batch"):
        evaluation.train_cached_probe(
            strategy,
            head,
            optimizer,
            cache,
            global_batch_size=8,
            epochs=1,
            seed=0,
        )
