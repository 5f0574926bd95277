// One NATS request from Node.js, used by the Python tests to prove that a non-Python client
// can call ndo objects with nothing but a subject and a body.
//
// Usage: node request.mjs <natsUrl> <subject> <body> [timeoutMs]
// Prints exactly one JSON line on stdout:
//   reply:                   {"data": "<reply body as UTF-8>", "headers": {"Name": "value", ...} | null}
//   no responders / timeout: {"error": "..."}                       (exit code 2)
//   anything else:           {"error": "..."}                       (exit code 1)
// A header sent more than once is reported with its values joined by ", ".
import { connect, ErrorCode, StringCodec } from "nats";

const EXIT_OK = 0;
const EXIT_FAILED = 1;
const EXIT_NO_REPLY = 2;

function emit(record) {
  process.stdout.write(`${JSON.stringify(record)}\n`);
}

function headersToObject(headers) {
  if (!headers) {
    return null;
  }
  const out = {};
  for (const [name, values] of headers) {
    out[name] = values.join(", ");
  }
  return out;
}

async function main(argv) {
  if (argv.length < 3 || argv.length > 4) {
    emit({ error: "usage: node request.mjs <natsUrl> <subject> <body> [timeoutMs]" });
    return EXIT_FAILED;
  }
  const [servers, subject, body, timeoutArg] = argv;
  const timeout = timeoutArg === undefined ? 5000 : Number.parseInt(timeoutArg, 10);
  if (!Number.isInteger(timeout) || timeout <= 0) {
    emit({ error: `timeoutMs must be a positive integer, got ${JSON.stringify(timeoutArg)}` });
    return EXIT_FAILED;
  }

  const sc = StringCodec();
  let nc;
  try {
    nc = await connect({ servers, reconnect: false, timeout });
  } catch (err) {
    emit({ error: `connect to ${servers} failed: ${err.message}` });
    return EXIT_FAILED;
  }
  try {
    const msg = await nc.request(subject, sc.encode(body), { timeout });
    emit({ data: sc.decode(msg.data), headers: headersToObject(msg.headers) });
    return EXIT_OK;
  } catch (err) {
    if (err.code === ErrorCode.NoResponders) {
      emit({ error: `no responders on ${subject}` });
      return EXIT_NO_REPLY;
    }
    if (err.code === ErrorCode.Timeout) {
      emit({ error: `timeout after ${timeout} ms waiting for a reply on ${subject}` });
      return EXIT_NO_REPLY;
    }
    emit({ error: `request on ${subject} failed: ${err.message}` });
    return EXIT_FAILED;
  } finally {
    await nc.close();
  }
}

process.exitCode = await main(process.argv.slice(2));
