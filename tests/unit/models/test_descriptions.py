"""Defect descriptions: the built-in texts, registration, and refusing bad input."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.data.synthetic import DEFECT_TYPES
from models.descriptions import (
    BUILTIN,
    MAX_DESCRIPTION,
    DefectDescription,
    DescriptionCatalog,
    DescriptionError,
)


def test_every_generated_and_elpv_defect_type_has_a_description():
    assert set(DEFECT_TYPES) <= set(BUILTIN)
    assert {"defect_p67", "defect_p100"} <= set(BUILTIN)
    # The look-alikes say what separates them.
    assert "penetrates" in BUILTIN["crack"].contrast
    assert "surface only" in BUILTIN["scratch"].contrast


def test_text_joins_description_keywords_and_contrast():
    d = DefectDescription("dent", "  A shallow   dent ", ("dent", "dimple"), "Not a hole.")
    assert d.description == "A shallow dent"
    assert d.text() == "A shallow dent. Keywords: dent, dimple. Not a hole."
    assert DefectDescription("burr", "A raised edge").text() == "A raised edge."
    assert DefectDescription.from_dict(d.to_dict()) == d


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "Bad Name"}, "name must be"),
        ({"name": ""}, "name must be"),
        ({"description": ""}, "description is empty"),
        ({"description": "x" * (MAX_DESCRIPTION + 1)}, "limit is"),
        ({"description": "<script>alert(1)</script>"}, "markup"),
        ({"description": "see [here](javascript:x)"}, "markup"),
        ({"description": "a \x00 null"}, "control"),
        ({"description": "zero\u200bwidth"}, "control"),
        ({"keywords": tuple(f"k{i}" for i in range(13))}, "keywords"),
        ({"contrast": "{{ template }}"}, "markup"),
    ],
)
def test_bad_descriptions_are_refused_naming_the_field(fields, message):
    values = {"name": "burr", "description": "A raised edge"} | fields
    with pytest.raises(DescriptionError, match=message):
        DefectDescription(**values)


def test_from_dict_refuses_unknown_fields_and_bad_keywords():
    with pytest.raises(DescriptionError, match="unknown field"):
        DefectDescription.from_dict({"name": "burr", "description": "x", "html": "<b>"})
    with pytest.raises(DescriptionError, match="keywords must be a list"):
        DefectDescription.from_dict({"name": "burr", "description": "x", "keywords": "edge"})


@pytest.mark.fuzz
@given(st.text(max_size=600))
def test_any_text_is_either_clean_or_refused(text):
    try:
        d = DefectDescription("burr", text)
    except DescriptionError:
        return
    assert 0 < len(d.description) <= MAX_DESCRIPTION
    assert "<" not in d.description and ">" not in d.description


def test_catalog_builtin_register_and_round_trip():
    catalog = DescriptionCatalog.builtin(["scratch", "crack"])
    assert catalog.names == ("scratch", "crack") and len(catalog) == 2
    burr = DefectDescription(
        "burr", "A raised sharp edge left by machining", ("burr", "sharp edge")
    )
    catalog.register(burr)
    assert "burr" in catalog and catalog["burr"] is burr
    assert catalog.texts()[-1] == burr.text()
    assert DescriptionCatalog.from_list(catalog.to_list()).names == catalog.names
    with pytest.raises(DescriptionError, match="no built-in description"):
        DescriptionCatalog.builtin(["scratch", "warp"])
    with pytest.raises(DescriptionError, match="expected a DefectDescription"):
        catalog.register({"name": "x"})


def test_variants_are_the_text_its_parts_and_one_sentence_per_keyword():
    crack = BUILTIN["crack"]
    variants = crack.variants()
    assert variants[0] == crack.text()
    assert crack.description + "." in variants and crack.contrast + "." in variants
    assert all(f"A surface with {k}." in variants for k in crack.keywords)
    assert len(variants) == len(set(variants)) == 3 + len(crack.keywords)
    bare = DefectDescription("dent", "A dent")
    assert bare.variants() == [
        "A dent.",
    ]
