"""fmnist-accel: Fashion-MNIST training through Hugging Face Accelerate."""

__version__ = "0.1.0"
