"""Turn each API family's constraint fields into the engine's one :class:`Grammar`.

At most one constraint per request: two (``response_format`` and ``guided_regex``, say) are a
422 rather than a silent choice. ``json_object`` is any JSON object (``{"type": "object"}``).
A JSON schema given as a string (vLLM accepts both) must parse as JSON.
"""

from __future__ import annotations

import json

from server.api.schemas.structured import (
    GuidedFields,
    JsonSchemaDocument,
    ResponseFormat,
    StructuredOutputs,
    TgiGrammar,
)
from server.engine.types import Grammar, InvalidRequestError

ANY_OBJECT: JsonSchemaDocument = {"type": "object"}


def json_schema_grammar(schema: JsonSchemaDocument | str, param: str) -> Grammar:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise InvalidRequestError(f"{param} is not valid JSON: {error}", param=param) from error
        if not isinstance(schema, dict | bool):
            raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
    # Key order is kept: properties are generated in the schema's order, as OpenAI documents.
    return Grammar("json_schema", json.dumps(schema), param)


def _response_format(response_format: ResponseFormat | None, param: str) -> Grammar | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_schema":
        assert response_format.json_schema is not None  # checked by the schema
        return json_schema_grammar(response_format.json_schema.json_schema, f"{param}.json_schema.schema")
    schema = response_format.inline_schema
    return json_schema_grammar(schema if schema is not None else ANY_OBJECT, param)


def _structured_outputs(outputs: StructuredOutputs, param: str) -> list[Grammar]:
    grammars = []
    if outputs.json_schema is not None:
        grammars.append(json_schema_grammar(outputs.json_schema, f"{param}.json"))
    if outputs.regex is not None:
        grammars.append(Grammar("regex", outputs.regex, f"{param}.regex"))
    if outputs.choice is not None:
        grammars.append(Grammar("choice", json.dumps(outputs.choice), f"{param}.choice"))
    if outputs.grammar is not None:
        grammars.append(Grammar("lark", outputs.grammar, f"{param}.grammar"))
    if outputs.json_object:
        grammars.append(json_schema_grammar(ANY_OBJECT, f"{param}.json_object"))
    return grammars


def request_grammar(body: GuidedFields, response_format: ResponseFormat | None) -> Grammar | None:
    """The one constraint an OpenAI-family body asks for, or ``None``."""
    grammars = []
    if (grammar := _response_format(response_format, "response_format")) is not None:
        grammars.append(grammar)
    if body.structured_outputs is not None:
        grammars.extend(_structured_outputs(body.structured_outputs, "structured_outputs"))
    if body.guided_json is not None:
        grammars.append(json_schema_grammar(body.guided_json, "guided_json"))
    if body.guided_regex is not None:
        grammars.append(Grammar("regex", body.guided_regex, "guided_regex"))
    if body.guided_choice is not None:
        grammars.append(Grammar("choice", json.dumps(body.guided_choice), "guided_choice"))
    if body.guided_grammar is not None:
        grammars.append(Grammar("lark", body.guided_grammar, "guided_grammar"))
    return only_one(grammars)


def only_one(grammars: list[Grammar]) -> Grammar | None:
    if len(grammars) > 1:
        names = ", ".join(grammar.param for grammar in grammars)
        raise InvalidRequestError(f"a request takes one output constraint; got {names}", param=grammars[1].param)
    return grammars[0] if grammars else None


def tgi_grammar(grammar: TgiGrammar | None, response_format: ResponseFormat | None) -> Grammar | None:
    """TGI's ``parameters.grammar`` or LoRAX's ``parameters.response_format``."""
    grammars = []
    if grammar is not None:
        param = "parameters.grammar.value"
        if grammar.type == "regex":
            if not isinstance(grammar.value, str):
                raise InvalidRequestError("a regex grammar's value must be a string", param=param)
            grammars.append(Grammar("regex", grammar.value, param))
        elif grammar.type == "json_schema" and isinstance(grammar.value, dict) and "schema" in grammar.value:
            grammars.append(json_schema_grammar(grammar.value["schema"], f"{param}.schema"))
        else:
            grammars.append(json_schema_grammar(grammar.value, param))
    if (from_format := _response_format(response_format, "parameters.response_format")) is not None:
        grammars.append(from_format)
    return only_one(grammars)
