"""The Node.js load generator's source, written by the harness to its run directory.

One Node process costs the machine several times less CPU per request than a nats-py
requester, which matters on two cores. It needs ``node`` and the ``nats`` npm package.
"""

from __future__ import annotations

from typing import Final

from ndo.ops.bench._protocol import ERROR_CODE_HEADER, HISTOGRAM_BASE

__all__ = ["NODE_GENERATOR_JS"]

NODE_GENERATOR_JS: Final = r"""
"use strict";
// ndo bench load generator for Node.js: the protocol is described in ndo.ops.bench._protocol.
const { connect, ErrorCode } = require("nats");
const readline = require("readline");

const queued = [];
let waiting = null;
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  if (waiting) { const w = waiting; waiting = null; w(line); } else { queued.push(line); }
}).on("close", () => { if (waiting) { const w = waiting; waiting = null; w(null); } });
function nextLine() {
  return queued.length ? Promise.resolve(queued.shift()) : new Promise((r) => { waiting = r; });
}

const LOG_BASE = Math.log(@BASE@);
const ERROR_HEADER = "@HEADER@";

async function main() {
  const job = JSON.parse(await nextLine());
  const nc = await connect({ servers: job.url, reconnect: false, timeout: 10000, noEcho: true });
  const [head, tail] = job.subject.split("{id}");
  const subjects = new Array(job.count);
  for (let k = 0; k < job.count; k++) {
    subjects[k] = head + job.id_prefix + (job.first + k) + tail;
  }
  const body = new TextEncoder().encode(job.body);
  const decoder = new TextDecoder();
  const objN = new Array(job.count).fill(0);
  const objSum = new Array(job.count).fill(0);
  const last = new Float64Array(job.count).fill(-Infinity);
  const hist = new Map();
  const errors = {};
  let ok = 0;
  let violations = 0;
  let seed = (job.seed >>> 0) || 1;
  function pick() {
    seed ^= seed << 13; seed >>>= 0; seed ^= seed >>> 17; seed ^= seed << 5; seed >>>= 0;
    return seed % job.count;
  }
  function fail(kind) { errors[kind] = (errors[kind] || 0) + 1; }
  process.stdout.write("ready\n");
  if ((await nextLine()) === null) { await nc.close(); return; }
  const start = performance.now();
  const deadline = start + job.duration * 1000;
  let cursor = 0;
  let finished = start;
  async function lane() {
    for (;;) {
      const now = performance.now();
      if (now >= deadline) { return; }
      let k;
      if (job.mode === "once") {
        if (cursor >= job.count) { return; }
        k = cursor++;
      } else {
        k = job.count === 1 ? 0 : pick();
      }
      try {
        const msg = await nc.request(subjects[k], body, { timeout: job.timeout_ms });
        const done = performance.now();
        finished = done;
        const code = msg.headers ? msg.headers.get(ERROR_HEADER) : "";
        if (code) { fail(code); continue; }
        const value = JSON.parse(decoder.decode(msg.data));
        if (typeof value !== "number") { fail("not_a_number"); continue; }
        ok++;
        const bucket = Math.floor(Math.log(Math.max((done - now) * 1000, 1)) / LOG_BASE);
        hist.set(bucket, (hist.get(bucket) || 0) + 1);
        objN[k]++;
        objSum[k] += value;
        if (job.increasing) { if (value <= last[k]) { violations++; } last[k] = value; }
      } catch (err) {
        finished = performance.now();
        if (err.code === ErrorCode.Timeout) { fail("timeout"); }
        else if (err.code === ErrorCode.NoResponders) { fail("no_responders"); }
        else { fail("client_error"); }
      }
    }
  }
  const lanes = [];
  for (let i = 0; i < job.inflight; i++) { lanes.push(lane()); }
  await Promise.all(lanes);
  const result = {
    ok, errors, elapsed: (finished - start) / 1000, hist: Object.fromEntries(hist),
    obj_n: objN, obj_sum: objSum, violations,
  };
  process.stdout.write(JSON.stringify(result) + "\n");
  await nc.close();
  await nextLine();  // stay alive (for the harness's CPU sample) until stdin closes
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({ fatal: String(err && err.stack || err) }) + "\n");
  process.exitCode = 1;
});
""".replace("@BASE@", repr(HISTOGRAM_BASE)).replace("@HEADER@", ERROR_CODE_HEADER)
"""Source of the Node.js generator; the harness writes it to its run directory (CommonJS, so
``NODE_PATH`` can point at a ``node_modules`` that holds the ``nats`` package)."""
