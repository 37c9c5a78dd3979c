"""Official ``cls_*.txt`` name sets (SCLIP, NACLIP, ClearCLIP) read as they are, in the API and the command."""

from __future__ import annotations

import pytest

from tag2mask.vocab.vocabulary import is_official_nameset, load_vocabulary, parse_nameset_file

# shaped like the official files (no trailing newline, ", " separators, a stuff-word first line)
VOC_LIKE = "sky, wall, tree, grass, road, floor\naeroplane\nbed\nperson, person in shirt, person in jeans\ntv monitor, monitor"
CONTEXT_LIKE = "background\naeroplane\nbag\nwood "
NO_BACKGROUND = "aeroplane\nbicycle\nbird, avian"


def _write(tmp_path, text, name="cls_x.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_detection_of_the_format():
    assert is_official_nameset(VOC_LIKE) and is_official_nameset(NO_BACKGROUND)
    assert not is_official_nameset("cat\n# comment\n")
    assert not is_official_nameset("cat\nbackground: sky\n")


def test_stuff_word_first_line_is_background(tmp_path):
    v = parse_nameset_file(_write(tmp_path, VOC_LIKE))
    assert v.background == ("sky", "wall", "tree", "grass", "road", "floor")
    assert v.names == ("aeroplane", "bed", "person", "tv monitor")  # label i = line i (0 = background)
    assert v.synonyms[2] == ("person", "person in shirt", "person in jeans")


def test_literal_background_first_line(tmp_path):
    v = parse_nameset_file(_write(tmp_path, CONTEXT_LIKE))
    assert v.background == ("background",) and v.names == ("aeroplane", "bag", "wood")


def test_background_free_set_keeps_every_line_as_a_class(tmp_path):
    v = parse_nameset_file(_write(tmp_path, NO_BACKGROUND))
    assert v.background == () and v.names == ("aeroplane", "bicycle", "bird")
    assert v.synonyms[2] == ("bird", "avian")


def test_explicit_first_line_overrides_detection(tmp_path):
    f = _write(tmp_path, "road, sky, snow\ncar\nbus")  # looks like background
    assert parse_nameset_file(f).background == ("road", "sky", "snow")
    as_class = parse_nameset_file(f, first_line_background=False)
    assert as_class.background == () and as_class.names == ("road", "car", "bus")
    g = _write(tmp_path, "ground, water\ncar", "cls_y.txt")  # two words only: not detected
    assert parse_nameset_file(g).names == ("ground", "car")
    assert load_vocabulary(str(g), first_line_background=True).background == ("ground", "water")


def test_clearclip_separator_and_overlaps(tmp_path):
    # ClearCLIP splits on ',' (no space); COCO-Object lists 'bed' both as background word and as class
    v = parse_nameset_file(_write(tmp_path, "sky,wall,bed,floor\nbed\nperson,person in shirt\n\n"))
    assert v.background == ("sky", "wall", "bed", "floor")
    assert v.names == ("bed", "person") and v.synonyms[1] == ("person", "person in shirt")


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="reserved") as info:
        parse_nameset_file(_write(tmp_path, "sky, wall, tree\ncat\nbackground"))
    assert "cls_x.txt" in str(info.value)
    with pytest.raises(ValueError, match="only a background line"):
        parse_nameset_file(_write(tmp_path, "background\n"))
    with pytest.raises(ValueError, match="no class name"):
        parse_nameset_file(_write(tmp_path, "cat\n , ,\ndog"))
    with pytest.raises(ValueError, match="official"):
        parse_nameset_file(_write(tmp_path, "cat\nbackground: sky\n"), first_line_background=True)
    with pytest.raises(ValueError, match="official"):
        load_vocabulary("cat, dog", first_line_background=False)


def test_segmenter_labels_follow_the_file(tmp_path, tiny_clip_path):
    from tag2mask.clip.loading import load_clip
    from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter

    seg = OpenVocabSegmenter(load_clip(tiny_clip_path), str(_write(tmp_path, VOC_LIKE)), "sclip", text_cache=False)
    assert seg.class_names == ("background", "aeroplane", "bed", "person", "tv monitor")
    # one prompt per synonym, in file order, each mapped to its line index
    assert seg.prompt_label.tolist() == [0] * 6 + [1, 2, 3, 3, 3, 4, 4]


def test_command_first_line_option(tmp_path, tiny_clip_path):
    import numpy as np
    from PIL import Image

    from tag2mask.cli.main import main

    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(img)
    names = _write(tmp_path, "road, sky, snow\ncar\nbus")
    common = ["segment", str(img), "--classes", str(names), "--weights", str(tiny_clip_path), "--device", "cpu",
              "--quiet", "--mode", "whole", "--short-side", "0"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--out", str(tmp_path / "b"), "--first-line", "class"]) == 0
    import json

    auto = json.loads((tmp_path / "a" / "run.json").read_text())
    forced = json.loads((tmp_path / "b" / "run.json").read_text())
    assert auto["class_names"] == ["background", "car", "bus"]
    assert forced["class_names"] == ["road", "car", "bus"]
    assert main(["segment", str(img), "--classes", "cat, dog", "--first-line", "class", "--weights",
                 str(tiny_clip_path), "--out", str(tmp_path / "c"), "--quiet"]) == 2
