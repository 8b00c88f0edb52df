"""Request fields that constrain the output: OpenAI ``response_format``, vLLM structured outputs, TGI grammars.

Every family's spelling maps to one engine :class:`~server.engine.types.Grammar` in
``server/api/structured_outputs.py``; the schemas or patterns themselves are checked there (by
the grammar engine), so a body that parses here can still be a 422 naming what is wrong.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

JsonSchemaDocument = dict[str, Any] | bool
Choices = Annotated[list[str], Field(min_length=1)]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field("response", description="Accepted and ignored (OpenAI requires it).")
    description: str | None = None
    json_schema: JsonSchemaDocument = Field(default_factory=dict, alias="schema")
    strict: bool | None = Field(None, description="Output always matches the schema, strict or not.")


class ResponseFormat(BaseModel):
    """OpenAI's ``{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}``; LoRAX's
    ``{"type": "json_object", "schema": {...}}`` is the same with the schema inline."""

    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    inline_schema: JsonSchemaDocument | None = Field(None, alias="schema", description="LoRAX's spelling.")

    @model_validator(mode="after")
    def _schema_where_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object: {"name": ..., "schema": {...}}')
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` object: exactly one constraint."""

    json_schema: JsonSchemaDocument | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = Field(None, description="A Lark or GBNF (EBNF) grammar.")
    json_object: bool | None = None

    model_config = ConfigDict(populate_by_name=True)


class GuidedFields(BaseModel):
    """vLLM's constraint fields on completions and chat bodies (the legacy ``guided_*`` names too)."""

    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchemaDocument | str | None = Field(None, description="vLLM (legacy): a JSON schema.")
    guided_regex: str | None = Field(None, description="vLLM (legacy): a regular expression.")
    guided_choice: Choices | None = Field(None, description="vLLM (legacy): the output is one of these strings.")
    guided_grammar: str | None = Field(None, description="vLLM (legacy): a Lark or GBNF grammar.")


class TgiGrammar(BaseModel):
    """TGI's ``parameters.grammar``: ``{"type": "json" | "json_schema", "value": schema}`` or
    ``{"type": "regex", "value": pattern}``."""

    type: Literal["json", "json_schema", "regex"]
    value: Any
