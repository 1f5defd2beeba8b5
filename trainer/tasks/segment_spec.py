"""What semantic segmentation is, read without torch (the spec half of the protocol, trainer/tasks/protocol.py).
The implementation is trainer/tasks/segment.py.
"""
from __future__ import annotations

from trainer.errors import ConfigError
from trainer.tasks.protocol import outputs_do_not_fit


class SegmentationSpec:
    """A class per pixel: masks of class indices, with an ignored value (data.ignore_index)."""

    title = "segmentation"
    targets = "masks"
    data_hint = "data.format=masks or voc, shards of a masks folder, or data.generated.variant=segmentation"
    default_monitor = "miou"
    fixed_input_size = False  # the U-Net pads to its stride; torchvision's models are fully convolutional
    implementation = "trainer.tasks.segment.Segmentation"  # its class (with torch), imported when first built

    @staticmethod
    def higher_is_better(metric: str) -> bool:
        return metric != "loss"

    @classmethod
    def check_config(cls, cfg, trained) -> None:
        """Its loss keys (loss.name dice or ce+dice) are refused by the classification task's build, and with
        every loss.* key by detection's config check; while it trains, test-time augmentation must map back."""
        if trained is cls and cfg.eval.tta == "flip_translate":
            raise ConfigError("eval.tta=flip_translate is for classification (shifted masks are not shifted back): "
                              "use eval.tta=flip for segmentation")

    @staticmethod
    def check_meta(meta: dict, path) -> None:
        if meta["num_outputs"] != len(meta["classes"]):
            raise outputs_do_not_fit(meta, path)

    @staticmethod
    def onnx_fields(meta: dict) -> dict:
        return {"probabilities": "softmax over axis 1 (classes), per pixel",
                "ignore_index": meta.get("ignore_index", 255)}
