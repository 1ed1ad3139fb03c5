// SPDX-License-Identifier: Apache-2.0
// Drive an MCP stdio server with the official TypeScript SDK
// (@modelcontextprotocol/sdk), found through NODE_PATH. argv[2]: a JSON
// document {"command": [...], "env": {...}, "calls": [[tool, args], ...]};
// prints the negotiated version, the listed tools and each call's result.
const { Client } = require("@modelcontextprotocol/sdk/client/index.js");
const { StdioClientTransport } = require("@modelcontextprotocol/sdk/client/stdio.js");

async function main(spec) {
  const transport = new StdioClientTransport({
    command: spec.command[0],
    args: spec.command.slice(1),
    env: spec.env,
    stderr: "inherit",
  });
  const client = new Client({ name: "keyward-test", version: "0.1.0" });
  await client.connect(transport);
  const out = { server: client.getServerVersion() ?? null };
  const listed = await client.listTools();
  out.tools = Object.fromEntries(listed.tools.map((t) => [t.name, t.inputSchema]));
  out.calls = [];
  for (const [tool, args] of spec.calls) {
    const result = await client.callTool({ name: tool, arguments: args });
    out.calls.push({
      tool,
      is_error: Boolean(result.isError),
      text: result.content.filter((c) => c.type === "text").map((c) => c.text).join(""),
      structured: result.structuredContent ?? null,
    });
  }
  await client.close();
  console.log(JSON.stringify(out));
}

main(JSON.parse(process.argv[2])).catch((e) => {
  console.error(e);
  process.exit(1);
});
