// A fake chat-completions server that costs little CPU, for the latency
// scenario: with the bundled simulator (Python) on one of a 2-core machine's
// cores, the clients are measured with what is left; this shows them with
// most of the machine. It answers every POST after --latency seconds with a
// fixed completion and usage, enforces nothing, and reports at /stats what
// `bench/common.py` reads from the simulator.
//
//     node bench/fast_server.js --latency 0.2
"use strict";
const http = require("http");

const flag = process.argv.indexOf("--latency");
const latencyMs = flag < 0 ? 0 : parseFloat(process.argv[flag + 1]) * 1000;
const answer = JSON.stringify({
  id: "chatcmpl-fast",
  object: "chat.completion",
  model: "fast",
  choices: [{ index: 0, message: { role: "assistant", content: "Fine." }, finish_reason: "stop" }],
  usage: { prompt_tokens: 10, completion_tokens: 2, total_tokens: 12 },
});
let requests = 0;
let ok = 0;
let firstOkAt = null;
let lastOkAt = null;

function seconds() {
  return Number(process.hrtime.bigint()) / 1e9;
}

const server = http.createServer((request, response) => {
  if (request.url.startsWith("/stats")) {
    response.setHeader("Content-Type", "application/json");
    response.end(
      JSON.stringify({
        requests,
        per_key: { all: { ok } },
        first_ok_at: firstOkAt === null ? {} : { all: firstOkAt },
        last_ok_at: lastOkAt === null ? {} : { all: lastOkAt },
      }),
    );
    return;
  }
  requests += 1;
  request.resume(); // the body is not read: every request gets the same answer
  request.on("end", () => {
    setTimeout(() => {
      response.writeHead(200, { "Content-Type": "application/json" });
      response.end(answer);
      ok += 1;
      lastOkAt = seconds();
      firstOkAt = firstOkAt === null ? lastOkAt : firstOkAt;
    }, latencyMs);
  });
});
server.keepAliveTimeout = 60000;
server.listen(0, "127.0.0.1", 4096, () => {
  console.log(`simulator listening on http://127.0.0.1:${server.address().port}/v1`);
});
