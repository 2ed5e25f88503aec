"""TensorFlow CPU kernels of this package, compiled on first use (see `native`)."""
