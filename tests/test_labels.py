"""The label set: refused when empty, ambiguous or badly spelled; read from plain and taxonomy files."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from conftest import TAXONOMY_PL

from pipeline.errors import ConfigError, LabelsError
from pipeline.labels import load_labels, validate_labels


def test_valid_labels_keep_their_order() -> None:
    assert load_labels(["Tea", "Coffee", "Shoes"], None) == ["Tea", "Coffee", "Shoes"]


def test_labels_error_is_a_config_error() -> None:
    assert issubclass(LabelsError, ConfigError)
    assert LabelsError("x").exit_code == 2


@pytest.mark.parametrize("labels", [[], None])
def test_empty_label_list(labels: list[str] | None) -> None:
    with pytest.raises(LabelsError, match="empty"):
        load_labels(labels, None)


def test_single_label_refused() -> None:
    with pytest.raises(LabelsError, match="only one label") as info:
        load_labels(["Coffee"], None)
    assert "'Coffee'" in str(info.value)


def test_exact_duplicates_refused() -> None:
    with pytest.raises(LabelsError, match="duplicate") as info:
        load_labels(["Tea", "Coffee", "Tea"], None)
    assert "'Tea'" in str(info.value)


def test_case_insensitive_duplicates_refused_naming_both_spellings() -> None:
    with pytest.raises(LabelsError, match="duplicate") as info:
        load_labels(["Coffee", "Tea", "coffee"], None)
    assert "'Coffee'" in str(info.value)
    assert "'coffee'" in str(info.value)


def test_casefold_duplicates_refused() -> None:
    # German sharp s: "STRASSE".casefold() == "straße".casefold()
    with pytest.raises(LabelsError, match="duplicate"):
        load_labels(["Straße", "STRASSE"], None)


def test_unicode_normalisation_duplicates_refused() -> None:
    composed = "Kawa parzona z mlekiem ó"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    with pytest.raises(LabelsError, match="duplicate"):
        load_labels([composed, decomposed], None)


def test_labels_are_nfc_normalised() -> None:
    decomposed = unicodedata.normalize("NFD", "Żywność")
    out = load_labels([decomposed, "Inne"], None)
    assert out[0] == unicodedata.normalize("NFC", "Żywność")


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_blank_label_refused(blank: str) -> None:
    with pytest.raises(LabelsError, match="#2 is blank"):
        load_labels(["Coffee", blank, "Tea"], None)


def test_non_text_label_refused() -> None:
    with pytest.raises(LabelsError, match="blank or not text"):
        validate_labels(["Coffee", 3, "Tea"], "labels")  # type: ignore[list-item]


@pytest.mark.parametrize("label", [" Coffee", "Coffee ", " Coffee "])
def test_leading_or_trailing_spaces_refused(label: str) -> None:
    with pytest.raises(LabelsError, match="leading or trailing spaces") as info:
        load_labels([label, "Tea"], None)
    assert repr(label) in str(info.value)


def test_control_character_refused() -> None:
    with pytest.raises(LabelsError, match="control character"):
        load_labels(["Cof\x07fee", "Tea"], None)


def test_error_names_where_the_labels_came_from(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("Coffee\ncoffee\n", encoding="utf-8")
    with pytest.raises(LabelsError) as info:
        load_labels(None, str(path))
    assert str(path) in str(info.value)


def test_labels_file_plain_lines_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text(
        "# product categories\n\nCoffee\n  Tea  \n# a comment in the middle\nHerbata zielona\n\n",
        encoding="utf-8",
    )
    assert load_labels(None, str(path)) == ["Coffee", "Tea", "Herbata zielona"]


def test_labels_file_with_duplicates_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("Coffee\nTea\nTEA\n", encoding="utf-8")
    with pytest.raises(LabelsError, match="duplicate"):
        load_labels(None, str(path))


def test_labels_file_only_comments_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("# nothing here\n\n", encoding="utf-8")
    with pytest.raises(LabelsError, match="empty"):
        load_labels(None, str(path))


def test_missing_labels_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.txt"
    with pytest.raises(LabelsError, match="not found") as info:
        load_labels(None, str(path))
    assert str(path) in str(info.value)


def test_labels_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_bytes("Kawa\nHerbata\nŻywność\n".encode("cp1250"))
    with pytest.raises(LabelsError, match="not UTF-8"):
        load_labels(None, str(path))


def test_max_depth_on_plain_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("Coffee\nTea\n", encoding="utf-8")
    with pytest.raises(LabelsError, match="taxonomy"):
        load_labels(None, str(path), max_depth=1)


def test_taxonomy_mixed_with_plain_lines_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("gid://shopify/TaxonomyCategory/aa : Apparel\nCoffee\n", encoding="utf-8")
    with pytest.raises(LabelsError, match="mixes") as info:
        load_labels(None, str(path))
    assert "line 2" in str(info.value) and "Coffee" not in str(info.value)


def test_small_taxonomy_file_full_paths_and_depths(tmp_path: Path) -> None:
    path = tmp_path / "categories.txt"
    path.write_text(
        "# Shopify Product Taxonomy\n"
        "gid://shopify/TaxonomyCategory/aa      : Apparel & Accessories\n"
        "gid://shopify/TaxonomyCategory/aa-1    : Apparel & Accessories > Clothing\n"
        "gid://shopify/TaxonomyCategory/aa-1-1  : Apparel & Accessories > Clothing > Shirts\n"
        "gid://shopify/TaxonomyCategory/fb      : Food, Beverages & Tobacco\n",
        encoding="utf-8",
    )
    assert load_labels(None, str(path)) == [
        "Apparel & Accessories",
        "Apparel & Accessories > Clothing",
        "Apparel & Accessories > Clothing > Shirts",
        "Food, Beverages & Tobacco",
    ]
    assert load_labels(None, str(path), max_depth=1) == ["Apparel & Accessories", "Food, Beverages & Tobacco"]
    assert load_labels(None, str(path), max_depth=2) == [
        "Apparel & Accessories",
        "Apparel & Accessories > Clothing",
        "Food, Beverages & Tobacco",
    ]


def test_shopify_polish_taxonomy_top_level() -> None:
    labels = load_labels(None, str(TAXONOMY_PL), max_depth=1)
    assert len(labels) > 10
    assert all(" > " not in label for label in labels)
    assert all(not label.startswith("gid://") for label in labels)
    assert "Elektronika" in labels
    assert "Zwierzęta i artykuły dla zwierząt" in labels
    # every top-level line of the file is there, once
    lines = TAXONOMY_PL.read_text(encoding="utf-8").splitlines()
    top = [ln.split(" : ", 1)[1].strip() for ln in lines if ln.startswith("gid://") and " > " not in ln]
    assert labels == top


def test_shopify_polish_taxonomy_depth_two_is_larger_and_bounded() -> None:
    top = load_labels(None, str(TAXONOMY_PL), max_depth=1)
    two = load_labels(None, str(TAXONOMY_PL), max_depth=2)
    assert len(two) > len(top)
    assert set(top) <= set(two)
    assert all(label.count(" > ") <= 1 for label in two)


def test_labels_file_with_utf8_bom(tmp_path: Path) -> None:
    # Windows editors often save UTF-8 with a byte order mark; it must not become part of a label.
    path = tmp_path / "labels.txt"
    path.write_bytes("Coffee\nTea\n".encode("utf-8-sig"))
    assert load_labels(None, str(path)) == ["Coffee", "Tea"]


def test_taxonomy_file_with_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "categories.txt"
    path.write_bytes(
        (
            "# Shopify Product Taxonomy\n"
            "gid://shopify/TaxonomyCategory/aa : Apparel & Accessories\n"
            "gid://shopify/TaxonomyCategory/fb : Food, Beverages & Tobacco\n"
        ).encode("utf-8-sig")
    )
    assert load_labels(None, str(path)) == ["Apparel & Accessories", "Food, Beverages & Tobacco"]


def test_google_taxonomy_lines_with_ids(tmp_path: Path) -> None:
    path = tmp_path / "taxonomy-with-ids.pl-PL.txt"
    path.write_text(
        "# Google_Product_Taxonomy_Version: 2021-09-21\n"
        "1 - Zwierzęta i artykuły dla zwierząt\n"
        "3237 - Zwierzęta i artykuły dla zwierząt > Żywe zwierzęta\n"
        "2 - Zwierzęta i artykuły dla zwierząt > Artykuły dla zwierząt\n"
        "3 - Zwierzęta i artykuły dla zwierząt > Artykuły dla zwierząt > Artykuły dla ptaków\n"
        "166 - Odzież i akcesoria\n",
        encoding="utf-8",
    )
    assert load_labels(None, str(path), max_depth=1) == [
        "Zwierzęta i artykuły dla zwierząt",
        "Odzież i akcesoria",
    ]
    assert load_labels(None, str(path), assign="leaf") == [
        "Zwierzęta i artykuły dla zwierząt > Żywe zwierzęta",
        "Zwierzęta i artykuły dla zwierząt > Artykuły dla zwierząt > Artykuły dla ptaków",
        "Odzież i akcesoria",
    ]
    # the leaves of the tree as cut at depth 2
    assert load_labels(None, str(path), max_depth=2, assign="leaf") == [
        "Zwierzęta i artykuły dla zwierząt > Żywe zwierzęta",
        "Zwierzęta i artykuły dla zwierząt > Artykuły dla zwierząt",
        "Odzież i akcesoria",
    ]


def test_plain_path_lines_are_a_taxonomy(tmp_path: Path) -> None:
    path = tmp_path / "paths.txt"
    path.write_text("Home > Kitchen > Kettles\nHome > Garden\nToys\nHome\n", encoding="utf-8")
    assert load_labels(None, str(path), max_depth=1) == ["Toys", "Home"]
    # "Home" has categories below it even though "Home > Kitchen" is not listed on its own
    assert load_labels(None, str(path), assign="leaf") == [
        "Home > Kitchen > Kettles",
        "Home > Garden",
        "Toys",
    ]


def test_a_category_listed_twice_is_merged_with_a_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "categories.txt"
    path.write_text(
        "gid://shopify/TaxonomyCategory/aa : Apparel\n"
        "gid://shopify/TaxonomyCategory/aa-1 : Apparel > Shirts\n"
        "gid://shopify/TaxonomyCategory/aa-9 : Apparel > Shirts\n",
        encoding="utf-8",
    )
    assert load_labels(None, str(path)) == ["Apparel", "Apparel > Shirts"]
    assert "line 3 (= line 2)" in caplog.text and "merged" in caplog.text


def test_the_whole_polish_shopify_taxonomy_loads() -> None:
    # it lists two category paths twice: merged, not refused
    labels = load_labels(None, str(TAXONOMY_PL))
    assert len(labels) == len(set(labels)) > 10_000
    leaves = load_labels(None, str(TAXONOMY_PL), assign="leaf")
    assert set(leaves) < set(labels)
    assert not any(other.startswith(leaf + " > ") for leaf in leaves[:200] for other in labels)


def test_assign_and_depth_need_a_taxonomy(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("Coffee\nTea\n", encoding="utf-8")
    with pytest.raises(LabelsError, match="need a taxonomy"):
        load_labels(None, str(path), assign="leaf")


def test_a_taxonomy_run_gives_each_label_its_id_and_path(make_job, read_parts, tmp_path: Path) -> None:
    from pipeline.runner import run_job

    path = tmp_path / "taxonomy-with-ids.txt"
    path.write_text(
        "1 - Animals\n3237 - Animals > Live Animals\n2 - Animals > Pet Supplies\n166 - Apparel\n",
        encoding="utf-8",
    )
    job = make_job(labels=None, labels_file=str(path), assign="leaf")
    run_job(job.load())
    ids = {"Animals > Live Animals": "3237", "Animals > Pet Supplies": "2", "Apparel": "166"}
    rows = read_parts(job.output).to_pylist()
    assert rows and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert row["label_id"] == ids[row["label"]]
        assert row["label_path"] == row["label"].split(" > ")


def test_plain_labels_get_no_taxonomy_columns(make_job, read_parts) -> None:
    from pipeline.runner import run_job

    job = make_job()
    run_job(job.load())
    names = read_parts(job.output).column_names
    assert "label_id" not in names and "label_path" not in names
