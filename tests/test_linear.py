"""The linear classifier of record (simclr_tf.linear) against a NumPy/SciPy reference."""

import numpy as np
import pytest
import scipy.optimize

from simclr_tf import linear


def problem(n: int, classes: int, dim: int, seed: int, spread: float = 1.0):
    """Overlapping Gaussian classes (not separable: λ matters) at an arbitrary scale and offset."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, [classes, dim])
    y = rng.integers(0, classes, n)
    x = (centres[y] + rng.normal(0, spread, [n, dim])) * rng.uniform(0.5, 20, dim) + 7.0
    return x.astype(np.float32), y


def reference_fit(x: np.ndarray, y: np.ndarray, l2: float, classes: int) -> np.ndarray:
    """argmin over (W, b) of mean cross-entropy + (λ/2)·||W||² on standardised x, by SciPy's
    L-BFGS-B with the analytic gradient: [dim + 1, classes] (last row the bias)."""
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n, dim = z.shape
    onehot = np.eye(classes)[y]

    def loss(theta):
        w, b = theta[:dim * classes].reshape(dim, classes), theta[dim * classes:]
        logits = z @ w + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        ce = -np.mean(np.sum(onehot * np.log(p + 1e-300), 1))
        grad_logits = (p - onehot) / n
        grad_w = z.T @ grad_logits + l2 * w
        return ce + 0.5 * l2 * np.sum(w * w), np.concatenate([grad_w.ravel(),
                                                                grad_logits.sum(0)])

    result = scipy.optimize.minimize(loss, np.zeros(dim * classes + classes), jac=True,
                                     method='L-BFGS-B', options=dict(maxiter=5000, gtol=1e-10))
    return np.vstack([result.x[:dim * classes].reshape(dim, classes), result.x[dim * classes:]])


def reference_predict(theta: np.ndarray, train_x: np.ndarray, x: np.ndarray) -> np.ndarray:
    z = (x - train_x.mean(0)) / (train_x.std(0) + 1e-6)
    return np.argmax(z @ theta[:-1] + theta[-1], 1)


@pytest.mark.parametrize('l2', [1e-3, 0.1])
def test_fit_minimises_mean_cross_entropy_plus_half_l2_norm(l2):
    x, y = problem(300, 4, 6, seed=0)
    theta = reference_fit(x, y, l2, 4)
    fitted = linear.fit(x, y, l2)
    # The softmax is unchanged by adding one vector to every class: compare centred weights.
    ours = np.vstack([fitted.model.coef_.T, fitted.model.intercept_])
    centre = lambda t: t - t.mean(1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(centre(ours), centre(theta), atol=2e-3 * max(1, np.abs(theta).max()))
    test_x, _ = problem(200, 4, 6, seed=1)
    np.testing.assert_array_equal(fitted.predict(test_x), reference_predict(theta, x, test_x))


def test_l2_is_chosen_where_the_reference_scores_best_on_validation():
    x, y = problem(240, 3, 40, seed=2, spread=2.5)  # few examples, many features: overfits
    val_x, val_y = problem(300, 3, 40, seed=3, spread=2.5)
    grid = (1e-4, 1e-2, 1.0, 100.0)
    chosen, scores = linear.choose_l2(x, y, val_x, val_y, 3, grid)
    reference = {l2: np.mean(reference_predict(reference_fit(x, y, l2, 3), x, val_x) == val_y)
                 for l2 in grid}
    for l2 in grid:
        assert abs(scores[l2]['top_1_accuracy'] - reference[l2]) <= 2 / 300, (l2, scores, reference)
    assert reference[chosen] >= max(reference.values()) - 2 / 300
    assert len(set(reference.values())) > 1  # λ mattered: the choice was tested


def test_protocol_refits_on_train_and_validation_and_separates_what_is_separable():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 60)
    x = (np.eye(16)[y] * 3 + rng.normal(0, 0.3, [300, 16])).astype(np.float32)
    fit, held = linear.validation_split(y)
    result = linear.evaluate((x[fit], y[fit]), (x[held], y[held]), (x, y), 5,
                             grid=(1e-4, 1e-2, 1.0))
    assert result['top_1_accuracy'] == 1.0 and result['mean_per_class_accuracy'] == 1.0
    assert result['l2'] in (1e-4, 1e-2, 1.0) and result['grid_size'] == 3
    shuffled = rng.permutation(y)
    chance = linear.evaluate((x[fit], shuffled[fit]), (x[held], shuffled[held]), (x, y), 5,
                             grid=(1e-2, 1.0))
    assert chance['top_1_accuracy'] < 0.45  # chance is 0.2


def test_mean_per_class_accuracy_equals_numpy():
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.zeros(90), np.ones(10), np.full(30, 3)]).astype(int)  # no class 2
    predicted = np.where(rng.uniform(size=len(labels)) < 0.7, labels, rng.integers(0, 4, 130))
    got = linear.accuracies(labels, predicted, 4)
    per_class = [np.sum((labels == c) & (predicted == c)) / np.sum(labels == c) for c in (0, 1, 3)]
    assert got['mean_per_class_accuracy'] == pytest.approx(np.mean(per_class))
    assert got['top_1_accuracy'] == pytest.approx(np.mean(labels == predicted))
    assert got['mean_per_class_accuracy'] != pytest.approx(got['top_1_accuracy'])


def test_validation_split_holds_out_each_class_share_deterministically():
    labels = np.repeat(np.arange(4), [50, 50, 50, 10])[np.random.default_rng(0).permutation(160)]
    fit, held = linear.validation_split(labels, 0.2)
    assert not set(fit) & set(held) and len(fit) + len(held) == 160
    np.testing.assert_array_equal(np.bincount(labels[held], minlength=4), [10, 10, 10, 2])
    np.testing.assert_array_equal(held, linear.validation_split(labels, 0.2)[1])
    assert not np.array_equal(held, linear.validation_split(labels, 0.2, seed=1)[1])
    single = linear.validation_split(np.array([0, 1, 1, 1]), 0.2)[1]  # a class of one stays
    assert list(single) != [0] and len(single) == 1
