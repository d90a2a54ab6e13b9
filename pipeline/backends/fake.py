"""A deterministic test double. It loads no model and knows nothing about language.

The label is picked by a hash of the row's text (for a JSON schema: every enum value, list length
and presence of an optional value likewise; strings are the row's last words), the confidence is
a second hash mapped into (0, 1], and a "token" is four bytes of UTF-8. Use it for tests of the
machinery (chunking, resume, output format) and for demos without a GPU; never for a claim about
model quality or speed.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

from pipeline.backends.base import Backend, ByteTokens, Completion, Constraint, Messages


class FakeBackend(ByteTokens, Backend):
    name = "fake"

    def complete(
        self, conversations: list[Messages], constraint: Constraint, max_tokens: int
    ) -> list[Completion]:
        delay = self.job.fake.seconds_per_row
        out = []
        for messages in conversations:
            if delay:
                time.sleep(delay)
            digest = hashlib.sha256(messages[-1]["content"].encode("utf-8")).digest()
            if constraint.choice is not None:
                answer = constraint.choice[int.from_bytes(digest[:4], "big") % len(constraint.choice)]
            else:
                answer = json.dumps(_fill(constraint.json_schema, digest, messages[-1]["content"]))
            confidence = (int.from_bytes(digest[4:8], "big") % 1000 + 1) / 1000
            out.append(
                Completion(
                    text=answer,
                    logprob=math.log(confidence),
                    prompt_tokens=self.prompt_tokens(messages),
                    output_tokens=self._tokens(answer) + 1,
                    finish_reason="stop",
                )
            )
        return out


def _fill(schema: dict, digest: bytes, text: str):
    """A deterministic document that satisfies the JSON schemas labelmill's tasks build."""
    if "anyOf" in schema:  # optional value: present for about half of the rows
        return _fill(schema["anyOf"][0], digest, text) if digest[8] % 2 else None
    if "enum" in schema:
        return schema["enum"][digest[9] % len(schema["enum"])]
    kind = schema.get("type")
    if kind == "object":
        return {
            key: _fill(sub, hashlib.sha256(digest + key.encode()).digest(), text)
            for key, sub in schema["properties"].items()
        }
    if kind == "array":
        count = max(schema.get("minItems", 0), 1 + digest[10] % min(2, schema.get("maxItems", 2)))
        items = [_fill(schema["items"], bytes([b ^ i for b in digest]), text) for i in range(count)]
        return list(dict.fromkeys(items))
    if kind == "number":
        return float(digest[11] % 50)
    return " ".join(text.split()[-2:])[: schema.get("maxLength", 200)]  # string: the row's last words
