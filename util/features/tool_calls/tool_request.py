"""A row's tools, read and checked (util/features/tool_calls/): its `tools`, `tool_choice` and
`parallel_tool_calls` values (lists and objects, or their JSON text) as a ToolRequest, or why they are not
one, naming what is wrong."""

import dataclasses
import json

from util.errors import ROW_ERRORS, InputError, RowError, row_error

TOOLS, TOOL_CHOICE, PARALLEL_TOOL_CALLS = "tools", "tool_choice", "parallel_tool_calls"  # a row's input columns
CHOICES = ("none", "auto", "required")
INVALID_TOOLS = "invalid tools"
ROW_ERRORS[INVALID_TOOLS] = "invalid tools: {reason}"


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    """A row's tools, checked: OpenAI's function tools, and its tool_choice ("none", "auto", "required", or the
    name of the function it must call)."""
    tools: tuple  # of dicts: {"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}
    choice: str
    function: str | None = None  # the function tool_choice names
    parallel: bool = True

    @property
    def openai_choice(self):
        return {"type": "function", "function": {"name": self.function}} if self.function else self.choice


def _without_nulls(value):  # Arrow fills a JSON file's missing keys with nulls: they were never given
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _json_value(value, name: str, plain_strings: bool = False):
    """A column's value: as given (a list or dict read from JSON, nulls dropped), or JSON text parsed. With
    `plain_strings`, text that is not JSON stands for itself (tool_choice: auto)."""
    if not isinstance(value, str):
        return _without_nulls(value)
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        if plain_strings:
            return value.strip()
        raise InputError(f"{name} is not valid JSON ({error})") from None


def _check_tool(index: int, tool) -> dict:
    where = f"tools[{index}]"
    if not isinstance(tool, dict):
        raise InputError(f"{where} must be an object, got {type(tool).__name__}")
    if tool.get("type", "function") != "function":
        raise InputError(f"{where}.type must be \"function\", got {json.dumps(tool['type'])}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InputError(f"{where}.function must be an object with a name, got {json.dumps(function)}")
    if not isinstance(function.get("name"), str) or not function["name"].strip():
        raise InputError(f"{where}.function has no name (a non-empty string)")
    if not isinstance(function.get("description", ""), str):
        raise InputError(f"{where}.function.description must be a string")
    parameters = function.get("parameters")
    if parameters is not None:
        from jsonschema import SchemaError
        from jsonschema.validators import validator_for

        if not isinstance(parameters, dict):
            raise InputError(f"{where}.function.parameters must be a JSON schema object, "
                             f"got {type(parameters).__name__}")
        try:
            validator_for(parameters).check_schema(parameters)
        except SchemaError as error:
            raise InputError(f"{where}.function.parameters is not a valid JSON schema: {error.message}") from None
    return {"type": "function", "function": function}


def tool_request(tools, choice=None, parallel=None) -> ToolRequest | None:
    """A row's `tools`, `tool_choice` and `parallel_tool_calls` values, checked, or None when the row has no
    tools and asks for none (null, [], tool_choice "none" or "auto"). ValueError naming what is wrong."""
    given = lambda value: value is not None and value != ""  # a CSV's empty cell too
    tools = _json_value(tools, TOOLS) if given(tools) else None
    choice = _json_value(choice, TOOL_CHOICE, plain_strings=True) if given(choice) else None
    parallel = _json_value(parallel, PARALLEL_TOOL_CALLS, plain_strings=True) if given(parallel) else None
    if tools is not None and not isinstance(tools, list):
        raise InputError(f"tools must be a list of function tools, got {type(tools).__name__}")
    if parallel is not None and not isinstance(parallel, bool):
        raise InputError(f"parallel_tool_calls must be true or false, got {json.dumps(parallel)}")
    checked = [_check_tool(i, tool) for i, tool in enumerate(tools or [])]
    names = [tool["function"]["name"] for tool in checked]
    if len(set(names)) < len(names):
        raise InputError(f"tools name {next(n for n in names if names.count(n) > 1)!r} more than once")
    function = None
    if isinstance(choice, dict):
        function = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type", "function") != "function" or not isinstance(function, str):
            raise InputError(f"tool_choice={json.dumps(choice)} must be \"none\", \"auto\", \"required\" or "
                             '{"type": "function", "function": {"name": "..."}}')
        if function not in names:
            raise InputError(f"tool_choice names the function {function!r}, which is not in tools"
                             f" ({', '.join(names) or 'none given'})")
        choice = "function"
    elif choice is not None and choice not in CHOICES:
        raise InputError(f"tool_choice={json.dumps(choice)} must be \"none\", \"auto\", \"required\" or "
                         '{"type": "function", "function": {"name": "..."}}')
    if not checked:
        if choice == "required":
            raise InputError('tool_choice "required" needs tools')
        return None
    return ToolRequest(tuple(checked), choice or "auto", function, parallel is not False)


def row_tool_request(row: dict) -> ToolRequest | None:
    """The row's ToolRequest (from its columns), or None; RowError for a bad one."""
    try:
        return tool_request(row.get(TOOLS), row.get(TOOL_CHOICE), row.get(PARALLEL_TOOL_CALLS))
    except ValueError as error:
        raise RowError(row_error(INVALID_TOOLS, reason=error)) from None
