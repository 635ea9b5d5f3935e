"""Methods a user can discover, read from the config classes' JSON schemas (torch-free).

One catalog serves `GET /v1/methods`, `modelpress methods [NAME]` and the README's configuration
reference (between `<!-- methods:start -->` and `<!-- methods:end -->`, rewritten by
`scripts/render_config_reference.py`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel

from compression.configs import CONFIG_CLASSES, MethodConfigBase

SHARED_KEYS = ("seed", "skip_layers")  # every method has them; the example leaves them out
README_BLOCK = re.compile(r"(<!-- methods:start -->\n).*?(<!-- methods:end -->)", re.S)


def method_entry(cls: type[MethodConfigBase]) -> dict[str, Any]:
    """{key, summary, needs_calibration, data, config_schema}: the shape `GET /v1/methods` returns."""
    return {
        "key": cls.model_fields["method"].default,
        "summary": cls.summary,
        "needs_calibration": cls.needs_calibration,
        "data": cls.data_needs(),
        "config_schema": cls.model_json_schema(),
    }


def method_catalog() -> list[dict[str, Any]]:
    return [method_entry(cls) for cls in CONFIG_CLASSES.values()]


def _bounds(prop: dict[str, Any]) -> str:
    parts = [f">= {prop['minimum']}"] if "minimum" in prop else []
    parts += [f"> {prop['exclusiveMinimum']}"] if "exclusiveMinimum" in prop else []
    parts += [f"<= {prop['maximum']}"] if "maximum" in prop else []
    parts += [f"< {prop['exclusiveMaximum']}"] if "exclusiveMaximum" in prop else []
    return f" {', '.join(parts)}" if parts else ""


def _items_limit(prop: dict[str, Any]) -> str:
    most = prop.get("maxItems", prop.get("maxProperties"))
    return f" (at most {most})" if most is not None else ""


def allowed_values(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    """What a JSON-schema property accepts, in a few words: `one of 2, 3, 4`, `number > 0, < 1`, ..."""
    if "$ref" in prop:
        nested = defs[prop["$ref"].rsplit("/", 1)[-1]]["properties"]
        return "object: " + "; ".join(f"{k}: {allowed_values(v, defs)}" for k, v in nested.items())
    if "anyOf" in prop:
        return " or ".join(allowed_values(option, defs) for option in prop["anyOf"])
    if "enum" in prop:
        return "one of " + ", ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    kind = prop.get("type")
    if kind == "array":
        return f"list of {allowed_values(prop.get('items', {}), defs)}{_items_limit(prop)}"
    if kind == "object" and "properties" in prop:
        return "object: " + "; ".join(f"{k}: {allowed_values(v, defs)}" for k, v in prop["properties"].items())
    if kind == "object":
        values = allowed_values(prop.get("additionalProperties", {}), defs)
        return f"map of name to {values}{_items_limit(prop)}"
    words = {"integer": "integer", "number": "number", "boolean": "true or false", "string": "text", "null": "null"}
    return words.get(kind, "any") + _bounds(prop)


def config_keys(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """[{name, default, allowed, description}] for every key a config accepts (not `method`)."""
    defs = schema.get("$defs", {})
    return [
        {
            "name": name,
            "default": prop.get("default"),
            "allowed": allowed_values(prop, defs),
            "description": prop.get("description", ""),
        }
        for name, prop in schema["properties"].items()
        if name != "method"
    ]


def example_config(schema: dict[str, Any]) -> dict[str, Any]:
    """A valid config: the method's own keys that have a value by default, at that value."""
    keys = [k for k in config_keys(schema) if k["name"] not in SHARED_KEYS]
    return {k["name"]: k["default"] for k in keys if k["default"] not in (None, [], {})}


def data_line(entry: dict[str, Any]) -> str:
    data = entry.get("data") or {"calibration": "required" if entry["needs_calibration"] else "optional"}
    kinds = ", ".join(data.get("kinds", []))
    words = {"required": "required", "optional": "used when given", "none": "not used"}
    return f"calibration data {words[data['calibration']]}" + (f" ({kinds})" if kinds else "")


def render_text(entry: dict[str, Any]) -> str:
    """One method for a terminal: summary, data needs, keys with defaults and ranges, an example."""
    lines = [f"{entry['key']}: {entry['summary']}", f"  data: {data_line(entry)}", "  config keys:"]
    for key in config_keys(entry["config_schema"]):
        lines.append(f"    {key['name']} = {json.dumps(key['default'])}  [{key['allowed']}]")
        if key["description"]:
            lines.append(f"        {key['description']}")
    lines.append(f"  example: --config '{json.dumps(example_config(entry['config_schema']))}'")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_row(key: dict[str, Any]) -> str:
    default = _cell(json.dumps(key["default"]))
    return f"| `{key['name']}` | `{default}` | {_cell(key['allowed'])} | {_cell(key['description'])} |"


def render_markdown(catalog: list[dict[str, Any]]) -> str:
    """The README's configuration reference: one table of keys per method."""
    blocks = []
    for entry in catalog:
        rows = [_markdown_row(k) for k in config_keys(entry["config_schema"])]
        blocks.append(
            "\n".join(
                [
                    f"#### `{entry['key']}`",
                    "",
                    f"{entry['summary']} Data: {data_line(entry)}.",
                    "",
                    "| key | default | allowed | meaning |",
                    "|---|---|---|---|",
                    *rows,
                    "",
                    f"Example: `{json.dumps(example_config(entry['config_schema']))}`",
                ]
            )
        )
    return "\n\n".join(blocks)


def update_readme(readme: str) -> str:
    """`readme` with its configuration reference regenerated from the schemas."""
    if not README_BLOCK.search(readme):
        raise ValueError("README has no <!-- methods:start --> ... <!-- methods:end --> block")
    return README_BLOCK.sub(lambda m: m.group(1) + render_markdown(method_catalog()) + "\n" + m.group(2), readme)


def valid_keys(cls: type[BaseModel], path: list[str]) -> list[str]:
    """The keys a config (or the nested model at `path` inside it) accepts, for an unknown-key error."""
    for name in path:
        field = cls.model_fields.get(name)
        nested = field.annotation if field is not None else None
        if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
            break
        cls = nested
    return sorted(k for k in cls.model_fields if k != "method")
