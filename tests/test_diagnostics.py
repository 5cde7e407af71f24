"""Embedding diagnostics against a loop-based NumPy reference."""

import math

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf.training.diagnostics import (
    DIAGNOSTIC_NAMES,
    embedding_diagnostics,
)


def _reference(features, labels):
    """The module docstring's definitions, written as explicit loops."""
    batch_size, num_views, dim = features.shape
    rows, row_labels = [], []
    for sample in range(batch_size):
        for view in range(num_views):
            vector = features[sample, view].astype(np.float64)
            rows.append(vector / np.linalg.norm(vector))
            row_labels.append(labels[sample])

    positive_cos, negative_cos, positive_dist, all_exp = [], [], [], []
    for i in range(len(rows)):
        for j in range(len(rows)):
            if i == j:
                continue
            cosine = float(np.dot(rows[i], rows[j]))
            distance = float(np.sum((rows[i] - rows[j]) ** 2))
            all_exp.append(math.exp(-2.0 * distance))
            if row_labels[i] == row_labels[j]:
                positive_cos.append(cosine)
                positive_dist.append(distance)
            else:
                negative_cos.append(cosine)

    def mean(values):
        return sum(values) / len(values) if values else 0.0

    stds = []
    for d in range(dim):
        column = [row[d] for row in rows]
        centre = mean(column)
        stds.append(math.sqrt(mean([(x - centre) ** 2 for x in column])))
    return {
        "positive_cosine": mean(positive_cos),
        "negative_cosine": mean(negative_cos),
        "alignment": mean(positive_dist),
        "uniformity": math.log(mean(all_exp)) if all_exp else 0.0,
        "feature_std": mean(stds),
    }


def _numpy(values):
    return {name: float(value) for name, value in values.items()}


HAND_MADE = {
    "two_classes": (
        [
            [[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]],
            [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]],
            [[0.0, 0.0, 1.0], [0.0, -1.0, 1.0]],
        ],
        [0, 0, 1],
    ),
    "one_view_each": (
        [[[1.0, 2.0]], [[-1.0, 0.5]], [[3.0, -1.0]], [[0.5, 0.5]]],
        [1, 2, 1, 2],
    ),
    "no_negatives": (
        [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 0.0]]],
        [5, 5],
    ),
    "no_positives": (
        [[[1.0, 0.0, 1.0]], [[0.0, 2.0, 0.0]], [[-1.0, 1.0, 1.0]]],
        [0, 1, 2],
    ),
}


@pytest.mark.parametrize("case", sorted(HAND_MADE))
def test_diagnostics_match_reference(case):
    features, labels = HAND_MADE[case]
    features = np.array(features, dtype=np.float32)
    labels = np.array(labels, dtype=np.int64)

    result = _numpy(embedding_diagnostics(features, labels))
    expected = _reference(features, labels)

    assert set(result) == set(DIAGNOSTIC_NAMES)
    for name in DIAGNOSTIC_NAMES:
        assert result[name] == pytest.approx(expected[name], abs=1e-5), name


def test_two_classes_exact_values():
    features, labels = HAND_MADE["two_classes"]
    result = _numpy(embedding_diagnostics(np.array(features), labels))

    # Class 0 rows are e1, (0.8, 0.6, 0), e1, e2: 12 ordered pairs with
    # cosines 0.8 (x4), 1 (x2), 0 (x4) and 0.6 (x2), summing to 6.4.
    # Class 1 rows are e3 and (0, -1, 1)/sqrt(2): cosine 1/sqrt(2) (x2).
    expected_positive = (6.4 + 2 * 2**-0.5) / 14
    assert result["positive_cosine"] == pytest.approx(expected_positive)
    assert result["alignment"] == pytest.approx(2 - 2 * expected_positive)
    # The 16 ordered negative pairs are orthogonal except those of
    # (0, -1, 1)/sqrt(2) with (0.8, 0.6, 0) and with e2.
    expected_negative = 2 * (-0.6 - 1.0) * 2**-0.5 / 16
    assert result["negative_cosine"] == pytest.approx(expected_negative)


def test_empty_pair_sets_give_zero():
    no_negatives = _numpy(
        embedding_diagnostics(np.array(HAND_MADE["no_negatives"][0]), [5, 5])
    )
    no_positives = _numpy(
        embedding_diagnostics(np.array(HAND_MADE["no_positives"][0]), [0, 1, 2])
    )
    single_row = _numpy(embedding_diagnostics(np.ones([1, 1, 4]), [0]))

    assert no_negatives["negative_cosine"] == 0.0
    assert no_positives["positive_cosine"] == 0.0
    assert no_positives["alignment"] == 0.0
    for name in DIAGNOSTIC_NAMES:
        assert single_row[name] == 0.0, name


def test_collapsed_embeddings():
    features = np.tile(np.array([3.0, -1.0, 2.0, 0.5]), [6, 2, 1])
    result = _numpy(embedding_diagnostics(features, [0, 1, 0, 2, 1, 2]))

    assert result["feature_std"] == pytest.approx(0.0, abs=1e-6)
    assert result["positive_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result["negative_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result["alignment"] == pytest.approx(0.0, abs=1e-6)
    assert result["uniformity"] == pytest.approx(0.0, abs=1e-6)


def test_random_directions_have_uniform_std():
    dim = 256
    rng = np.random.default_rng(0)
    features = rng.normal(size=(1000, 2, dim)).astype(np.float32)
    labels = rng.integers(0, 10, size=1000)

    result = _numpy(embedding_diagnostics(features, labels))

    assert result["feature_std"] == pytest.approx(dim**-0.5, rel=0.02)
    assert abs(result["positive_cosine"]) < 0.01
    assert abs(result["negative_cosine"]) < 0.01
    # Near-orthogonal pairs are at squared distance 2, so exp(-4).
    assert result["uniformity"] == pytest.approx(-4.0, abs=0.05)


def test_labels_none_makes_views_positives():
    features, _ = HAND_MADE["two_classes"]
    features = np.array(features, dtype=np.float32)

    result = _numpy(embedding_diagnostics(features, None))
    expected = _reference(features, np.arange(3))

    for name in DIAGNOSTIC_NAMES:
        assert result[name] == pytest.approx(expected[name], abs=1e-5), name


def test_half_precision_input_gives_float32():
    features, labels = HAND_MADE["two_classes"]
    result = embedding_diagnostics(tf.constant(features, tf.float16), labels)

    for name in DIAGNOSTIC_NAMES:
        assert result[name].dtype == tf.float32, name


def test_replica_step_sees_local_rows(mirrored):
    strategy = mirrored(2)
    rng = np.random.default_rng(1)
    features = rng.normal(size=(8, 2, 5)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 2, 2, 0, 1])
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(8)
    inputs = next(iter(strategy.experimental_distribute_dataset(dataset)))

    @tf.function
    def run(features, labels):
        return strategy.run(embedding_diagnostics, args=(features, labels))

    per_replica = run(*inputs)

    for replica, rows in enumerate([slice(0, 4), slice(4, 8)]):
        expected = _reference(features[rows], labels[rows])
        for name in DIAGNOSTIC_NAMES:
            value = float(per_replica[name].values[replica])
            assert value == pytest.approx(expected[name], abs=1e-5), name
