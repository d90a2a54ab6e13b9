"""Scoring a label set (``pipeline/scoring.py``): the trie, the search, and the label paths of a
real tokenizer (SmolLM2's, no engine) under chat templates that open the answer differently.

The search is checked against brute force: with random conditional distributions at every node,
each label's probability is the product along its path, and the search must give exactly that,
summing to 1, and must return the most probable label however the trie's nodes are shared.
"""

from __future__ import annotations

import math
import random

import pytest
from engine_env import CHECKPOINT

from pipeline.errors import ConfigError
from pipeline.scoring import LabelTrie, Search, answer, search_all

END = 0


def _trie(paths: dict[str, list[int]]) -> LabelTrie:
    return LabelTrie(list(paths), list(paths.values()), [END])


def _model(seed: int):
    """A stand-in for the model: a fixed random distribution over the allowed tokens of each prefix."""
    rng = random.Random(seed)
    table: dict[tuple, dict[int, float]] = {}

    def logprobs(prefix: tuple[int, ...], allowed: list[int]) -> dict[int, float]:
        key = (prefix, tuple(allowed))
        if key not in table:
            weights = [rng.random() ** 3 + 1e-9 for _ in allowed]
            total = sum(weights)
            table[key] = {t: math.log(w / total) for t, w in zip(allowed, weights, strict=True)}
        return table[key]

    return logprobs


def _brute_force(trie: LabelTrie, paths: dict[str, list[int]], model) -> dict[str, float]:
    """Each label's probability: walk its whole path, reading the model at every shared node."""
    found = {}
    for label, path in paths.items():
        node, logp = trie.root, 0.0
        for token in [*path, None]:
            if node.resolved is not None:
                break
            allowed = trie.allowed(node)
            step = model(node.prefix, allowed)
            if token is None:  # the label ends inside another's path
                logp += step[END]
                break
            logp += step[token]
            node = node.children[token]
        found[label] = logp
    return found


def _search(trie: LabelTrie, model, top: int) -> Search:
    search = Search(trie, top)
    search_all([search], lambda requests: [model(n.prefix, trie.allowed(n)) for _, n in requests])
    return search


def _random_paths(rng: random.Random, labels: int) -> dict[str, list[int]]:
    paths: dict[str, list[int]] = {}
    while len(paths) < labels:
        path = [rng.randint(1, 4) for _ in range(rng.randint(1, 4))]
        if path not in paths.values():
            paths[f"L{len(paths)}"] = path
    return paths


@pytest.mark.parametrize("seed", range(40))
def test_the_search_gives_each_label_its_path_probability_and_the_best_label(seed):
    rng = random.Random(seed)
    paths = _random_paths(rng, rng.randint(2, 12))  # shared prefixes, labels inside others' paths
    trie, model = _trie(paths), _model(seed)
    exact = _brute_force(trie, paths, model)
    assert math.isclose(sum(math.exp(v) for v in exact.values()), 1.0, abs_tol=1e-9)

    every = _search(trie, model, top=len(paths))
    assert set(every.exact) == set(paths)
    for label, logp in every.exact.items():
        assert math.isclose(logp, exact[label], abs_tol=1e-9), label
    assert math.isclose(sum(math.exp(v) for v in every.exact.values()), 1.0, abs_tol=1e-9)

    best = _search(trie, model, top=1)
    label, logp = best.best()
    assert math.isclose(logp, max(exact.values()), abs_tol=1e-12)
    assert exact[label] == max(exact.values())
    assert best.asked <= every.asked  # the top label alone never needs more requests


def test_a_label_that_starts_another_is_resolved_by_the_end_of_the_answer():
    paths = {"Tea": [5], "Tea Set": [5, 7], "Coffee": [6]}
    trie = _trie(paths)
    assert trie.steps() == [3, 2]  # every label needs step 1; Tea and Tea Set a second
    node = trie.root.children[5]
    assert node.ends == "Tea" and trie.allowed(node) == [7, END]
    table = {(): {5: math.log(0.8), 6: math.log(0.2)}, (5,): {7: math.log(0.25), END: math.log(0.75)}}
    search = _search(trie, lambda prefix, allowed: table[prefix], top=3)
    probs = {label: math.exp(v) for label, v in search.ranked()}
    assert probs == pytest.approx({"Tea": 0.6, "Tea Set": 0.2, "Coffee": 0.2})
    assert search.best()[0] == "Tea"


def test_a_shared_node_is_opened_only_while_its_labels_could_win():
    trie = _trie({"Tea": [5], "Tea Set": [5, 7], "Coffee": [6]})
    calls = []

    def model(prefix, allowed):
        calls.append(prefix)
        return {5: math.log(0.1), 6: math.log(0.9)} if prefix == () else {7: -0.7, END: -0.7}

    search = _search(trie, model, top=1)
    assert search.best()[0] == "Coffee" and calls == [()]  # 0.9 alone beats everything under "Te"
    assert search.asked == 1


def test_tokens_every_label_shares_are_not_asked_about():
    # A template whose answer opens with a newline: every path starts with it (token 9)
    trie = _trie({"A": [9, 1], "B": [9, 2, 3], "C": [9, 2, 4]})
    assert trie.skip(trie.root).prefix == (9,)
    assert trie.steps() == [3, 2]
    asked = []

    def model(prefix, allowed):
        asked.append(prefix)
        return {t: -math.log(len(allowed)) for t in allowed}

    search = _search(trie, model, top=3)
    assert asked == [(9,), (9, 2)]
    assert sum(math.exp(v) for v in search.exact.values()) == pytest.approx(1.0)


def test_labels_the_model_cannot_tell_apart_are_refused():
    with pytest.raises(ConfigError, match="'Tea' and 'tea' are the same tokens"):
        _trie({"Tea": [5, 6], "tea": [5, 6]})


def test_an_answer_reports_the_steps_and_the_top_labels():
    trie = _trie({"Tea": [5], "Tea Set": [5, 7], "Coffee": [6]})
    table = {(): {5: math.log(0.8), 6: math.log(0.2)}, (5,): {7: math.log(0.4), END: math.log(0.6)}}
    search = _search(trie, lambda prefix, allowed: table[prefix], top=2)
    done = answer(search, prompt_tokens=40, cached_tokens=32)
    assert done.text == "Tea" and done.output_tokens == 2 and done.prompt_tokens == 40
    assert [label for label, _ in done.alternatives] == ["Tea", "Tea Set"]
    assert math.exp(done.logprob) == pytest.approx(0.48)


# --- label paths from a real tokenizer and chat template (SmolLM2's; no engine) ---------------

needs_tokenizer = pytest.mark.skipif(
    not (CHECKPOINT / "tokenizer.json").exists(), reason="run: labelmill models fetch smollm2-135m"
)
MESSAGES = [{"role": "system", "content": "Pick a label."}, {"role": "user", "content": "a product"}]


def _backend(template: str | None = None):
    from pipeline.backends.vllm import EngineSettings, VllmBackend

    backend = VllmBackend(EngineSettings(), str(CHECKPOINT))
    if template is not None:
        backend._tokenizer.chat_template = template
    return backend


def _ids(backend, text: str) -> list[int]:
    return backend._tokenizer(text, add_special_tokens=False)["input_ids"]


@needs_tokenizer
def test_label_paths_are_the_tokens_the_template_writes_for_the_answer():
    backend = _backend()
    labels = ["Tea", "Tea Set", "TeaSet", "Tea  Set", "Żółta herbata", "Zioła"]
    paths = backend.label_paths(labels, MESSAGES)
    for label, path in zip(labels, paths, strict=True):
        assert backend._tokenizer.decode(path) == label  # Polish diacritics survive byte tokens
    assert paths[1][: len(paths[0])] == paths[0]  # "Tea" starts "Tea Set"
    assert len({tuple(p) for p in paths}) == len(labels)  # spacing variants are other paths
    trie = backend.label_trie(tuple(labels), MESSAGES)
    tea = trie.root
    for token in paths[0]:
        tea = tea.children[token]
    assert tea.ends == "Tea" and set(trie.allowed(tea)) >= set(backend.end_tokens())
    # the end of the answer is the template's end of turn
    assert backend._tokenizer.convert_ids_to_tokens(backend.end_tokens()) == ["<|im_end|>"]


@needs_tokenizer
def test_a_template_that_writes_a_space_before_the_answer_gives_leading_space_tokens():
    template = (
        "{% for m in messages %}{{ m['role'] }}:{% if m['role'] == 'assistant' %} {{ m['content'] }}"
        "<|im_end|>{% else %} {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    backend = _backend(template)
    [path] = backend.label_paths(["Coffee"], MESSAGES)
    assert path == _ids(backend, " Coffee") != _ids(backend, "Coffee")


@needs_tokenizer
def test_a_template_that_opens_the_answer_with_a_newline_costs_no_step():
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
    )
    backend = _backend(template)
    labels = ["Coffee", "Vitamin", "Shoes"]
    paths = backend.label_paths(labels, MESSAGES)
    newline = _ids(backend, "\n")
    assert all(p[: len(newline)] == newline for p in paths)
    trie = backend.label_trie(tuple(labels), MESSAGES)
    assert trie.skip(trie.root).prefix == tuple(newline)  # appended to the prompt, not asked
    assert trie.steps() == [3]
