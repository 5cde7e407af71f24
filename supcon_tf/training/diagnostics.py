"""Scalar diagnostics of contrastive embeddings, computed in TensorFlow.

The rows are the `batch_size * num_views` projections `z`, L2-normalised,
in sample-major order as in `supcon_tf.losses`. A pair `(i, j)` is two
distinct rows (`i != j`). It is positive when the samples of the two rows
share a label, so the other views of a row's own sample are positive, and
negative otherwise. With `d_ij = |z_i - z_j|^2 = 2 - 2 z_i . z_j`:

    positive_cosine = mean over positive pairs of z_i . z_j
    negative_cosine = mean over negative pairs of z_i . z_j
    alignment       = mean over positive pairs of d_ij
    uniformity      = log(mean over all pairs of exp(-2 d_ij))
    feature_std     = mean over dimensions of std over rows of z

`alignment` (alpha = 2) and `uniformity` (t = 2) are the measures of
Wang and Isola, "Understanding Contrastive Representation Learning through
Alignment and Uniformity on the Hypersphere" (ICML 2020). Lower is better
for both. `feature_std` falls to 0 when the embeddings collapse to one
point and is close to `1 / sqrt(dim)` for points spread uniformly on the
sphere.

A mean over an empty set of pairs is reported as 0, not NaN. This gives
0 for the positive terms when no two rows share a label and for
`negative_cosine` when all rows share one label. With a single row,
every value is 0.
"""

import tensorflow as tf

DIAGNOSTIC_NAMES = (
    "positive_cosine",
    "negative_cosine",
    "alignment",
    "uniformity",
    "feature_std",
)


def embedding_diagnostics(
    features: tf.Tensor, labels: tf.Tensor | None
) -> dict[str, tf.Tensor]:
    """Computes the collapse and alignment diagnostics of one batch.

    The function uses only TensorFlow ops with dynamic batch sizes, so it
    runs inside a `tf.function` and inside `strategy.run`. In a replica
    step it receives only that replica's rows, so each value describes the
    local batch. Divide by `num_replicas_in_sync` before a SUM reduction
    to log the mean over replicas.

    Args:
        features: `[batch_size, num_views, dim]` projections of any scale
            and float dtype. They are cast to float32 and L2-normalised.
        labels: int `[batch_size]` class ids, or None to treat every
            sample as its own class, so that only its other views are
            positives.

    Returns:
        float32 scalars keyed by the names in `DIAGNOSTIC_NAMES`, as the
        module docstring defines them.
    """
    rows, row_labels = _flatten_rows(features, labels)
    cosine = tf.matmul(rows, rows, transpose_b=True)
    squared_distance = tf.maximum(2.0 - 2.0 * cosine, 0.0)

    num_rows = tf.shape(rows)[0]
    distinct = tf.logical_not(tf.eye(num_rows, dtype=tf.bool))
    same_label = tf.equal(row_labels[:, None], row_labels[None, :])
    positive = tf.logical_and(distinct, same_label)
    negative = tf.logical_not(same_label)

    return {
        "positive_cosine": _masked_mean(cosine, positive),
        "negative_cosine": _masked_mean(cosine, negative),
        "alignment": _masked_mean(squared_distance, positive),
        "uniformity": _log_mean_exp(-2.0 * squared_distance, distinct),
        "feature_std": _feature_std(rows),
    }


def _flatten_rows(features, labels):
    """Returns normalised `[batch * views, dim]` rows and their labels."""
    features = tf.cast(tf.convert_to_tensor(features), tf.float32)
    shape = tf.shape(features)
    batch_size, num_views = shape[0], shape[1]
    rows = tf.reshape(features, [batch_size * num_views, shape[2]])
    rows = tf.math.l2_normalize(rows, axis=1)

    if labels is None:
        labels = tf.range(batch_size)
    labels = tf.reshape(tf.convert_to_tensor(labels), [-1])
    row_labels = tf.repeat(labels, num_views)
    return rows, row_labels


def _feature_std(rows):
    """Mean over dimensions of the std over rows, or 0 with no rows."""
    std = tf.reduce_mean(tf.math.reduce_std(rows, axis=0))
    return tf.where(tf.shape(rows)[0] > 0, std, 0.0)


def _masked_mean(values, mask):
    """Mean of `values` where `mask` is true, or 0 where it never is."""
    weights = tf.cast(mask, tf.float32)
    total = tf.reduce_sum(values * weights)
    return tf.math.divide_no_nan(total, tf.reduce_sum(weights))


def _log_mean_exp(values, mask):
    """`log(mean(exp(values)))` over `mask`, or 0 where `mask` is empty."""
    count = tf.reduce_sum(tf.cast(mask, tf.float32))
    masked = tf.where(mask, values, tf.fill(tf.shape(values), -float("inf")))
    result = tf.reduce_logsumexp(masked) - tf.math.log(tf.maximum(count, 1.0))
    return tf.where(count > 0, result, 0.0)
