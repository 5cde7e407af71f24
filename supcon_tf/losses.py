"""Supervised contrastive (SupCon) and N-pairs losses in TensorFlow.

Notation. A batch of `batch_size` samples with `num_views` views each gives
`batch_size * num_views` rows `z`, L2-normalised, ordered sample-major
(row = sample * num_views + view). For an anchor row `i`, `A(i)` is every
row but `i`, `P(i)` the positives (rows other than `i` whose sample shares a
label with the anchor's sample, the anchor's other views included) and
`N(i)` the negatives, the rows of other samples that share no label. A row
that `positives_cap` drops from `P(i)` stays out of `N(i)` too. With
`s_ij = z_i . z_j / temperature`, the SupCon loss of Khosla et al. 2020
(arXiv 2004.11362) is, per anchor,

    eq. 2 (summation="outside", the default):
        L_i = -1/|P(i)| sum_{p in P(i)} log(exp(s_ip) / D_ip)
    eq. 3 (summation="inside"):
        L_i = -log(1/|P(i)| sum_{p in P(i)} exp(s_ip) / D_ip)

where the denominator `D_ip` is selected by `denominator`:

    "all":            D_ip = sum_{a in A(i)} exp(s_ia)
    "one_positive":   D_ip = exp(s_ip) + sum_{n in N(i)} exp(s_in)
    "only_negatives": D_ip = sum_{n in N(i)} exp(s_in)

An anchor with no positive contributes 0, and so does an anchor with no
negative under "only_negatives", where `D_ip` would be 0. The loss of a
sample is the mean of `L_i` over its anchor views.

The N-pairs loss, as in TensorFlow Addons' `npairs_loss`, is the
softmax cross-entropy of each logits row against the target row
`y_ij = [label_i == label_j] / sum_k [label_i == label_k]`.

Reduction across replicas. Inside a `tf.distribute` replica context with
more than one replica, `supcon_loss` and `npairs_feature_loss` gather
features and labels from all replicas (a zero-padded all-reduce) and
return the loss of this replica's own samples against the whole global
batch. The gradient of the gather is summed back to the replica that owns
each slice. The caller sums the per-sample loss over its local samples and
divides by the global batch size. Summing that value across replicas, which
the all-reduce of the gradients does, gives the mean over the global batch,
equal to the single-device result.
"""

import keras
import tensorflow as tf

from supcon_tf.errors import UsageError

SUMMATIONS = ("outside", "inside")
CONTRAST_MODES = ("all", "one")
DENOMINATORS = ("all", "one_positive", "only_negatives")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(
            f"Invalid {name} {value!r}. Expected one of {', '.join(choices)}."
        )


def _check_options(
    temperature: float,
    base_temperature: float | None = None,
    summation: str = "outside",
    contrast_mode: str = "all",
    denominator: str = "all",
    positives_cap: int | None = None,
    cross_replica: bool = True,
) -> None:
    """Raises UsageError on an invalid `supcon_loss` option."""
    del cross_replica  # Accepted so that Keras options can be passed as-is.
    _check_choice("summation", summation, SUMMATIONS)
    _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
    _check_choice("denominator", denominator, DENOMINATORS)
    if not temperature > 0:
        raise UsageError(f"temperature must be > 0, got {temperature}.")
    if base_temperature is not None and not base_temperature > 0:
        raise UsageError(
            f"base_temperature must be > 0 or None, got {base_temperature}."
        )
    if positives_cap is not None and (
        not isinstance(positives_cap, int) or positives_cap < 0
    ):
        raise UsageError(
            f"positives_cap must be an int >= 0 or None, got {positives_cap!r}."
        )


def _normalize_views(features) -> tf.Tensor:
    """Casts to float32, adds a views axis to 2-d input and L2-normalises."""
    features = tf.convert_to_tensor(features)
    if not features.dtype.is_floating:
        raise UsageError(
            f"features must be a float tensor, got dtype {features.dtype.name}."
        )
    if features.shape.rank == 2:
        features = features[:, None, :]
    elif features.shape.rank != 3:
        raise UsageError(
            "features must have shape [batch_size, num_views, dim] or "
            f"[batch_size, dim], got shape {features.shape}."
        )
    features = tf.cast(features, tf.float32)
    return tf.math.l2_normalize(features, axis=-1)


def _standardize_labels(labels) -> tuple[tf.Tensor, bool]:
    """Returns `[batch_size]` ids or `[batch_size, num_classes]` multi-hot.

    The flag is True for multi-hot labels. Integer ids keep their dtype.
    """
    labels = tf.convert_to_tensor(labels)
    shape = labels.shape
    if shape.rank == 1:
        return labels, False
    if shape.rank == 2 and shape[1] == 1:
        return labels[:, 0], False
    if shape.rank == 2 and shape[1] is not None and shape[1] > 1:
        return labels, True
    raise UsageError(
        "labels must have shape [batch_size], [batch_size, 1] or "
        f"[batch_size, num_classes], got shape {shape}."
    )


def _find_sync_replica_context() -> tf.distribute.ReplicaContext | None:
    """Returns the replica context to gather over, or None on one replica."""
    if not tf.distribute.has_strategy():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def _replica_sizes(context, local_size: tf.Tensor) -> tuple:
    """Returns this replica's offset in the global batch and its size.

    The offset is the sum of the local batch sizes of the replicas with a
    smaller `replica_id_in_sync_group`, so unequal local batches are placed
    correctly.
    """
    replica_ids = tf.range(context.num_replicas_in_sync)
    this_replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    mine = tf.cast(tf.equal(replica_ids, this_replica), tf.int32)
    sizes = context.all_reduce("SUM", mine * local_size)
    offset = tf.reduce_sum(tf.where(replica_ids < this_replica, sizes, 0))
    return offset, tf.reduce_sum(sizes)


def _all_gather(context, value: tf.Tensor, offset, global_size) -> tf.Tensor:
    """Concatenates every replica's `value` along axis 0, in replica order.

    Each replica zero-pads its slice to the global size at its offset and
    the replicas sum the results. `ReplicaContext.all_gather` would move
    half the bytes, but under MultiWorkerMirroredStrategy inside a
    `tf.function` (TensorFlow 2.21) it fails with "destinations can not be
    empty". The gradient of the sum is summed over the replicas, and the
    padding's gradient slices out this replica's part, as required.
    """
    local_size = tf.shape(value)[0]
    after = global_size - offset - local_size
    paddings = tf.concat(
        [[[offset, after]], tf.zeros([tf.rank(value) - 1, 2], tf.int32)],
        axis=0,
    )
    return context.all_reduce("SUM", tf.pad(value, paddings))


def _gather_global_batch(features, labels, cross_replica: bool):
    """Returns global features, global labels and this replica's offset.

    On one replica, or with `cross_replica=False`, the local batch is the
    global batch and the offset is 0.
    """
    context = _find_sync_replica_context() if cross_replica else None
    if context is None:
        return features, labels, tf.constant(0, tf.int32)
    offset, global_size = _replica_sizes(context, tf.shape(features)[0])
    features = _all_gather(context, features, offset, global_size)
    if labels is not None:
        labels = _all_gather(context, labels, offset, global_size)
    return features, labels, offset


def _build_label_mask(labels, global_labels, is_multi_hot: bool) -> tf.Tensor:
    """Returns the `[local_batch, global_batch]` shared-label mask."""
    if is_multi_hot:
        local_hot = tf.cast(tf.not_equal(labels, 0), tf.float32)
        global_hot = tf.cast(tf.not_equal(global_labels, 0), tf.float32)
        shared = tf.matmul(local_hot, global_hot, transpose_b=True)
        return shared > 0
    return tf.equal(labels[:, None], global_labels[None, :])


def _convert_positive_mask(positive_mask, features) -> tf.Tensor:
    positive_mask = tf.convert_to_tensor(positive_mask)
    if positive_mask.shape.rank != 2:
        raise UsageError(
            "positive_mask must have shape [local_batch, global_batch], "
            f"got shape {positive_mask.shape}."
        )
    local_size = features.shape[0]
    if local_size is not None and positive_mask.shape[0] not in (
        None,
        local_size,
    ):
        raise UsageError(
            f"positive_mask has shape {positive_mask.shape}, but features "
            f"have batch size {local_size}."
        )
    return tf.cast(positive_mask, tf.bool)


def _index_anchor_rows(local_size, num_views, contrast_mode: str):
    """Returns the local sample and the view of every anchor row."""
    if contrast_mode == "all":
        samples = tf.repeat(tf.range(local_size), num_views)
        views = tf.tile(tf.range(num_views), [local_size])
        return samples, views
    samples = tf.range(local_size)
    return samples, tf.zeros_like(samples)


def _build_row_masks(
    sample_mask, offset, num_views, contrast_mode, positives_cap
):
    """Expands a sample mask to `[anchors, global_rows]` row masks.

    Returns:
        `(self_mask, positives, negatives)`, bool. Positives are the anchor's
        other views plus the labelled rows, capped in global row order.
        Labelled rows dropped by the cap are neither positive nor negative.
    """
    global_size = tf.shape(sample_mask)[1]
    anchor_samples, anchor_views = _index_anchor_rows(
        tf.shape(sample_mask)[0], num_views, contrast_mode
    )
    column_samples = tf.repeat(tf.range(global_size), num_views)
    column_views = tf.tile(tf.range(num_views), [global_size])

    same_sample = tf.equal(
        (anchor_samples + offset)[:, None], column_samples[None, :]
    )
    self_mask = same_sample & tf.equal(
        anchor_views[:, None], column_views[None, :]
    )
    labelled = tf.repeat(
        tf.gather(sample_mask, anchor_samples), num_views, axis=1
    )

    other_positives = labelled & ~same_sample
    negatives = ~labelled & ~same_sample
    if positives_cap is not None:
        rank = tf.cumsum(tf.cast(other_positives, tf.int32), axis=1)
        other_positives &= rank <= positives_cap
    positives = other_positives | (same_sample & ~self_mask)
    return self_mask, positives, negatives


def _masked_logsumexp(values, mask):
    """Computes each row's log-sum-exp over the entries where `mask` is True.

    Returns:
        `(logsumexp, nonempty)`, both `[rows, 1]`. Rows with no True entry
        get 0, so no -inf or NaN reaches the forward value or the gradient.
    """
    nonempty = tf.reduce_any(mask, axis=1, keepdims=True)
    row_max = tf.reduce_max(
        tf.where(mask, values, -float("inf")), axis=1, keepdims=True
    )
    row_max = tf.stop_gradient(tf.where(nonempty, row_max, 0.0))
    shifted = tf.where(mask, values - row_max, -float("inf"))
    total = tf.reduce_sum(tf.exp(shifted), axis=1, keepdims=True)
    total = tf.where(nonempty, total, 1.0)
    return tf.math.log(total) + row_max, nonempty


def _compute_log_probabilities(logits, self_mask, negatives, denominator: str):
    """Returns `log(exp(s_ip) / D_ip)` for every pair and a defined flag.

    The flag, `[anchors]` bool, is False where `D_ip` is empty, which only
    happens for "only_negatives" when an anchor has no negative.
    """
    defined = tf.ones([tf.shape(logits)[0]], tf.bool)
    if denominator == "all":
        log_denominator, _ = _masked_logsumexp(logits, ~self_mask)
        return logits - log_denominator, defined
    log_negatives, has_negatives = _masked_logsumexp(logits, negatives)
    if denominator == "one_positive":
        # log(e^s / (e^s + e^L)) = -softplus(L - s), stable for any s and L.
        log_prob = -tf.nn.softplus(log_negatives - logits)
        return tf.where(has_negatives, log_prob, 0.0), defined
    return logits - log_negatives, has_negatives[:, 0]


def _compute_anchor_losses(log_prob, positives, summation: str):
    """Returns the per-anchor loss `[anchors]` and whether it has positives."""
    num_positives = tf.reduce_sum(tf.cast(positives, tf.float32), axis=1)
    safe_count = tf.maximum(num_positives, 1.0)
    if summation == "outside":
        total = tf.reduce_sum(tf.where(positives, log_prob, 0.0), axis=1)
        losses = -total / safe_count
    else:
        log_total, _ = _masked_logsumexp(log_prob, positives)
        losses = tf.math.log(safe_count) - log_total[:, 0]
    return losses, num_positives > 0


def _compute_contrast_logits(
    features, global_features, contrast_mode, temperature
):
    """Returns `[anchors, global_rows]` cosine similarities / temperature."""
    dim = tf.shape(features)[-1]
    anchors = features if contrast_mode == "all" else features[:, :1]
    anchors = tf.reshape(anchors, [-1, dim])
    contrast = tf.reshape(global_features, [-1, dim])
    return tf.matmul(anchors, contrast, transpose_b=True) / temperature


def supcon_loss(
    features,
    labels=None,
    *,
    temperature: float,
    base_temperature: float | None = None,
    summation: str = "outside",
    contrast_mode: str = "all",
    denominator: str = "all",
    positives_cap: int | None = None,
    positive_mask=None,
    cross_replica: bool = True,
) -> tf.Tensor:
    """Computes the per-sample SupCon loss (eq. 2 of arXiv 2004.11362).

    The module docstring gives the equations. All math runs in float32
    whatever the features' dtype, and only `[anchors, global_rows]` buffers
    are built, never a `[rows, rows, dim]` one.

    Args:
        features: `[batch_size, num_views, dim]` or `[batch_size, dim]` (one
            view), any float dtype. Each vector is L2-normalised, so its
            scale does not change the loss.
        labels: `[batch_size]` or `[batch_size, 1]` class ids, compared in
            their own dtype, or `[batch_size, num_classes]` one-hot or
            multi-hot labels, where samples sharing any class are positives.
            None, with no `positive_mask`, gives SimCLR: every sample is its
            own class.
        temperature: Divides the cosine similarities.
        base_temperature: When set, the loss is multiplied by
            `temperature / base_temperature` (the PyTorch SupContrast
            convention). None leaves eq. 2 unscaled.
        summation: "outside" (eq. 2) or "inside" (eq. 3).
        contrast_mode: "all" makes every view an anchor. "one" makes only
            view 0 of each sample an anchor, while all rows are contrasted.
        denominator: "all", "one_positive" or "only_negatives".
        positives_cap: Keeps at most this many positives besides the
            anchor's own views (always kept), the first in global row order.
            None keeps all.
        positive_mask: Sample-level positives instead of `labels`, bool or
            0/1, `[batch_size, batch_size]` on one replica. Across replicas
            pass this replica's rows of the global mask,
            `[local_batch_size, global_batch_size]`. A sample's own other
            views are positives whatever the diagonal holds.
        cross_replica: Gather the global batch inside a replica context with
            more than one replica. False keeps each replica's loss local.

    Returns:
        `[batch_size]` float32: the mean loss over each sample's anchor
        views. Across replicas, sum it over the local samples and divide by
        the global batch size; see the module docstring.

    Raises:
        UsageError: (a ValueError) on an invalid option, both `labels` and
            `positive_mask` given, or a tensor of the wrong shape.
    """
    _check_options(
        temperature,
        base_temperature,
        summation,
        contrast_mode,
        denominator,
        positives_cap,
    )
    if labels is not None and positive_mask is not None:
        raise UsageError(
            "Got both labels and positive_mask. Pass only one of them."
        )
    features = _normalize_views(features)
    local_size, num_views = tf.shape(features)[0], tf.shape(features)[1]
    is_multi_hot = False
    if labels is not None:
        labels, is_multi_hot = _standardize_labels(labels)

    global_features, global_labels, offset = _gather_global_batch(
        features, labels, cross_replica
    )
    if positive_mask is not None:
        sample_mask = _convert_positive_mask(positive_mask, features)
    elif labels is not None:
        sample_mask = _build_label_mask(labels, global_labels, is_multi_hot)
    else:
        sample_mask = tf.zeros([local_size, tf.shape(global_features)[0]], bool)
    self_mask, positives, negatives = _build_row_masks(
        sample_mask, offset, num_views, contrast_mode, positives_cap
    )

    logits = _compute_contrast_logits(
        features, global_features, contrast_mode, temperature
    )
    log_prob, defined = _compute_log_probabilities(
        logits, self_mask, negatives, denominator
    )
    losses, has_positives = _compute_anchor_losses(
        log_prob, positives, summation
    )
    losses = tf.where(has_positives & defined, losses, 0.0)
    if base_temperature is not None:
        losses *= temperature / base_temperature
    return tf.reduce_mean(tf.reshape(losses, [local_size, -1]), axis=1)


def _standardize_class_ids(labels) -> tf.Tensor:
    labels, is_multi_hot = _standardize_labels(labels)
    if is_multi_hot:
        raise UsageError(
            "N-pairs labels must have shape [batch_size] or [batch_size, 1], "
            f"got shape {labels.shape}."
        )
    return labels


def _npairs_cross_entropy(labels, global_labels, logits) -> tf.Tensor:
    """Returns `[rows]`: cross-entropy of logits rows against label targets."""
    targets = tf.cast(
        tf.equal(labels[:, None], global_labels[None, :]), "float32"
    )
    targets /= tf.reduce_sum(targets, axis=1, keepdims=True)
    return tf.nn.softmax_cross_entropy_with_logits(
        labels=targets, logits=logits
    )


def npairs_loss(labels, logits) -> tf.Tensor:
    """Computes TensorFlow Addons' N-pairs loss in float32.

    Args:
        labels: `[batch_size]` or `[batch_size, 1]` class ids.
        logits: `[batch_size, batch_size]` similarity logits, any float dtype.

    Returns:
        Scalar float32: the mean over rows of the softmax cross-entropy of
        each logits row against its row of the normalised label-equality
        matrix (diagonal included).
    """
    labels = _standardize_class_ids(labels)
    logits = tf.cast(logits, tf.float32)
    return tf.reduce_mean(_npairs_cross_entropy(labels, labels, logits))


def npairs_feature_loss(
    features, labels, *, temperature: float, cross_replica: bool = True
) -> tf.Tensor:
    """Computes the keras.io SupCon example objective per sample.

    Logits are cosine similarities divided by `temperature`, and each row is
    scored with the N-pairs cross-entropy. On one device the mean of the
    result equals `npairs_loss(labels, logits)`. Across replicas the rows
    are this replica's samples and the columns the gathered global batch.

    Args:
        features: `[batch_size, dim]` or `[batch_size, 1, dim]`, any float
            dtype. L2-normalised inside.
        labels: `[batch_size]` or `[batch_size, 1]` class ids.
        temperature: Divides the cosine similarities.
        cross_replica: Gather the global batch inside a replica context with
            more than one replica.

    Returns:
        `[batch_size]` float32 per-sample loss.
    """
    _check_options(temperature)
    features = _normalize_views(features)
    if features.shape[1] not in (None, 1):
        raise UsageError(
            "npairs_feature_loss takes one view, [batch_size, dim] or "
            f"[batch_size, 1, dim], got {features.shape[1]} views."
        )
    features = features[:, 0, :]
    labels = _standardize_class_ids(labels)
    global_features, global_labels, _ = _gather_global_batch(
        features, labels, cross_replica
    )
    logits = tf.matmul(features, global_features, transpose_b=True)
    return _npairs_cross_entropy(labels, global_labels, logits / temperature)


class SupConLoss(keras.losses.Loss):
    """`supcon_loss` as a Keras loss: `y_true` labels, `y_pred` features.

    The constructor takes `temperature`, Keras's `reduction` and `name`, and
    the keyword options of `supcon_loss` other than `positive_mask`.

    `call` returns the per-sample loss, and Keras's `reduction` then
    applies. Inside a distribution strategy the mean reductions
    ("sum_over_batch_size", the default, and "mean") also divide by the
    number of replicas (Keras 3.15), so custom training loops should call
    `supcon_loss` and divide by the global batch size themselves.

    NOTE: In Keras 3.15, `keras.losses.Loss.__call__` converts `y_true` to
    the loss dtype (float32 by default), which keeps integer class ids exact
    only below 2**24. It also rejects `y_true=None`, so pass
    `tf.range(batch_size)` as `y_true` for SimCLR.
    """

    def __init__(
        self,
        temperature: float,
        *,
        reduction: str = "sum_over_batch_size",
        name: str = "supcon_loss",
        **options,
    ):
        super().__init__(name=name, reduction=reduction)
        _check_options(temperature, **options)
        self.options = {"temperature": temperature, **options}

    def call(self, y_true, y_pred):
        return supcon_loss(y_pred, y_true, **self.options)

    def get_config(self) -> dict:
        return {**super().get_config(), **self.options}


class NPairsLoss(keras.losses.Loss):
    """`npairs_feature_loss` as a Keras loss: `y_true` ids, `y_pred` features.

    `call` returns the per-sample loss, and Keras's `reduction` then applies.
    Inside a distribution strategy its default reduction also divides by the
    number of replicas, so custom training loops should call
    `npairs_feature_loss` and divide by the global batch size themselves.
    """

    def __init__(
        self,
        temperature: float,
        *,
        cross_replica: bool = True,
        reduction: str = "sum_over_batch_size",
        name: str = "npairs_loss",
    ):
        super().__init__(name=name, reduction=reduction)
        _check_options(temperature)
        self.temperature = temperature
        self.cross_replica = cross_replica

    def call(self, y_true, y_pred):
        return npairs_feature_loss(
            y_pred,
            y_true,
            temperature=self.temperature,
            cross_replica=self.cross_replica,
        )

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "temperature": self.temperature,
            "cross_replica": self.cross_replica,
        }
