"""cnn-trainer: a distributed CNN image-classification trainer on Accelerate."""
__version__ = "0.1.0"

__all__ = ["train", "load_config"]


def __getattr__(name: str):
    """`from trainer import train, load_config` (trainer/api.py), imported on first use: `trainer --help` and a
    config mistake stay torch-free and fast."""
    if name in __all__:
        from trainer import api

        return getattr(api, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
