"""Bad input, caught where it enters (issue 5): one test per kind, every file generated here.

Policy: an unreadable training/validation image is skipped and listed (count in the manifest)
unless strict=true; anything that would make the submission wrong is an error before training;
`imgcls inspect` reports all of it in one pass and exits 1.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, write_image
from imgcls import cache, cli, config, layouts
from imgcls.errors import UserError


def decode_error(path: Path) -> str:
    with pytest.raises(cache.DecodeError) as e:
        cache.decode(path, 16)
    return str(e.value)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels, with no pixel data: 60 bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# --- single files: what decode says ------------------------------------------------------------

def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert decode_error(tmp_path / "empty.jpg") == "empty file (0 bytes)"


def test_truncated_jpeg(tmp_path):
    whole = write_image(tmp_path / "whole.jpg", size=(64, 64)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    assert decode_error(tmp_path / "cut.jpg").startswith("broken or truncated image: image file is truncated")


def test_non_image_with_image_extension(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are my notes, not a photo\n")
    assert decode_error(tmp_path / "notes.jpg") == ("not an image: its content is not a format Pillow reads, "
                                                    "despite the .jpg extension")


def test_unsupported_format_is_listed_not_ignored(tmp_path):
    heic = tmp_path / "train" / "cat" / "IMG_0001.HEIC"
    heic.parent.mkdir(parents=True)
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))  # an ISO-BMFF HEIC header
    write_image(tmp_path / "train" / "cat" / "ok.png")
    ds = layouts.read(tmp_path)
    assert heic in [s.path for s in ds.splits["train"]]  # a sample, so it is reported, not silently dropped
    assert decode_error(heic) == "HEIC images are not supported; convert it to JPEG or PNG"


def test_cmyk_jpeg_decodes_to_its_rgb_colour(tmp_path):
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "red.jpg")  # C=0 M=Y=full: red
    r, g, b = cache.decode(tmp_path / "red.jpg", 8)[4, 4].tolist()
    assert r > 220 and g < 40 and b < 40


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_png_is_composited_on_white(tmp_path, mode):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (200, 0, 0, 255)  # left half opaque red, right half fully transparent black
    img = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "P":
        img = img.convert("P", palette=Image.ADAPTIVE, colors=4)
        transparent = img.getpixel((7, 0))
        img.info["transparency"] = transparent
    img.save(tmp_path / "x.png", transparency=img.info.get("transparency")) if mode == "P" else img.save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode == mode
    out = cache.decode(tmp_path / "x.png", 8)
    assert out[0, 7].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert out[0, 0, 0] > 50 and out[0, 0].tolist() != [255, 255, 255]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:4] = 32768
    arr[6:] = 200  # dark: still 16-bit range, so 200/65535 -> 1, not 200
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    out = cache.decode(tmp_path / "deep.png", 8)
    assert out[:, 0, 0].tolist() == [128] * 4 + [255] * 2 + [1] * 2
    assert (out[..., 0] == out[..., 2]).all()


def test_greyscale_becomes_three_equal_channels(tmp_path):
    write_image(tmp_path / "grey.jpg", mode="L")
    out = cache.decode(tmp_path / "grey.jpg", 16)
    assert out.shape == (16, 16, 3) and (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # stored landscape: left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display (a phone held upright)
    Image.fromarray(arr).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = cache.decode(tmp_path / "phone.jpg", 16).astype(int)
    # Displayed upright the left (red) half is on top: without the EXIF rotation red would be on the left.
    assert out[2, 2, 0] > 200 and out[2, 2, 2] < 60  # top-left red
    assert out[13, 2, 2] > 200 and out[13, 2, 0] < 60  # bottom-left blue


@pytest.mark.parametrize("side", [10_000, 100_000])  # 1e8 px: over the limit; 1e10 px: Pillow's own error
def test_decompression_bomb_is_refused_from_the_header(tmp_path, side):
    path = png_header_only(tmp_path / "bomb.png", side, side)
    assert path.stat().st_size < 100
    message = decode_error(path)
    assert "decompression-bomb" in message and f"{side}" in message.replace(",", "")


# --- folders: what layouts.read collects as errors ---------------------------------------------

def test_empty_class_folder(tmp_path):
    write_image(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "train" / "dog").mkdir(parents=True)
    ds = layouts.read(tmp_path)
    assert ds.errors == [f"{tmp_path / 'train' / 'dog'} holds no images; remove the empty class folder."]
    with pytest.raises(UserError, match="1 problem"):
        ds.check()


def test_food11_name_without_numeric_label(tmp_path):
    write_image(tmp_path / "training" / "0_1.jpg")
    write_image(tmp_path / "training" / "apple_2.jpg")
    ds = layouts.read(tmp_path)
    assert ds.errors == [f"{tmp_path / 'training' / 'apple_2.jpg'}: food-11 file names are <label>_<n>.<ext> with a "
                         "numeric label; rename or remove this file."]


def test_duplicate_test_ids(tmp_path):
    write_image(tmp_path / "training" / "0_1.jpg")
    write_image(tmp_path / "test" / "0001.jpg")
    write_image(tmp_path / "test" / "0001.png")  # the submission Id is the stem: 0001 twice
    ds = layouts.read(tmp_path)
    assert ds.errors == [f"{tmp_path / 'test'}: 1 test id(s) occur more than once (e.g. 0001); each test id must be unique."]


def tiny_layout(root: Path, wnids: list[str], folders: list[str], test: list[str], template: list[str]) -> Path:
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in folders:
        write_image(root / "train" / w / "images" / f"{w}_0.JPEG", fmt="JPEG")
    for name in test:
        write_image(root / "test" / "images" / name, fmt="JPEG")
    (root / "submission_sample.csv").write_text("image_id,label\n" + "".join(f"{i},0\n" for i in template))
    return root


def test_wnids_naming_a_missing_folder_and_a_folder_not_in_wnids(tmp_path):
    root = tiny_layout(tmp_path, ["n01", "n02"], ["n01", "n03"], ["test_0.JPEG"], ["test_0.JPEG"])
    assert layouts.read(root).errors == [
        f"wnids.txt names n02 but {root / 'train' / 'n02'} is missing: add the folder or remove the line.",
        f"{root / 'train' / 'n03'} is not named in wnids.txt: add it to wnids.txt or remove the folder."]


def test_template_ids_that_do_not_match_the_test_files(tmp_path):
    root = tiny_layout(tmp_path, ["n01"], ["n01"], ["test_0.JPEG", "test_1.JPEG"], ["test_0.JPEG", "test_9.JPEG"])
    template = root / "submission_sample.csv"
    assert layouts.read(root).errors == [
        f"{template}: 1 template id(s) have no test image (e.g. test_9.JPEG).",
        f"{template}: 1 test image(s) are not in the template (e.g. test_1.JPEG)."]


@pytest.mark.parametrize("text, message", [
    ("lrr: 0.1\n", "Unknown config key 'lrr'. Did you mean lr?"),
    ("optim:\n  epochs: 3\n", "epochs belongs to section 'run', not 'optim'."),
    ("epochs: ten\n", "epochs='ten' has the wrong type: expected an integer."),
    ("hflip: [1, 2]\n", "hflip=[1, 2] has the wrong type: expected a number."),
    ("- epochs\n", "must hold a mapping of key: value, not list."),
])
def test_yaml_with_unknown_key_or_wrong_type(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError) as e:
        config.resolve(file=tmp_path / "c.yaml")
    assert message in str(e.value)


# --- the policy, end to end through the CLI ----------------------------------------------------

def add_bad_training_files(root: Path) -> list[Path]:
    """One of each unreadable kind among otherwise good food-11 training images."""
    t = root / "training"
    (t / "0_90.jpg").write_bytes(b"")
    whole = write_image(t / "1_91.jpg", size=(64, 64)).read_bytes()
    (t / "1_91.jpg").write_bytes(whole[:len(whole) // 2])
    (t / "2_92.jpg").write_text("not a photo")
    (t / "0_93.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(32))
    png_header_only(t / "1_94.png", 100_000, 100_000)
    return sorted([t / "0_90.jpg", t / "1_91.jpg", t / "2_92.jpg", t / "0_93.heic", t / "1_94.png"])


def test_unreadable_training_images_are_skipped_listed_and_counted(food11_tiny, tmp_path, capsys):
    bad = add_bad_training_files(food11_tiny)
    run = tmp_path / "run"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, "epochs=1"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {len(bad)} unreadable training image(s):" in out
    for p in bad:
        assert str(p) in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["skipped"] == len(bad) and sorted(manifest["data"]["skipped_files"]) == sorted(map(str, bad))
    assert manifest["data"]["images"]["train"] == 24  # the 24 good ones: the bad ones are not trained on


def test_strict_makes_an_unreadable_training_image_an_error(food11_tiny, tmp_path, capsys):
    (food11_tiny / "training" / "0_90.jpg").write_bytes(b"")
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "run"), *FAST, "strict=true"]) == 1
    err = capsys.readouterr().err
    assert f"{food11_tiny / 'training' / '0_90.jpg'}: empty file (0 bytes) (strict=true)" in err
    assert "With strict=true: fix or remove those training images, or set strict=false to skip them." in err
    assert not (tmp_path / "run").exists()  # refused before training


def test_unreadable_test_image_is_an_error_before_training(food11_tiny, tmp_path, capsys):
    (food11_tiny / "test" / "0009.jpg").write_text("not a photo")
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "run"), *FAST]) == 1
    err = capsys.readouterr().err
    assert f"test image {food11_tiny / 'test' / '0009.jpg'}: not an image" in err and "the submission needs it" in err
    assert not (tmp_path / "run").exists()


def test_inspect_reports_every_problem_in_one_pass(food11_tiny, capsys):
    bad = add_bad_training_files(food11_tiny)
    write_image(food11_tiny / "training" / "apple_1.jpg")  # no numeric label
    write_image(food11_tiny / "test" / "0001.png")  # 0001.jpg exists: duplicate id
    (food11_tiny / "test" / "0007.jpg").write_bytes(b"")  # unreadable test image
    assert cli.main(["inspect", str(food11_tiny), "decode_workers=1"]) == 1
    out = capsys.readouterr().out
    for p in bad:
        assert f"unreadable (train would skip it; strict=true makes it an error): {p}:" in out
    assert "apple_1.jpg: food-11 file names are <label>_<n>.<ext>" in out
    assert "1 test id(s) occur more than once (e.g. 0001)" in out
    assert f"error: test image {food11_tiny / 'test' / '0007.jpg'}: empty file (0 bytes)" in out
    assert out.strip().endswith(f"{len(bad) + 1} unreadable file(s), 3 error(s)")


def test_inspect_of_a_clean_folder_exits_0(food11_tiny, capsys):
    assert cli.main(["inspect", str(food11_tiny), "decode_workers=1"]) == 0
    assert "0 unreadable file(s), 0 error(s)" in capsys.readouterr().out
