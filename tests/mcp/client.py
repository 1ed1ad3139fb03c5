# SPDX-License-Identifier: Apache-2.0
"""Drive an MCP stdio server with the official Python SDK (`mcp`).

argv: a JSON document {"command": [...], "env": {...}, "calls": [[tool,
args], ...]}. Prints one JSON document: the negotiated protocol version,
the listed tools, whether each input schema is valid (jsonschema), and per
call the result and whether the tool's schema accepts the arguments.
"""
import asyncio
import json
import sys

import jsonschema
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main(spec):
    params = StdioServerParameters(
        command=spec["command"][0], args=spec["command"][1:], env=spec["env"]
    )
    out = {}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out["protocol"] = init.protocol_version
            listed = await session.list_tools()
            schemas = {t.name: t.input_schema for t in listed.tools}
            out["tools"] = {t.name: t.input_schema for t in listed.tools}
            out["schemas_valid"] = {}
            for name, schema in schemas.items():
                try:
                    jsonschema.Draft202012Validator.check_schema(schema)
                    out["schemas_valid"][name] = True
                except jsonschema.SchemaError as e:
                    out["schemas_valid"][name] = str(e)
            out["calls"] = []
            for tool, args in spec["calls"]:
                schema_ok = None
                if tool in schemas:
                    schema_ok = jsonschema.Draft202012Validator(schemas[tool]).is_valid(args)
                result = await session.call_tool(tool, args)
                out["calls"].append({
                    "tool": tool,
                    "schema_ok": schema_ok,
                    "is_error": bool(result.is_error),
                    "text": "".join(c.text for c in result.content if c.type == "text"),
                    "structured": result.structured_content,
                })
    print(json.dumps(out))


asyncio.run(main(json.loads(sys.argv[1])))
