"""Tests for supcon_tf.losses against loop-based NumPy references."""

import math

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import losses

TEMPERATURES = (0.05, 0.1, 0.5, 1.0)
LABELS = np.array([0, 1, 0, 2, 1, 3, 2, 4])  # samples 5 and 7 are unique.
MULTI_HOT = np.array(
    [
        [1, 0, 0, 0],
        [0, 1, 0, 1],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
        [0, 0, 0, 0],
        [0, 0, 1, 0],
        [1, 0, 0, 0],
    ]
)


def reference_anchor(rows, anchor, num_views, pairs, temperature, options):
    """Computes the loss of one anchor row with plain loops over the rows."""
    sample = anchor // num_views
    logits = {
        j: float(np.dot(rows[anchor], rows[j])) / temperature
        for j in range(len(rows))
        if j != anchor
    }
    cap = options.get("positives_cap")
    positives, negatives, num_labelled = [], [], 0
    for j in sorted(logits):
        if j // num_views == sample:
            positives.append(j)
        elif pairs[sample][j // num_views]:
            if cap is None or num_labelled < cap:
                positives.append(j)
            num_labelled += 1
        else:
            negatives.append(j)

    denominator = options.get("denominator", "all")
    if not positives or (denominator == "only_negatives" and not negatives):
        return 0.0
    negative_sum = sum(math.exp(logits[n]) for n in negatives)
    ratios = []
    for p in positives:
        if denominator == "all":
            total = sum(math.exp(value) for value in logits.values())
        elif denominator == "one_positive":
            total = math.exp(logits[p]) + negative_sum
        else:
            total = negative_sum
        ratios.append(math.exp(logits[p]) / total)

    if options.get("summation", "outside") == "outside":
        loss = -sum(math.log(r) for r in ratios) / len(ratios)
    else:
        loss = -math.log(sum(ratios) / len(ratios))
    if options.get("base_temperature") is not None:
        loss *= temperature / options["base_temperature"]
    return loss


def reference_supcon(features, pairs, temperature, **options):
    """Computes the per-sample SupCon loss with plain loops.

    `pairs[s][t]` is True when samples s and t share a label.
    """
    features = np.asarray(features, np.float64)
    if features.ndim == 2:
        features = features[:, None, :]
    batch_size, num_views, _ = features.shape
    rows = [
        features[s, v] / np.linalg.norm(features[s, v])
        for s in range(batch_size)
        for v in range(num_views)
    ]
    anchor_views = range(num_views)
    if options.get("contrast_mode", "all") == "one":
        anchor_views = [0]
    result = []
    for s in range(batch_size):
        view_losses = [
            reference_anchor(
                rows, s * num_views + v, num_views, pairs, temperature, options
            )
            for v in anchor_views
        ]
        result.append(sum(view_losses) / len(view_losses))
    return np.array(result)


def pairs_from_ids(labels):
    labels = np.asarray(labels).reshape(-1)
    return [[a == b for b in labels] for a in labels]


def pairs_from_multi_hot(labels):
    return [[bool(np.any(a & b)) for b in labels] for a in labels]


def random_features(batch_size, num_views, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch_size, num_views, dim)).astype(np.float32)


def unit_vector_at(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# Each case: (id, num_views, label kind, supcon_loss options).
OPTION_CASES = [
    ("default", 2, "ids", {}),
    ("inside", 2, "ids", {"summation": "inside"}),
    ("contrast_one", 2, "ids", {"contrast_mode": "one"}),
    ("one_positive", 2, "ids", {"denominator": "one_positive"}),
    ("only_negatives", 2, "ids", {"denominator": "only_negatives"}),
    (
        "inside_one_positive",
        2,
        "ids",
        {"summation": "inside", "denominator": "one_positive"},
    ),
    (
        "inside_only_negatives",
        2,
        "ids",
        {"summation": "inside", "denominator": "only_negatives"},
    ),
    ("cap_0", 2, "ids", {"positives_cap": 0}),
    ("cap_1", 2, "ids", {"positives_cap": 1}),
    (
        "cap_1_one_positive",
        2,
        "ids",
        {"positives_cap": 1, "denominator": "one_positive"},
    ),
    ("base_temperature", 2, "ids", {"base_temperature": 0.07}),
    ("views_1", 1, "ids", {}),
    ("views_4", 4, "ids", {}),
    ("views_4_contrast_one", 4, "ids", {"contrast_mode": "one"}),
    ("column_labels", 2, "column_ids", {}),
    ("multi_hot", 2, "multi_hot", {}),
    ("positive_mask", 2, "positive_mask", {}),
    ("simclr", 2, "none", {}),
]


def case_inputs(num_views, label_kind, batch_size=8):
    """Returns features, the labels argument, its kind and the pair matrix."""
    features = random_features(batch_size, num_views, seed=num_views)
    labels = LABELS[:batch_size]
    if label_kind == "ids":
        return features, labels, pairs_from_ids(labels)
    if label_kind == "column_ids":
        return features, labels[:, None], pairs_from_ids(labels)
    if label_kind == "multi_hot":
        hot = MULTI_HOT[:batch_size]
        return features, hot, pairs_from_multi_hot(hot)
    if label_kind == "positive_mask":
        mask = np.random.default_rng(7).random((batch_size, batch_size)) < 0.3
        return features, mask, mask.tolist()
    return features, None, pairs_from_ids(np.arange(batch_size))


def call_supcon(features, labels, label_kind, temperature, **options):
    if label_kind == "positive_mask":
        return losses.supcon_loss(
            features, positive_mask=labels, temperature=temperature, **options
        )
    return losses.supcon_loss(
        features, labels, temperature=temperature, **options
    )


def test_npairs_loss_known_value():
    logits = np.array(
        [
            [0.9, 0.1, 0.8, -1.0],
            [0.1, 0.9, 0.7, 0.2],
            [1.0, 1.0, 1.5, -0.8],
            [-0.9, -0.1, -0.8, 1.0],
        ]
    )
    labels = np.array([0, 1, 0, 2])
    loss = losses.npairs_loss(labels, logits)
    column_loss = losses.npairs_loss(labels[:, None], logits)
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), 0.8931958627, atol=1e-6)
    np.testing.assert_allclose(column_loss.numpy(), 0.8931958627, atol=1e-6)


def test_npairs_feature_loss_matches_logits():
    features = random_features(6, 1, dim=4)[:, 0, :]
    labels = np.array([3, 1, 3, 0, 1, 2])
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    logits = unit @ unit.T / 0.1
    per_sample = losses.npairs_feature_loss(features, labels, temperature=0.1)
    three_d = losses.npairs_feature_loss(
        features[:, None, :], labels, temperature=0.1
    )
    assert per_sample.shape == (6,)
    np.testing.assert_allclose(
        tf.reduce_mean(per_sample).numpy(),
        losses.npairs_loss(labels, logits).numpy(),
        rtol=1e-5,
    )
    np.testing.assert_allclose(three_d.numpy(), per_sample.numpy(), rtol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_supcon_antipodal_closed_form(temperature):
    # Both views of sample 0 at +x, of sample 1 at -x: each anchor has one
    # positive at logit 1/T and two negatives at -1/T.
    features = np.array([[[1.0, 0.0]] * 2, [[-1.0, 0.0]] * 2], np.float32)
    loss = losses.supcon_loss(features, [0, 1], temperature=temperature)
    expected = math.log1p(2 * math.exp(-2 / temperature))
    # At T = 0.05 the loss, 8.5e-18, is below float32 resolution next to 1.
    np.testing.assert_allclose(
        loss.numpy(), [expected] * 2, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_supcon_tiny_hand_case(temperature):
    # 3 samples x 2 views on the unit circle. Samples 0 and 1 share a label.
    degrees = [[0, 60], [180, 120], [90, 270]]
    features = np.array(
        [[unit_vector_at(d) for d in views] for views in degrees]
    )
    labels = [0, 0, 1]
    loss = losses.supcon_loss(features, labels, temperature=temperature)
    expected = reference_supcon(features, pairs_from_ids(labels), temperature)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_supcon_anchor_without_positive(temperature):
    # One view each: sample 2 has no other sample with its label.
    features = np.array(
        [unit_vector_at(0), unit_vector_at(60), unit_vector_at(200)], np.float32
    )
    labels = [5, 5, 6]
    loss = losses.supcon_loss(features, labels, temperature=temperature)
    expected = reference_supcon(features, pairs_from_ids(labels), temperature)
    assert loss.numpy()[2] == 0.0
    assert np.all(np.isfinite(loss.numpy()))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "num_views,label_kind,options",
    [case[1:] for case in OPTION_CASES],
    ids=[case[0] for case in OPTION_CASES],
)
@pytest.mark.parametrize("temperature", (0.1, 0.5))
def test_supcon_options_match_reference(
    num_views, label_kind, options, temperature
):
    features, labels, pairs = case_inputs(num_views, label_kind)
    loss = call_supcon(features, labels, label_kind, temperature, **options)
    expected = reference_supcon(features, pairs, temperature, **options)
    assert loss.dtype == tf.float32
    assert loss.shape == (8,)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"summation": "inside"},
        {"contrast_mode": "one"},
        {"denominator": "one_positive"},
        {"denominator": "only_negatives", "summation": "inside"},
        {"positives_cap": 1},
    ],
    ids=repr,
)
def test_supcon_gradient_matches_numeric(options):
    features = random_features(4, 2, dim=3).astype(np.float64)
    labels = [0, 1, 0, 2]

    def loss_fn(x):
        return losses.supcon_loss(x, labels, temperature=0.5, **options)

    theoretical, numerical = tf.test.compute_gradient(loss_fn, [features])
    # The loss runs in float32, so finite differences carry float32 noise.
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-3)
    assert np.abs(theoretical[0]).max() > 1e-2


@pytest.mark.parametrize("denominator", losses.DENOMINATORS)
@pytest.mark.parametrize("summation", losses.SUMMATIONS)
def test_supcon_low_temperature_finite(denominator, summation):
    features = tf.constant(random_features(8, 2, dim=16))
    options = {"denominator": denominator, "summation": summation}
    with tf.GradientTape() as tape:
        tape.watch(features)
        loss = losses.supcon_loss(
            features, LABELS, temperature=0.005, **options
        )
        total = tf.reduce_sum(loss)
    gradient = tape.gradient(total, features)
    expected = reference_supcon(
        features.numpy(), pairs_from_ids(LABELS), 0.005, **options
    )
    assert np.all(np.isfinite(loss.numpy()))
    assert np.all(np.isfinite(gradient.numpy()))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("denominator", losses.DENOMINATORS)
@pytest.mark.parametrize("summation", losses.SUMMATIONS)
@pytest.mark.parametrize(
    "num_views,labels",
    [(2, [1, 1, 1]), (1, [1, 2, 3]), (1, [4])],
    ids=["no_negatives", "no_positives", "one_row"],
)
def test_supcon_degenerate_batches_finite(
    num_views, labels, denominator, summation
):
    features = tf.constant(random_features(len(labels), num_views, dim=3))
    options = {"denominator": denominator, "summation": summation}
    with tf.GradientTape() as tape:
        tape.watch(features)
        loss = losses.supcon_loss(features, labels, temperature=0.1, **options)
        total = tf.reduce_sum(loss)
    gradient = tape.gradient(total, features, unconnected_gradients="zero")
    expected = reference_supcon(
        features.numpy(), pairs_from_ids(labels), 0.1, **options
    )
    assert np.all(np.isfinite(gradient.numpy()))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_supcon_half_precision_features(dtype):
    features = random_features(8, 2, dim=16)
    low = tf.cast(features, dtype)
    loss = losses.supcon_loss(low, LABELS, temperature=0.1)
    same_values = losses.supcon_loss(
        tf.cast(low, tf.float32), LABELS, temperature=0.1
    )
    full = losses.supcon_loss(features, LABELS, temperature=0.1)
    assert loss.dtype == tf.float32
    assert np.all(np.isfinite(loss.numpy()))
    np.testing.assert_allclose(loss.numpy(), same_values.numpy(), rtol=1e-6)
    np.testing.assert_allclose(loss.numpy(), full.numpy(), rtol=5e-2)


def test_supcon_labels_compared_as_integers():
    # 256 and 257 round to the same bfloat16 value; as ids they differ, so
    # no single-view sample has a positive.
    features = tf.constant([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], tf.bfloat16)
    labels = tf.constant([256, 257, 0])
    loss = losses.supcon_loss(features, labels, temperature=0.1)
    np.testing.assert_array_equal(loss.numpy(), [0.0, 0.0, 0.0])


def test_supcon_ignores_feature_scale():
    features = random_features(8, 2)
    loss = losses.supcon_loss(features, LABELS, temperature=0.1)
    for scale in (1e-3, 7.0, 1e3):
        scaled = losses.supcon_loss(features * scale, LABELS, temperature=0.1)
        np.testing.assert_allclose(scaled.numpy(), loss.numpy(), rtol=1e-5)


@pytest.mark.parametrize(
    "bad_labels,shape_text",
    [
        (np.zeros((8, 2, 1), np.int32), r"\(8, 2, 1\)"),
        (np.int32(3), r"\(\)"),
    ],
)
def test_supcon_wrong_label_shape_raises(bad_labels, shape_text):
    with pytest.raises(ValueError, match=shape_text):
        losses.supcon_loss(random_features(8, 2), bad_labels, temperature=0.1)


def test_supcon_wrong_feature_shape_raises():
    with pytest.raises(ValueError, match=r"\(2, 2, 2, 2\)"):
        losses.supcon_loss(np.ones((2, 2, 2, 2)), [0, 1], temperature=0.1)


def test_supcon_labels_and_mask_together_raise():
    with pytest.raises(ValueError, match="only one"):
        losses.supcon_loss(
            random_features(2, 2),
            [0, 1],
            positive_mask=np.eye(2),
            temperature=0.1,
        )


@pytest.mark.parametrize(
    "option,value",
    [
        ("summation", "middle"),
        ("contrast_mode", "two"),
        ("denominator", "none"),
    ],
)
def test_supcon_invalid_option_raises(option, value):
    features = random_features(2, 2)
    with pytest.raises(ValueError, match=f"{value}.*Expected one of"):
        losses.supcon_loss(features, [0, 1], temperature=0.1, **{option: value})
    with pytest.raises(ValueError, match=value):
        losses.SupConLoss(temperature=0.1, **{option: value})


def test_supcon_invalid_numbers_raise():
    features = random_features(2, 2)
    with pytest.raises(ValueError, match="temperature"):
        losses.supcon_loss(features, [0, 1], temperature=0.0)
    with pytest.raises(ValueError, match="positives_cap"):
        losses.supcon_loss(features, [0, 1], temperature=0.1, positives_cap=-1)


@pytest.mark.parametrize(
    "options", [{}, {"contrast_mode": "one"}, {"positives_cap": 1}], ids=repr
)
def test_supcon_graph_has_no_rows_rows_dim_tensor(options):
    batch_size, num_views, dim = 6, 2, 16
    rows = batch_size * num_views
    spec = tf.TensorSpec([batch_size, num_views, dim], tf.float32)
    traced = tf.function(
        lambda x: losses.supcon_loss(
            x, LABELS[:batch_size], temperature=0.1, **options
        )
    ).get_concrete_function(spec)
    sizes = [
        output.shape.num_elements() or 0
        for op in traced.graph.get_operations()
        for output in op.outputs
    ]
    assert max(sizes) < rows * rows * dim


def test_keras_wrappers_match_functions():
    features = random_features(8, 2)
    supcon = losses.SupConLoss(temperature=0.1, denominator="one_positive")
    expected = losses.supcon_loss(
        features, LABELS, temperature=0.1, denominator="one_positive"
    )
    np.testing.assert_allclose(
        supcon(LABELS, features).numpy(), np.mean(expected.numpy()), rtol=1e-6
    )
    restored = losses.SupConLoss.from_config(supcon.get_config())
    assert restored.options == supcon.options

    npairs = losses.NPairsLoss(temperature=0.2)
    npairs_expected = losses.npairs_feature_loss(
        features[:, 0], LABELS, temperature=0.2
    )
    np.testing.assert_allclose(
        npairs(LABELS, features[:, 0]).numpy(),
        np.mean(npairs_expected.numpy()),
        rtol=1e-6,
    )


@pytest.fixture(scope="module")
def strategy():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def split_across_replicas(strategy, array, rows_on_first):
    """Gives replica 0 the first `rows_on_first` rows, replica 1 the rest."""
    if array is None:
        return None
    bounds = [(0, rows_on_first), (rows_on_first, len(array))]

    def value_fn(context):
        start, stop = bounds[context.replica_id_in_sync_group]
        return tf.constant(array[start:stop])

    return strategy.experimental_distribute_values_from_function(value_fn)


def two_replica_result(strategy, loss_fn, features, labels, rows_on_first):
    """Returns the summed replica losses and the gathered feature gradients."""
    global_batch_size = len(features)

    def replica_step(local_features, local_labels):
        with tf.GradientTape() as tape:
            tape.watch(local_features)
            per_sample = loss_fn(local_features, local_labels)
            loss = tf.reduce_sum(per_sample) / global_batch_size
        return loss, tape.gradient(loss, local_features)

    @tf.function
    def step(local_features, local_labels):
        loss, gradient = strategy.run(
            replica_step, args=(local_features, local_labels)
        )
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        return total, strategy.gather(gradient, axis=0)

    return step(
        split_across_replicas(strategy, features, rows_on_first),
        split_across_replicas(strategy, labels, rows_on_first),
    )


def one_device_result(loss_fn, features, labels):
    features = tf.constant(features)
    with tf.GradientTape() as tape:
        tape.watch(features)
        loss = tf.reduce_mean(loss_fn(features, labels))
    return loss, tape.gradient(loss, features)


def assert_replicas_match_one_device(
    strategy, loss_fn, features, labels, rows_on_first
):
    loss, gradient = one_device_result(loss_fn, features, labels)
    replica_loss, replica_gradient = two_replica_result(
        strategy, loss_fn, features, labels, rows_on_first
    )
    assert gradient.shape == replica_gradient.shape
    np.testing.assert_allclose(replica_loss.numpy(), loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        replica_gradient.numpy(), gradient.numpy(), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
    "num_views,label_kind,options",
    [case[1:] for case in OPTION_CASES],
    ids=[case[0] for case in OPTION_CASES],
)
def test_two_replicas_match_one_device(
    strategy, num_views, label_kind, options
):
    features, labels, _ = case_inputs(num_views, label_kind)

    def loss_fn(x, y):
        return call_supcon(x, y, label_kind, 0.1, **options)

    assert_replicas_match_one_device(strategy, loss_fn, features, labels, 4)


@pytest.mark.parametrize("label_kind", ["ids", "none"])
def test_two_replicas_unequal_batches(strategy, label_kind):
    features, labels, _ = case_inputs(2, label_kind)

    def loss_fn(x, y):
        return losses.supcon_loss(x, y, temperature=0.1)

    assert_replicas_match_one_device(strategy, loss_fn, features, labels, 3)


def test_two_replicas_npairs_feature_loss(strategy):
    features = random_features(8, 1, dim=6)[:, 0, :]

    def loss_fn(x, y):
        return losses.npairs_feature_loss(x, y, temperature=0.1)

    assert_replicas_match_one_device(strategy, loss_fn, features, LABELS, 4)


def test_two_replicas_local_only(strategy):
    # cross_replica=False: each replica contrasts its own 4 samples only.
    features = random_features(8, 2)

    def loss_fn(x, y):
        return losses.supcon_loss(x, y, temperature=0.1, cross_replica=False)

    replica_loss, _ = two_replica_result(strategy, loss_fn, features, LABELS, 4)
    halves = [
        loss_fn(features[:4], LABELS[:4]),
        loss_fn(features[4:], LABELS[4:]),
    ]
    expected = sum(tf.reduce_sum(half) for half in halves) / 8
    np.testing.assert_allclose(replica_loss.numpy(), expected, rtol=1e-5)
