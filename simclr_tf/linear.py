"""The linear classifier of record on frozen features: the paper's transfer protocol.

ℓ2-regularised multinomial logistic regression, optimised with L-BFGS (scikit-learn's
`LogisticRegression`, the implementation the field uses for this), no augmentation. The
objective is the mean cross-entropy plus (λ/2)·||W||² (bias not regularised), i.e.
scikit-learn's C = 1 / (λ·n). λ is chosen on a validation split from a log-spaced grid (the
paper's: 45 values from 1e-6 to 1e5), fitted from the strongest to the weakest with warm starts
(each fit starts from the previous solution), then the classifier is refitted on train +
validation with the chosen λ and tested. Features are standardised with the fitting set's mean
and standard deviation, so one grid serves features of any scale (h, z, raw pixels).

Used by the probe (`simclr_tf.probe`, where the validation split is a held-out part of the train
features) and by the transfer command (`simclr_tf.transfer`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import numpy as np

PAPER_GRID = tuple(float(v) for v in np.logspace(-6, 5, 45))
VALIDATION_FRACTION = 0.2  # of each class of train, held out where a data set has no validation
# (the data sources' HELD_OUT)
MAX_ITER = 1000
# BLAS/OpenMP threads of a fit: the loss and gradient of these sizes gain little from a second
# core, and threads that spin while another process holds the cores slow L-BFGS tenfold
# (bench/linear_classifier.py measures both).
THREADS = 1


def accuracies(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, float]:
    """Top-1, and mean per-class accuracy (the mean over the classes present in `labels` of the
    share of each class predicted right: the paper's metric for Aircraft, Pets, Caltech-101 and
    Flowers)."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    present = [c for c in range(num_classes) if np.any(labels == c)]
    per_class = [np.mean(predicted[labels == c] == c) for c in present]
    return {'top_1_accuracy': float(np.mean(predicted == labels)) if len(labels) else 0.0,
            'mean_per_class_accuracy': float(np.mean(per_class)) if per_class else 0.0}


def validation_split(labels: np.ndarray, fraction: float = VALIDATION_FRACTION, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) indices: `fraction` of every class held out, deterministically; the
    same draw as the `<split>[validation]` of a data source."""
    from simclr_tf.sources import held_out
    return held_out(labels, fraction, seed)


@dataclasses.dataclass
class Classifier:
    """A fitted classifier with the standardisation of the data it was fitted on."""
    model: object  # sklearn LogisticRegression
    mean: np.ndarray
    scale: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict((x - self.mean) / self.scale)


def _standardise(x: np.ndarray, mean: Optional[np.ndarray] = None,
                 scale: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x standardised as float64, mean, scale); by x's own statistics unless given."""
    if mean is None:
        mean, scale = x.mean(0), x.std(0) + 1e-6
    return (np.asarray(x, np.float64) - mean) / scale, mean, scale


def _fit(model, x: np.ndarray, y: np.ndarray, l2: float):
    """model (warm-started from its last solution, if any) fitted at λ = l2 on standardised x."""
    from threadpoolctl import threadpool_limits
    model.set_params(C=1.0 / (l2 * len(x)))
    with warnings.catch_warnings(), threadpool_limits(THREADS):
        # Weakly regularised fits may stop at max_iter; their validation score says enough.
        warnings.simplefilter('ignore')
        return model.fit(x, y)


def _new_model():
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(solver='lbfgs', max_iter=MAX_ITER, tol=1e-4, warm_start=True)


def fit(x: np.ndarray, y: np.ndarray, l2: float) -> Classifier:
    """One fit at λ = l2, standardised by x's statistics."""
    z, mean, scale = _standardise(x)
    return Classifier(_fit(_new_model(), z, y, l2), mean, scale)


def choose_l2(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
              num_classes: int, grid: tuple[float, ...] = PAPER_GRID,
              metric: str = 'top_1_accuracy') -> tuple[float, dict[float, dict[str, float]]]:
    """(the best λ on validation by `metric`, {λ: validation accuracies}); the grid is walked from
    the strongest λ down, each fit warm-started from the one before. Ties go to the stronger λ."""
    z, mean, scale = _standardise(train_x)
    val_z = _standardise(val_x, mean, scale)[0]
    model, scores = _new_model(), {}
    for l2 in sorted(grid, reverse=True):
        scores[l2] = accuracies(val_y, _fit(model, z, train_y, l2).predict(val_z), num_classes)
    best = max(scores, key=lambda l2: (scores[l2][metric], l2))
    return best, scores


def evaluate(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
             test: tuple[np.ndarray, np.ndarray], num_classes: int,
             grid: tuple[float, ...] = PAPER_GRID, metric: str = 'top_1_accuracy'
             ) -> dict:
    """The protocol: λ chosen on `val`, refitted on train + val, tested on `test`. Returns test
    top-1 and mean per-class accuracy, the chosen λ, its validation score, the grid's size."""
    l2, scores = choose_l2(*train, *val, num_classes, grid, metric)
    both_x, both_y = np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]])
    final = fit(both_x, both_y, l2)
    return {**accuracies(test[1], final.predict(test[0]), num_classes), 'l2': l2,
            'validation': scores[l2], 'grid_size': len(grid),
            'validation_curve': {f'{k:.3g}': v[metric] for k, v in sorted(scores.items())}}
