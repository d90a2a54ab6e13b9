"""Scoring a label set: each label's probability in a decode step or a few, instead of spelling one
label out token by token under a constraint.

Every label is tokenised once, canonically (as the model writes it right after the chat template's
opening of the answer), and the token paths form a trie. Asking the model for one token with only
the root's children allowed (``max_tokens=1``, logprobs for every allowed token) gives, in one
decode step, the probability of each child; a child with a single label beneath it resolves that
label. A child shared by several labels (``Tea`` for ``Tea`` and ``Tea Set``) is asked about one
token deeper, with its prefix appended to the prompt; where a label ends inside another's path, the
end of the answer (the model's end-of-turn tokens) is one of the children.

The probability of a label is the product of the probabilities of its path's tokens, each
normalised over the tokens allowed at that step, down to the token that singles the label out (or
the end of answer, for a label that is a prefix of another). These sum to 1 over the label set.

Which nodes are asked about is a best-first search per row: a shared node is opened only while its
probability mass is more than the ``k``-th best label already resolved (``k`` = how many labels
the answer reports), since no label beneath it could otherwise enter the top ``k``. With ``k`` = 1
that is: after the first step, only rows whose best first token is shared continue, and the answer
is the most probable label of the whole set, with its exact probability.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.contracts import Completion
from pipeline.errors import ConfigError

NEG_INF = float("-inf")


@dataclass(eq=False)
class Node:
    """A token prefix shared by some labels."""

    prefix: tuple[int, ...]
    children: dict[int, Node] = field(default_factory=dict)
    ends: str | None = None
    """The label whose path ends here, while others continue (``Tea`` under ``Tea Set``)."""
    labels: list[str] = field(default_factory=list)
    """Every label in this subtree, in the set's order."""
    allowed: list[int] = field(default_factory=list)
    """The tokens the model may choose here: the children, and the end of the answer where a
    label ends here."""

    @property
    def resolved(self) -> str | None:
        """The one label beneath, if only one is."""
        return self.labels[0] if len(self.labels) == 1 else None


class LabelTrie:
    """The token paths of a label set; ``end_ids`` are the tokens that end an answer."""

    def __init__(self, labels: Sequence[str], paths: Sequence[Sequence[int]], end_ids: Sequence[int]) -> None:
        if len(labels) != len(paths):
            raise ValueError("one token path per label")
        self.labels = list(labels)
        self.end_ids = tuple(dict.fromkeys(end_ids))
        self.root = Node(())
        owner: dict[tuple[int, ...], str] = {}
        for label, path in zip(labels, paths, strict=True):
            path = tuple(path)
            if not path:
                raise ConfigError(f"label {label!r} has no tokens")
            if path in owner:
                raise ConfigError(
                    f"labels {owner[path]!r} and {label!r} are the same tokens to the model, so it "
                    "can't tell them apart",
                    hint="merge them or word one differently",
                )
            owner[path] = label
            node = self.root
            node.labels.append(label)
            for depth, token in enumerate(path, 1):
                node = node.children.setdefault(token, Node(path[:depth]))
                node.labels.append(label)
            node.ends = label
        self._check_ends()
        for node in self.nodes():
            node.allowed = list(node.children) + (list(self.end_ids) if node.ends is not None else [])
        self.priors: dict[object, Prior] = {}
        """Content-free priors of this label set, by the prompts they were read with."""

    def _check_ends(self) -> None:
        for node in self.nodes():
            if node.ends is not None and node.children and not self.end_ids:
                raise ConfigError(
                    f"label {node.ends!r} is the start of another label, and the model's "
                    "end-of-answer token is not known",
                    hint="use decoding: constrained",
                )
            clash = set(node.children) & set(self.end_ids) if node.ends is not None else set()
            if clash:
                raise ConfigError(f"a label's tokens include the end-of-answer token {sorted(clash)}")

    def skip(self, node: Node) -> Node:
        """``node``, or the first node below it where the labels part: a token every label beneath
        continues with (a template's newline before the answer, a taxonomy's `` > ``) has
        probability 1 under the constraint and is appended to the prompt without asking."""
        while node.resolved is None and node.ends is None and len(node.children) == 1:
            node = next(iter(node.children.values()))
        return node

    def nodes(self):
        """Every node, depth first."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def allowed(self, node: Node) -> list[int]:
        """The tokens the model may choose at ``node``: its children, and the end of the answer
        where a label ends there."""
        return node.allowed

    def decisions(self) -> list[Node]:
        """Every node a search can ask about: below the skipped shared tokens, with labels parting."""
        found, stack = [], [self.skip(self.root)]
        while stack:
            node = stack.pop()
            if node.resolved is not None:
                continue
            found.append(node)
            stack.extend(self.skip(child) for child in node.children.values())
        return found

    @property
    def width(self) -> int:
        """The most tokens allowed at one node (the logprobs a step asks for)."""
        return max(len(self.allowed(n)) for n in self.nodes() if n.resolved is None)

    def steps(self) -> list[int]:
        """Per step (1, 2, ...): how many labels need that step at least, asked one after another
        (step 1 for all; step 2 for labels whose first token is shared; ...). Its length is the
        trie's depth: the most steps a row can need."""
        needs: list[int] = []

        def walk(node: Node, depth: int) -> None:
            node = self.skip(node)
            if node.resolved is not None:
                return
            while len(needs) < depth:
                needs.append(0)
            needs[depth - 1] += len(node.labels)
            for child in node.children.values():
                walk(child, depth + 1)

        walk(self.root, 1)
        return needs


class Search:
    """One row's best-first search of a trie: ``pending`` says which nodes to ask about next,
    ``feed`` takes the model's log-probabilities for a node's allowed tokens."""

    def __init__(self, trie: LabelTrie, top: int = 1, prior: Prior | None = None) -> None:
        self.trie = trie
        self.prior = prior
        self.top = max(1, top)
        self.exact: dict[str, float] = {}
        self.open: list[tuple[float, Node]] = [(0.0, trie.skip(trie.root))]
        self.asked = 0

    def pending(self) -> list[Node]:
        """The nodes whose labels could still enter the top ``top``; empty when done."""
        if not self.open:
            return []
        ranked = sorted(self.exact.values(), reverse=True)
        bar = ranked[self.top - 1] if len(ranked) >= self.top else NEG_INF
        return [node for mass, node in self.open if mass > bar]

    def feed(self, node: Node, logprobs: Mapping[int, float]) -> None:
        """The model's log-probabilities of the tokens allowed at ``node`` (renormalised here
        over those tokens; a token the model gave none for counts as impossible)."""
        entry = next(i for i, (_, n) in enumerate(self.open) if n is node)
        mass = self.open.pop(entry)[0]
        self.asked += 1
        allowed = self.trie.allowed(node)
        values = [logprobs.get(t, NEG_INF) for t in allowed]
        total = _logsumexp(values)
        if total == NEG_INF:
            raise ValueError("no log-probability for any allowed token")
        conditional = dict(zip(allowed, (v - total for v in values), strict=True))
        neutral = self.prior.get(node) if self.prior is not None else None
        if neutral is not None:  # contextual calibration: what the input adds to the prompt's bias
            shifted = {t: v - neutral[t] for t, v in conditional.items()}
            total = _logsumexp(list(shifted.values()))
            conditional = {t: v - total for t, v in shifted.items()}
        for token, child in node.children.items():
            here = mass + conditional[token]
            if child.resolved is not None:
                self.exact[child.resolved] = here
            else:
                self.open.append((here, self.trie.skip(child)))
        if node.ends is not None:
            self.exact[node.ends] = mass + _logsumexp([conditional[t] for t in self.trie.end_ids])

    def ranked(self) -> list[tuple[str, float]]:
        """The resolved labels, most probable first (ties in the label set's order)."""
        order = {label: i for i, label in enumerate(self.trie.labels)}
        return sorted(self.exact.items(), key=lambda item: (-item[1], order[item[0]]))

    def best(self) -> tuple[str, float]:
        return self.ranked()[0]


Ask = Callable[[list[tuple[int, Node]]], list[Mapping[int, float]]]
"""Asks the model about ``(row, node)`` pairs: for each, the log-probabilities of the node's
allowed tokens after the row's prompt and the node's prefix."""


Prior = dict[Node, dict[int, float]]
"""Per node, the log-probabilities of its allowed tokens after a content-free input."""

NEUTRAL_TEXTS = ("N/A", "", "[MASK]")
"""Content-free inputs whose answers measure the bias the prompt and the labels' tokens alone give
each label (contextual calibration, Zhao et al. 2021, "Calibrate Before Use")."""
_PRIOR_FLOOR = -30.0
"""A content-free probability below e^-30 counts as e^-30, so no label is ruled out by it."""


def read_priors(tries: Sequence[LabelTrie], neutral_rows: Sequence[int], key: object, ask: Ask) -> None:
    """Ask the content-free rows about every decision node of each trie that has no prior under
    ``key`` yet; each node's prior is the mean of their probabilities. Kept on the trie."""
    distinct = [t for t in {id(t): t for t in tries}.values() if key not in t.priors]
    requests = [(row, node) for t in distinct for node in t.decisions() for row in neutral_rows]
    if not requests:
        return
    answers = ask(requests)
    sums: dict[Node, dict[int, float]] = {}
    for (_, node), logprobs in zip(requests, answers, strict=True):
        values = [logprobs.get(t, NEG_INF) for t in node.allowed]
        total = _logsumexp(values)
        into = sums.setdefault(node, dict.fromkeys(node.allowed, 0.0))
        for token, value in zip(node.allowed, values, strict=True):
            into[token] += math.exp(value - total) / len(neutral_rows) if total > NEG_INF else 0.0
    for trie in distinct:
        own = set(trie.decisions())
        trie.priors[key] = {
            node: {t: max(math.log(p) if p > 0 else NEG_INF, _PRIOR_FLOOR) for t, p in probs.items()}
            for node, probs in sums.items()
            if node in own
        }


def search_all(searches: Sequence[Search], ask: Ask) -> int:
    """Run every row's search to the end, one engine call per step for all the rows that still
    need one; the number of steps taken."""
    steps = 0
    while True:
        requests = [(row, node) for row, search in enumerate(searches) for node in search.pending()]
        if not requests:
            return steps
        steps += 1
        answers = ask(requests)
        if len(answers) != len(requests):
            raise ValueError(f"{len(answers)} answers to {len(requests)} scoring requests")
        for (row, node), logprobs in zip(requests, answers, strict=True):
            searches[row].feed(node, logprobs)


def answer(search: Search, prompt_tokens: int, cached_tokens: int | None = None) -> Completion:
    """A finished search as a Completion: the most probable label, its log-probability over the
    set, the ``top`` most probable labels, and as output tokens the steps it was asked in."""
    ranked = search.ranked()
    label, logprob = ranked[0]
    return Completion(
        text=label,
        logprob=logprob,
        prompt_tokens=prompt_tokens,
        output_tokens=search.asked,
        finish_reason="stop",
        cached_tokens=cached_tokens,
        alternatives=tuple(ranked[: search.top]),
    )


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values, default=NEG_INF)
    if top == NEG_INF:
        return NEG_INF
    return top + math.log(sum(math.exp(v - top) for v in values))
