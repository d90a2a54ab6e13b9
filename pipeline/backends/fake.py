"""A deterministic test double. It loads no model and knows nothing about language.

The label is picked by a hash of the row's text, the confidence is a second hash mapped into
(0, 1], and a "token" is four bytes of UTF-8. Use it for tests of the machinery (chunking, resume,
output format) and for demos without a GPU; never for a claim about model quality or speed.
"""

from __future__ import annotations

import hashlib
import math
import time

from pipeline.backends.base import Backend, ByteTokens, Completion, Messages


class FakeBackend(ByteTokens, Backend):
    name = "fake"

    def complete(
        self, conversations: list[Messages], choices: list[str], max_tokens: int
    ) -> list[Completion]:
        delay = self.job.fake.seconds_per_row
        out = []
        for messages in conversations:
            if delay:
                time.sleep(delay)
            digest = hashlib.sha256(messages[-1]["content"].encode("utf-8")).digest()
            label = choices[int.from_bytes(digest[:4], "big") % len(choices)]
            confidence = (int.from_bytes(digest[4:8], "big") % 1000 + 1) / 1000
            out.append(
                Completion(
                    text=label,
                    logprob=math.log(confidence),
                    prompt_tokens=self.prompt_tokens(messages),
                    output_tokens=self._tokens(label) + 1,
                    finish_reason="stop",
                )
            )
        return out
