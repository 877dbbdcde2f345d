"""This project's projection head against the authors' (google-research/simclr, tf2/model.py),
run side by side with the same weights: z in inference and training mode, the gradients of a loss
on z with respect to every head weight, the BN moving statistics after a training call, and the
initial distributions of a fresh head. For every mode the authors' flags allow ('linear';
'nonlinear' with 1, 2 and 3 layers).

    git clone https://github.com/google-research/simclr /tmp/simclr   # their code, not ours
    pip install -r requirements-dev.txt                                # tf-keras: their tf.keras
    python bench/authors_head.py --authors_tf2=/tmp/simclr/tf2

Their code is imported from --authors_tf2 and runs on tf-keras (Keras 2, TF_USE_LEGACY_KERAS=1);
this project's runs on Keras 3 in the same process. Exits 1 if any difference exceeds 1e-5.
"""

import argparse
import os
import sys

os.environ['TF_USE_LEGACY_KERAS'] = '1'  # before TensorFlow: their tf.keras is Keras 2
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

ROLES = ('kernel', 'gamma', 'beta', 'moving_mean', 'moving_variance')


def role(name: str) -> str:
    return next(r for r in ROLES if f'/{r}' in name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--authors_tf2', required=True, help="their repository's tf2 folder")
    args = parser.parse_args()
    sys.path.insert(0, args.authors_tf2)
    import numpy as np
    import tensorflow as tf
    from absl import flags
    for name, value in (('proj_head_mode', 'nonlinear'), ('num_proj_layers', 2),
                        ('proj_out_dim', 128), ('ft_proj_selector', 0),
                        ('batch_norm_decay', 0.9), ('global_bn', False)):
        define = {str: flags.DEFINE_string, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float, bool: flags.DEFINE_boolean}[type(value)]
        define(name, value, 'as in their run.py')
    their_flags = flags.FLAGS
    their_flags(['authors_head'])
    import model as theirs  # their tf2/model.py

    from simclr_tf import heads
    from simclr_tf.config import Config

    rng, worst = np.random.default_rng(0), 0.0
    print('mode       layers  training  max|z diff|  max|grad diff|  max|weight, BN stat diff|')
    for mode, layers in (('linear', 1), ('nonlinear', 1), ('nonlinear', 2), ('nonlinear', 3)):
        their_flags.proj_head_mode, their_flags.num_proj_layers = mode, layers
        h = tf.constant(np.maximum(rng.normal(size=(256, 128)), 0), tf.float32)  # post-ReLU
        a = theirs.ProjectionHead()
        # Their 'linear' mode returns None (list.append's result); its one layer is what it
        # computes, so that layer is called directly.
        call_a = ((lambda x, training: a.linear_layers[0](x, training)) if mode == 'linear'
                  else (lambda x, training: a(x, training=training)[0]))
        call_a(h, training=False)
        b = heads.ProjectionHead(Config(proj_head_mode=mode, num_proj_layers=layers,
                                        proj_out_dim=128))
        b(h, training=False)
        assert len(a.variables) == len(b.variables)
        pairs = []  # (theirs, ours), matched by layer index and role
        for j in range(layers):
            ours = {role(v.path): v for v in b.variables if f'_{j}/' in v.path}
            for v in (v for v in a.variables if f'_{j}/' in v.name):
                pairs.append((v, ours.pop(role(v.name))))
            assert not ours, ours
        for v, w in pairs:  # the same random weights and statistics in both
            value = rng.normal(size=v.shape).astype(np.float32) * 0.1
            if role(v.name) in ('gamma', 'moving_variance'):
                value = np.abs(value) + 0.5
            v.assign(value)
            w.assign(value)
        trainable = [(v, w) for v, w in pairs if v.trainable]
        for training in (False, True):
            with tf.GradientTape(persistent=True) as tape:
                za, zb = call_a(h, training), b(h, training=training)[0]
                la, lb = (tf.reduce_sum(tf.math.l2_normalize(z, 1) ** 3) for z in (za, zb))
            ga = tape.gradient(la, [v for v, _ in trainable])
            gb = tape.gradient(lb, [w for _, w in trainable])
            dz = float(tf.reduce_max(tf.abs(za - zb)))
            dg = max(float(tf.reduce_max(tf.abs(x - y))) for x, y in zip(ga, gb))
            dw = max(float(tf.reduce_max(tf.abs(v - w))) for v, w in pairs)
            worst = max(worst, dz, dg, dw)
            print(f'{mode:10s} {layers:6d}  {training!s:8s}  {dz:11.1e}  {dg:14.1e}  {dw:25.1e}')
    print('\nfresh heads (nonlinear, 2 layers, h 512 wide): mean and std of each variable')
    their_flags.proj_head_mode, their_flags.num_proj_layers = 'nonlinear', 2
    h = tf.zeros([8, 512])
    a = theirs.ProjectionHead()
    a(h, training=False)
    b = heads.ProjectionHead(Config(proj_head_mode='nonlinear', num_proj_layers=2,
                                    proj_out_dim=128))
    b(h, training=False)
    for who, variables in (('theirs', a.variables), ('ours', b.variables)):
        for v in variables:
            print(f'  {who:6s} {v.name if who == "theirs" else v.path:70s} {str(v.shape):11s} '
                  f'mean {float(tf.reduce_mean(v)):+.4f} std {float(tf.math.reduce_std(v)):.4f}')
    print(f'\nlargest difference {worst:.1e} (float32 rounding: < 1e-5 passes)')
    return 0 if worst < 1e-5 else 1


if __name__ == '__main__':
    sys.exit(main())
