"""A real OpenAI-style HTTP server on loopback that stands in for a strong LLM whose labels are known.

Cascade measurements (a cheap model first, a strong "teacher" for the rows it is unsure of) need a
teacher whose every answer is known in advance: then what the cascade writes can be checked row by
row, and what it cost counted, without a paid API or a GPU. This server is that teacher. It speaks
HTTP over a socket, and labelmill's ``openai`` backend talks to it exactly as to a provider.

It answers each row text with the label ``answers`` gives it, as one token whose logprob is
``log(confidence)``, so the backend reads back the confidence configured for that text. The row
text is what the prompt template puts last in the final user message (labelmill's templates end
the user message with it: "Product title: {text}"); the longest text of ``answers`` that the
message ends with is the one answered. A message that ends with none of them gets ``default``, or
else the first label the request allows, and is counted under its whole content.

Every request must carry ``Authorization: Bearer <key>``, else 401. With ``model_name_check``, a
request for another model gets OpenAI's 404 for a model that does not exist.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

from loopback import JsonHandler, LoopbackServer

DEFAULT_CONFIDENCE = 0.99


class TeacherServer(LoopbackServer):
    def __init__(
        self,
        answers: Mapping[str, str],
        *,
        key: str = "teacher-key",
        confidence: Mapping[str, float] | float = DEFAULT_CONFIDENCE,
        default: str | None = None,
        model_name_check: str | None = None,
    ) -> None:
        for value in confidence.values() if isinstance(confidence, Mapping) else [confidence]:
            if not 0.0 < value <= 1.0:
                raise ValueError(f"a confidence is a probability in (0, 1], not {value!r}")
        super().__init__(_Handler)
        self.answers = dict(answers)
        self.key = key
        self.confidence = dict(confidence) if isinstance(confidence, Mapping) else confidence
        self.default = default
        self.model_name_check = model_name_check
        self.asked: Counter[str] = Counter()
        self.requests = 0
        # Texts as the template ends the message with them (it strips trailing whitespace), by
        # length, longest first: a message is matched by one dict look-up per distinct length, so a
        # few thousand texts cost a few hundred look-ups a request, and the longest match wins
        # ("green tea" over "tea").
        self._by_tail: dict[str, str] = {}
        for text in self.answers:
            self._by_tail.setdefault(text.rstrip(), text)
        self._lengths = sorted({len(t) for t in self._by_tail if t}, reverse=True)
        self._lock = threading.Lock()

    def asked_texts(self) -> set[str]:
        """Every text asked at least once (a message that matched no text: its whole content)."""
        with self._lock:
            return set(self.asked)

    def row_text(self, content: str) -> str | None:
        """The longest text of ``answers`` that ``content`` ends with (trailing whitespace aside)."""
        content = content.rstrip()
        for n in self._lengths:
            if n <= len(content):
                found = self._by_tail.get(content[-n:])
                if found is not None:
                    return found
        return None

    def confidence_of(self, text: str) -> float:
        if isinstance(self.confidence, dict):
            return self.confidence.get(text, DEFAULT_CONFIDENCE)
        return self.confidence

    def count(self, text: str) -> None:
        with self._lock:
            self.requests += 1
            self.asked[text] += 1


def allowed_labels(body: dict) -> list[str] | None:
    """The label set a request holds its answer to, as labelmill's backend sends it: vLLM's
    ``structured_outputs.choice`` (``api.constraint: choice``) or the enum of ``label`` in OpenAI's
    ``response_format`` (``json_schema``); None when it sends neither."""
    choice = (body.get("structured_outputs") or {}).get("choice")
    if choice:
        return list(choice)
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
    enum = ((schema.get("properties") or {}).get("label") or {}).get("enum")
    return list(enum) if enum else None


def wants_wrapped_label(body: dict) -> bool:
    """The answer goes back as ``{"label": ...}``: a label set asked through ``response_format``."""
    return body.get("response_format") is not None and allowed_labels(body) is not None


class _Handler(JsonHandler):
    server: TeacherServer

    def do_POST(self) -> None:
        body = self.authorised_body()
        if body is None:
            return None
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        wanted = self.server.model_name_check
        if wanted is not None and body.get("model") != wanted:
            return self._json(
                404,
                {
                    "error": {
                        "message": f"The model `{body.get('model')}` does not exist or you do not have "
                        "access to it.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "model_not_found",
                    }
                },
            )
        content = body["messages"][-1]["content"]
        text = self.server.row_text(content)
        labels = allowed_labels(body)
        if text is not None:
            answer = self.server.answers[text]
        else:
            text = content
            answer = self.server.default if self.server.default is not None else (labels or [None])[0]
        self.server.count(text)
        if answer is None:
            # Neither a known text nor a default nor a label set: nothing sensible to say.
            return self._json(400, {"error": {"message": "the teacher has no answer for this text"}})
        # An answer outside the label set still goes back: validating it is the client's job.
        content_out = json.dumps({"label": answer}) if wants_wrapped_label(body) else answer
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content_out},
            "finish_reason": "stop",
            "logprobs": None,
        }
        if body.get("logprobs"):
            # One token: the backend sums the tokens' logprobs and takes exp() as the confidence.
            logprob = math.log(self.server.confidence_of(text))
            choice["logprobs"] = {"content": [{"token": content_out, "logprob": logprob}]}
        prompt_tokens = len(content) // 4 + 10
        return self._json(
            200,
            {
                "id": f"chatcmpl-teacher-{self.server.requests}",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [choice],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": 2,
                    "total_tokens": prompt_tokens + 2,
                },
            },
        )
