"""Class vocabularies: display names, prompt synonyms and background words.

A :class:`Vocabulary` holds K classes.  Each class has a display name and one or more prompt
strings ("synonyms"); a class's score is the max over its synonyms' scores.  ``background`` lists
extra prompts that compete in the softmax but never receive a mask (CLIP-ES's "class-related
background"); it may be empty.

Text grammars
-------------
**Name-set file** (:func:`parse_nameset_file`), UTF-8, one class per line::

    # comments and blank lines are ignored
    person, people, human        <- synonyms separated by ','; the first is the display name
    dog
    background: sky, grass       <- background words (the line may repeat; words accumulate)

A line that is exactly ``background`` (no colon) is rejected: the word is reserved so that a
copied 21-class list with a background entry does not silently create a "background" class.
A line using the inline syntax below (``;`` or ``|``) is rejected too (it would silently become one
class), and so is a file that is not UTF-8 (the error names the file and line).

**Official name-set file** (``configs/cls_<dataset>.txt`` of SCLIP, NACLIP, ClearCLIP), detected
when a file has neither comments nor ``background:`` lines: line ``i`` is the class with label
``i``, its synonyms separated by ``,``; on the datasets with a background class the *first* line
lists the background words (``sky, wall, tree, ...``, or just ``background``). Whether the first
line is background is decided by ``first_line_background``; automatically (``None``) it is when
its first word is ``background`` or when it lists at least three words that are all common
background words (:data:`BACKGROUND_WORDS`, which covers the official VOC / COCO-Object lines).
Such files are read as they are: a word may be both a background word and a class (COCO-Object's
``bed``), as in the official harness. Blank lines are skipped.

**Inline string** (:func:`parse_class_string`): sections separated by ``;``.  A section starting
with ``background:`` lists background words separated by ``,``; any other section lists classes
separated by ``,``, with ``|`` separating synonyms of one class::

    "cat, person|people|human; background: sky, grass, wall"

Without ``;`` (which ``curl -F`` and some shells read as their own syntax) the same list is
``"cat, person|people|human, background: sky, grass, wall"``: every word after ``background:`` is a
background word.

``mode`` controls how synonyms become prompts: ``"max"`` embeds each synonym separately and takes
the max score; ``"joined"`` writes them into one prompt joined by ``','`` (CLIP-ES's
sentence-level fusion, e.g. ``'person with clothes,people,human'``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

from tag2mask.vocab import classes as _classes

PROMPT_MODES = ("max", "joined")
PRESETS = ("voc", "coco", "voc-maskclip", "synth")
_BACKGROUND_KEY = "background"


def _clean(word: str) -> str:
    return " ".join(word.split())


@dataclass(frozen=True)
class Vocabulary:
    """K classes with prompt synonyms plus optional background words.

    Attributes:
        names: display name per class, class index 0..K-1.
        synonyms: prompt strings per class (at least one each).
        background: background prompt strings (may be empty).
        mode: ``"max"`` (one prompt per synonym, class score = max) or ``"joined"``
            (all synonyms of a class in one ``','``-joined prompt).
        allow_background_overlap: accept a word listed both as a class and as a background word
            (official name-set files contain such overlaps; otherwise it is reported as a mistake).
    """

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    background: tuple[str, ...] = ()
    mode: str = "max"
    allow_background_overlap: bool = False

    def __post_init__(self) -> None:
        # Coerce lists to tuples so the frozen object is hashable and really immutable.
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "synonyms", tuple(tuple(s) for s in self.synonyms))
        object.__setattr__(self, "background", tuple(self.background))
        if not self.names:
            raise ValueError("a vocabulary needs at least one class; the class list is empty")
        if len(self.names) != len(self.synonyms):
            raise ValueError(f"{len(self.names)} class names but {len(self.synonyms)} synonym groups")
        if self.mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {self.mode!r}; choose one of {PROMPT_MODES}")
        for name, syns in zip(self.names, self.synonyms):
            if not name or not name.strip():
                raise ValueError("class names must be non-empty strings")
            if not syns or any(not s or not s.strip() for s in syns):
                raise ValueError(f"class {name!r} needs at least one non-empty prompt synonym")
        check_class_names(self.names)
        check_class_names(self.background, what="background word")
        for syns in self.synonyms:
            check_class_names(syns, what="prompt synonym")
        clash = {n.lower() for n in self.names} & {b.lower() for b in self.background}
        if clash and not self.allow_background_overlap:
            raise ValueError(f"words listed both as class and as background: {sorted(clash)}")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def prompt_names(self) -> tuple[tuple[str, ...], ...]:
        """Prompt strings per class after applying ``mode`` (what gets put into the templates)."""
        if self.mode == "joined":
            return tuple((",".join(s),) for s in self.synonyms)
        return self.synonyms

    def flat_prompts(self) -> tuple[list[str], list[int]]:
        """All class prompts in one list, plus the class index of each (for one text batch)."""
        prompts: list[str] = []
        index: list[int] = []
        for k, group in enumerate(self.prompt_names()):
            prompts.extend(group)
            index.extend([k] * len(group))
        return prompts, index

    def index_of(self, name: str) -> int:
        """Class index of a display name (exact, then case-insensitive, then any synonym).

        Raises ``KeyError`` listing the valid names.
        """
        if name in self.names:
            return self.names.index(name)
        key = _clean(name).lower()
        for k, n in enumerate(self.names):
            if n.lower() == key:
                return k
        for k, syns in enumerate(self.synonyms):
            if any(_clean(s).lower() == key for s in syns):
                return k
        raise KeyError(f"class {name!r} is not in this vocabulary; valid names: {list(self.names)}")

    def with_background(self, background: Iterable[str]) -> "Vocabulary":
        """Copy with a different background list."""
        return Vocabulary(self.names, self.synonyms, tuple(background), self.mode, self.allow_background_overlap)

    @classmethod
    def from_names(
        cls,
        names: Sequence[Union[str, Sequence[str]]],
        background: Iterable[str] = (),
        mode: str = "max",
        display_names: Sequence[str] | None = None,
        allow_background_overlap: bool = False,
    ) -> "Vocabulary":
        """Build from class entries: a string is one literal prompt (commas are kept, as
        CLIP-ES uses them inside names); a sequence of strings is a synonym group whose first
        element is the display name.  ``display_names`` overrides the display names.
        """
        groups: list[tuple[str, ...]] = []
        for entry in names:
            group = (entry,) if isinstance(entry, str) else tuple(entry)
            groups.append(tuple(_clean(s) for s in group))
        if display_names is None:
            shown = [g[0] if g else "" for g in groups]
        else:
            shown = [_clean(n) for n in display_names]
        return cls(tuple(shown), tuple(groups), tuple(_clean(b) for b in background), mode, allow_background_overlap)


def check_class_names(names: Sequence[str], where: str = "", what: str = "class name") -> tuple[str, ...]:
    """Refuse empty names, names with control characters (a NUL byte ...) and duplicates (any case).

    Returns:
        the names as given.

    Raises:
        ValueError: naming ``where`` (a file or an option) and the offending name.
    """
    prefix = f"{where}: " if where else ""
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"{prefix}{what}s must be non-empty text")
        if any(ord(c) < 32 or ord(c) == 127 for c in n):
            raise ValueError(f"{prefix}{what} {n!r} contains a control character (a NUL byte, a tab ...)")
    try:
        _reject_duplicates(names, what)
    except ValueError as exc:
        raise ValueError(f"{prefix}{exc}") from None
    return tuple(names)


def _reject_duplicates(words: Sequence[str], what: str) -> None:
    seen: dict[str, str] = {}
    dups = []
    for w in words:
        key = w.lower()
        if key in seen:
            dups.append(w)
        seen[key] = w
    if dups:
        raise ValueError(f"duplicate {what}(s): {dups}")


def get_vocabulary(name: str) -> Vocabulary:
    """Preset vocabularies.

    * ``"voc"``  -- 20 VOC classes, CLIP-ES prompt names (one sentence-level prompt per class),
      25 CLIP-ES background words.
    * ``"coco"`` -- 80 COCO classes, CLIP-ES prompt names (incl. the ``sknowboard`` typo),
      23 background words.
    * ``"voc-maskclip"`` -- 20 VOC classes with MaskCLIP's names, no background words.
    * ``"synth"`` -- the 12 object classes of tag2mask's synthetic world, its 6 stuff textures as
      background words (ids match the synthetic masks: class k -> label k + 1).
    """
    key = name.strip().lower()
    if key == "voc":
        return Vocabulary.from_names(
            _classes.VOC_CLIP_ES_NAMES, _classes.VOC_BACKGROUND_WORDS, display_names=_classes.VOC_CLASSES
        )
    if key == "coco":
        return Vocabulary.from_names(
            _classes.COCO_CLIP_ES_NAMES, _classes.COCO_BACKGROUND_WORDS, display_names=_classes.COCO_CLASSES
        )
    if key == "voc-maskclip":
        return Vocabulary.from_names(_classes.MASKCLIP_VOC_NAMES, display_names=_classes.VOC_CLASSES)
    if key == "synth":
        from tag2mask.synth.world import OBJECT_NAMES, STUFF_NAMES

        return Vocabulary.from_names(list(OBJECT_NAMES), list(STUFF_NAMES))
    raise KeyError(f"unknown vocabulary preset {name!r}; choose one of {list(PRESETS)}")


def _split_words(text: str, sep: str) -> list[str]:
    return [w for w in (_clean(p) for p in text.split(sep)) if w]


def _background_section(text: str) -> str | None:
    """The word list after ``background:`` or None if ``text`` is not a background section."""
    head, colon, rest = text.partition(":")
    if colon and head.strip().lower() == _BACKGROUND_KEY:
        return rest
    return None


def _reserved(word: str, where: str) -> None:
    if word.lower() == _BACKGROUND_KEY:
        raise ValueError(
            f"{where}: 'background' is reserved; list background words as 'background: sky, grass' instead"
        )


#: words that mark the first line of an official name-set file as background (automatic detection)
BACKGROUND_WORDS = frozenset(
    "sky wall tree wood grass road sea river mountain sands sand desk bed building cloud clouds lamp door window "
    "wardrobe ceiling shelf curtain stair stairs floor hill rail fence ground land lake water railway railroad "
    "house ocean rock street valley bridge sign field snow dirt mud pavement sidewalk earth plant bush leaves "
    "background".split()
)


def is_official_nameset(text: str) -> bool:
    """Whether name-set text is in the official ``cls_*.txt`` format (no comments, no ``background:`` lines)."""
    lines = [line.strip() for line in text.splitlines()]
    return not any(line.startswith("#") or _background_section(line) is not None for line in lines if line)


def _first_line_is_background(words: Sequence[str]) -> bool:
    lowered = [w.lower() for w in words]
    return lowered[0] == _BACKGROUND_KEY or (len(lowered) >= 3 and all(w in BACKGROUND_WORDS for w in lowered))


def _reject_inline_syntax(p: Path, lineno: int, raw: str) -> None:
    """'cat, dog; background: sky' saved to a file would silently become one class: refuse it."""
    if ";" in raw or "|" in raw:
        raise ValueError(
            f"{p}:{lineno}: {raw.strip()!r} uses the inline syntax (';' between sections, '|' between "
            "synonyms); in a class-name file write one class per line with its synonyms separated by ',', "
            "and background words on a 'background: sky, grass' line (or pass the text itself to --classes)"
        )


def _parse_official(p: Path, text: str, mode: str, first_line_background: bool | None) -> Vocabulary:
    for lineno, raw in enumerate(text.splitlines(), start=1):
        _reject_inline_syntax(p, lineno, raw)
    lines = [(n, _split_words(raw, ",")) for n, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
    for lineno, syns in lines:
        if not syns:
            raise ValueError(f"{p}:{lineno}: no class name on this line")
    if not lines:
        raise ValueError(f"{p}: the file lists no classes")
    background: list[str] = []
    if first_line_background is None:
        first_line_background = _first_line_is_background(lines[0][1])
    if first_line_background:
        background = lines[0][1]
        lines = lines[1:]
        if not lines:
            raise ValueError(f"{p}: only a background line; the classes follow it, one per line")
    for lineno, syns in lines:
        _reserved(syns[0], f"{p}:{lineno}")
    try:
        return Vocabulary.from_names([syns for _, syns in lines], background, mode=mode, allow_background_overlap=True)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None


def parse_nameset_file(
    path: Union[str, os.PathLike], mode: str = "max", first_line_background: bool | None = None
) -> Vocabulary:
    """Read a name-set file: tag2mask's grammar or an official ``cls_*.txt`` (module docstring).

    ``first_line_background`` (official files only): whether line 1 holds the background words
    (``None``: detected). Giving it for a file in tag2mask's grammar is an error.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class-name file not found: {p}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{p}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "save the class-name file as UTF-8") from None
    if is_official_nameset(text):
        return _parse_official(p, text, mode, first_line_background)
    if first_line_background is not None:
        raise ValueError(
            f"{p}: first_line_background applies to official cls_*.txt name sets; this file uses comments "
            "or 'background:' lines, which already say what is background"
        )
    groups: list[list[str]] = []
    background: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        _reject_inline_syntax(p, lineno, raw)
        bg = _background_section(line)
        if bg is not None:
            background.extend(_split_words(bg, ","))
            continue
        syns = _split_words(line, ",")
        if not syns:
            raise ValueError(f"{p}:{lineno}: no class name on this line: {raw!r}")
        _reserved(syns[0], f"{p}:{lineno}")
        groups.append(syns)
    if not groups:
        raise ValueError(f"{p}: the file lists no classes (only comments, blanks or background lines)")
    try:
        return Vocabulary.from_names(groups, background, mode=mode)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None


def parse_class_string(text: str, mode: str = "max") -> Vocabulary:
    """Parse an inline spec such as ``"cat, person|people; background: sky, grass"``."""
    groups: list[list[str]] = []
    background: list[str] = []
    for section in text.split(";"):
        if not section.strip():
            continue
        bg = _background_section(section)
        if bg is not None:
            background.extend(_split_words(bg, ","))
            continue
        entries = _split_words(section, ",")
        for i, entry in enumerate(entries):
            bg = _background_section(entry)
            if bg is not None:
                # "cat, dog, background: sky, grass": the same lists without ';' (which curl -F and
                # some shells treat as their own syntax); every word after the marker is background
                background.extend(w for w in [_clean(bg), *entries[i + 1:]] if w)
                break
            syns = _split_words(entry, "|")
            if not syns:
                raise ValueError(f"empty class entry {entry!r} in class string {text!r}")
            _reserved(syns[0], f"class string {text!r}")
            groups.append(syns)
    if not groups:
        raise ValueError(f"class string {text!r} lists no classes; expected e.g. 'cat, dog; background: sky'")
    return Vocabulary.from_names(groups, background, mode=mode)


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # a long inline list is no file name ("File name too long"), nor a NUL
        return False


def load_vocabulary(spec: str, mode: str = "max", first_line_background: bool | None = None) -> Vocabulary:
    """``voc`` / ``coco`` / ``voc-maskclip``, a name-set file path, or an inline class string.

    ``mode`` applies to files and inline strings (presets are fixed to CLIP-ES prompts);
    ``first_line_background`` to official ``cls_*.txt`` files only (``None``: detected).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"vocabulary spec must be a string or path, got {type(spec).__name__}")
    spec_str = os.fspath(spec)
    if not spec_str.strip():
        raise ValueError("vocabulary spec is empty; use 'voc', 'coco', a file path or 'cat, dog'")
    p = Path(spec_str).expanduser()
    if first_line_background is not None and not _is_file(p):
        raise ValueError(f"first_line_background applies to official cls_*.txt name-set files, not to {spec_str!r}")
    if spec_str.strip().lower() in PRESETS:
        return get_vocabulary(spec_str)
    if _is_file(p):
        return parse_nameset_file(p, mode=mode, first_line_background=first_line_background)
    looks_like_path = p.suffix.lower() in (".txt", ".names", ".csv") or (os.sep in spec_str and "," not in spec_str)
    if looks_like_path:
        raise FileNotFoundError(f"class-name file not found: {p}")
    return parse_class_string(spec_str, mode=mode)


__all__ = [
    "Vocabulary", "PROMPT_MODES", "PRESETS", "BACKGROUND_WORDS", "get_vocabulary", "is_official_nameset",
    "parse_nameset_file", "parse_class_string", "load_vocabulary", "check_class_names",
]
