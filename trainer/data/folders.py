"""Reading ImageFolder trees: finding classes and files, splitting, checking that every file decodes.

Errors name the folder or file at fault. Images of any mode (grayscale, 16-bit, float, RGBA, palette, CMYK)
become 8-bit RGB (`to_rgb`), turned upright by their EXIF orientation unless told not to.
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
Sample = Tuple[str, int]  # (path, class index)


def is_image_file(path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """One channel of a 16-bit, 32-bit integer or float image (PIL modes I;16*, I, F) as uint8.

    PIL's own convert("RGB") clips these instead of scaling: a 16-bit gradient comes out 99% white. Rules:
    - integers (I;16, I;16B/L/N, I): 16-bit data, v / 257 rounded (65535 -> 255, 257 -> 1), clipped to
      [0, 255]. Mode I (32-bit) is read the same way: it is what 16-bit PNGs open as on some Pillow versions.
    - floats (F): NaN -> 0; then if every value is in [0, 1], x 255; elif every value is in [0, 255], as is;
      else the 16-bit range, / 257; rounded (half to even) and clipped to [0, 255].
    """
    x = values.astype(np.float64)  # float32 would round 16-bit values; float64 holds every int32 exactly
    if values.dtype.kind == "f":
        x = np.nan_to_num(x, nan=0.0)  # +-inf stay huge and are clipped below
        lo, hi = (x.min(), x.max()) if x.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1:
            x = x * 255
        elif not (lo >= 0 and hi <= 255):
            x = x / 257
    else:
        x = x / 257
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit, 32-bit and float grayscale scaled (`scale_to_uint8`), alpha
    dropped (LA, PA, RGBA, palette transparency: the colour under it is kept), palettes looked up, 1-bit as
    0/255, CMYK and anything else through PIL's convert."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return Image.fromarray(scale_to_uint8(np.asarray(img)), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:  # via RGBA: PIL warns on a direct P -> RGB here
        img = img.convert("RGBA")
    return img.convert("RGB")


EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 2-8 say how the stored pixels are turned
# what undoes each orientation (the inverse of PIL's exif_transpose; 6 and 8 are the two 90-degree turns)
UNDO_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
                    7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


# what turns each orientation upright (PIL's exif_transpose's own table)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def jpeg_orientation(img: Image.Image) -> int:
    """The EXIF Orientation (2-8; 1 for none) of an opened JPEG: the tag of its Exif segment, wherever that lies
    among its APP1 segments and however the tag is typed (Pillow's EXIF parser), nothing else. The one rule of
    every JPEG decode here (torchvision's and PIL's, the scaled and the GPU decodes, the masks' turn, `trainer
    pack`), so that all turn a file alike: torchvision's own reader takes only the first APP1 segment (an XMP
    one before the Exif one hides the tag) and a tag stored as a LONG reads 0, and PIL's getexif() and
    exif_transpose also take XMP's tiff:Orientation when the Exif has none."""
    return _orientation_of(img.info.get("exif"))


def jpeg_bytes_orientation(data) -> int:
    """jpeg_orientation of a JPEG's bytes (or any buffer of them: a uint8 array), from its header's segments
    alone: the payload Pillow keeps as info["exif"] (the first APP1 segment that starts "Exif\0\0"), found by
    walking the segments' lengths up to the scan: ~3 us, where opening the file in Pillow takes ~40 us, longer
    than decoding a CIFAR-size JPEG. 1 for a header that cannot be walked (the decoder then names the fault)."""
    view = memoryview(data).cast("B")
    pos, end = 2, len(view)
    while pos + 4 <= end and view[pos] == 0xFF:
        marker = view[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: past the header
            break
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            length = view[pos + 2] << 8 | view[pos + 3]
            if marker == 0xE1 and view[pos + 4:pos + 10] == b"Exif\x00\x00":
                return _orientation_of(bytes(view[pos + 4:pos + 2 + length]))
            pos += 2 + length
    return 1


def _orientation_of(exif_segment: Optional[bytes]) -> int:
    if not exif_segment:
        return 1
    exif = Image.Exif()
    try:
        exif.load(exif_segment)
    except Exception:  # a damaged Exif block: as if it had none (the image itself may still decode)
        return 1
    value = exif.get(EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and value in UPRIGHT else 1


def load_rgb(path, exif_orientation: bool = True) -> Image.Image:
    """A file path or object, decoded fully by PIL as 8-bit RGB (`to_rgb`), turned upright by its EXIF
    Orientation tag (JPEG, TIFF, PNG, WebP) unless `exif_orientation` is false; then the stored pixels."""
    with Image.open(path) as img:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        img.load()
        if exif_orientation and img.format == "JPEG":  # by the one rule of every JPEG decode (jpeg_orientation)
            turn = jpeg_orientation(img)
            return to_rgb(img.transpose(UPRIGHT[turn]) if turn in UPRIGHT else img)
        if exif_orientation:
            ImageOps.exif_transpose(img, in_place=True)  # no copy when there is no tag
        elif orientation in UNDO_ORIENTATION and img.getexif().get(EXIF_ORIENTATION, 1) == 1:
            # the tag went on load: PIL turned the image itself (Pillow 13 does for TIFFs, whatever we ask)
            img = img.transpose(UNDO_ORIENTATION[orientation])
        return to_rgb(img)


JPEG_MAGIC = b"\xff\xd8\xff"  # how a JPEG starts, whatever its file name says


def decode_jpeg_rgb(data, exif_orientation: bool):
    """torchvision's libjpeg-turbo decoder, always to 3-channel RGB (grayscale and CMYK converted); `data`
    is one uint8 tensor of file bytes or a list of them (one batched call). With `exif_orientation` each is
    turned upright by its EXIF Orientation as `jpeg_orientation` reads it, as PIL's `ImageOps.exif_transpose`
    turns it (equal pixels, tested); not by torchvision's own reading of the tag (see jpeg_orientation)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from trainer.data.device_decode import upright

    with warnings.catch_warnings():  # torchvision 0.29 announces a move of its decoders to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=False)
    if not exif_orientation:
        return images

    def turned(image: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:  # a view where it can (no copy)
        return upright(image, jpeg_bytes_orientation(raw.numpy()))

    return [turned(image, raw) for image, raw in zip(images, data)] if isinstance(data, list) else turned(images, data)


def decode_rgb(path: str, exif_orientation: bool = True) -> torch.Tensor:
    """One image file as a (3, H, W) uint8 RGB tensor: what the training, evaluation and predict paths read.

    JPEGs go through torchvision's `decode_jpeg`: with the file read, 2.2x PIL per CIFAR-size image and on
    par for photo-sized ones, and the uint8 tensor then feeds torchvision's vectorised uint8 resize (a
    224-px RandomResizedCrop sample 1.5-1.9x faster than from a PIL image; bench/input_pipeline.py). Other
    formats, and any JPEG that decoder refuses (a truncated one too), go through PIL (`load_rgb`), whose
    error then says what is wrong. Both paths apply the EXIF orientation (phone photos are stored sideways
    with a tag saying so) unless `exif_orientation` is false (data.exif_orientation).
    """
    with open(path, "rb") as fh:
        return decode_bytes(fh.read(), exif_orientation)


def decode_bytes(data: bytes, exif_orientation: bool = True) -> torch.Tensor:
    """An image file's bytes (read from a file, or a packed shard's row) as decode_rgb gives them."""
    if data[:3] == JPEG_MAGIC:
        try:
            return decode_jpeg_rgb(torch.frombuffer(bytearray(data), dtype=torch.uint8), exif_orientation)
        except RuntimeError:  # a JPEG variant libjpeg-turbo in torchvision does not take: PIL may
            pass
    return torch.from_numpy(np.array(load_rgb(io.BytesIO(data), exif_orientation))).permute(2, 0, 1)


# ---- scaled JPEG decoding: only the pixels a sample keeps (data.scaled_decode) ----

# libjpeg-turbo's DCT-domain scales with SIMD code: 1/8, 1/4, 1/2 and 1. Its other M/8 scales (3/4, 5/8, ...)
# have none: a 640x480 JPEG took 2.0 ms at 7/8 against 1.0 ms whole (simplejpeg, this VM, 2026-12-06).
DCT_SCALES = (8, 4, 2, 1)
SCALABLE_MODES = ("RGB", "L")  # PIL's modes of YCbCr and grayscale JPEGs; CMYK/YCCK ones take the full path


class JpegHeader(NamedTuple):
    """What the scale choice needs of a JPEG, read from its header without decoding a pixel."""
    width: int  # as stored
    height: int
    orientation: int  # the EXIF orientation to apply (1: none, or data.exif_orientation off)

    def upright_size(self) -> Tuple[int, int]:
        """(height, width) once turned upright: what decode_rgb's image measures."""
        return (self.width, self.height) if self.orientation >= 5 else (self.height, self.width)


def jpeg_header(data: bytes, exif_orientation: bool = True) -> Optional[JpegHeader]:
    """The header of a JPEG whose pixels Pillow can decode at a reduced DCT scale (baseline or progressive,
    YCbCr or grayscale); None for anything else (not a JPEG, CMYK, a header PIL cannot parse), which then
    takes the full decode (decode_bytes) and its errors."""
    if data[:3] != JPEG_MAGIC:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG" or img.mode not in SCALABLE_MODES:
                    return None
                return JpegHeader(img.width, img.height, jpeg_orientation(img) if exif_orientation else 1)
    except Exception:  # PIL raises many types for a bad header: the full path names the file and the error
        return None


def dct_scale(height: float, width: float, out_height: int, out_width: int) -> int:
    """The largest DCT scale divisor s (8, 4, 2 or 1) at which a `height` x `width` region of the full image
    still has at least `out_height` x `out_width` pixels: the region is then only ever shrunk to the output,
    as from the full decode, never enlarged."""
    for s in DCT_SCALES:
        if height / s >= out_height and width / s >= out_width:
            return s
    return 1


def stored_box(box: Tuple[int, int, int, int], orientation: int, height: int,
               width: int) -> Tuple[int, int, int, int]:
    """A (top, left, height, width) box of the upright image as the same pixels' box in the stored one
    (`height` x `width` as stored), for EXIF `orientation` as `upright` (device_decode) applies it."""
    top, left, h, w = box
    if orientation == 2:
        return top, width - left - w, h, w
    if orientation == 3:
        return height - top - h, width - left - w, h, w
    if orientation == 4:
        return height - top - h, left, h, w
    if orientation == 5:
        return left, top, w, h
    if orientation == 6:
        return height - left - w, top, w, h
    if orientation == 7:
        return height - left - w, width - top - h, w, h
    if orientation == 8:
        return left, width - top - h, w, h
    return box


def decode_region(data: bytes, header: JpegHeader, box: Tuple[int, int, int, int], size: Sequence[int],
                  exif_orientation: bool = True, interpolation=None, antialias: bool = True) -> torch.Tensor:
    """The (top, left, height, width) `box` of a JPEG's upright image resized to `size` (height, width): a
    (3, H, W) uint8 tensor, decoded at the reduced DCT scale `dct_scale` allows for the box.

    Scale 1: the full decode (decode_bytes) and torchvision's resized_crop, the very pixels of the full path.
    Scale s > 1: Pillow's draft mode decodes the stored image at 1/s (ceil(W/s) x ceil(H/s): its pixel j is
    stored pixels [j*s, (j+1)*s)), the box mapped into the stored frame, its edges moved to the nearest
    multiple of s so that it falls on whole decoded pixels (each edge moves at most s/2 pixels of the full
    image, under half an output pixel since the box keeps >= `size` pixels at 1/s), resized there, and the
    result turned upright. Raises what Pillow raises for a file it cannot decode."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from trainer.data.device_decode import upright

    interpolation = InterpolationMode.BILINEAR if interpolation is None else interpolation
    out_h, out_w = int(size[0]), int(size[1])
    turned = header.orientation >= 5  # a quarter turn: the stored frame's output is width x height
    top, left, h, w = stored_box(box, header.orientation, header.height, header.width)
    s = dct_scale(h, w, out_w if turned else out_h, out_h if turned else out_w)
    if s == 1:
        image = decode_bytes(data, exif_orientation)
        return TF.resized_crop(image, *box, [out_h, out_w], interpolation=interpolation, antialias=antialias)
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (header.width // s, header.height // s))  # picks exactly 1/s (see test_data)
        img.load()
        pixels = np.array(img if img.mode == "RGB" else img.convert("RGB"))  # writable (asarray's is not)
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    rows, cols = image.shape[-2:]
    # edges on the decoded grid, rounded half up (shift-invariant: h / s >= out_h keeps >= out_h rows)
    t0, t1 = min(int(top / s + 0.5), rows - 1), min(int((top + h) / s + 0.5), rows)
    l0, l1 = min(int(left / s + 0.5), cols - 1), min(int((left + w) / s + 0.5), cols)
    out = TF.resized_crop(image, t0, l0, max(t1 - t0, 1), max(l1 - l0, 1),
                          [out_w, out_h] if turned else [out_h, out_w], interpolation=interpolation,
                          antialias=antialias)
    return upright(out, header.orientation).contiguous()



def decode_fit(data: bytes, header: JpegHeader, size: Sequence[int], exif_orientation: bool = True) -> torch.Tensor:
    """A JPEG's whole upright image as a (3, H, W) uint8 tensor, decoded at the smallest DCT scale at which it
    still has `size` (height, width) pixels or more: what evaluation's Resize to `size` then shrinks (the eval
    splits with data.scaled_decode, and `trainer predict` of their models: the same function, so both give the
    same pixels). A one-element `size` (side,) is a shorter-side Resize (data.crop_mode=center): the scale keeps
    the shorter side >= side, i.e. both sides, so it depends on the header's size alone (deterministic).
    Scale 1: decode_bytes itself. Raises what Pillow raises for a file it cannot decode."""
    from trainer.data.device_decode import upright

    height, width = header.upright_size()
    out_h, out_w = (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))
    s = dct_scale(height, width, out_h, out_w)
    if s == 1:
        return decode_bytes(data, exif_orientation)
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (header.width // s, header.height // s))
        img.load()
        pixels = np.array(img if img.mode == "RGB" else img.convert("RGB"))
    # the last decoded row and column stand for the image's last H mod s (W mod s) rows (columns) alone: kept
    # only where those are at least half of s, as decode_region rounds its edges, so that the image is not
    # stretched by up to (s - 1) / s of a decoded pixel towards its bottom and right
    pixels = pixels[:int(header.height / s + 0.5), :int(header.width / s + 0.5)]
    return upright(torch.from_numpy(pixels).permute(2, 0, 1), header.orientation).contiguous()


# ---- walking folders ----

class SkippedPath(NamedTuple):
    """A path the folder walk did not list (walk_image_files), kept so that it can be reported."""
    path: str
    target: str  # what a link points at (its text, as `ls -l` shows it); "" for a folder bind-mounted twice
    why: str  # a key of SKIP_REASONS


SKIP_REASONS = {
    "folder_seen": "symlinked folder(s) already visited (a loop or a second path to one folder)",
    "broken": "broken link(s)",
}


def _inode(st: os.stat_result) -> Tuple[int, int]:
    return st.st_dev, st.st_ino  # what a real folder is, whatever path reached it


def _link_text(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # not a link (a bind-mounted folder seen twice)
        return ""


def walk_image_files(folders: Sequence, seen: Optional[Set[Tuple[int, int]]] = None,
                     listed_folders: Optional[Dict[str, int]] = None) -> Tuple[List[str], List[SkippedPath]]:
    """Image files under each of `folders`, recursively: one sorted list of paths, and the paths skipped.

    Every path to an image file is listed, as torchvision's ImageFolder lists them: a hardlink, or a symlink
    to a file, is a file of the folder it is in, even when it leads to a file listed already (DVC's hardlink
    and symlink caches store equal images that way: dropping them dropped samples, and could empty a class).
    Symlinked folders are followed (datasets are often linked in), but each real folder is entered once, so a
    link to a folder itself or to a parent ends instead of looping, and a second path to a folder does not
    list its files twice; broken links are skipped too. A folder is known by its (st_dev, st_ino), whatever
    path reached it. `seen` holds those of folders not to enter (scan_split: the split folder, so that a link
    up to it does not list its classes a second time); it is updated with the folders this walk enters. Each
    of `folders` is entered.

    Where one folder has several paths, the one with no symlink on the way is walked, else the first met:
    real subfolders are listed depth-first in name order, symlinked ones after all the real folders under
    every one of `folders`, in the order met. The result is the same on every run.

    `listed_folders`, when given, receives every folder listed, with its modification time (st_mtime_ns, read
    before listing it): what trainer.data.manifest compares to know that nothing changed since.
    """
    seen = set() if seen is None else seen
    roots = [os.fspath(f) for f in folders]
    seen.update(_inode(os.stat(r)) for r in roots)
    skipped: List[SkippedPath] = []
    found: List[str] = []  # every image file met, by the path that reached it
    todo = list(reversed(roots))  # folders to list (a stack: depth-first)
    links: List[Tuple[str, Tuple[int, int]]] = []  # symlinked folders met, entered after the real ones
    while todo or links:
        if not todo:
            link, inode = links.pop(0)
            if inode in seen:
                skipped.append(SkippedPath(link, _link_text(link), "folder_seen"))
            else:
                seen.add(inode)
                todo.append(link)
            continue
        path = todo.pop()
        try:
            if listed_folders is not None:
                listed_folders[path] = os.stat(path).st_mtime_ns
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:  # os.walk would skip it silently: a class would lose files unnoticed
            raise DataError(f"cannot list folder {path}: {err.strerror or err}") from None
        subfolders = []
        for entry in entries:
            if entry.is_symlink():
                try:
                    st = entry.stat()  # follows the link
                except OSError:  # dangling, or a loop of links (ELOOP)
                    skipped.append(SkippedPath(entry.path, _link_text(entry.path), "broken"))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    links.append((entry.path, _inode(st)))
                elif is_image_file(entry.name):
                    found.append(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                inode = _inode(entry.stat(follow_symlinks=False))
                if inode in seen:  # a bind mount of a folder already entered
                    skipped.append(SkippedPath(entry.path, "", "folder_seen"))
                    continue
                seen.add(inode)
                subfolders.append(entry.path)
            elif is_image_file(entry.name):  # no stat per file: a million files on a network file system
                found.append(entry.path)
        todo.extend(reversed(subfolders))  # popped in name order
    return sorted(found), skipped


def describe_skipped(skipped: Sequence[SkippedPath]) -> str:
    """One line for a log: how many paths the walk skipped, of which kinds, and one example."""
    counts = Counter(s.why for s in skipped)
    kinds = ", ".join(f"{counts[why]} {text}" for why, text in SKIP_REASONS.items() if counts[why])
    first = skipped[0]
    example = f"{first.path} -> {first.target}" if first.target else first.path
    return f"skipped {len(skipped)} path(s) while listing image files: {kinds}; e.g. {example}"


def find_classes(folder: Path) -> List[str]:
    if not folder.exists():
        raise DataError(f"data path does not exist: {folder}")
    if not folder.is_dir():
        raise DataError(f"data path is not a folder: {folder}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {folder} (expected {folder}/<class name>/<images>)")
    return classes


def scan_split(folder: Path, classes: Sequence[str], skipped: Optional[List[SkippedPath]] = None,
               listed_folders: Optional[Dict[str, int]] = None) -> List[Sample]:
    """All image files under folder/<class>/ (recursively, symlinked folders followed), sorted within each
    class, labelled by class index.

    One walk over all class folders (walk_image_files), with the split folder held as seen: no folder is
    entered twice, nor under two classes, and a folder link from one class into another or up to the split
    folder is skipped rather than followed. Every path to a file is a sample of the class folder it is in, as
    in torchvision's ImageFolder: a hardlink, or a symlink to a file of the same class or of another, counts
    (a deliberate duplicate: DVC's caches store equal images as links). The paths skipped are appended to
    `skipped` when it is given (build_data reports them in one line).
    """
    folder = Path(folder)
    owner = {_inode(os.stat(folder)): str(folder)}  # real folder -> the path that claimed it
    for name in classes:
        class_dir = folder / name
        if not class_dir.is_dir():
            raise DataError(f"class folder missing: {class_dir} (the training split has class '{name}')")
        inode = _inode(os.stat(class_dir))
        # Two classes whose folders are one folder (`puppy -> dog`) stay an error, where torchvision would make
        # two classes of the same images: every image would be both, so no model can tell the two apart and
        # their metrics mean nothing; it is a mistake, not a duplicate. (A file linked into another class is one
        # image with two labels, which a user may mean: it counts, above.)
        if inode in owner:
            raise DataError(f"class folder {class_dir} is the same folder as {owner[inode]} (a symlink): "
                            f"each class needs its own folder")
        owner[inode] = str(class_dir)
    if listed_folders is not None:
        listed_folders[str(folder)] = os.stat(folder).st_mtime_ns
    files, passed = walk_image_files([folder / name for name in classes], seen={_inode(os.stat(folder))},
                                     listed_folders=listed_folders)
    if skipped is not None:
        skipped.extend(passed)
    start = len(str(folder / "_")) - 1  # where the class name begins in every path (pathlib drops a "./" root)
    per_class: Dict[str, List[str]] = {name: [] for name in classes}
    for f in files:  # every path the walk gives is folder/<class>/...
        per_class[f[start:].split(os.sep, 1)[0]].append(f)
    for name in classes:
        if not per_class[name]:
            class_dir = folder / name
            passed_here = [s for s in passed if s.path.startswith(os.path.join(str(class_dir), ""))]
            why = f"; {describe_skipped(passed_here)}" if passed_here else ""
            raise DataError(f"empty class folder: {class_dir} has no image files ({', '.join(IMAGE_EXTENSIONS)}){why}")
    return [(f, idx) for idx, name in enumerate(classes) for f in per_class[name]]


def lost_class_message(name: str, by: str, dropped: Sequence[str], more_classes: int) -> str:
    """The one line for a class that skipping unreadable images left with no training image (`by`: what
    skipped them), which the folder path and the shards both refuse; the caller adds the fix."""
    example = f", e.g. {dropped[0]}" if dropped else ""
    more = f" (and {more_classes} more class(es) likewise)" if more_classes else ""
    return (f"class '{name}' has no readable training image left: {by} dropped all {len(dropped)} of its "
            f"files{example}{more}")


def stratified_split(samples: List[Sample], fraction: float, seed: int) -> Tuple[List[Sample], List[Sample]]:
    """Seeded split keeping each class's share: round(fraction x count) of every class goes to the second part.

    Each class keeps at least one training sample; the order inside each part stays sorted by path.
    """
    rng = np.random.default_rng(seed)
    labels = np.array([label for _, label in samples])
    held = np.zeros(len(samples), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n_held = min(int(round(fraction * len(idx))), len(idx) - 1)
        held[rng.permutation(idx)[:n_held]] = True
    return [s for s, h in zip(samples, held) if not h], [s for s, h in zip(samples, held) if h]


def image_error(err: Exception) -> str:
    """A decoding error as "Type: message" for the one error line. PIL names a file it was handed open by
    the object's repr ("<_io.BytesIO object at 0x7f...>", "<_io.BufferedReader name='...'>"), which tells the
    user nothing new and may differ run to run: that part is dropped (the caller names the file)."""
    return f"{type(err).__name__}: " + re.sub(r"\s*<(_io\.[^<>]*|[^<>]* object at 0x[0-9a-fA-F]+)>", "", str(err))


def decode_checked(path, exif_orientation: bool = False) -> Tuple[Optional[Image.Image], str]:
    """(the file decoded as load_rgb decodes it, "") if it decodes, else (None, why not): the full check of a
    file, whose decode a caller may keep (trainer pack --max-side shrinks it) instead of decoding it again."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's "palette images with transparency" note; we convert anyway
            return load_rgb(path, exif_orientation=exif_orientation), ""
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
        return None, image_error(err)


def _check_one(path: str) -> str:
    """"" if the file decodes, else why not."""
    return decode_checked(path)[1]  # decodability only; orientation cannot make a file bad


# What a complete file of these formats ends with: a JPEG's end-of-image marker, a PNG's IEND chunk (in its
# last 12 bytes). The usual damage (a copy cut short) removes it.
END_MARKERS = {"JPEG": (2, b"\xff\xd9"), "PNG": (12, b"IEND")}


def ends_complete(fh, fmt: Optional[str]) -> bool:
    """Whether an open image file (seekable) ends as a complete file of its format (PIL's name: JPEG, PNG) does;
    True for the formats without an end marker here. False is not yet "bad": see _check_header."""
    if fmt not in END_MARKERS:
        return True
    length, marker = END_MARKERS[fmt]
    fh.seek(0, os.SEEK_END)
    fh.seek(max(fh.tell() - length, 0))
    return marker in fh.read(length)


def _check_header(path: str) -> str:
    """The cheap check: the header parses (PIL reads no pixel), the size is not 0 and, for JPEG and PNG, the
    end marker is there. A file that fails it is decoded in full before it is called bad: some valid JPEGs
    carry bytes after their end marker (camera trailers), and they must not be refused."""
    try:
        with open(path, "rb") as fh:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(fh) as img:
                    width, height, fmt = img.width, img.height, img.format
            if width <= 0 or height <= 0:
                return f"image size {width}x{height}"
            if ends_complete(fh, fmt):
                return ""
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
        return image_error(err)
    return _check_one(path)  # no end marker: decode it to know


def find_bad_images(samples: List[Sample], full: bool = True, workers: int = 4) -> Dict[str, str]:
    """{path: why} of the files that fail the check: a full decode (`full`), or the header check above.
    Threads: PIL releases the GIL while decoding, and the header check waits on the file system."""
    check = _check_one if full else _check_header
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        problems = list(pool.map(check, [p for p, _ in samples], chunksize=64))
    except BaseException:  # a stop request mid-way: drop the queued files instead of decoding them all first
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return {p: why for (p, _), why in zip(samples, problems) if why}


def verify_images(samples: List[Sample], skip_bad: bool, workers: int = 4, full: bool = True,
                  known_bad: Optional[Dict[str, str]] = None) -> Tuple[List[Sample], List[str]]:
    """Check every file once (find_bad_images), or take `known_bad` (what an earlier check of these samples
    found: trainer.data.manifest).

    Returns the good samples and the bad paths; raises on the first bad file unless `skip_bad`.
    """
    found = find_bad_images(samples, full, workers) if known_bad is None else known_bad
    bad = [(p, found[p]) for p, _ in samples if p in found]
    if bad and not skip_bad:
        path, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"cannot read image {path}: {why}{more}; fix or remove it, or set data.skip_bad_images=true")
    bad_paths = {p for p, _ in bad}
    return [s for s in samples if s[0] not in bad_paths], sorted(bad_paths)


def scan_imagefolder(root: Path, skipped: Optional[List[SkippedPath]] = None,
                     listed_folders: Optional[Dict[str, int]] = None) -> Tuple[List[str], Dict[str, List[Sample]]]:
    """Class names and the samples of each split folder present, for either layout (see imagefolder_splits):
    root/train/<class>/... (+ val/, test/) gives "train" (+ "val", "test"); root/<class>/... gives "train"."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if listed_folders is not None:
        listed_folders[str(root)] = os.stat(root).st_mtime_ns  # a train/, val/ or test/ folder added or removed
    train_dir = root / "train"
    if train_dir.is_dir():
        classes = find_classes(train_dir)
        splits = {"train": scan_split(train_dir, classes, skipped, listed_folders)}
        for split in ("val", "test"):
            if (root / split).is_dir():
                extra = set(find_classes(root / split)) - set(classes)
                if extra:
                    raise DataError(f"{root / split} has classes not in train/: {sorted(extra)}")
                splits[split] = scan_split_allow_missing(root / split, classes, skipped, listed_folders)
    else:
        classes = find_classes(root)
        splits = {"train": scan_split(root, classes, skipped, listed_folders)}
    return classes, splits


def imagefolder_splits(root: Path, val_fraction: float, split_seed: int,
                       skipped: Optional[List[SkippedPath]] = None,
                       scanned: Optional[Tuple[List[str], Dict[str, List[Sample]]]] = None
                       ) -> Tuple[List[str], Dict[str, List[Sample]]]:
    """Class names and samples per split for either layout; the paths the folder walks skipped are appended
    to `skipped` when it is given (see scan_split). `scanned`: scan_imagefolder's result, if already made
    (a cached scan: trainer.data.manifest).

    - root/train/<class>/... (+ root/val/, + root/test/): val is split from train when there is no val/.
    - root/<class>/...: train and val are a stratified split of it.
    """
    root = Path(root)
    classes, found = scanned if scanned is not None else scan_imagefolder(root, skipped)
    splits = dict(found)
    if "val" not in splits and val_fraction <= 0:
        if "test" not in splits:
            raise DataError(f"{root} has no val/ or test/ folder and data.val_fraction is 0: nothing to validate on")
        splits["val"] = splits["test"]  # all of train trains; validation is the test split (see data.val_fraction)
    if "val" not in splits:
        splits["train"], splits["val"] = stratified_split(splits["train"], val_fraction, split_seed)
    return classes, splits


def scan_split_allow_missing(folder: Path, classes: Sequence[str], skipped: Optional[List[SkippedPath]] = None,
                             listed_folders: Optional[Dict[str, int]] = None) -> List[Sample]:
    """Like scan_split for val/test, where a class may be absent (its folder missing); empty folders still fail."""
    present = [c for c in classes if (folder / c).is_dir()]
    samples = scan_split(folder, present, skipped, listed_folders)
    remap = {i: classes.index(c) for i, c in enumerate(present)}
    return [(p, remap[label]) for p, label in samples]
