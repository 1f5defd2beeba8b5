"""cnn-trainer: a distributed CNN image-classification trainer on Accelerate."""
__version__ = "0.1.0"
