// The ndo browser demo (index.html): a DrawingBoard and a ChatRoom, called over NATS WebSockets
// with the nats.ws client that `ndo serve --demo` serves from node_modules as ./nats.js.
//
// The wire protocol, all of it (docs/demo.md):
//   call:   request <prefix>.rpc.<Class>.<id>.<method>, body = JSON object of keyword arguments,
//           reply = JSON result; an error reply has a Nats-Service-Error-Code header and the
//           body {"error": {"type", "message", ...}}
//   events: subscribe <prefix>.evt.<Class>.<id>.* ; each message is one event's JSON data
// A browser gets "caller" rights (ops/_browser_access.py): publish on rpc subjects, subscribe to
// evt subjects and to its own inbox (_INBOX.>, nats.ws's default inbox prefix), nothing else.

import { connect, headers } from "./nats.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const ID_PATTERN = /^[A-Za-z0-9_-]{1,128}$/; // an object id (subjects/_naming.py)
const CALL_TIMEOUT_MS = 5000;
const MAX_POINTS = 2000; // DrawingBoard.MAX_POINTS

// What the page knows, for the curious (and for tests/browser/demo_two_pages.mjs): every stroke
// and message with where it came from ("history", "event" or "self"), and the connection's id.
const state = {
  ready: false,
  error: "",
  clientId: null,
  objectId: "",
  strokes: new Map(), // seq -> stroke
  messages: new Map(), // seq -> message
  snapshot() { // plain data, as JSON would carry it
    return {
      ready: this.ready,
      error: this.error,
      clientId: this.clientId,
      objectId: this.objectId,
      strokes: [...this.strokes.values()],
      messages: [...this.messages.values()],
    };
  },
};
window.ndoDemo = state;

const statusLine = document.getElementById("status");

function showStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
  if (isError) state.error = text;
}

// One object's methods and events.
function objectHandle(nc, prefix, className, objectId) {
  const base = `${className}.${objectId}`;
  return {
    async call(method, args = {}) {
      const h = headers();
      h.set("Idempotency-Key", crypto.randomUUID()); // a retried call applies once
      const reply = await nc.request(
        `${prefix}.rpc.${base}.${method}`,
        encoder.encode(JSON.stringify(args)),
        { timeout: CALL_TIMEOUT_MS, headers: h },
      );
      const body = reply.data.length ? JSON.parse(decoder.decode(reply.data)) : null;
      const code = reply.headers?.get("Nats-Service-Error-Code");
      if (code) {
        const error = body?.error ?? {};
        throw new Error(`${className}.${method}: ${code} ${error.type}: ${error.message}`);
      }
      return body;
    },
    // Call onEvent(topic, data) for each event; subscribe before reading history, so that
    // nothing falls between the two (the server handles a connection's messages in order).
    watch(onEvent) {
      const subscription = nc.subscribe(`${prefix}.evt.${base}.*`);
      (async () => {
        for await (const m of subscription) {
          const topic = m.subject.slice(m.subject.lastIndexOf(".") + 1);
          onEvent(topic, JSON.parse(decoder.decode(m.data)));
        }
      })();
    },
  };
}

// The DrawingBoard: strokes by sequence number, drawn once each.
async function startBoard(board, user) {
  const canvas = document.getElementById("canvas");
  const ctx = canvas.getContext("2d");
  const color = document.getElementById("color");
  const width = document.getElementById("width");
  const count = document.getElementById("stroke-count");

  const paint = (stroke) => {
    ctx.strokeStyle = stroke.color;
    ctx.lineWidth = stroke.width;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    const [first, ...rest] = stroke.points;
    ctx.moveTo(first[0], first[1]);
    for (const [x, y] of rest.length ? rest : [first]) ctx.lineTo(x, y);
    ctx.stroke();
  };
  const add = (stroke, source) => {
    if (state.strokes.has(stroke.seq)) return;
    state.strokes.set(stroke.seq, { ...stroke, source });
    paint(stroke);
    count.textContent = `${state.strokes.size} strokes`;
  };
  const redraw = () => {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    [...state.strokes.values()].sort((a, b) => a.seq - b.seq).forEach(paint);
    count.textContent = `${state.strokes.size} strokes`;
  };

  board.watch((topic, data) => {
    if (topic === "stroke") add(data, "event");
    if (topic === "clear") {
      for (const seq of [...state.strokes.keys()]) if (seq <= data.seq) state.strokes.delete(seq);
      redraw();
    }
  });
  for (let since = 0; ;) { // pages of up to 1,000 strokes, oldest first
    const page = await board.call("strokes", { since, limit: 1000 });
    page.forEach((stroke) => add(stroke, "history"));
    if (page.length < 1000) break;
    since = page[page.length - 1].seq;
  }

  // Drawing: a preview while the pointer moves, one `stroke` call when it is released.
  let points = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect(); // the canvas may be shown scaled
    return [
      Math.round(((e.clientX - r.left) * canvas.width) / r.width),
      Math.round(((e.clientY - r.top) * canvas.height) / r.height),
    ];
  };
  canvas.addEventListener("pointerdown", (e) => {
    points = [at(e)];
    canvas.setPointerCapture?.(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!points || points.length >= MAX_POINTS) return;
    const p = at(e);
    const last = points[points.length - 1];
    paint({ color: color.value, width: Number(width.value), points: [last, p] });
    points.push(p);
  });
  const finish = async () => {
    if (!points) return;
    const stroke = { points, color: color.value, width: Number(width.value), user };
    points = null;
    try {
      const seq = await board.call("stroke", stroke);
      add({ ...stroke, seq }, "self"); // its `stroke` event then finds it drawn
    } catch (err) {
      showStatus(`stroke refused: ${err.message}`, true);
      redraw(); // take the preview away
    }
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  document.getElementById("clear").addEventListener("click", () => {
    board.call("clear").catch((err) => showStatus(err.message, true));
  });
}

// The ChatRoom: messages by sequence number, listed in order.
async function startChat(room, defaultUser) {
  const list = document.getElementById("messages");
  const form = document.getElementById("chat-form");
  const userInput = document.getElementById("user");
  const textInput = document.getElementById("text");
  userInput.value = defaultUser;

  const render = () => {
    const items = [...state.messages.values()].sort((a, b) => a.seq - b.seq).slice(-200);
    list.replaceChildren(
      ...items.map((m) => {
        const li = document.createElement("li");
        const who = document.createElement("span");
        who.className = "user";
        who.textContent = m.user; // text, never HTML
        li.append(who, document.createTextNode(m.text));
        li.dataset.seq = m.seq;
        return li;
      }),
    );
    list.scrollTop = list.scrollHeight;
  };
  const add = (message, source) => {
    if (state.messages.has(message.seq)) return;
    state.messages.set(message.seq, { ...message, source });
    render();
  };

  room.watch((topic, data) => {
    if (topic === "message") add(data, "event");
  });
  (await room.call("history", { limit: 50 })).forEach((m) => add(m, "history"));

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = textInput.value;
    if (!text.trim()) return;
    try {
      add(await room.call("post", { user: userInput.value.trim(), text }), "self");
      textInput.value = "";
    } catch (err) {
      showStatus(err.message, true);
    }
  });
}

async function main() {
  const config = await (await fetch("./config.json", { cache: "no-store" })).json();
  const wanted = decodeURIComponent(location.hash.slice(1));
  const objectId = ID_PATTERN.test(wanted) ? wanted : "demo";
  state.objectId = objectId;
  window.addEventListener("hashchange", () => location.reload());
  document.getElementById("where").textContent =
    `board and room "${objectId}" (change it: add #name to the URL)`;

  const params = new URLSearchParams(location.search);
  const login = {};
  if (config.login) {
    if (!params.get("user")) {
      showStatus(
        "this server wants a login: add ?user=NAME&pass=PASSWORD to the URL " +
          "(ndo serve's --websocket-user and --websocket-password)",
        true,
      );
      return;
    }
    Object.assign(login, { user: params.get("user"), pass: params.get("pass") ?? "" });
  }
  const nc = await connect({ servers: config.websocket_url, name: "ndo demo", ...login });
  state.clientId = nc.info?.client_id ?? null;
  nc.closed().then((err) => showStatus(`disconnected${err ? `: ${err.message}` : ""}`, true));

  const user = `guest-${Math.random().toString(36).slice(2, 6)}`;
  const board = objectHandle(nc, config.prefix, "DrawingBoard", objectId);
  const room = objectHandle(nc, config.prefix, "ChatRoom", objectId);
  await Promise.all([startBoard(board, user), startChat(room, user)]);
  showStatus(`connected to ${config.websocket_url} as ${user}`);
  state.ready = true;
}

main().catch((err) => {
  const hint = /authorization/i.test(err.message)
    ? "check the ?user= and ?pass= of the URL"
    : "is `ndo serve --websocket-port 9222 --demo` running?";
  showStatus(`cannot start: ${err.message} (${hint})`, true);
});
