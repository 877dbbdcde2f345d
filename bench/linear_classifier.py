"""What the linear protocol costs: the features of an encoder on a data set, then the linear
classifier of record (simclr_tf.linear: L-BFGS logistic regression, the l2 grid walked with warm
starts, refit on train + validation), timed apart, with one or two BLAS/OpenMP threads.

    python bench/linear_classifier.py --model=/tmp/simclr_study/simclr \\
        --dataset=/tmp/transfer/cifar100 --l2_values=45 --threads=1,2

Prints one JSON line per thread count: feature seconds (once), fit seconds, accuracies, the chosen
l2, and the fits' iterations.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True)
    parser.add_argument('--dataset', required=True, help='an image folder with train/ and test/')
    parser.add_argument('--l2_values', type=int, default=45)
    parser.add_argument('--threads', default='1,2')
    args = parser.parse_args()
    from simclr_tf import logs
    logs.setup()
    from simclr_tf import features, linear
    encoder = features.load(args.model)
    config = features.data_config(encoder, args.dataset, crop_proportion=1.0)
    t0 = time.time()
    train, train_y = features.extract(encoder, config, 'train')
    test, test_y = features.extract(encoder, config, 'test')
    feature_seconds = time.time() - t0
    x, xt = train[features.H], test[features.H]
    fit, held = linear.validation_split(train_y)
    grid = tuple(float(v) for v in np.logspace(-6, 5, args.l2_values))
    classes = int(train_y.max()) + 1
    for threads in (int(t) for t in args.threads.split(',')):
        linear.THREADS = threads
        t0 = time.time()
        result = linear.evaluate((x[fit], train_y[fit]), (x[held], train_y[held]),
                                 (xt, test_y), classes, grid)
        print(json.dumps({'model': args.model, 'dataset': args.dataset, 'threads': threads,
                          'train': len(train_y), 'test': len(test_y), 'dim': int(x.shape[1]),
                          'classes': classes, 'grid': len(grid),
                          'feature_seconds': round(feature_seconds, 1),
                          'fit_seconds': round(time.time() - t0, 1),
                          'top_1': result['top_1_accuracy'],
                          'mean_per_class': result['mean_per_class_accuracy'],
                          'l2': result['l2']}), flush=True)


if __name__ == '__main__':
    main()
