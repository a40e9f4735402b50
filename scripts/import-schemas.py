#!/usr/bin/env python3
"""Rebuild the bundled table schemas in schemas/ from the shared reference material.

A developer tool, run by hand when the reference material changes (the project never reads
../shared at run time). Writes one flat JSON Schema per table, first property = primary key,
in the DAP vocabulary of spec section 4.2; the emulator wraps each in the meta/key/value envelope.

  python3 scripts/import-schemas.py ../shared/dap-schemas schemas
"""
import json
import pathlib
import re
import sys

src = pathlib.Path(sys.argv[1])
dst = pathlib.Path(sys.argv[2])
OVERSIZED = {"type": "string", "const": "__dap_oversized_truncated__"}
SCHEMA_KEYS = ("type", "format", "maxLength", "enum", "const", "description", "title", "oneOf",
               "items", "properties", "additionalProperties", "required", "multipleOf",
               "exclusiveMinimum", "exclusiveMaximum", "minimum", "maximum", "$ref")


def write(ns, table, schema):
    out = dst / ns / f"{table}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")


def check_vocabulary(node, where):
    for k, v in node.items():
        if k not in SCHEMA_KEYS and k != "definitions":
            raise SystemExit(f"{where}: keyword {k!r} is outside the DAP vocabulary")
    for p, child in node.get("properties", {}).items():
        check_vocabulary(child, f"{where}.{p}")
    for child in node.get("oneOf", []):
        check_vocabulary(child, where)
    if "items" in node:
        check_vocabulary(node["items"], where + "[]")


# canvas: the 0.9.0 schemas as they are.
for f in sorted((src / "canvas").glob("*.json")):
    schema = json.loads(f.read_text())
    check_vocabulary(schema, f.stem)
    write("canvas", f.stem, schema)


def doc_column(p, key_types):
    """One documented column (docs pseudo-type) as a schema node."""
    t = p["doc_type"].replace("`", "")
    base = [x.strip() for x in t.split("|") if x.strip() != "None"]
    node = {}
    if len(base) == 1:
        b = base[0]
    elif "Literal['__dap_oversized_truncated__']" in base:
        b = "bounded_str"
        m = [x for x in base if x.startswith("Annotated")]
        if m:
            node_max = int(re.search(r"MaxLength\((\d+)\)", m[0]).group(1))
            node = {"oneOf": [OVERSIZED, {"type": "string", "maxLength": node_max}]}
    else:
        b = "int64" if all(x.startswith("[") for x in base) else "str"
    if node:
        pass
    elif b in ("int64", "int32"):
        node = {"type": "integer", "format": b}
    elif b.startswith("["):
        target = b.strip("[]")
        node = {"type": "integer", "format": key_types.get(target, "int64")}
    elif b == "datetime":
        node = {"type": "string", "format": "date-time"}
    elif b == "bool":
        node = {"type": "boolean"}
    elif b == "float64":
        node = {"type": "number", "format": "float64"}
    elif b == "Decimal":
        # The docs give no precision; money amounts: decimal(12, 2).
        node = {"type": "number", "multipleOf": 0.01,
                "exclusiveMinimum": -10000000000, "exclusiveMaximum": 10000000000}
    elif b == "UUID":
        node = {"type": "string", "format": "uuid"}
    elif b == "bounded_str":
        node = {"oneOf": [OVERSIZED, {"type": "string"}]}
    elif b.startswith("Annotated[str"):
        node = {"type": "string", "maxLength": int(re.search(r"MaxLength\((\d+)\)", b).group(1))}
    elif b in ("str", "json"):
        # JSON-valued columns are text, as in the 0.9.0 schemas (a free-form object has no
        # DAP schema form that the official client accepts).
        node = {"type": "string"}
    else:
        raise SystemExit(f"unknown doc type {t!r} for {p['name']}")
    node["description"] = p["description"]
    return node


def doc_table(props, description, key_types):
    props = sorted(props, key=lambda p: not p["primary_key"])
    schema = {"type": "object", "properties": {}, "additionalProperties": False}
    required = []
    for p in props:
        schema["properties"][p["name"]] = doc_column(p, key_types)
        if not p["nullable"]:
            required.append(p["name"])
    schema["required"] = required
    schema["title"] = description
    return schema


# canvas.collaborations from its documented column list.
collab = json.loads((src / "docs-columns" / "canvas-collaborations.json").read_text())
write("canvas", "collaborations",
      doc_table(collab["properties"], collab["description"], {"users": "int64"}))

# catalog: 28 tables from the documented column lists; FK columns take the key type of their target.
catalog = json.loads((src / "docs-columns" / "catalog-tables.json").read_text())["tables"]
key_types = {}
for name, table in catalog.items():
    for p in table["properties"]:
        if p["primary_key"]:
            key_types[name] = p["doc_type"]
for name, table in catalog.items():
    write("catalog", name, doc_table(table["properties"], table["description"], key_types))

# canvas_logs.web_logs: the 0.9.0 schema with the current docs' inline user_agent in place of
# user_agent_id, and the IP references pointing into a local definitions block.
web = json.loads((src / "canvas_logs" / "web_logs.json").read_text())
props = {}
for name, node in web["properties"].items():
    if name == "user_agent_id":
        props["user_agent"] = {
            "oneOf": [OVERSIZED, {"type": "string", "maxLength": 255}],
            "description": "The user agent string, as the header received from the user's browser or client software.",
        }
    elif name == "remote_ip":
        props[name] = {"oneOf": [{"$ref": "#/definitions/IPv4Address"},
                                 {"$ref": "#/definitions/IPv6Address"}],
                       "description": node["description"]}
    else:
        props[name] = node
web["properties"] = props
web["definitions"] = {}
for d in ("IPv4Address", "IPv6Address"):
    node = json.loads((src / "api" / f"{d}.json").read_text())
    node.pop("examples", None)
    web["definitions"][d] = node
write("canvas_logs", "web_logs", web)
