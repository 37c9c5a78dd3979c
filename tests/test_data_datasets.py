"""Data set readers and label files on small hand-built layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tag2mask.data.datasets import (COCODataset, FolderDataset, Sample, VOCDataset, detect_dataset,
                                    labels_from_xml, open_dataset)
from tag2mask.data.tag_files import LabelFileError, names_to_ids, read_labels_file, safe_image_path
from tag2mask.io.palette import save_label_png

VOC = ("aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
       "person pottedplant sheep sofa train tvmonitor").split()
FIXTURE = Path(__file__).parent / "data" / "clip_es"


def _xml(names: list[str]) -> str:
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>1</xmin></bndbox></object>" for n in names)
    return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


def _voc(tmp: Path) -> Path:
    root = tmp / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    objects = {"a": ["person", "dog", "person"], "b": ["tvmonitor", "chair"], "c": ["cat"]}
    for name, objs in objects.items():
        Image.new("RGB", (4, 3)).save(root / "JPEGImages" / f"{name}.jpg")
        (root / "Annotations" / f"{name}.xml").write_text(_xml(objs))
    m = np.zeros((3, 4), np.uint8)
    m[0, 0], m[1, 1], m[2, 2] = 15, 12, 255
    save_label_png(root / "SegmentationClass" / "a.png", m)
    save_label_png(root / "SegmentationClassAug" / "c.png", np.full((3, 4), 8, np.uint8))
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("a\nb\nc\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\n")
    return root


def test_voc_xml_labels_first_appearance(tmp_path: Path) -> None:
    root = _voc(tmp_path)
    ds = VOCDataset(root.parent, "train_aug", VOC)  # VOCdevkit accepted
    samples = list(ds)
    assert len(ds) == 3 and [s.name for s in samples] == ["a", "b", "c"]
    assert samples[0].label_ids == [14, 11]  # person, dog; repeat dropped
    assert samples[1].label_ids == [19, 8]
    assert samples[0].gt_path == root / "SegmentationClass" / "a.png"
    assert samples[2].gt_path == root / "SegmentationClassAug" / "c.png"
    assert samples[1].gt_path is None
    assert isinstance(samples[0], Sample) and samples[0].image_path.name == "a.jpg"


def test_voc_mask_labels(tmp_path: Path) -> None:
    ds = VOCDataset(_voc(tmp_path), "val", VOC, label_source="mask")
    assert ds[0].label_ids == [11, 14]  # ascending mask values 12, 15 minus 1


def test_fixture_xml_matches_index() -> None:
    index = json.loads((FIXTURE / "index.json").read_text())
    for e in index["images"]:
        assert labels_from_xml(FIXTURE / e["annotation"], VOC) == e["label_ids"]


def test_voc_unknown_class_lists_valid(tmp_path: Path) -> None:
    root = _voc(tmp_path)
    (root / "Annotations" / "a.xml").write_text(_xml(["person", "unicorn"]))
    with pytest.raises(LabelFileError, match=r"a\.xml.*'unicorn'.*aeroplane, bicycle"):
        VOCDataset(root, "val", VOC)[0]


def test_voc_missing_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nosuch.txt"):
        VOCDataset(_voc(tmp_path), "nosuch", VOC)


def test_coco_split_ids(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(80)]
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "JPEGImages" / "COCO_train2014_000000000009.jpg")
    save_label_png(tmp_path / "SegmentationClass" / "COCO_train2014_000000000009.png",
                   np.array([[0, 46], [51, 255]], np.uint8))
    (tmp_path / "train.txt").write_text("COCO_train2014_000000000009 45 50 45\nCOCO_train2014_000000000025 23\n")
    ds = COCODataset(tmp_path, "train.txt", names)
    s = list(ds)
    assert s[0].label_ids == [45, 50] and s[0].gt_path is not None
    assert s[1].label_ids == [23] and s[1].gt_path is None
    assert COCODataset(tmp_path, tmp_path / "train.txt", names, label_source="mask")[0].label_ids == [45, 50]
    (tmp_path / "bad.txt").write_text("x 80\n")
    with pytest.raises(ValueError, match=r"bad.txt:1.*\[80\]"):
        COCODataset(tmp_path, "bad.txt", names)
    assert detect_dataset(tmp_path) == "coco"


def _folder(tmp: Path) -> Path:
    img = tmp / "imgs"
    (img / "sub").mkdir(parents=True)
    for n in ("x.jpg", "y.png", "sub/z.jpg"):
        Image.new("RGB", (2, 2)).save(img / n)
    return img


def test_folder_json_and_csv(tmp_path: Path) -> None:
    img = _folder(tmp_path)
    j = tmp_path / "labels.json"
    j.write_text(json.dumps({"x.jpg": ["Dog", "person", "dog"], "sub/z.jpg": []}))
    ds = FolderDataset(img, j, VOC)
    s = list(ds)
    assert [x.name for x in s] == ["x", "sub/z"] and s[0].label_ids == [11, 14] and s[1].label_ids == []
    c = tmp_path / "labels.csv"
    c.write_text("image,labels\nx.jpg,cat;dog;cat\ny.png,\n")
    assert read_labels_file(c) == {"x.jpg": ["cat", "dog"], "y.png": []}
    assert [x.label_ids for x in FolderDataset(img, c, VOC)] == [[7, 11], []]
    assert [x.name for x in FolderDataset(img)] == ["sub/z", "x", "y"]


def test_label_file_errors(tmp_path: Path) -> None:
    img = _folder(tmp_path)
    c = tmp_path / "bad.csv"
    c.write_text("file,classes\nx.jpg,cat\n")
    with pytest.raises(LabelFileError, match="bad.csv.*header"):
        read_labels_file(c)
    j = tmp_path / "u.json"
    j.write_text(json.dumps({"x.jpg": ["cat", "wolf"]}))
    with pytest.raises(LabelFileError, match="'x.jpg'.*'wolf'.*valid names are: aeroplane"):
        FolderDataset(img, j, VOC)
    j.write_text(json.dumps({"x.jpg": "cat"}))
    with pytest.raises(LabelFileError, match="u.json.*list"):
        read_labels_file(j)
    with pytest.raises(FileNotFoundError):
        read_labels_file(tmp_path / "missing.json")


@pytest.mark.parametrize("entry", ["../secret.jpg", "/etc/passwd", "sub/../../x.jpg", "C:\\x.jpg", "..\\x.jpg"])
def test_path_traversal_refused(tmp_path: Path, entry: str) -> None:
    img = _folder(tmp_path)
    j = tmp_path / "t.json"
    j.write_text(json.dumps({entry: ["cat"], "x.jpg": ["dog"]}))
    with pytest.raises(LabelFileError, match="outside|absolute"):
        FolderDataset(img, j, VOC)
    ds = FolderDataset(img, j, VOC, strict=False)
    assert [s.name for s in ds] == ["x"] and ds.errors[0][0] == entry


def test_symlink_escape_refused(tmp_path: Path) -> None:
    img = _folder(tmp_path)
    (tmp_path / "outside.jpg").write_bytes(b"x")
    (img / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    with pytest.raises(LabelFileError, match="outside"):
        safe_image_path(img, "link.jpg")
    assert safe_image_path(img, "sub/z.jpg") == (img / "sub" / "z.jpg").resolve()


def test_registry_and_detect(tmp_path: Path) -> None:
    root = _voc(tmp_path)
    assert detect_dataset(root) == "voc" and detect_dataset(root.parent) == "voc"
    assert len(open_dataset("voc", root=root, split="train", class_names=VOC)) == 2
    assert detect_dataset(_folder(tmp_path)) == "folder"
    assert detect_dataset(tmp_path / "nothing") is None
    with pytest.raises(ValueError, match="known: coco, folder, voc"):
        open_dataset("ade")
    assert names_to_ids(["cat", "CAT "], VOC) == [7]


def test_json_labels_with_a_duplicate_image_are_refused(tmp_path):
    from tag2mask.data.tag_files import LabelFileError, read_labels_file

    path = tmp_path / "tags.json"
    path.write_text('{"a.jpg": ["cat"], "b.jpg": ["dog"], "a.jpg": ["dog"]}')
    with pytest.raises(LabelFileError, match="a.jpg"):
        read_labels_file(path)


def test_official_coco_spellings_match_the_voc_style_class_names():
    from tag2mask.data.tag_files import names_to_ids, unknown_class_names
    from tag2mask.vocab.classes import COCO_CLASSES, MASKCLIP_VOC_NAMES, VOC_CLASSES

    coco_official = ["motorcycle", "Airplane", "couch", "potted plant", "dining table", "tv", "hair dryer"]
    ids = names_to_ids(coco_official, COCO_CLASSES)
    assert [COCO_CLASSES[i] for i in ids] == ["motorbike", "aeroplane", "sofa", "pottedplant", "diningtable",
                                              "tvmonitor", "hair drier"]
    assert unknown_class_names({"a.jpg": coco_official}, COCO_CLASSES) == {}
    # the other way round: VOC spellings against a list that spells the classes the COCO way
    assert [MASKCLIP_VOC_NAMES[i] for i in names_to_ids(["aeroplane", "tvmonitor", "pottedplant"],
                                                        MASKCLIP_VOC_NAMES)] == ["airplane", "tv monitor",
                                                                                 "potted plant"]
    # a variant never takes a class that has its own name in the list
    assert names_to_ids(["couch"], ["sofa", "couch"]) == [1]
    with pytest.raises(ValueError, match="unknown class name 'sofa bed'"):
        names_to_ids(["sofa bed"], VOC_CLASSES)
