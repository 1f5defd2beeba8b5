"""Scale jitter both ways (data.augment.scale_range) for segmentation and detection, and detection's multi-scale
training (data.augment.multiscale_sizes): trainer/data/scale.py."""
import numpy as np
import pytest
import torch

from trainer.data.coco import DETECTOR_MEAN_UINT8, detection_train_transform
from trainer.data.masks import mask_train_transform
from trainer.data.scale import MultiScale

GREY, RED = (128, 128, 128), (220, 30, 30)


def _scene(h=48, w=64):
    """A grey image with a red [10, 8, 30, 20] (XYXY) rectangle; its mask is 1 there, 0 elsewhere."""
    arr = np.full((h, w, 3), GREY, dtype=np.uint8)
    arr[8:20, 10:30] = RED
    mask = np.zeros((h, w), dtype=np.int64)
    mask[8:20, 10:30] = 1
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)


def test_segmentation_zooms_out_onto_an_ignored_canvas_and_in_by_cropping():
    image, mask = _scene(32, 32)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    out = mask_train_transform(32, mean, std, hflip=False, crop_padding=4, random_resized_crop=False,
                               rrc_min_scale=0.35, color_jitter=0.0, ignore_index=255, scale_range=[0.5, 0.5])
    torch.manual_seed(0)
    x, m = out(image, mask)
    assert x.shape == (3, 32, 32) and m.shape == (32, 32)
    # the whole image at half size in the top-left corner; the padding right and bottom counts nowhere
    assert (m[16:, :] == 255).all() and (m[:, 16:] == 255).all() and (m[:16, :16] != 255).all()
    assert (m[4:10, 5:15] == 1).all() and int((m == 1).sum()) == 6 * 10
    assert torch.allclose(x[:, 16:, 16:], torch.tensor(0.0).expand(3, 16, 16), atol=0.02)  # mean colour -> 0
    twice = mask_train_transform(32, mean, std, False, 0, False, 0.35, 0.0, 255, scale_range=[2.0, 2.0])
    crops = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, m = twice(image, mask)
        assert x.shape == (3, 32, 32) and not (m == 255).any()  # zoomed in: all pixels are the image's
        crops.add(int((m == 1).sum()))
    assert len(crops) > 2  # the crop's place varies


def test_detection_scale_range_pads_and_crops_to_the_canvas_clipping_and_dropping_boxes():
    image, _ = _scene(48, 64)
    target = {"boxes": torch.tensor([[10.0, 8.0, 30.0, 20.0]]), "labels": torch.tensor([1])}
    out = detection_train_transform(False, None, False, 0.0, scale_range=[0.5, 0.5], image_size=64)
    torch.manual_seed(0)
    x, t = out(image, target)
    # fitted into 64x64 (factor 1: 64x48), halved to 32x24, padded right/bottom with the detectors' mean
    assert x.shape == (3, 64, 64)
    assert torch.allclose(t["boxes"], torch.tensor([[5.0, 4.0, 15.0, 10.0]]))
    assert torch.allclose(x[:, 40, 40] * 255, torch.tensor(DETECTOR_MEAN_UINT8, dtype=torch.float32), atol=0.5)
    zoom = detection_train_transform(False, None, False, 0.0, scale_range=[3.0, 3.0], image_size=64)
    kept = dropped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        x, t = zoom(image, target)
        assert x.shape == (3, 64, 64) and len(t["boxes"]) == len(t["labels"])
        for box in t["boxes"]:
            assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 64  # clipped to the crop
            assert box[2] - box[0] >= 1 and box[3] - box[1] >= 1
        kept, dropped = kept + len(t["boxes"]), dropped + (len(t["boxes"]) == 0)
    assert kept > 0 and dropped > 0  # 3x zoom of a 192x144 image: the box is in some crops, not in others


def test_multiscale_draws_one_short_side_per_batch_from_seed_epoch_and_position():
    sizes = [40, 48, 56, 64]
    resize = MultiScale(sizes, max_size=80, seed=3)
    draws = [resize.size_for(epoch, first) for epoch in range(3) for first in range(0, 64, 8)]
    assert set(draws) == set(sizes)  # every size is drawn
    assert draws == [MultiScale(sizes, 80, 3).size_for(e, f) for e in range(3) for f in range(0, 64, 8)]
    assert draws != [MultiScale(sizes, 80, 4).size_for(e, f) for e in range(3) for f in range(0, 64, 8)]
    image, _ = _scene(30, 60)
    batch = ([image.float() / 255, image.float()[:, :20, :20] / 255],
             [{"boxes": torch.tensor([[10.0, 8.0, 30.0, 20.0]]), "labels": torch.tensor([1])},
              {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    first = next(f for f in range(0, 400, 8) if resize.size_for(1, f) == 56)
    images, targets = resize(batch, 1, first)
    # 30x60 to short side 56 would make the long side 112 > 80: capped, 40x80; the square 20x20 to 56x56
    assert images[0].shape == (3, 40, 80) and images[1].shape == (3, 56, 56)
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[10.0, 8.0, 30.0, 20.0]]) * 80 / 60)
    assert targets[1]["boxes"].shape == (0, 4) and torch.equal(targets[0]["labels"], torch.tensor([1]))


def test_the_detector_skips_its_own_resize_in_training_only_when_the_data_sizes_the_images():
    from trainer.config import load_config
    from trainer.tasks import build_task

    def task(*overrides):
        cfg = load_config(overrides=["data.generated.variant=detection", "data.image_size=64",
                                     "model.name=retinanet_small", *overrides])
        return build_task("detection", ["a", "b"], [1, 1], cfg.loss, cfg.eval, cfg.data, cfg.model, [1, 2], 4)

    plain, ms = task(), task("data.augment.multiscale_sizes=[48,64]")
    assert not plain.build_model("retinanet_small", 64).transform._skip_resize and plain.train_resizer(0) is None
    model = ms.build_model("retinanet_small", 64)
    assert model.transform._skip_resize and ms.train_resizer(0).max_size == ms.options["max_size"]
    assert task("data.augment.scale_range=[0.5,2]").build_model("retinanet_small", 64).transform._skip_resize
    model.eval()  # evaluation resizes to min_size whatever the flag
    assert model.transform([torch.rand(3, 32, 48)])[0].image_sizes == [(64, 96)]


@pytest.mark.parametrize("overrides, message", [
    (["data.generated.variant=segmentation", "data.augment.scale_range=[2,1]"], "must be \\[min, max\\]"),
    (["data.generated.variant=segmentation", "data.augment.scale_range=[0.5,2]",
      "data.augment.random_resized_crop=true"], "scale_range and data.augment.random_resized_crop"),
    (["data.generated.variant=multiclass", "data.augment.scale_range=[0.5,2]"], "scale_range is for segmentation"),
    (["data.generated.variant=segmentation", "data.augment.multiscale_sizes=[32]"],
     "multiscale_sizes is for detection"),
    (["data.generated.variant=detection", "data.augment.multiscale_sizes=[32]", "data.augment.scale_range=[0.5,2]"],
     "choose one"),
])
def test_scale_keys_are_refused_where_they_mean_nothing(overrides, message):
    from trainer.config import load_config
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_the_validation_loss_of_a_detector_trained_on_sized_images_is_taken_at_the_evaluated_size():
    from trainer.tasks.detect import validation_losses
    from trainer.tasks.detect_models import build_detection_model

    torch.manual_seed(0)
    plain = build_detection_model("retinanet_small", 3, {"min_size": 64, "max_size": 64})
    skipping = build_detection_model("retinanet_small", 3, {"min_size": 64, "max_size": 64})
    skipping.load_state_dict(plain.state_dict())
    skipping.transform._skip_resize = True
    image = torch.rand(3, 32, 32)
    target = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([1]), "image_id": 0}
    with torch.no_grad():  # as evaluation calls it
        assert validation_losses(skipping.eval(), image, target) == validation_losses(plain.eval(), image, target)
    assert skipping.transform._skip_resize and not skipping.training  # put back as it was


def test_multiscale_sizes_in_the_loader_follow_the_position_so_a_resume_and_every_rank_agree(tmp_path):
    from trainer.data.coco import DetectionDataset, collate_detection, detection_eval_transform, read_coco
    from trainer.data.generated import write_generated_coco
    from trainer.data.loaders import WorkerLoader

    write_generated_coco(tmp_path, 32, seed=0, counts={"train": 12})
    split = read_coco(tmp_path / "train" / "annotations.json", tmp_path / "train", log=lambda *_: None)
    resize = MultiScale([24, 40, 56], max_size=100, seed=9)

    def sides(start, rank=0, processes=1, batch=4):
        loader = WorkerLoader(DetectionDataset(split, seed=9), batch, 9, 0, 2, False, detection_eval_transform(),
                              collate=collate_detection, rank=rank, processes=processes, resizer=resize)
        loader.set_epoch(2)
        return [(stop, {tuple(x.shape[-2:]) for x in images}) for stop, (images, _) in loader.steps(start)]

    whole = sides(0)
    # the generated images are square: each step's images are its drawn side squared
    assert whole == [(stop, {(resize.size_for(2, stop - 4),) * 2}) for stop in (4, 8, 12)]
    assert sides(8) == whole[2:]  # resumed at position 8: the sizes the uninterrupted epoch had from there
    for rank in range(2):  # 2 processes x 2 images: each micro-step's ranks resize to the one side of its position
        assert [s for _, s in sides(0, rank, 2, 2)] == [s for _, s in whole]
