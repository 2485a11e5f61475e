"""What each prompt must return, as pydantic models, and the extraction of that JSON from an LLM's
reply (code fences, chatter before and after, the report's capitalised keys).

Every way an output can fail has a named cause; the run report counts them, so a model that
refuses, rambles or answers in the wrong language shows up as a number, not as silent data loss.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from embedforge.data_synth.corpus import normalize_text

QUESTION_TYPES = ("keywords", "acquire_knowledge", "summary", "yes_or_no", "background")
DIFFICULTIES = ("high_school", "university", "phd")

# Causes of a failed request, content first, transport last (transport failures are retried by a rerun).
CONTENT_FAILURES = ("empty_output", "refusal", "malformed_json", "schema_invalid", "wrong_language")
TRANSPORT_FAILURES = ("timeout", "connection_error", "rate_limited", "http_error")

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can(?:'|no)t|i cannot|i'?m unable|i am unable|as an ai\b|"
    r"i won'?t|i will not|i'?m not able)",
    re.IGNORECASE,
)
_PLACEHOLDER = re.compile(r"^\s*(<[^>]*>|\.\.\.|…)\s*$")


class OutputError(ValueError):
    """An LLM output that cannot be used; `cause` is one of CONTENT_FAILURES."""

    def __init__(self, cause: str, detail: str = ""):
        assert cause in CONTENT_FAILURES, cause
        self.cause, self.detail = cause, detail
        super().__init__(f"{cause}: {detail}" if detail else cause)


def _snake(value: object) -> object:
    """'Acquire Knowledge' / 'high-school' -> 'acquire_knowledge' / 'high_school'."""
    return re.sub(r"[\s\-]+", "_", value.strip().lower()) if isinstance(value, str) else value


class _Output(BaseModel):
    # Extra keys are tolerated (small models add "explanation"); missing or wrong ones are not.
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    @field_validator("*", mode="after")
    @classmethod
    def _not_placeholder(cls, value):
        if isinstance(value, str) and (not value or _PLACEHOLDER.match(value)):
            raise ValueError("empty or a placeholder copied from the prompt")
        return value


# Upper bounds on each text field, in characters. With constrained decoding they also bound a reply's
# length, so a model that rambles inside a string still closes the object within max_new_tokens.
SHORT, SENTENCE, TEXT = 120, 300, 800


class RetrievalConfig(_Output):
    character: str = Field(validation_alias=AliasChoices("character", "Character"), max_length=SENTENCE)
    question_type: Literal[QUESTION_TYPES] = Field(
        validation_alias=AliasChoices("question_type", "Question_Type", "Question_type", "type")
    )
    difficulty: Literal[DIFFICULTIES] = Field(validation_alias=AliasChoices("difficulty", "Difficulty"))

    @field_validator("question_type", "difficulty", mode="before")
    @classmethod
    def _normalise(cls, value):
        return _snake(value)


class RetrievalQuery(_Output):
    query: str = Field(validation_alias=AliasChoices("query", "Query"), max_length=SENTENCE)


class PassageQueries(_Output):
    """One call, several queries of different types for one passage (the small-model strategy).

    `topic` comes first on purpose: a small model that has just named the passage's subject keeps
    to it in the queries that follow. The keys are the query types; QUERY_TYPES maps them to the
    question types of the two-stage flow, so coverage reports compare both.
    """

    topic: str = Field(max_length=60)
    question: str = Field(max_length=SHORT)
    keywords: str = Field(max_length=80)
    summary: str = Field(max_length=SHORT)

    def queries(self) -> list[tuple[str, str]]:
        """(question type, query) pairs, in the order the model wrote them."""
        return [(QUERY_TYPES[key], getattr(self, key)) for key in QUERY_TYPES]


QUERY_TYPES = {"question": "acquire_knowledge", "keywords": "keywords", "summary": "summary"}


class BitextPair(_Output):
    source: str = Field(max_length=TEXT)
    translation: str = Field(max_length=TEXT)

    @model_validator(mode="after")
    def _differ(self):
        if normalize_text(self.source) == normalize_text(self.translation):
            raise ValueError("translation equals the source")
        return self


class StsTriple(_Output):
    sentence: str = Field(max_length=SENTENCE)
    paraphrase: str = Field(max_length=SENTENCE)
    contrast: str = Field(max_length=SENTENCE)

    @model_validator(mode="after")
    def _distinct(self):
        if len({normalize_text(t) for t in (self.sentence, self.paraphrase, self.contrast)}) < 3:
            raise ValueError("the three sentences must differ")
        return self


class ClassificationExample(_Output):
    task: str = Field(max_length=SENTENCE)
    text: str = Field(max_length=TEXT)
    label: str = Field(max_length=SHORT)
    misleading_label: str = Field(max_length=SHORT)

    @model_validator(mode="after")
    def _labels_differ(self):
        if normalize_text(self.label) == normalize_text(self.misleading_label):
            raise ValueError("misleading_label equals label")
        return self


SCHEMAS: dict[str, type[_Output]] = {
    cls.__name__: cls
    for cls in (RetrievalConfig, RetrievalQuery, PassageQueries, BitextPair, StsTriple, ClassificationExample)
}


def decoding_schema(schema: str | type[_Output]) -> str:
    """The JSON Schema a constrained decoder enforces for `schema`, as canonical JSON text.

    Every field is required, no other key is allowed, and strings are non-empty and bounded, so
    a reply that follows it parses and passes the pydantic model's type checks.
    """
    model = SCHEMAS[schema] if isinstance(schema, str) else schema
    source = model.model_json_schema()
    properties = {}
    for name, prop in source["properties"].items():
        prop = {k: v for k, v in prop.items() if k != "title"}
        if prop.get("type") == "string" and "enum" not in prop:
            prop["minLength"] = max(1, prop.get("minLength", 1))
        properties[name] = prop
    out = {"type": "object", "properties": properties, "required": list(properties),
           "additionalProperties": False}
    return json.dumps(out)  # key order kept: a constrained decoder writes the properties in this order


def extract_json(text: str | None) -> dict:
    """The first JSON object in an LLM reply: the whole reply, a fenced block, or an object embedded
    in chatter. Raises OutputError(empty_output | refusal | malformed_json)."""
    if text is None or not text.strip():
        raise OutputError("empty_output")
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for candidate in candidates:
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    if _REFUSAL.search(text):
        raise OutputError("refusal", text.strip()[:80])
    raise OutputError("malformed_json", text.strip()[:80])


def parse_output(text: str | None, schema: str | type[_Output]) -> _Output:
    """Extract and validate; raises OutputError with the cause of the first failure."""
    model = SCHEMAS[schema] if isinstance(schema, str) else schema
    obj = extract_json(text)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(object)"
        raise OutputError("schema_invalid", f"{where}: {first['msg']}") from None
