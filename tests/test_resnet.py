"""The encoder: sizes match the reference ResNets, stages have the paper's shapes, options work."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.resnet import (STAGES, BottleneckBlock, Conv2dFixedPadding, ResidualBlock, ResNet,
                              SelectiveKernelConv)


def num_params(variables) -> int:
    return sum(int(np.prod(v.shape)) for v in variables)


def blocks(encoder: ResNet):
    return [b for g in encoder.block_groups for b in g.blocks]


@pytest.fixture(scope='module')
def resnet50() -> ResNet:
    encoder = ResNet(depth=50)
    encoder.build((None, 224, 224, 3))  # variables only: counting needs no forward pass
    return encoder


@pytest.fixture(scope='module')
def tiny_cifar() -> ResNet:
    encoder = ResNet(depth=18, width_multiplier=0.25, cifar_stem=True)
    encoder(tf.zeros([1, 32, 32, 3]))
    return encoder


def test_resnet50_has_torchvision_resnet50_parameter_count(resnet50):
    # torchvision resnet50 without its fc layer: 23,508,032. Same architecture (v1.5, no conv
    # biases, BN gamma/beta), so the count matches exactly; BN moving statistics are extra state.
    assert num_params(resnet50.trainable_variables) == 23_508_032
    assert num_params(resnet50.non_trainable_variables) == 2 * 26_560  # moving mean + variance


def test_resnet50_gives_2048_d_h_and_imagenet_stage_shapes(resnet50):
    out = resnet50(tf.random.uniform([2, 32, 32, 3]), training=False)
    assert out['final_avg_pool'].shape == (2, 2048)
    assert out['initial_conv'].shape == (2, 16, 16, 64)  # 7x7/2 conv
    assert out['initial_max_pool'].shape == (2, 8, 8, 64)  # 3x3/2 max pool
    assert [out[f'block_group{i}'].shape[1:] for i in range(1, 5)] == [
        (8, 8, 256), (4, 4, 512), (2, 2, 1024), (1, 1, 2048)]


def test_resnet18_cifar_parameter_count():
    encoder = ResNet(depth=18, cifar_stem=True)
    encoder.build((None, 32, 32, 3))
    torchvision_r18 = 11_176_512  # without fc, 7x7 stem
    stem_7x7, stem_3x3 = 7 * 7 * 3 * 64, 3 * 3 * 3 * 64
    # The authors' code projects the shortcut of every group's first block, also in group 1 of
    # ResNet-18 where the shape is unchanged: one more 1x1 conv (64·64) and its BN (2·64).
    first_group_projection = 64 * 64 + 2 * 64
    expected = torchvision_r18 - stem_7x7 + stem_3x3 + first_group_projection
    assert expected == 11_173_056
    assert num_params(encoder.trainable_variables) == expected


def test_cifar_stem_stage_shapes(tiny_cifar):
    images = tf.random.uniform([2, 32, 32, 3])
    out = tiny_cifar(images, training=False)
    assert list(out) == list(STAGES)
    expected = {'initial_conv': (32, 32, 16), 'initial_max_pool': (32, 32, 16),
                'block_group1': (32, 32, 16), 'block_group2': (16, 16, 32),
                'block_group3': (8, 8, 64), 'block_group4': (4, 4, 128)}
    assert {k: tuple(out[k].shape[1:]) for k in expected} == expected
    assert out['final_avg_pool'].shape == (2, 128)  # 512 × 0.25
    # No max pool: the stem output is the BN-ReLU of the 3x3 conv.
    assert float(tf.reduce_min(out['initial_max_pool'])) >= 0.0
    assert all(v.dtype == tf.float32 for v in out.values())
    np.testing.assert_allclose(out['final_avg_pool'],
                               tf.reduce_mean(out['block_group4'], [1, 2]), rtol=1e-5)


def test_imagenet_stem_small_model_stage_shapes():
    encoder = ResNet(depth=18, width_multiplier=0.25)
    out = encoder(tf.random.uniform([1, 64, 64, 3]), training=True)
    assert out['initial_conv'].shape == (1, 32, 32, 16)
    assert out['initial_max_pool'].shape == (1, 16, 16, 16)
    assert out['block_group4'].shape == (1, 2, 2, 128)
    assert encoder.compute_output_shape((1, 64, 64, 3)) == {k: tuple(v.shape)
                                                            for k, v in out.items()}


def test_last_bn_of_each_residual_branch_starts_at_zero(tiny_cifar):
    for block in blocks(tiny_cifar):
        bns = [l for l in block.residual if isinstance(l, keras.layers.BatchNormalization)]
        assert not np.any(bns[-1].gamma.numpy())
        assert all(np.all(bn.gamma.numpy() == 1) for bn in bns[:-1])


def test_strided_conv_pads_explicitly_not_same():
    # SAME would pad an even input by (0, 1); the original pads (1, 1) whatever the input size.
    conv = Conv2dFixedPadding(4, 3, strides=2)
    x = tf.random.uniform([1, 8, 8, 3])
    y = conv(x)
    expected = tf.nn.conv2d(x, conv.kernel, 2, [[0, 0], [1, 1], [1, 1], [0, 0]])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert conv.compute_output_shape((1, 8, 8, 3)) == tuple(y.shape)


def test_selective_kernel_mixes_its_two_branches_convexly():
    sk = SelectiveKernelConv(4, strides=1, sk_ratio=0.0625)
    x = tf.random.uniform([2, 6, 6, 3])
    sk.build(x.shape)
    kernel = sk.conv.kernel.numpy()
    sk.conv.kernel.assign(np.concatenate([kernel[..., :4], kernel[..., :4]], -1))
    branch = tf.nn.relu(sk.bn(sk.conv(x))[..., :4])
    # Identical branches: any softmax mixture of them gives the branch itself.
    np.testing.assert_allclose(sk(x, training=False), branch, rtol=1e-5, atol=1e-6)
    assert sk.fc_reduce.filters == 32  # max(int(4 × 0.0625), min_dim=32)


@pytest.mark.parametrize('depth,block', [(18, ResidualBlock), (50, BottleneckBlock)])
def test_sk_and_se_variants_build_and_run(depth, block):
    encoder = ResNet(depth=depth, width_multiplier=0.25, sk_ratio=0.0625, se_ratio=0.25)
    out = encoder(tf.random.uniform([2, 16, 16, 3]), training=True)
    assert out['initial_conv'].shape == (2, 8, 8, 16)
    assert out['final_avg_pool'].shape == (2, block.expansion * 128)
    assert np.all(np.isfinite(out['final_avg_pool']))
    first = encoder.block_groups[1].blocks[0]
    assert isinstance(first, block)
    # The authors put SK convs in bottleneck blocks only; basic blocks keep plain 3x3 convs.
    has_sk = any(isinstance(l, SelectiveKernelConv) for l in first.residual)
    assert has_sk == (block is BottleneckBlock)
    assert first.se is not None and first.shortcut.resnet_d
    assert len(encoder.stem.convs) == 7  # deep stem: three 3x3 convs with BN-ReLU between


def test_get_config_round_trip(tiny_cifar):
    clone = ResNet.from_config(tiny_cifar.get_config())
    assert clone.get_config() == tiny_cifar.get_config()
    clone.build((None, 32, 32, 3))
    assert num_params(clone.variables) == num_params(tiny_cifar.variables)


def test_mixed_precision_computes_low_and_returns_float32():
    keras.mixed_precision.set_global_policy('mixed_bfloat16')
    try:
        encoder = ResNet(depth=18, width_multiplier=0.25, cifar_stem=True)
        out = encoder(tf.random.uniform([2, 16, 16, 3]), training=True)
    finally:
        keras.mixed_precision.set_global_policy('float32')
    assert encoder.stem.convs[0].compute_dtype == 'bfloat16'
    assert encoder.stem.convs[0].kernel.dtype == 'float32'
    assert all(v.dtype == tf.float32 for v in out.values())


# Measured by running the authors' tf2 resnet.resnet(depth, 1) (tf-keras 2.21, --sk_ratio=0.0625)
# on 64x64 inputs: trainable parameters and the multiset of variable shapes (kernels, BN).
AUTHORS_SK = {
    18: (11_199_968, {(1, 1, 64, 64): 1, (1, 1, 64, 128): 1, (1, 1, 128, 256): 1,
                      (1, 1, 256, 512): 1, (3, 3, 3, 32): 1, (3, 3, 32, 32): 1, (3, 3, 32, 64): 1,
                      (3, 3, 64, 64): 4, (3, 3, 64, 128): 1, (3, 3, 128, 128): 3,
                      (3, 3, 128, 256): 1, (3, 3, 256, 256): 3, (3, 3, 256, 512): 1,
                      (3, 3, 512, 512): 3, (32,): 8, (64,): 24, (128,): 20, (256,): 20,
                      (512,): 20}),
    34: (21_308_128, {(1, 1, 64, 64): 1, (1, 1, 64, 128): 1, (1, 1, 128, 256): 1,
                      (1, 1, 256, 512): 1, (3, 3, 3, 32): 1, (3, 3, 32, 32): 1, (3, 3, 32, 64): 1,
                      (3, 3, 64, 64): 6, (3, 3, 64, 128): 1, (3, 3, 128, 128): 7,
                      (3, 3, 128, 256): 1, (3, 3, 256, 256): 11, (3, 3, 256, 512): 1,
                      (3, 3, 512, 512): 5, (32,): 8, (64,): 32, (128,): 36, (256,): 52,
                      (512,): 28}),
}


@pytest.mark.parametrize('depth', [18, 34])
def test_sk_basic_block_resnets_match_the_authors_layers_and_parameter_count(depth):
    # sk_ratio > 0 in a ResNet-18/34: deep stem and ResNet-D shortcuts, no SK conv (authors' code).
    encoder = ResNet(depth=depth, sk_ratio=0.0625)
    encoder.build((None, 64, 64, 3))
    params, shapes = AUTHORS_SK[depth]
    assert num_params(encoder.trainable_variables) == params
    counts = {}
    for v in encoder.variables:
        counts[tuple(v.shape)] = counts.get(tuple(v.shape), 0) + 1
    assert counts == shapes
    assert all(b.shortcut.resnet_d for b in blocks(encoder) if b.shortcut is not None)
