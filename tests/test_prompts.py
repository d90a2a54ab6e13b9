"""Prompt templates: rendered strictly, row text last, fingerprint follows every change."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import LABELS, PROMPT_EN, PROMPTS_DIR

from pipeline.errors import ConfigError, PromptError
from pipeline.prompts import load_template
from pipeline.prompts import render as render_template
from pipeline.tasks.classify import ClassifySettings, ClassifyTask
from pipeline.tasks.extract import AttributeSpec, ExtractSettings, ExtractTask


def render(path, labels, prompt_vars):
    """Render a classification template for ``labels``."""
    return render_template(path, ClassifyTask(ClassifySettings(labels=list(labels))), prompt_vars)


def template(tmp_path: Path, system: str, user: str, name: str = "t.yaml", **extra: str) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"system": system, "user": user, **extra}), encoding="utf-8")
    return path


def test_prompt_error_is_a_config_error() -> None:
    assert issubclass(PromptError, ConfigError)


def test_render_fills_labels_and_puts_row_text_last() -> None:
    prompt = render(PROMPT_EN, LABELS, {})
    messages = prompt.messages("Nescafe Gold 200 g")
    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    for label in LABELS:
        assert f"- {label}" in system
    assert "{" not in system and "}" not in system
    assert user.endswith("Nescafe Gold 200 g")
    assert user == "Product title: Nescafe Gold 200 g"
    assert "Nescafe" not in system
    assert prompt.source == str(PROMPT_EN)


def test_row_text_is_inserted_verbatim_even_with_braces() -> None:
    prompt = render(PROMPT_EN, LABELS, {})
    text = "Mug {labels} {0} }{ 100%"
    assert prompt.messages(text)[1]["content"].endswith(text)


def test_row_text_last_when_template_has_text_after_placeholder(tmp_path: Path) -> None:
    path = template(tmp_path, "Pick one of: {labels_inline}", "Title: {text}\n\n")
    prompt = render(path, ["A", "B"], {})
    assert prompt.system == "Pick one of: A, B"
    assert prompt.messages("row")[1]["content"] == "Title: row"


def test_shared_prefix_is_the_same_for_every_row() -> None:
    prompt = render(PROMPT_EN, LABELS, {})
    a, b = prompt.messages("first row"), prompt.messages("second, different row")
    assert a[0] == b[0]
    assert a[1]["content"].removesuffix("first row") == b[1]["content"].removesuffix("second, different row")


def test_unknown_variable_is_named(tmp_path: Path) -> None:
    path = template(tmp_path, "You work for {shop_name}. Labels:\n{labels}", "Item: {text}")
    with pytest.raises(PromptError) as info:
        render(path, LABELS, {})
    assert "shop_name" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_variable_in_user_message_is_named(tmp_path: Path) -> None:
    path = template(tmp_path, "{labels}", "Context {context}: {text}")
    with pytest.raises(PromptError, match="context"):
        render(path, LABELS, {})


def test_prompt_var_fills_the_template_variable(tmp_path: Path) -> None:
    path = template(tmp_path, "You work for {shop}.\n{labels}", "Item: {text}")
    prompt = render(path, LABELS, {"shop": "a Polish pharmacy"})
    assert prompt.system.startswith("You work for a Polish pharmacy.")


def test_text_in_system_message_refused(tmp_path: Path) -> None:
    path = template(tmp_path, "Classify {text} into {labels}", "{text}")
    with pytest.raises(PromptError, match="system"):
        render(path, LABELS, {})


def test_text_missing_from_user_message_refused(tmp_path: Path) -> None:
    path = template(tmp_path, "{labels}", "Classify the product.")
    with pytest.raises(PromptError, match="exactly once"):
        render(path, LABELS, {})


def test_text_twice_in_user_message_refused(tmp_path: Path) -> None:
    path = template(tmp_path, "{labels}", "Title: {text}\nAgain: {text}")
    with pytest.raises(PromptError, match="exactly once"):
        render(path, LABELS, {})


def test_unused_prompt_var_refused(tmp_path: Path) -> None:
    with pytest.raises(PromptError) as info:
        render(PROMPT_EN, LABELS, {"shop": "a pharmacy"})
    assert "shop" in str(info.value)
    assert "not used" in str(info.value)


@pytest.mark.parametrize("name", ["labels", "labels_inline", "text"])
def test_prompt_vars_may_not_redefine_builtins(name: str) -> None:
    with pytest.raises(PromptError, match="built-in") as info:
        render(PROMPT_EN, LABELS, {name: "x"})
    assert name in str(info.value)


def test_placeholder_with_format_spec_refused(tmp_path: Path) -> None:
    path = template(tmp_path, "{labels!r}", "{text}")
    with pytest.raises(PromptError, match="plain name"):
        render(path, LABELS, {})


def test_positional_placeholder_refused(tmp_path: Path) -> None:
    path = template(tmp_path, "{labels} {}", "{text}")
    with pytest.raises(PromptError, match="plain name"):
        render(path, LABELS, {})


def test_unbalanced_brace_refused(tmp_path: Path) -> None:
    path = template(tmp_path, "Labels: {labels", "{text}")
    with pytest.raises(PromptError, match="literal braces"):
        render(path, LABELS, {})


def test_literal_braces_render(tmp_path: Path) -> None:
    path = template(tmp_path, 'Answer as JSON {{"label": ...}}\n{labels}', "{{row}} {text}")
    prompt = render(path, ["A", "B"], {})
    assert prompt.system.startswith('Answer as JSON {"label": ...}')
    assert prompt.messages("x")[1]["content"] == "{row} x"


def test_literal_text_in_braces_next_to_placeholder(tmp_path: Path) -> None:
    # "{{text}}" is the documented way to write the literal word "{text}"; the real placeholder
    # follows it. The user message should render as "Replace {text} with: <row>".
    path = template(tmp_path, "{labels}", "Replace {{text}} with: {text}")
    prompt = render(path, ["A", "B"], {})
    assert prompt.messages("row")[1]["content"] == "Replace {text} with: row"


def test_fingerprint_is_stable() -> None:
    assert render(PROMPT_EN, LABELS, {}).fingerprint == render(PROMPT_EN, list(LABELS), {}).fingerprint


def test_fingerprint_changes_with_labels() -> None:
    base = render(PROMPT_EN, LABELS, {}).fingerprint
    assert render(PROMPT_EN, [*LABELS, "Tooth brush"], {}).fingerprint != base
    assert render(PROMPT_EN, list(reversed(LABELS)), {}).fingerprint != base
    assert render(PROMPT_EN, ["Coffee", "Tea", "Vitamin", "Shoe"], {}).fingerprint != base


def test_fingerprint_changes_with_template_text(tmp_path: Path) -> None:
    a = template(tmp_path, "Pick one:\n{labels}", "Title: {text}", name="a.yaml")
    b = template(tmp_path, "Pick exactly one:\n{labels}", "Title: {text}", name="b.yaml")
    c = template(tmp_path, "Pick one:\n{labels}", "Product: {text}", name="c.yaml")
    d = template(tmp_path, "Pick one:\n{labels}", "Title: {text} (end)", name="d.yaml")
    prints = {render(p, LABELS, {}).fingerprint for p in (a, b, c, d)}
    assert len(prints) == 4


def test_fingerprint_changes_with_prompt_vars(tmp_path: Path) -> None:
    path = template(tmp_path, "Shop: {shop}\n{labels}", "{text}")
    assert (
        render(path, LABELS, {"shop": "pharmacy"}).fingerprint
        != render(path, LABELS, {"shop": "bookshop"}).fingerprint
    )


def test_fingerprint_ignores_description(tmp_path: Path) -> None:
    a = template(tmp_path, "{labels}", "T: {text}", name="a.yaml", description="one")
    b = template(tmp_path, "{labels}", "T: {text}", name="b.yaml", description="two")
    assert render(a, LABELS, {}).fingerprint == render(b, LABELS, {}).fingerprint


def test_template_unknown_key_refused(tmp_path: Path) -> None:
    path = template(tmp_path, "{labels}", "{text}", systme="typo")
    with pytest.raises(PromptError, match="systme"):
        load_template(path)


def test_template_missing_user_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("system: '{labels}'\n", encoding="utf-8")
    with pytest.raises(PromptError, match="user"):
        load_template(path)


def test_template_not_found(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="not found"):
        render(tmp_path / "nope.yaml", LABELS, {})


def test_template_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("system: [oops\nuser: x\n", encoding="utf-8")
    with pytest.raises(PromptError, match="not valid YAML"):
        load_template(path)


SHIPPED = sorted(PROMPTS_DIR.glob("*.yaml"))


def test_all_four_shipped_templates_are_found() -> None:
    names = {p.name for p in SHIPPED}
    assert {
        "classify_product.en.yaml",
        "classify_product.pl.yaml",
        "classify_keyword.en.yaml",
        "classify_keyword.pl.yaml",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_templates_render(path: Path) -> None:
    tmpl = load_template(path)
    labels = ["informacyjna", "nawigacyjna", "komercyjna", "transakcyjna"]
    needs_shop = "{shop}" in tmpl.system or "{shop}" in tmpl.user
    if tmpl.task == "extract":
        attrs = [
            AttributeSpec(name="kolor", type="enum", values=labels),
            AttributeSpec(name="marka", type="string"),
        ]
        task = ExtractTask(ExtractSettings(attributes=attrs))
    else:
        task = ClassifyTask(
            ClassifySettings(labels=labels, labels_max=3 if "labels_max" in tmpl.system else None)
        )
    prompt = render_template(path, task, {"shop": "internetowego"} if needs_shop else {})
    assert tmpl.language in {"en", "pl"}
    assert path.name.split(".")[-2] == tmpl.language
    messages = prompt.messages("krem do rąk z mocznikiem")
    assert messages[1]["content"].endswith("krem do rąk z mocznikiem")
    shown = messages[0]["content"] if "{choices}" not in tmpl.user else messages[1]["content"]
    for label in labels:
        assert label in shown
    assert "{text}" not in messages[0]["content"]
    assert "{" not in messages[1]["content"]


def test_a_choices_template_shows_each_rows_own_options_after_the_shared_instructions() -> None:
    paths = ["Food > Tea", "Food > Coffee", "Home > Mugs", "Home > Kettles"]
    task = ClassifyTask(ClassifySettings(labels=paths, strategy="hierarchical"))
    prompt = render_template(PROMPTS_DIR / "classify_product_choices.en.yaml", task, {})
    assert prompt.row_choices
    one = prompt.messages("green tea", ["Food > Tea", "Food > Coffee"])
    two = prompt.messages("kettle", ["Home > Mugs", "Home > Kettles"])
    assert one[0] == two[0]  # the system message: the same for every row
    assert one[1]["content"] == "Categories:\n- Food > Tea\n- Food > Coffee\n\nProduct title: green tea"
    assert "Food" not in two[1]["content"]
    with pytest.raises(ValueError, match="give them"):
        prompt.messages("kettle")
