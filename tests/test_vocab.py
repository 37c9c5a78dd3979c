"""Class lists, template sets, vocabulary presets and the name-set grammars."""

import json
from pathlib import Path

import pytest

from tag2mask.vocab import classes as C
from tag2mask.vocab.templates import (
    CLIP_ES, IMAGENET_80, MASKCLIP_85, PHOTO, TEMPLATE_SETS, get_templates,
)
from tag2mask.vocab.vocabulary import (
    Vocabulary, get_vocabulary, load_vocabulary, parse_class_string, parse_nameset_file,
)

INDEX = json.loads((Path(__file__).parent / "data" / "clip_es" / "index.json").read_text())


def test_voc_lists_match_official_fixture():
    assert list(C.VOC_CLASSES) == INDEX["class_names"]
    assert list(C.VOC_CLIP_ES_NAMES) == INDEX["new_class_names"]
    assert list(C.VOC_BACKGROUND_WORDS) == INDEX["background_category"]
    assert len(C.MASKCLIP_VOC_NAMES) == 20 and C.MASKCLIP_VOC_NAMES[0] == "airplane"
    assert C.MASKCLIP_VOC_NAMES[19] == "tv monitor"


def test_coco_lists():
    assert len(C.COCO_CLASSES) == len(C.COCO_CLIP_ES_NAMES) == 80
    assert len(set(C.COCO_CLASSES)) == 80
    assert C.COCO_CLIP_ES_NAMES[C.COCO_CLASSES.index("snowboard")] == "sknowboard"
    assert C.COCO_CLIP_ES_NAMES[C.COCO_CLASSES.index("hair drier")] == "hairdrier,blowdrier"
    assert C.COCO_CLIP_ES_NAMES[C.COCO_CLASSES.index("tie")] == "necktie"
    assert len(C.COCO_BACKGROUND_WORDS) == 23
    assert set(C.VOC_BACKGROUND_WORDS) - set(C.COCO_BACKGROUND_WORDS) == {"keyboard", "sign"}


def test_templates():
    assert CLIP_ES == ("a clean origami {}.",) and PHOTO == ("a photo of a {}.",)
    assert len(IMAGENET_80) == len(set(IMAGENET_80)) == 80
    assert IMAGENET_80[0] == "a bad photo of a {}." and IMAGENET_80[-1] == "a tattoo of the {}."
    assert len(MASKCLIP_85) == 85 and MASKCLIP_85[:80] == IMAGENET_80
    assert MASKCLIP_85[-1] == "this is one {} in the scene."
    assert all(t.count("{}") == 1 for t in MASKCLIP_85)
    assert get_templates("clip-es") is TEMPLATE_SETS["clip-es"]
    assert get_templates("ImageNet80") == IMAGENET_80
    assert get_templates(["a {} here."]) == ("a {} here.",)
    assert get_templates("itap of a {}.") == ("itap of a {}.",)
    with pytest.raises(KeyError, match="maskclip85"):
        get_templates("nope")
    with pytest.raises(ValueError):
        get_templates([])
    with pytest.raises(ValueError, match="exactly one"):
        get_templates(["no slot"])


def test_presets():
    voc = get_vocabulary("voc")
    assert len(voc) == 20 and len(voc.background) == 25
    assert voc.names[14] == "person"
    assert voc.synonyms[14] == ("person with clothes,people,human",)
    assert all(len(s) == 1 for s in voc.synonyms)
    prompts, index = voc.flat_prompts()
    assert prompts == list(C.VOC_CLIP_ES_NAMES) and index == list(range(20))
    coco = get_vocabulary("COCO")
    assert len(coco) == 80 and len(coco.background) == 23
    assert ("sknowboard",) in coco.synonyms
    assert coco.index_of("snowboard") == coco.index_of("sknowboard") == 31
    assert load_vocabulary("voc") == voc
    with pytest.raises(KeyError, match="voc"):
        get_vocabulary("ade")


def test_index_of():
    voc = get_vocabulary("voc")
    assert voc.index_of("dog") == 11 and voc.index_of("Dog") == 11
    assert voc.index_of("bird avian") == 2
    with pytest.raises(KeyError, match="aeroplane"):
        voc.index_of("unicorn")


def test_parse_nameset_file(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text(
        "# my classes\n\nperson, people , human\n  dog\nbackground: sky, grass\nBackground: wall\n",
        encoding="utf-8",
    )
    v = parse_nameset_file(f)
    assert v.names == ("person", "dog")
    assert v.synonyms == (("person", "people", "human"), ("dog",))
    assert v.background == ("sky", "grass", "wall")
    assert v.flat_prompts() == (["person", "people", "human", "dog"], [0, 0, 0, 1])
    j = parse_nameset_file(f, mode="joined")
    assert j.prompt_names() == (("person,people,human",), ("dog",))
    assert load_vocabulary(str(f)) == v


@pytest.mark.parametrize(
    "content,match",
    [
        ("# only comments\n\n", "no classes"),
        ("background: sky\n", "no classes"),
        ("cat\ndog\ncat\n", "duplicate"),
        ("cat\nbackground\n", "reserved"),
        ("cat\nbackground: cat\n", "both"),
    ],
)
def test_nameset_file_errors(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        parse_nameset_file(f)
    assert "bad.txt" in str(info.value)


def test_parse_class_string():
    v = parse_class_string("cat, person|people|human; background: sky, grass , wall")
    assert v.names == ("cat", "person")
    assert v.synonyms == (("cat",), ("person", "people", "human"))
    assert v.background == ("sky", "grass", "wall")
    assert parse_class_string("cat,dog").background == ()
    assert load_vocabulary("cat, dog; background: sky") == parse_class_string("cat,dog;background:sky")
    for bad, match in [("", "no classes"), ("background: sky", "no classes"), (" ; ", "no classes"),
                       ("cat, Cat", "duplicate"), ("background, cat", "reserved")]:
        with pytest.raises(ValueError, match=match):
            parse_class_string(bad)


def test_load_vocabulary_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_vocabulary(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="empty"):
        load_vocabulary("  ")


def test_vocabulary_validation():
    with pytest.raises(ValueError, match="at least one class"):
        Vocabulary((), ())
    with pytest.raises(ValueError, match="prompt mode"):
        Vocabulary(("a",), (("a",),), mode="mean")
    with pytest.raises(ValueError, match="synonym"):
        Vocabulary(("a",), ((),))
    v = Vocabulary.from_names([["car", "automobile"], "bus"], background=["road"])
    assert v.names == ("car", "bus") and hash(v) == hash(Vocabulary.from_names([["car", "automobile"], "bus"], ["road"]))
    assert v.with_background([]).background == ()


def test_inline_background_without_semicolon():
    """`curl -F "classes=a; background: b"` drops what follows ';': the ',' form says the same."""
    from tag2mask.vocab.vocabulary import parse_class_string

    for text in ("cat, dog|puppy, background: sky, grass", "cat, dog|puppy; background: sky, grass"):
        v = parse_class_string(text)
        assert v.names == ("cat", "dog") and v.synonyms[1] == ("dog", "puppy")
        assert v.background == ("sky", "grass")
