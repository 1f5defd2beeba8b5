"""The typed config schema, loading (recipe YAML + key=value overrides) and saving the resolved config.

Defaults live here; recipes in configs/ hold only their differences. Every mistake (unknown key, wrong
type, missing value, a value out of range) becomes a `ConfigError` naming the full key, raised before
any work is done.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.errors import ConfigError


VERIFY_MODES = ("header", "full", "off")  # data.verify_images
# tracking.log_with: accelerate's trackers the trainer drives, each with the module it imports and the pip
# package that provides it (mlflow-skinny: MLflow's client without its server and UI, all accelerate's tracker needs)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb"), "comet_ml": ("comet_ml", "comet_ml")}


# ---- ranges: every number in the schema says which values it takes, next to its default ----

class Range:
    """The values a numeric key takes, written as an interval: "[0, 1)" (0 included, 1 not), "(0, inf)" (any
    number above 0). Every value must also be finite: nan and inf are never a learning rate, a probability or a
    count, so "inf" only says that there is no upper bound."""

    def __init__(self, text: str):
        low, high = (s.strip() for s in text[1:-1].split(","))
        if text[0] not in "[(" or text[-1] not in ")]" or not float(low) < float(high):
            raise ValueError(f"not an interval: {text!r}")
        self.text, self.low_text, self.low, self.high = text, low, float(low), float(high)
        self.with_low, self.with_high = text[0] == "[", text[-1] == "]"

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return ((self.low <= value if self.with_low else self.low < value)
                and (value <= self.high if self.with_high else value < self.high))

    def __str__(self) -> str:  # "> 0" reads better than "in (0, inf)"
        if math.isinf(self.high):
            return f"{'>=' if self.with_low else '>'} {self.low_text}"
        return f"in {self.text}"


def ranged(default, values: str):
    """A schema field holding numbers in the interval `values` (see `Range`): the number itself, or each entry
    of a list (nested lists too) or each value of a mapping; null (None) is always allowed where the type
    is Optional. `check_ranges` enforces it at load."""
    meta = {"range": Range(values)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_ranges(node, prefix: str = "") -> None:
    """Every field of the schema dataclass `node` (and of those nested in it) that declares a range holds a value
    inside it, else one line naming the full key, the value and the range."""
    for f in dataclasses.fields(node):
        key, value = prefix + f.name, getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
        elif "range" in f.metadata and value is not None:
            _check_range(key, value, f.metadata["range"])


def _check_range(key: str, value, values: Range) -> None:
    if isinstance(value, dict):  # e.g. optim.freeze_after_epochs: each value, named by its own key
        for name, v in value.items():
            _check_range(f"{key}.{name}", v, values)
    elif isinstance(value, (list, tuple)):
        if not all(v in values for v in _leaves(value)):
            raise ConfigError(f"{key} entries must be {_finite(value)}{values}, got {list(value)}")
    elif value not in values:
        raise ConfigError(f"{key} must be {_finite(value)}{values}, got {value}")


def _leaves(items) -> list:
    """The entries of a list, nested lists flattened (model.detection.anchor_sizes: a list per feature level)."""
    return [x for v in items for x in (_leaves(v) if isinstance(v, (list, tuple)) else [v])]


def _finite(value) -> str:
    """The words "finite and " where nan or inf is the trouble: optim.lr must be finite and > 0, got inf."""
    numbers = _leaves(value) if isinstance(value, (list, tuple)) else [value]
    return "finite and " if any(isinstance(v, float) and not math.isfinite(v) for v in numbers) else ""


@dataclass
class AugmentCfg:
    hflip: bool = True  # random horizontal flip, p=0.5
    # pixels of reflect padding before a random crop back to image_size; 0 = off (smaller than the image side,
    # checked against the images)
    crop_padding: int = ranged(4, "[0, inf)")
    random_resized_crop: bool = False  # ImageNet-style crop instead of pad+crop (min scale below)
    rrc_min_scale: float = ranged(0.35, "(0, 1]")  # smallest crop, as a fraction of the image's area
    # brightness/contrast/saturation strength: each factor drawn from [max(0, 1 - x), 1 + x]; 0 = off
    color_jitter: float = ranged(0.0, "[0, inf)")
    # random: each sample flipped with p=0.5 per epoch; alternating (data.loader=device only): a random half in
    # the first epoch, then every image flips on alternate epochs, so each sees both sides equally (airbench)
    flip_mode: Literal["random", "alternating"] = "random"
    # detection: each image rescaled by a factor drawn from [min, max] of its own size before the detector's
    # own resize (null = off), and SSD's random IoU crop (a zoom that keeps objects whole)
    scale_jitter: Optional[List[float]] = ranged(None, "(0, inf)")
    iou_crop: bool = False  # detection: SSD's random IoU crop (see scale_jitter above)
    # segmentation and detection: scale jitter both ways, [min, max] (null = off; torchvision's references: 0.5-2):
    # each training image resized by a factor drawn from it (segmentation: of the S x S training frame;
    # detection: of the image fitted into S x S, aspect kept), padded right/bottom to S x S where smaller (the
    # mean colour; masks data.ignore_index) and randomly cropped to S x S, S = data.image_size; boxes clipped,
    # those under 1 px dropped. Replaces the resize + crop_padding / random_resized_crop of segmentation;
    # a detector's own resize is skipped in training (evaluation still resizes to model.detection.min_size)
    scale_range: Optional[List[float]] = ranged(None, "(0, inf)")
    # detection: multi-scale training, the short side of each micro-step's images drawn from this list (px; the
    # long side capped at model.detection.max_size; the detector's own resize skipped in training), seeded by
    # (seed, epoch, batch position); evaluation at model.detection.min_size. torchvision's "multiscale" preset:
    # [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]. null = off
    multiscale_sizes: Optional[List[int]] = ranged(None, "[1, inf)")
    # classification, data.loader=workers: a policy of torchvision.transforms.v2 on the uint8 image, after the
    # crop and flip; randaugment takes the two numbers below (torchvision's defaults)
    auto_augment: Literal["none", "randaugment", "trivialaugment", "autoaugment", "augmix"] = "none"
    randaugment_num_ops: int = ranged(2, "[1, 16]")  # auto_augment=randaugment: operations per image
    randaugment_magnitude: int = ranged(9, "[0, 30]")  # auto_augment=randaugment: strength, of 31 levels
    # classification: probability that a rectangle of each image is replaced by noise, after normalisation
    # (Zhong et al.; timm's --reprob); 0 = off
    random_erasing: float = ranged(0.0, "[0, 1]")
    # classification: mixup / CutMix of each batch after collation (Beta(alpha, alpha) mixing weights; 0 = off);
    # when both are on, each mixed batch uses CutMix with probability mix_switch_prob, else mixup; a batch is
    # mixed at all with probability mix_prob. Targets become soft (loss.label_smoothing applies to them).
    mixup_alpha: float = ranged(0.0, "[0, inf)")
    cutmix_alpha: float = ranged(0.0, "[0, inf)")  # CutMix's Beta(alpha, alpha); 0 = off
    mix_prob: float = ranged(1.0, "[0, 1]")  # probability that a batch is mixed at all
    mix_switch_prob: float = ranged(0.5, "[0, 1]")  # both on: probability of CutMix, else mixup


@dataclass
class GeneratedCfg:
    # segmentation: several shapes per image with their pixel masks, written as a `masks` folder;
    # detection: the same scenes with a tight box per shape, written as a COCO folder
    # multilabel: the same scenes, each image labelled with the kinds of shape visible in it (a CSV per split)
    variant: Literal["binary", "multiclass", "segmentation", "detection", "multilabel"] = "multiclass"
    train_per_class: int = ranged(1000, "[1, inf)")  # training images per class
    val_per_class: int = ranged(150, "[1, inf)")  # validation images per class
    test_per_class: int = ranged(150, "[0, inf)")  # 0 = no test split
    # the data is a pure function of (variant, counts, image_size, seed); numpy's SeedSequence takes no negative
    seed: int = ranged(0, "[0, inf)")


@dataclass
class CsvCfg:
    """data.format=multilabel: the columns of each split's CSV (the Kaggle/fastai convention by default)."""
    image_column: str = "image"  # the image's path, relative to the CSV's folder (or absolute)
    labels_column: str = "labels"  # the class names of the image, joined by `separator`; empty = no label
    separator: str = " "  # between the class names of one cell


@dataclass
class DataCfg:
    format: Literal["imagefolder", "cifar10", "cifar100", "generated", "masks", "voc", "coco", "voc_detection",
                    "shards", "multilabel"] = \
        "generated"  # where the images come from and how they are laid out (see data.root)
    # imagefolder: a folder with train/ (+ val/, + test/) or a single folder of class folders;
    # cifar: torchvision's root (holds cifar-10-batches-py/); generated: where the images are written
    # (default data/generated/<variant>-<size>px-seed<seed>-v<format> under the current directory);
    # masks (segmentation): ROOT/<split>/images/<name>.<ext> + ROOT/<split>/masks/<name>.png (class indices)
    # with ROOT/classes.txt; voc: torchvision's VOC root (holds VOCdevkit/VOC2012/), read offline;
    # coco (detection): ROOT/<split>/annotations.json (or Roboflow's _annotations.coco.json) beside the images,
    # or the standard ROOT/annotations/instances_<split>2017.json + ROOT/<split>2017/; voc_detection: VOC's
    # Annotations/ XML boxes from the same VOC root; shards: a folder `trainer pack` wrote from an image folder
    # (classification), a masks folder (segmentation) or a COCO folder (detection); multilabel: ROOT/train.csv,
    # ROOT/val.csv (+ ROOT/test.csv), each row an image path (relative to ROOT) and its class names (data.csv),
    # with ROOT/classes.txt or else the sorted union of train.csv's labels as the classes.
    root: Optional[str] = None
    # coco: explicit files per split, winning over the layouts above: {train: {annotations: FILE, images: DIR}}
    coco_files: Optional[Dict[str, Any]] = None
    # segmentation: mask value that counts nowhere (void borders; the VOC convention); the segmentation task
    # takes 8-bit values only, and none that is a class's index
    ignore_index: int = ranged(255, "[0, 255]")
    class_names: Optional[List[str]] = None  # masks: class names by index (instead of ROOT/classes.txt)
    voc_year: str = "2012"  # voc, voc_detection: the year of VOCdevkit/VOC<year>
    download: bool = False  # cifar only: fetch from the internet when absent
    image_size: int = ranged(32, "[1, inf)")  # side in pixels of the square network input
    # classification and multi-label: how an image becomes that input in evaluation, `trainer predict`, the ONNX
    # export's check and training without random_resized_crop (timm's names; trainer/data/datasets.py `Fit`):
    # squash = both sides resized to image_size / crop_pct; center = the shorter side resized to image_size /
    # crop_pct, aspect kept; then the centre image_size square is kept. Each null = the pretrained weights' own
    # (model.weights: torchvision's weights.transforms(), timm's pretrained_cfg), else squash, crop_pct 1 (no crop)
    # and bilinear (antialiased). Recorded in model.json
    crop_mode: Optional[Literal["squash", "center"]] = None
    # the fraction of the resized side the centre crop keeps (ResNet-50's IMAGENET1K_V2: 224 / 232; timm's
    # default 0.875); 1 = no crop
    crop_pct: Optional[float] = ranged(None, "(0, 1]")
    # of that resize and of RandomResizedCrop
    interpolation: Optional[Literal["bilinear", "bicubic", "nearest"]] = None
    # used when there is no val/ folder: a seeded, stratified split of train. 0 = train on all of train and
    # validate on test/ (CIFAR: the test set), as the classic recipes do; then evaluate only at the end
    # (eval.every_epochs=0) so the test split never steers training
    val_fraction: float = ranged(0.1, "[0, 1)")
    split_seed: int = ranged(0, "[0, inf)")  # numpy's default_rng takes no negative seed
    # per channel, of pixel values in [0, 1]; null = measured on the training images. A std is at most 0.5
    # there (1 leaves the scale as is): the ranges refuse 0-255-scale values such as 123.7 or 58.4
    mean: Optional[List[float]] = ranged(None, "[0, 1]")
    std: Optional[List[float]] = ranged(None, "(0, 1]")  # per channel, as mean; null = measured
    # DataLoader workers per process (persistent: started once per run); 0 = loaded in the main process
    num_workers: int = ranged(2, "[0, inf)")
    prefetch_factor: int = ranged(2, "[1, inf)")  # batches each worker loads ahead
    # workers: per-sample decode + augment in DataLoader workers (any dataset size, any augmentation).
    # device: the whole training split decoded once into one uint8 tensor on the device (GPU, or CPU), and
    # pad-crop/flip done as batched tensor ops there: no workers, for datasets that fit (CIFAR-10: 150 MB)
    loader: Literal["workers", "device"] = "workers"
    # where the training JPEGs of data.loader=workers are decoded: cpu, in the DataLoader workers; cuda, in
    # batches on the GPU with nvJPEG (the workers then only read the files; trainer/data/device_decode.py).
    # For image folders and their shards (classification); evaluation decodes on the CPU either way
    decode_device: Literal["cpu", "cuda"] = "cpu"
    # data.loader=workers, decode_device=cpu: a JPEG whose sample starts with RandomResizedCrop (training) or
    # evaluation's resize of the whole image (data.crop_mode squash: both sides; center: the shorter side) is
    # decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps the crop's pixels at data.image_size, or
    # the resized sides at least their size, the crop drawn from the header first (trainer.data.folders.
    # decode_region, decode_fit; BENCHMARKS.md "Scaled JPEG decoding" for the speed and the accuracy); false =
    # every image decoded whole. PNG, CMYK JPEGs and pad-crop-flip augmentation always decode whole
    scaled_decode: bool = True
    # check every image-folder training file at start-up (eval splits val/test are always checked):
    # header: open it and parse its header (format, size) and, for JPEG/PNG, look for its end marker; a file
    # failing that is then fully decoded, so a valid one is never refused (BENCHMARKS.md: the cost of each);
    # full: decode every file; off: none (a bad file is met while training). true = full, false = off.
    # What it found is cached with the folder's scan (data.cache_dir), so a restart does not check again
    verify_images: str = "header"
    skip_bad_images: bool = False  # with verify_images: drop (and count) unreadable files instead of failing
    # where an image folder's scan (classes, files, what verification found) is cached, keyed by the folder's
    # real path and checked against the modification times of every folder in it at each start: "" =
    # $TRAINER_CACHE_DIR, else the user's cache ($XDG_CACHE_HOME/cnn-trainer, else ~/.cache/cnn-trainer; shared
    # by the nodes of a cluster where the home is), "off" = scan every time. Never written into the data folder
    cache_dir: str = ""
    # rotate/flip images by their EXIF Orientation tag (phone photos), in training, eval and predict alike
    # (recorded in model.json)
    exif_orientation: bool = True
    sampler: Literal["random", "weighted"] = "random"  # weighted: class-balanced draw with replacement
    # detection: aspect-ratio grouping, torchvision's --aspect-ratio-group-factor (its reference uses 3): images
    # in 2k + 2 groups of width/height, each global batch drawn from one group (trainer/data/detection_order.py);
    # 0 = off
    aspect_ratio_group_factor: int = ranged(0, "[0, inf)")
    # detection: repeat-factor sampling for rare categories (LVIS: 0.001): an image is repeated
    # max(1, sqrt(t / f_c)) times per epoch in expectation, f_c the fraction of training images holding its
    # rarest category (stochastic rounding, each epoch the same length); null = off
    repeat_factor_threshold: Optional[float] = ranged(None, "(0, 1]")
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    generated: GeneratedCfg = field(default_factory=GeneratedCfg)
    csv: CsvCfg = field(default_factory=CsvCfg)


@dataclass
class DetectionModelCfg:
    """What users tune on a detector (trainer/tasks/detect_models.py says which model takes which)."""
    # the detector resizes each image's short side to this (px); null = data.image_size
    min_size: Optional[int] = ranged(None, "[1, inf)")
    # ... and its long side to at most this; null = min_size x 1333 / 800
    max_size: Optional[int] = ranged(None, "[1, inf)")
    # pixels, one entry (a number or a list) per feature level; null = the model's
    anchor_sizes: Optional[List[Any]] = ranged(None, "(0, inf)")
    # height / width, for every level or one list per level
    aspect_ratios: Optional[List[Any]] = ranged(None, "(0, inf)")
    # with a pretrained backbone: stages left trainable (the most, nothing frozen, depends on the model: resnet 5,
    # mobilenet 6; checked where the model is built)
    trainable_backbone_layers: Optional[int] = ranged(None, "[0, inf)")
    # detections below this score are dropped; null = the model's (0.05)
    score_thresh: Optional[float] = ranged(None, "[0, 1]")
    # non-maximum suppression IoU per class; null = the model's (0.5)
    nms_thresh: Optional[float] = ranged(None, "[0, 1]")
    # kept after NMS; null = the model's (100; COCO scores 100)
    detections_per_img: Optional[int] = ranged(None, "[1, inf)")


@dataclass
class ModelCfg:
    name: str = "multiclass_cnn"  # a name of trainer/models.py, a torchvision classifier, timm/<name>, or a task's own
    small_input_stem: Optional[bool] = None  # torchvision models: 3x3 stride-1 stem for small images; null = auto (image_size <= 64)
    pretrained_path: Optional[str] = None  # local .safetensors or .pth state dict; the classifier head is re-initialised
    # pretrained weights by name: DEFAULT, or one of the model's torchvision weights (ResNet50_Weights.IMAGENET1K_V2,
    # or the tag alone), read from torch.hub's cache ($TORCH_HOME/hub/checkpoints, else ~/.cache/torch/...) and
    # loaded as pretrained_path is; for model.name=timm/<arch>[.<tag>], DEFAULT (the name's tag, else timm's
    # default one) or a tag (a1_in1k), read as model.safetensors from the Hugging Face cache ($HF_HUB_CACHE, else
    # $HF_HOME/hub, else ~/.cache/huggingface/hub). Their mean/std, resize, crop and interpolation are the
    # defaults of data.mean/std/crop_mode/crop_pct/interpolation
    weights: Optional[str] = None
    # fetch a missing weights file into that cache (needs network; never while HF_HUB_OFFLINE is set, for timm's)
    weights_download: bool = False
    channels_last: bool = False  # NHWC memory format (faster convolutions with bf16 on GPUs)
    compile: bool = False  # torch.compile the model in place (nn.Module.compile): slower start, maybe faster steps
    # stochastic depth: the drop probability of the last residual block (ConvNeXt, EfficientNet, the ResNets;
    # rising linearly from 0 at the first block, as torchvision and timm do); null = the model's own
    # (torchvision's convnext_tiny 0.1, efficientnet_b0 0.2, none for the rest), 0 = off
    drop_path: Optional[float] = ranged(None, "[0, 1)")
    # before the classifier head; null = the model's own (EfficientNet 0.2)
    dropout: Optional[float] = ranged(None, "[0, 1)")
    # BatchNorm statistics computed over the global batch of all GPUs (torch.nn.SyncBatchNorm; GPU only)
    sync_bn: bool = False
    # fine-tuning (with model.pretrained_path): the backbone is frozen, weights and BatchNorm statistics,
    # for this many epochs; only the head trains
    freeze_backbone_epochs: int = ranged(0, "[0, inf)")
    detection: DetectionModelCfg = field(default_factory=DetectionModelCfg)


@dataclass
class LossCfg:
    # segmentation: pixel cross-entropy, soft Dice (ignored pixels left out), or their weighted sum
    name: Literal["ce", "dice", "ce+dice"] = "ce"
    dice_weight: float = ranged(1.0, "[0, inf)")  # ce+dice: loss = ce + dice_weight x dice
    # segmentation models with an auxiliary head (FCN, DeepLabV3): its loss's weight
    aux_weight: float = ranged(0.5, "[0, inf)")
    label_smoothing: float = ranged(0.0, "[0, 1)")  # multiclass and segmentation
    # binary only: weight of positive examples in BCEWithLogitsLoss
    pos_weight: Optional[float] = ranged(None, "(0, inf)")
    # weight each class by N / (C * count_c) from the training counts (images; pixels for segmentation,
    # where class imbalance is the rule: background often holds most pixels)
    class_weighted: bool = False


@dataclass
class EarlyStoppingCfg:
    # stop after this many evaluations in a row without eval.monitor improving on its best by more than
    # min_delta; the run then ends as a finished run (final model, summary). 0 = off
    patience: int = ranged(0, "[0, inf)")
    min_delta: float = ranged(0.0, "[0, inf)")  # in the units of eval.monitor


@dataclass
class TrainCfg:
    epochs: int = ranged(10, "[1, inf)")  # passes over the training split
    batch_size: int = ranged(64, "[1, inf)")  # per process; global batch = batch_size x processes x grad_accum_steps
    grad_accum_steps: int = ranged(1, "[1, inf)")  # micro-batches per optimizer update
    # the global batch, whatever the allocation: each start derives the accumulation (and, where it must, a
    # smaller per-process batch) from its process count, train.batch_size being the most one process takes.
    # One flag for a job that may be requeued onto another number of GPUs (`batching`); null = off
    global_batch_size: Optional[int] = ranged(None, "[1, inf)")
    # drop each epoch's last, smaller training batch; null = the task's choice (classification and detection
    # keep it, segmentation drops it: a batch of one breaks DeepLabV3's BatchNorm). airbench94 drops it.
    drop_last: Optional[bool] = None
    # the largest global L2 norm of the gradients; null = no clipping (a negative norm turned every update
    # around: gradient ascent)
    clip_grad_norm: Optional[float] = ranged(None, "(0, inf)")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast dtype; fp16 (with a grad scaler) needs a GPU
    # stop after this many optimizer updates (smoke tests); null = epochs
    max_steps: Optional[int] = ranged(None, "[1, inf)")
    log_every_steps: int = ranged(20, "[1, inf)")  # optimizer updates between metrics.jsonl rows
    device: Literal["auto", "cpu"] = "auto"  # auto = GPU when available
    progress_bar: bool = True  # a bar on a terminal; in a log file a plain line per log step either way
    # longest wait for a peer in any collective (start-up included) before failing
    dist_timeout_s: int = ranged(300, "[1, inf)")
    # GPU only: let cuDNN time its algorithms per shape (faster convolutions; results are then not bitwise
    # reproducible across runs, so set false when a resumed GPU run must match an uninterrupted one exactly)
    cudnn_benchmark: bool = True
    # GPU: deterministic kernels (torch.use_deterministic_algorithms, warning where an op has none; cuDNN
    # deterministic and not benchmarking; cuBLAS's fixed workspace), so that a resumed GPU run can match an
    # uninterrupted one bit for bit; slower. CPU kernels here are deterministic already.
    deterministic: bool = False
    # Linux (glibc): memory a step frees stays with the process for the next step, instead of being given back
    # to the system and faulted in again (glibc's malloc tunables; trainer/host_memory.py). Less system time on
    # CPU (BENCHMARKS.md, "Host memory kept between steps"); the process holds its peak until the run ends.
    # `trainer eval` reads it too (the run's value, or the command's override), for its forward passes.
    keep_freed_memory: bool = True
    early_stopping: EarlyStoppingCfg = field(default_factory=EarlyStoppingCfg)


@dataclass
class OptimCfg:
    name: Literal["sgd", "adamw"] = "sgd"  # the optimizer
    lr: float = ranged(0.05, "(0, inf)")  # peak lr per optimizer update (0 would train nothing)
    momentum: float = ranged(0.9, "[0, 1)")  # sgd only; at 1 the velocity never decays
    nesterov: bool = False  # sgd only: Nesterov momentum
    betas: List[float] = ranged([0.9, 0.999], "[0, 1)")  # adamw only (torch refuses others)
    weight_decay: float = ranged(5e-4, "[0, inf)")  # not applied to norm and bias parameters (unless bias_decay)
    # poly: (1 - progress)^poly_power after the warm-up (torchvision's segmentation reference); one_cycle: torch's
    # OneCycleLR with max_lr = optim.lr (the one_cycle_* keys; it warms up itself); all counted in updates
    schedule: Literal["cosine", "linear", "step", "constant", "poly", "one_cycle"] = "cosine"
    poly_power: float = ranged(0.9, "(0, inf)")  # 0.9: torchvision's segmentation reference and DeepLab's
    # one_cycle: torch's OneCycleLR's arguments, with its defaults
    one_cycle_pct_start: float = ranged(0.3, "(0, 1)")  # one_cycle: fraction of the updates rising to optim.lr
    one_cycle_div_factor: float = ranged(25.0, "[1, inf)")  # one_cycle starts at optim.lr / this
    one_cycle_final_div_factor: float = ranged(1.0e4, "[1, inf)")  # one_cycle ends at its start / this
    one_cycle_anneal: Literal["cos", "linear"] = "cos"  # one_cycle's annealing curve, up and down
    # one_cycle's momentum cycle [base, max] (SGD's momentum, AdamW's beta1): max at the start, base at the lr's
    # peak, max at the end, replacing optim.momentum / betas[0]; torch's cycle_momentum defaults; null = keep it
    one_cycle_momentum: Optional[List[float]] = ranged([0.85, 0.95], "[0, 1)")
    warmup_epochs: float = ranged(0.0, "[0, inf)")  # linear warmup, in epochs of optimizer updates
    warmup_start_ratio: float = ranged(0.0, "[0, 1]")  # warmup starts at this fraction of lr (0: from ~0)
    # cosine / linear / poly floor at the last update, as a fraction of lr (above 1 the "floor" would pass the peak)
    min_lr_ratio: float = ranged(0.0, "[0, 1]")
    step_milestones: List[float] = ranged([], "[0, inf)")  # step schedule: epochs where lr *= step_gamma
    step_gamma: float = ranged(0.1, "(0, 1]")  # a decay: above 1 the lr would climb past the peak optim.lr
    # lr multiplier for biases and norm parameters (airbench: 64 for BN biases)
    bias_lr_scale: float = ranged(1.0, "(0, inf)")
    # which of them bias_lr_scale applies to: all, or only those of normalisation layers (airbench94: BN biases)
    bias_lr_scale_scope: Literal["all", "norm"] = "all"
    # weight decay on biases and norm parameters too, the same per update as on the weights (so divided by
    # their bias_lr_scale; airbench94 decays its BN biases this way)
    bias_decay: bool = False
    # parameters whose name starts with a key stop training after that many epochs: their gradients are
    # dropped (no update, momentum or weight decay), as with model.freeze_backbone_epochs. In YAML, e.g.
    # {whiten.bias: 3} (airbench94 trains its whitening bias for 3 epochs only)
    freeze_after_epochs: Dict[str, int] = ranged({}, "[0, inf)")
    fused: Optional[bool] = None  # fused optimizer kernel; null = on for CUDA, off on CPU
    # Lookahead / EMA of the weights: every `lookahead_every` updates the slow copy moves towards the weights,
    # slow += (1 - d) x (weights - slow) with d = lookahead_decay x (update / total)^3, and the weights are set
    # back to it; the final model is the slow copy. 0 = off. (airbench: every 5 updates, decay 0.95^5)
    lookahead_every: int = ranged(0, "[0, inf)")
    lookahead_decay: float = ranged(0.7738, "[0, 1)")  # at 1 the slow copy would never move
    head_lr_scale: float = ranged(1.0, "(0, inf)")  # lr multiplier for the classifier head (fine-tuning: often 10)
    # layer-wise lr decay (BEiT / timm): the head keeps lr, each block-level below it lr x layer_decay^depth;
    # null = off (0 would freeze every block below the head)
    layer_decay: Optional[float] = ranged(None, "(0, 1]")


@dataclass
class EmaCfg:
    """An exponential moving average of the weights, evaluated and exported instead of them (timm's ModelEmaV3,
    torchvision's reference ExponentialMovingAverage): ema = decay x ema + (1 - decay) x weights every `every`
    optimizer updates, in float32. Buffers (BatchNorm running statistics) are averaged like the weights, as
    both references do by default."""
    # 0 = off; e.g. 0.999 for a few thousand updates, 0.9998 for ImageNet-length runs
    decay: float = ranged(0.0, "[0, 1)")
    # short runs: the decay used at EMA update t is min(decay, 1 - (1 + t)^-warmup_power) (timm's warm-up), so
    # the average does not hold on to the random initial weights
    warmup: bool = True
    warmup_power: float = ranged(0.75, "(0, inf)")  # the power of that warm-up (timm: 3/4)
    every: int = ranged(1, "[1, inf)")  # optimizer updates between EMA updates
    # which weights evaluation scores: ema, raw (the trained weights), or both (raw metrics logged as raw_<name>;
    # eval.monitor may name either, and best/ holds the weights it monitors)
    evaluate: Literal["ema", "raw", "both"] = "ema"


@dataclass
class EvalCfg:
    every_epochs: int = ranged(1, "[0, inf)")  # 0 = only at the end
    batch_size: Optional[int] = ranged(None, "[1, inf)")  # per process; null = 2 x train.batch_size
    topk: List[int] = ranged([5], "[1, inf)")  # multiclass; each k is clamped to the class count
    threshold: float = ranged(0.5, "(0, 1)")  # binary decision threshold on the positive-class probability
    positive_class: Optional[str] = None  # binary: the class name counted as positive; null = the class with index 1
    threshold_tuning: Optional[Literal["max_f1", "youden", "target_recall"]] = None  # binary: choose the threshold on val
    # for threshold_tuning=target_recall: the highest threshold keeping this recall
    target_recall: float = ranged(0.9, "(0, 1]")
    # the metric that picks best/; null = the task's headline (accuracy; miou for segmentation); higher is
    # better except for losses
    monitor: Optional[str] = None
    # test-time augmentation: flip = mean of the logits of the image and its mirror; flip_translate
    # (classification) = airbench94's 6 views: flip, plus flip of the image shifted 1 px up-left and down-right
    # (trainer.models.forward_tta); recorded in model.json, so `trainer eval` and `trainer predict` apply the same
    tta: Literal["none", "flip", "flip_translate"] = "none"
    # which split `trainer eval` scores; all = every image under data.root/<class>/, what `trainer eval` scores by
    # default when the data.root it is given is a folder of class folders without train/ (trainer/evaluate.py)
    split: Literal["val", "test", "train", "all"] = "val"
    # when best/ gets its plots: end = once, at the end of the run, those of the final best (a new best during
    # training writes its weights, model.json and eval.json at once, so a run killed early still leaves a usable
    # best/; drawing every plot at every improvement was most of an epoch's export time, BENCHMARKS.md); every =
    # with each new best, as before
    best_plots: Literal["end", "every"] = "end"
    # detection: also score the validation loss (metric `loss` and its parts): a second pass of every image with the
    # detector in training mode, which doubled the evaluation's time (bench/eval_epoch.py, BENCHMARKS.md).
    # Classification and segmentation compute theirs from the logits they already have, at no cost: refused there
    detection_loss: bool = False
    # detection: what scores the boxes. pycocotools (the reference, and the tests' oracle) or faster_coco_eval, its
    # C++ port (pip install faster-coco-eval): the same numbers up to the last bits of a float (2e-16 measured),
    # 2.7x faster on 5,000 images (bench/det_eval.py --backends, BENCHMARKS.md)
    coco_backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"


@dataclass
class WandbCfg:
    enabled: bool = False  # log to Weights & Biases (the wandb extra); off: wandb is never imported
    project: str = "cnn-trainer"  # W&B project
    entity: Optional[str] = None  # W&B team or user; null = your default
    tags: List[str] = field(default_factory=list)  # W&B run tags


@dataclass
class TrackingCfg:
    # Loggers besides metrics.jsonl (always written: the run's own record), each through accelerate's tracker in
    # its local mode inside the run directory: tensorboard (<run>/tensorboard/), mlflow (<run>/mlflow/, a file
    # store), wandb (<run>/wandb/; wandb.enabled=true adds it), comet_ml (offline: an archive per start in
    # <run>/comet_ml/, for `comet upload`). E.g. tracking.log_with=[tensorboard,mlflow]
    log_with: List[str] = field(default_factory=list)
    project: str = "cnn-trainer"  # comet_ml's project name
    mlflow_experiment: str = "cnn-trainer"  # the MLflow experiment the run is logged under
    # null = the run's own file store (<run>/mlflow); or a tracking server, database or file store of your own
    # (http://host:5000, sqlite:///path/mlflow.db, file:///shared/mlruns or a folder), which the trainer then
    # does not manage
    mlflow_uri: Optional[str] = None


@dataclass
class CheckpointCfg:
    # optimizer updates between checkpoints; 0 = only per epoch / at the end / on request
    every_steps: int = ranged(0, "[0, inf)")
    every_epochs: int = ranged(1, "[0, inf)")  # epochs between checkpoints; 0 = none per epoch
    # newest checkpoints kept; the one latest.json names and the best are never deleted
    keep_last: int = ranged(2, "[0, inf)")
    keep_best: bool = True  # also keep the checkpoint taken at the best eval.monitor value


@dataclass
class RunCfg:
    dir: Optional[str] = None  # run directory; null = runs/<name>-<timestamp>
    name: Optional[str] = None  # null = the recipe's file name
    # An existing run directory with a checkpoint is resumed from its latest one (the same command continues
    # the run); overwrite=true deletes it and starts over; anything else refuses to touch it.
    overwrite: bool = False
    resume: Optional[str] = None  # a checkpoint folder (or a run directory) to resume from instead
    # A resume compares this config with the checkpoint's: keys that change which batches come next or the
    # learning rate of the next update (batch size, accumulation, epochs, schedule, data, model) are refused,
    # listed old -> new, unless this says the change is meant. Keys in RESUME_SAFE_KEYS always pass.
    allow_config_change: bool = False


@dataclass
class Config:
    # auto: segmentation for mask data (data.format masks/voc, the generated segmentation variant), detection
    # for box data (coco, voc_detection, the generated detection variant), multilabel for label sets
    # (data.format=multilabel, the generated multilabel variant), else binary
    # when the data has 2 classes, else multiclass
    task: Literal["auto", "binary", "multiclass", "segmentation", "detection", "multilabel"] = "auto"
    seed: int = ranged(0, "[0, 4294967295]")  # accelerate's set_seed seeds numpy, whose seeds are 32-bit
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    ema: EmaCfg = field(default_factory=EmaCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    wandb: WandbCfg = field(default_factory=WandbCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    run: RunCfg = field(default_factory=RunCfg)


# Keys that may differ between a checkpoint and the run resuming it: they change how the run is watched,
# evaluated, saved, launched or read from disk, not which batches it sees or which lr each update gets.
# (data.root may move, e.g. a node-local copy: the data's identity is checked by its fingerprint instead.)
RESUME_SAFE_KEYS = ("run.", "wandb.", "tracking.", "checkpoint.", "eval.", "train.log_every_steps",
                    "train.progress_bar", "train.dist_timeout_s", "train.cudnn_benchmark", "train.deterministic",
                    "train.device", "data.num_workers", "data.prefetch_factor", "data.verify_images", "data.root",
                    "data.download", "model.compile", "model.weights_download", "ema.evaluate")


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted keys (data.image_size: 32): what a resume compares, MLflow's parameters."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# what a process count splits: a resume compares the global batch they make (trainer/state.py), not each key, so
# that a requeue onto another allocation with the same global batch continues (batch halved on twice the GPUs)
BATCH_KEYS = ("train.batch_size", "train.grad_accum_steps", "train.global_batch_size")


def config_changes(old: dict, new: dict) -> List[str]:
    """`key: old -> new` for every key that differs and is not resume-safe (a key one side lacks counts
    as changed only if the other side does not hold its default); the batch keys are compared as the global
    batch they make, by the caller."""
    defaults = flatten(to_dict(Config()))
    a, b = flatten(old), flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUME_SAFE_KEYS) or key in BATCH_KEYS:
            continue
        before, after = a.get(key, defaults.get(key)), b.get(key, defaults.get(key))
        if before != after:
            changes.append(f"{key}: {before} -> {after}")
    return changes


def _fix_yaml_booleans(cfg) -> None:
    # YAML 1.1 reads `no` as False; for train.mixed_precision that means "no", not an error.
    if OmegaConf.select(cfg, "train.mixed_precision", default=None) is False:
        OmegaConf.update(cfg, "train.mixed_precision", "no")


def load_yaml(path: Path, what: str):
    """A YAML file through OmegaConf, with a syntax error as one line naming the file and position."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a YAML file") from None


def load_spec_file(path: Path, what: str, keys: set, required: Sequence[str]) -> dict:
    """A sweep or tune file: a YAML mapping of known keys (`what` names the kind in errors), resolved to plain
    Python, with its required keys present."""
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    loaded = load_yaml(path, f"{what} file")
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(f"{what} file {path} is not a mapping of keys (name, recipe, parameters, ...)")
    try:
        spec = OmegaConf.to_container(loaded, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{what} file {path}: {str(err).splitlines()[0]}") from None
    unknown = sorted(set(spec) - keys)
    if unknown:
        raise ConfigError(f"unknown {what} key '{unknown[0]}' in {path}; valid: {sorted(keys)}")
    for key in required:
        if key not in spec:
            raise ConfigError(f"{what} file {path} needs '{key}'")
    return spec


def _one_line(err: OmegaConfBaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{first} (key: {key})" if key and key not in first else first


def load_config(recipe: Optional[str] = None, overrides: Optional[List[str]] = None, base: Optional[dict] = None) -> Config:
    """Schema defaults <- `base` (e.g. a run's saved config) <- recipe YAML <- key=value overrides."""
    layers = [OmegaConf.structured(Config)]
    try:
        if base is not None:
            base_cfg = OmegaConf.create(base)
            _fix_yaml_booleans(base_cfg)
            layers.append(base_cfg)
        if recipe is not None:
            path = Path(recipe)
            if not path.is_file():
                raise ConfigError(f"recipe file not found: {recipe}")
            recipe_cfg = load_yaml(path, "recipe")
            if not isinstance(recipe_cfg, dict) and not OmegaConf.is_dict(recipe_cfg):
                raise ConfigError(f"recipe {recipe} is not a mapping of keys")
            _fix_yaml_booleans(recipe_cfg)
            layers.append(recipe_cfg)
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not key=value")
        for item in overrides or []:
            try:  # a value OmegaConf cannot parse (e.g. `{a:b}` without a space) names its override
                OmegaConf.from_dotlist([item])
            except yaml.YAMLError as err:
                raise ConfigError(f"override '{item}': its value is not valid YAML "
                                  f"({str(err).splitlines()[0]}; a mapping needs a space after each colon)") from None
        if overrides:
            dot = OmegaConf.from_dotlist(list(overrides))
            _fix_yaml_booleans(dot)
            layers.append(dot)
        merged = OmegaConf.merge(*layers)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required value: {missing[0]}")
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    if cfg.run.name is None and recipe is not None:
        cfg.run.name = Path(recipe).stem
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Each number inside the range its field declares (`check_ranges`), then the rules that relate keys to
    each other and to the data, which one field's range cannot express; each names its key."""
    check_ranges(cfg)
    if cfg.model.weights and cfg.model.pretrained_path:
        raise ConfigError("model.weights and model.pretrained_path both name the starting weights: choose one")
    if cfg.run.resume and cfg.run.overwrite:
        raise ConfigError("run.resume and run.overwrite=true contradict each other: choose one")
    needs_root = {"imagefolder": "image", "masks": "masks", "coco": "COCO", "shards": "packed (trainer pack)",
                  "multilabel": "multi-label CSV"}
    if cfg.data.format in needs_root and not cfg.data.root:
        raise ConfigError(f"missing required value: data.root (the {needs_root[cfg.data.format]} folder to train on)")
    if cfg.data.coco_files is not None and cfg.data.format != "coco":
        raise ConfigError(f"data.coco_files is for data.format=coco (it is {cfg.data.format})")
    if cfg.train.global_batch_size is not None and cfg.train.grad_accum_steps != 1:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} derives the accumulation from the "
                          f"process count: leave train.grad_accum_steps at 1 (it is {cfg.train.grad_accum_steps})")
    jitter = cfg.data.augment.scale_jitter
    if jitter is not None and (len(jitter) != 2 or not jitter[0] <= jitter[1]):
        raise ConfigError(f"data.augment.scale_jitter must be [min, max] with min <= max, got {list(jitter)}")
    scale_range = cfg.data.augment.scale_range
    if scale_range is not None:
        if len(scale_range) != 2 or not scale_range[0] <= scale_range[1]:
            raise ConfigError(f"data.augment.scale_range must be [min, max] with min <= max, got {list(scale_range)}")
        if cfg.data.augment.random_resized_crop:
            raise ConfigError("data.augment.scale_range and data.augment.random_resized_crop both choose the scale "
                              "and crop of a training image: turn one off")
        if cfg.data.augment.multiscale_sizes:
            raise ConfigError("data.augment.scale_range and data.augment.multiscale_sizes both size a detector's "
                              "training images (a fixed square canvas, or a short side per batch): choose one")
    # each task's rules: the data it trains on, the keys only it reads (trainer/tasks, above this module: imported
    # when a config is checked; the package's face imports no torch, so a mistake still fails in 0.3 s)
    from trainer.tasks import check_config as check_task_config

    check_task_config(cfg)
    legacy = {"true": "full", "false": "off"}  # the key was a boolean: true meant a full decode
    cfg.data.verify_images = legacy.get(str(cfg.data.verify_images).lower(), cfg.data.verify_images)
    if cfg.data.verify_images not in VERIFY_MODES:
        raise ConfigError(f"data.verify_images must be one of {', '.join(VERIFY_MODES)} (or true = full, false = off), "
                          f"got {cfg.data.verify_images!r}")
    # YAML 1.1 reads `off` (and `no`, `false`) as a boolean, which a str key receives as "False"
    if str(cfg.data.cache_dir).lower() in ("false", "off", "no"):
        cfg.data.cache_dir = "off"
    elif str(cfg.data.cache_dir).lower() in ("true", "yes", "on"):
        raise ConfigError(f"data.cache_dir is a folder, \"\" (the default place) or off, got {cfg.data.cache_dir!r}")
    if cfg.data.skip_bad_images and cfg.data.verify_images == "off":
        raise ConfigError("data.skip_bad_images=true needs data.verify_images=header or full (bad files are found at "
                          "start-up)")
    for key in ("mean", "std"):
        value = getattr(cfg.data, key)
        if value is not None and len(value) != 3:
            raise ConfigError(f"data.{key} must have 3 values (R, G, B), got {value}")
    if cfg.data.augment.flip_mode == "alternating" and cfg.data.loader != "device":
        raise ConfigError("data.augment.flip_mode=alternating needs data.loader=device")
    if cfg.data.loader == "device" and (cfg.data.augment.random_resized_crop or cfg.data.augment.color_jitter > 0):
        raise ConfigError("data.loader=device does pad-crop and flip only; turn off data.augment.random_resized_crop "
                          "and data.augment.color_jitter, or use data.loader=workers")
    if cfg.data.loader == "device" and cfg.data.sampler == "weighted":
        raise ConfigError("data.sampler=weighted needs data.loader=workers")
    if cfg.data.decode_device == "cuda":
        if cfg.data.loader != "workers":
            raise ConfigError("data.decode_device=cuda is for data.loader=workers (data.loader=device decodes the "
                              "split once, at start-up, on the CPU)")
    if cfg.optim.schedule == "one_cycle" and cfg.optim.warmup_epochs > 0:
        raise ConfigError(f"optim.warmup_epochs={cfg.optim.warmup_epochs} with optim.schedule=one_cycle: the cycle "
                          f"warms up itself (optim.one_cycle_pct_start of the updates); set optim.warmup_epochs=0")
    cycle = cfg.optim.one_cycle_momentum
    if cycle is not None and (len(cycle) != 2 or not cycle[0] <= cycle[1]):
        raise ConfigError(f"optim.one_cycle_momentum must be [base, max] with base <= max, got {list(cycle)}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have 2 values, got {cfg.optim.betas}")
    _validate_regularisation(cfg)
    _validate_trackers(cfg)


def trackers(cfg: Config) -> List[str]:
    """The loggers a run drives: tracking.log_with, plus wandb when wandb.enabled, each once."""
    return list(dict.fromkeys([*cfg.tracking.log_with, *(["wandb"] if cfg.wandb.enabled else [])]))


def _validate_trackers(cfg: Config) -> None:
    """Each logger known, and its package installed (accelerate would drop a missing one without a word)."""
    import importlib.util

    for name in trackers(cfg):
        if name not in TRACKERS:
            raise ConfigError(f"tracking.log_with: unknown logger '{name}'; valid: {', '.join(sorted(TRACKERS))}")
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            key = "wandb.enabled=true" if name == "wandb" and name not in cfg.tracking.log_with else "tracking.log_with"
            raise ConfigError(f"{key} logs with {name}, whose package is not installed: pip install {package} "
                              f"-c launch/constraints.txt (or pip install -e '.[{name}]')")


def _validate_regularisation(cfg: Config) -> None:
    """The rules of EMA, per-image policies on the device loader, freezing and early stopping that relate keys to
    each other (their ranges are in the schema; which task each key is for, the tasks' check_config says)."""
    aug = cfg.data.augment
    if cfg.ema.decay == 0 and cfg.ema.evaluate != "ema":
        raise ConfigError(f"ema.evaluate={cfg.ema.evaluate} needs EMA on (ema.decay > 0)")
    if (cfg.eval.monitor or "").startswith("raw_") and cfg.ema.evaluate != "both":
        raise ConfigError(f"eval.monitor={cfg.eval.monitor} names the raw weights' metric, logged only with "
                          f"ema.evaluate=both (and ema.decay > 0)")
    if cfg.data.loader == "device" and (aug.auto_augment != "none" or aug.random_erasing > 0):
        raise ConfigError("data.augment.auto_augment and data.augment.random_erasing are per-image transforms: use "
                          "data.loader=workers (data.loader=device does pad-crop, flip, mixup and CutMix)")
    if cfg.model.freeze_backbone_epochs >= cfg.train.epochs:
        raise ConfigError(f"model.freeze_backbone_epochs={cfg.model.freeze_backbone_epochs} must be smaller than "
                          f"train.epochs={cfg.train.epochs} (the backbone would never train)")
    if cfg.train.early_stopping.patience and not cfg.eval.every_epochs:
        raise ConfigError("train.early_stopping.patience needs evaluations during training (eval.every_epochs > 0)")


def batching(train_cfg, processes: int) -> Tuple[int, int]:
    """(per-process batch, accumulation steps) of a start on `processes` processes: the config's own, or with
    train.global_batch_size the fewest accumulation steps whose per-process batch divides the global batch
    exactly and is at most train.batch_size (so a requeue onto half the GPUs accumulates twice as many)."""
    total = train_cfg.global_batch_size
    if total is None:
        return train_cfg.batch_size, train_cfg.grad_accum_steps
    if total % processes:
        raise ConfigError(f"train.global_batch_size={total} cannot be split evenly over {processes} processes; "
                          f"choose a multiple of the process count")
    per_process = total // processes
    steps = next(a for a in range(1, per_process + 1) if per_process % a == 0
                 and per_process // a <= train_cfg.batch_size)
    return per_process // steps, steps


def eval_batch_size(cfg: Config) -> int:
    """Per process; no gradients are kept, so twice the training batch unless eval.batch_size says."""
    return cfg.eval.batch_size or 2 * cfg.train.batch_size


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
