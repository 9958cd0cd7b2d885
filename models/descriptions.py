"""Defect descriptions: what each defect type looks like, in words.

The CLIP reranker matches images against these texts, and a defect type
registered with only a description is ranked at once, before any image of it
exists. Each description follows one shape: a sentence saying what the defect
is, keywords, and, for types that are easily confused, a ``contrast`` sentence
naming what separates them from their look-alike (a crack penetrates and
branches; a scratch stays on the surface).

Descriptions come from users (an API, a file), so they are checked: plain text
of bounded length, no markup, no control characters.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_NAME = 64
MAX_DESCRIPTION = 400
MAX_KEYWORDS = 12
MAX_KEYWORD = 40
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
# Angle brackets, braces and backticks: markup or templates, never defect words.
_MARKUP = re.compile(r"[<>{}`]|\]\(|\bjavascript:", re.IGNORECASE)


class DescriptionError(ValueError):
    """A defect description is malformed; the message names the field."""


def _clean_text(field_name: str, text: str, limit: int, required: bool = True) -> str:
    if not isinstance(text, str):
        raise DescriptionError(f"{field_name} must be text, got {type(text).__name__}")
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if required and not text:
        raise DescriptionError(f"{field_name} is empty")
    if len(text) > limit:
        raise DescriptionError(f"{field_name} is {len(text)} characters; the limit is {limit}")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs") for ch in text):
        raise DescriptionError(f"{field_name} contains control or invisible characters")
    if _MARKUP.search(text):
        raise DescriptionError(f"{field_name} contains markup; plain text only")
    return text


@dataclass(frozen=True)
class DefectDescription:
    """One defect type, described.

    Attributes:
        name: the type's identifier (lower case, digits, ``_`` and ``-``).
        description: one or two sentences saying what it looks like.
        keywords: short words or phrases an inspector would use for it.
        contrast: what separates it from the type it is most often confused with.
    """

    name: str
    description: str
    keywords: tuple[str, ...] = field(default=())
    contrast: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise DescriptionError(
                f"name must be lower-case letters, digits, '_' or '-', got {self.name!r}"
            )
        if len(self.name) > MAX_NAME:
            raise DescriptionError(f"name is {len(self.name)} characters; the limit is {MAX_NAME}")
        object.__setattr__(
            self, "description", _clean_text("description", self.description, MAX_DESCRIPTION)
        )
        keywords = tuple(self.keywords)
        if len(keywords) > MAX_KEYWORDS:
            raise DescriptionError(f"{len(keywords)} keywords; the limit is {MAX_KEYWORDS}")
        object.__setattr__(
            self, "keywords", tuple(_clean_text("keyword", k, MAX_KEYWORD) for k in keywords)
        )
        object.__setattr__(
            self, "contrast", _clean_text("contrast", self.contrast, MAX_DESCRIPTION, False)
        )

    def text(self) -> str:
        """The sentence the text encoder reads."""
        parts = [self.description.rstrip(".") + "."]
        if self.keywords:
            parts.append("Keywords: " + ", ".join(self.keywords) + ".")
        if self.contrast:
            parts.append(self.contrast.rstrip(".") + ".")
        return " ".join(parts)

    def variants(self) -> list[str]:
        """Phrasings of this description: the full text, its parts and its keywords.

        The reranker learns from a different phrasing at each step, so its text
        projection follows what the words mean rather than one sentence; at
        inference it averages the embeddings of all of them (a prompt ensemble).
        """
        texts = [self.text(), self.description.rstrip(".") + "."]
        texts += [f"A surface with {keyword}." for keyword in self.keywords]
        if self.contrast:
            texts.append(self.contrast.rstrip(".") + ".")
        return list(dict.fromkeys(texts))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "description": self.description,
            "keywords": list(self.keywords),
            "contrast": self.contrast,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DefectDescription:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = sorted(set(data) - {"name", "description", "keywords", "contrast"})
        if unknown:
            raise DescriptionError(f"unknown field(s) {unknown}")
        keywords = data.get("keywords", ())
        if isinstance(keywords, str) or not isinstance(keywords, Iterable):
            raise DescriptionError("keywords must be a list of texts")
        return cls(
            name=data.get("name", ""),
            description=data.get("description", ""),
            keywords=tuple(keywords),
            contrast=data.get("contrast", "") or "",
        )


def _d(
    name: str, description: str, keywords: Iterable[str], contrast: str = ""
) -> DefectDescription:
    return DefectDescription(name, description, tuple(keywords), contrast)


# The generator's five defect types (with contrast sentences for the scratch and
# crack look-alikes).
SYNTHETIC = (
    _d(
        "scratch",
        "A thin, elongated line of superficial damage that does not penetrate the "
        "material, which keeps its structural integrity",
        ("scratch", "fine line", "surface mark", "abrasion", "shallow", "not deep"),
        "Critical difference: surface only, unlike a crack that penetrates the material",
    ),
    _d(
        "crack",
        "A deep fracture with visible separation that penetrates the thickness of the "
        "material and branches, a structural discontinuity",
        ("deep crack", "fracture", "split", "separation", "branching fissure"),
        "Critical difference: penetrates deeply and branches, unlike a superficial scratch",
    ),
    _d(
        "perforation",
        "A round hole or opening that goes fully or partly through the material",
        ("hole", "perforation", "opening", "puncture", "circular", "pit"),
    ),
    _d(
        "contamination",
        "Foreign particles, stains or substances stuck to the surface without changing "
        "its structure",
        ("dirt", "stain", "particles", "residue", "foreign substance", "smudge"),
        "Added material on the surface, not structural damage",
    ),
    _d(
        "deformation",
        "A change of the original shape, a dent, bulge or bend, without the material breaking",
        ("dent", "deformed", "wavy", "bulge", "bend", "no fracture"),
        "The surface keeps its integrity; only its shape changes",
    ),
)

# ELPV's graded levels among defective cells (electroluminescence images).
ELPV = (
    _d(
        "defect_p67",
        "A solar cell that is probably defective: faint dark lines or small darker "
        "areas in the electroluminescence image, a possible micro-crack",
        ("possible micro-crack", "faint dark line", "slightly darker region", "uncertain"),
        "Less certain than a clear defect: the marks are faint and small",
    ),
    _d(
        "defect_p100",
        "A solar cell that is certainly defective: a visible crack, a broken finger "
        "or a dark inactive region in the electroluminescence image",
        ("crack", "dark inactive area", "broken cell", "disconnected region", "clear defect"),
        "Unlike a doubtful cell, the crack or dark area is plain to see",
    ),
)

BUILTIN: dict[str, DefectDescription] = {d.name: d for d in (*SYNTHETIC, *ELPV)}


class DescriptionCatalog:
    """The descriptions a category's reranker ranks: built-in ones plus registered ones.

    Args:
        descriptions: the initial descriptions (default: none).
    """

    def __init__(self, descriptions: Iterable[DefectDescription] = ()) -> None:
        self._by_name: dict[str, DefectDescription] = {}
        for description in descriptions:
            self.register(description)

    @classmethod
    def builtin(cls, names: Iterable[str]) -> DescriptionCatalog:
        """A catalog of the built-in descriptions of these types.

        Raises:
            DescriptionError: a type has no built-in description (register one).
        """
        names = list(names)
        missing = [n for n in names if n not in BUILTIN]
        if missing:
            raise DescriptionError(
                f"no built-in description for {missing}; register one with a description"
            )
        return cls(BUILTIN[n] for n in names)

    def register(self, description: DefectDescription) -> None:
        """Add a type, or replace its description."""
        if not isinstance(description, DefectDescription):
            raise DescriptionError(
                f"expected a DefectDescription, got {type(description).__name__}"
            )
        self._by_name[description.name] = description

    @property
    def names(self) -> tuple[str, ...]:
        """The types, in registration order."""
        return tuple(self._by_name)

    def __getitem__(self, name: str) -> DefectDescription:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def texts(self) -> list[str]:
        """The text of every type, in :attr:`names` order."""
        return [d.text() for d in self._by_name.values()]

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready form."""
        return [d.to_dict() for d in self._by_name.values()]

    @classmethod
    def from_list(cls, items: Iterable[Mapping[str, Any]]) -> DescriptionCatalog:
        """Inverse of :meth:`to_list`."""
        return cls(DefectDescription.from_dict(item) for item in items)
