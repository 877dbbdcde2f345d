"""The contrastive objectives (paper §2.1, Table 2) and the supervised loss.

Every contrastive loss takes z = g(h) for one replica's batch, laid out [first views; second
views] ([2n, d]). The keys (the other examples each view is contrasted with) are gathered over all
replicas, so the negatives are the 2(N-1) other views of the *global* batch of N examples, while
each replica computes the loss only for its own n anchors. Averaging the per-replica losses
(which is what summing per-replica gradients of loss / num_replicas does) gives exactly the loss
on the global batch.

Each loss returns (loss, logits_ab, labels) like the authors' `add_contrastive_loss`:
logits_ab [n, N] are the first views' scores against all second views and labels [n, 2N] is one
hot at each anchor's positive, so `contrastive_metrics` applies to every loss.
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf.config import Config

LARGE_NUM = 1e9  # subtracted from a view's similarity with itself, so it is never a candidate


def cross_replica_concat(x: tf.Tensor) -> tf.Tensor:
    """Concatenates x over all replicas along axis 0, in replica order.

    Identity outside a multi-replica replica context. The gradient flows back to each replica's
    own rows: `ReplicaContext.all_gather` sums the upstream gradient over replicas and slices out
    the caller's part.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return x
    return ctx.all_gather(x, axis=0)


def _replica_id() -> tf.Tensor:
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return tf.constant(0, tf.int32)
    # A Python int on Mirrored/MultiWorker, a uint32 tensor on TPU.
    return tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def _similarities(z: tf.Tensor, hidden_norm: bool):
    """This replica's anchors against the gathered keys.

    Returns (s_ab, s_aa, s_ba, s_bb, labels, self_mask): s_xy[i, k] = <x_i, y_k> for this
    replica's view-x anchors and all N view-y keys; labels [n, 2N] one-hot at the positive
    (column replica_id * n + i of the first block); self_mask [n, N] one-hot at the anchor itself.
    """
    z = tf.cast(z, tf.float32)  # the loss is always computed in float32 (mixed precision)
    if hidden_norm:
        z = tf.math.l2_normalize(z, -1)
    h1, h2 = tf.split(z, 2, 0)
    n = tf.shape(h1)[0]
    # One collective for both views: gather [n, 2d] and split again.
    h1_all, h2_all = tf.split(cross_replica_concat(tf.concat([h1, h2], 1)), 2, 1)
    n_global = tf.shape(h1_all)[0]

    index = tf.range(n) + _replica_id() * n
    labels = tf.one_hot(index, 2 * n_global)
    self_mask = tf.one_hot(index, n_global)

    s_ab = tf.matmul(h1, h2_all, transpose_b=True)
    s_aa = tf.matmul(h1, h1_all, transpose_b=True)
    s_ba = tf.matmul(h2, h1_all, transpose_b=True)
    s_bb = tf.matmul(h2, h2_all, transpose_b=True)
    return s_ab, s_aa, s_ba, s_bb, labels, self_mask


def nt_xent(z: tf.Tensor, temperature: float, hidden_norm: bool = True):
    """NT-Xent, the normalised temperature-scaled cross-entropy (paper eq. 1).

    For anchor x_i of the first view, the candidates are the N second views (logits_ab, the
    positive among them) and the other N-1 first views (logits_aa, itself masked out); and
    symmetrically for the second view. The returned loss is mean over this replica's n examples of
    l(i, j) + l(j, i), i.e. 2x the paper's L (which averages the two directions). This is the
    authors' code, with which the published learning rates and temperatures were tuned.

    Returns (loss, logits_ab [n, N], labels [n, 2N]).
    """
    s_ab, s_aa, s_ba, s_bb, labels, self_mask = _similarities(z, hidden_norm)
    logits_ab = s_ab / temperature
    logits_ba = s_ba / temperature
    logits_aa = s_aa / temperature - self_mask * LARGE_NUM
    logits_bb = s_bb / temperature - self_mask * LARGE_NUM

    loss_a = tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([logits_ab, logits_aa], 1))
    loss_b = tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([logits_ba, logits_bb], 1))
    return tf.reduce_mean(loss_a + loss_b), logits_ab, labels


def _directions(s_ab, s_aa, s_ba, s_bb, labels, self_mask):
    """Per direction: the candidate scores [n, 2N], the positive score [n], the negatives' mask.

    The negatives are NT-Xent's: all 2N candidates but the positive and the anchor itself.
    """
    negatives = 1.0 - labels - tf.concat([tf.zeros_like(self_mask), self_mask], 1)
    for s_cross, s_same in ((s_ab, s_aa), (s_ba, s_bb)):
        scores = tf.concat([s_cross, s_same], 1)
        positive = tf.reduce_sum(scores * labels, 1)
        yield scores, positive, negatives


def nt_logistic(z: tf.Tensor, temperature: float, hidden_norm: bool = True):
    """NT-Logistic (Table 2): per anchor u with positive v+ and negatives v-,

        -log sigmoid(u.v+ / T) - mean over v- of log sigmoid(-u.v- / T).

    Balancing: the 2(N-1) negative terms are averaged, so positives and negatives carry equal
    total weight (summing them would let the negatives outweigh the one positive 2(N-1) to 1
    and the loss collapse to "push everything apart"). Negatives, the two directions and the
    reduction are as `nt_xent` (loss = mean over examples of the a and b direction terms).

    Returns (loss, logits_ab = s_ab / T, labels).
    """
    sims = _similarities(z, hidden_norm)
    labels = sims[4]
    loss = 0.0
    for scores, positive, negatives in _directions(*sims):
        negative_term = tf.reduce_sum(negatives * tf.math.log_sigmoid(-scores / temperature), 1)
        loss += (-tf.math.log_sigmoid(positive / temperature)
                 - negative_term / tf.reduce_sum(negatives, 1))
    return tf.reduce_mean(loss), sims[0] / temperature, labels


def margin_triplet(z: tf.Tensor, margin: float, hidden_norm: bool = True,
                   semi_hard: bool = False):
    """Margin triplet (Table 2): per anchor, mean over negatives of max(s- - s+ + m, 0).

    s are plain dot products (cosine similarities with hidden_norm), no temperature.
    semi_hard: FaceNet's semi-hard negatives (d+ < d- < d+ + m) in similarities, i.e. the
    negatives with s+ - m < s- < s+: closer than the margin but not closer than the positive.
    An anchor with no such negative falls back to all its negatives. Negatives, directions and
    reduction are as `nt_xent`.

    Returns (loss, logits_ab = s_ab, labels).
    """
    sims = _similarities(z, hidden_norm)
    labels = sims[4]
    loss = 0.0
    for scores, positive, negatives in _directions(*sims):
        positive = positive[:, None]
        hinge = tf.nn.relu(scores - positive + margin)
        if semi_hard:
            window = tf.cast((scores > positive - margin) & (scores < positive), tf.float32)
            selected = tf.stop_gradient(negatives * window)
            has_any = tf.reduce_sum(selected, 1, keepdims=True) > 0
            negatives = tf.where(has_any, selected, negatives)
        loss += tf.reduce_sum(negatives * hinge, 1) / tf.reduce_sum(negatives, 1)
    return tf.reduce_mean(loss), sims[0], labels


def contrastive_loss(z: tf.Tensor, config: Config):
    """The contrastive loss chosen by config.contrastive_loss; returns (loss, logits_ab, labels)."""
    if config.contrastive_loss == 'nt_xent':
        return nt_xent(z, config.temperature, config.hidden_norm)
    if config.contrastive_loss == 'nt_logistic':
        return nt_logistic(z, config.temperature, config.hidden_norm)
    if config.contrastive_loss == 'margin_triplet':
        return margin_triplet(z, config.margin, config.hidden_norm, config.semi_hard)
    raise ValueError(f'unknown contrastive_loss {config.contrastive_loss!r}')


def contrastive_metrics(logits_ab: tf.Tensor, labels: tf.Tensor):
    """The authors' contrast_acc and contrast_entropy for one replica's rows.

    accuracy: how often the second view scoring highest against a first view is its positive;
    entropy: mean entropy of softmax(logits_ab) over the rows.
    """
    logits_ab = tf.cast(logits_ab, tf.float32)
    n_global = tf.shape(logits_ab)[1]
    correct = tf.equal(tf.argmax(labels[:, :n_global], 1), tf.argmax(logits_ab, 1))
    accuracy = tf.reduce_mean(tf.cast(correct, tf.float32))
    log_p = tf.nn.log_softmax(logits_ab, -1)
    entropy = -tf.reduce_mean(tf.reduce_sum(tf.exp(log_p) * log_p, -1))
    return accuracy, entropy


def supervised_loss(labels_onehot: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy over this replica's examples, in float32."""
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
        tf.cast(labels_onehot, tf.float32), tf.cast(logits, tf.float32)))


def distillation_loss(teacher_logits: tf.Tensor, student_logits: tf.Tensor,
                      temperature: float) -> tf.Tensor:
    """SimCLRv2's distillation loss over this replica's examples, in float32: the mean over x of
    -T^2 sum_y softmax(t(x) / T)_y log softmax(s(x) / T)_y. The teacher's side is a constant.
    T^2 is the authors' colab's (Hinton et al.: gradients of one size whatever T); at the default
    T = 1 this is the paper's loss exactly."""
    teacher = tf.stop_gradient(tf.nn.softmax(tf.cast(teacher_logits, tf.float32) / temperature))
    return temperature ** 2 * tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
        teacher, tf.cast(student_logits, tf.float32) / temperature))


def labelled_loss(labels_onehot: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(cross-entropy, accuracy) averaged over the examples of the *global* batch that have a
    label (a one-hot row; unlabelled rows are all zero), as this replica's share: averaging the
    replicas' values (as their summed gradients of value / replicas do) gives the global means.
    Both are 0 when no example of the global batch has a label."""
    labels_onehot = tf.cast(labels_onehot, tf.float32)
    known = tf.reduce_sum(labels_onehot, 1)
    ce = tf.nn.softmax_cross_entropy_with_logits(labels_onehot, tf.cast(logits, tf.float32))
    correct = tf.cast(tf.equal(tf.argmax(labels_onehot, 1), tf.argmax(logits, 1)), tf.float32)
    sums = tf.stack([tf.reduce_sum(known * ce), tf.reduce_sum(known * correct)])
    count, replicas = tf.reduce_sum(known), 1.0
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, count)
        replicas = float(ctx.num_replicas_in_sync)
    shares = sums * replicas / tf.maximum(count, 1.0)
    return shares[0], shares[1]
