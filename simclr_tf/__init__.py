"""SimCLR (Chen et al., ICML 2020) on TensorFlow 2 / Keras 3."""

__version__ = '0.1.0'
