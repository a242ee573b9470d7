"""Request features passed through to vLLM: structured output and token logprobs.

Shapes follow OpenAI (``response_format``, ``logprobs`` / ``top_logprobs``) and, where OpenAI
has nothing, vLLM's own OpenAI server (``structured_outputs: {"regex": ...}`` /
``{"choice": [...]}`` / ``{"json": {...}}``). Everything is checked at submit; the worker
checks again (raw ``XADD`` bodies) and the engine has the last word (a constraint its
grammar backend cannot compile fails that job alone, ``invalid_request``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_TOP_LOGPROBS = 20
"""OpenAI's bound for ``top_logprobs``; a worker may cap lower (``max_logprobs``)."""
MAX_STOP_TOKEN_IDS = 64
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""A LoRA adapter's name is the name of its directory on the worker: no path separators,
no leading dot, so a name can never point outside the worker's ``lora_dir``."""


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    """OpenAI's ``json_schema`` object. The JSON key is ``schema``, which pydantic's
    BaseModel already uses as a method name, hence the alias."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SCHEMA_NAME.match(v):
            raise ValueError("name must be 1..64 characters of a-z, A-Z, 0-9, _ and -")
        return v

    @model_serializer(mode="wrap")
    def _by_alias(self, handler: SerializerFunctionWrapHandler,
                  info: SerializationInfo) -> dict[str, Any]:
        # Always write the wire name, whatever the caller's by_alias: the body is re-read
        # by a worker with extra="forbid".
        data: dict[str, Any] = handler(self)
        if "json_schema" in data:
            data["schema"] = data.pop("json_schema")
        return data


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat,
                           Field(discriminator="type")]
"""OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type":
"json_object"}`` (any JSON object) or ``{"type": "json_schema", "json_schema": {"name": ...,
"schema": {...}}}``."""


class StructuredOutputs(BaseModel):
    """vLLM's extra constraints, exactly one of them. ``regex`` is checked with Python's
    ``re``, an approximation: the engine's grammar backend has its own dialect (no
    look-around, for one) and rejects what it cannot compile when the job runs."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: dict[str, Any] | None = Field(None, alias="json")
    """A JSON Schema the output must satisfy (as ``response_format``'s ``json_schema``)."""
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = None

    @model_serializer(mode="wrap")
    def _by_alias(self, handler: SerializerFunctionWrapHandler,
                  info: SerializationInfo) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if "json_schema" in data:
            data["json"] = data.pop("json_schema")
        return data

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"regex does not compile: {e}") from None
        return v

    @field_validator("choice")
    @classmethod
    def _choices(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not c for c in v)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [k for k in ("json_schema", "regex", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'json', 'regex' and 'choice'")
        return self


class TopLogprob(BaseModel):
    """One candidate token at a position."""

    token: str | None = None
    """The token's text; None when the worker runs without a tokenizer."""
    token_id: int
    logprob: float
    """Natural log of its probability, ≤ 0 (``-9999.0`` stands for minus infinity)."""


class TokenLogprob(TopLogprob):
    """One generated token, as OpenAI's ``choices[0].logprobs.content[i]``."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)
    """The ``top_logprobs`` most likely tokens at this position, most likely first."""
