'use strict';
// The Node.js side of tests/test_node.py: one process per scenario, driven over stdin/stdout
// with one JSON object per line (request -> reply). Every script call goes through
// examples/node/luasched.js, so the scripts, SHA1s and key names come from the exported manifest
// only (never copied by hand).
//
//   node driver.js --scripts DIR (--url redis://127.0.0.1:PORT | --cluster 127.0.0.1:P1,P2,...)
//
// Requests ({"op": ...}) and replies ({"ok": true, ...} or {"ok": false, "error", "code"}):
//   hello                                 -> node and ioredis versions
//   reset                                 -> forget whether the Functions library is installed
//   keys    script, places                -> keys (the KEYS the client builds from the patterns)
//   call    script, places, args          -> reply, route ("evalsha" | "fcall")
//   enqueue ns, queue, tasks:[[id, payload]...], max_attempts
//                                         -> replies (one enqueue per task, in order)
//   work    ns, queue, workers, lease_ms  -> taken:[{task_id, payload, token, worker}], routes:
//           `workers` workers, each on its own connection, dequeue + ack until the queue
//           answers nothing ready.
//   enqueue_hex ns, queue, task_id, payload_hex -> reply (the payload sent as bytes)
//   take_hex    ns, queue                 -> task_id, payload_hex: one dequeue + ack, with
//                                            replies as Buffers (binary payloads)
//   quit                                  -> (closes the connections, exits 0)
const path = require('path');
const readline = require('readline');
const Redis = require('ioredis');
const { Luasched } = require(path.join(__dirname, '..', '..', 'examples', 'node', 'luasched.js'));

function parseOptions(argv) {
  const options = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) throw new Error(`bad option ${argv[i]}`);
    options[argv[i].slice(2)] = argv[i + 1];
  }
  if (!options.scripts || !(options.url || options.cluster)) {
    throw new Error('usage: driver.js --scripts DIR (--url URL | --cluster HOST:PORT,...)');
  }
  return options;
}

const options = parseOptions(process.argv.slice(2));
const connections = [];

function connect() {
  let client;
  if (options.cluster) {
    const nodes = options.cluster.split(',').map((address) => {
      const [host, port] = address.split(':');
      return { host, port: Number(port) };
    });
    client = new Redis.Cluster(nodes, { enableReadyCheck: true });
  } else {
    client = new Redis(options.url, { maxRetriesPerRequest: 1 });
  }
  connections.push(client);
  return Luasched.fromDir(client, options.scripts);
}

const main = connect();
let binary = null; // the same client, replies as Buffers (ops *_hex)
const once = { request_id: '', request_ttl_ms: 60000 };

async function worker(ls, op, name, taken) {
  const places = { ns: op.ns, queue: op.queue };
  for (;;) {
    const reply = await ls.call('queue.dequeue', places, {
      worker_id: name, count: 1, lease_ms: op.lease_ms || 30000, wait_ms: 0,
      ack_task_id: '', ack_token: 0, ...once,
    });
    if (reply.length === 1) return; // [next_due_ms]: nothing ready
    const [, taskId, payload, , token] = reply;
    await ls.call('queue.ack', places, { task_id: taskId, token, ...once });
    taken.push({ task_id: taskId, payload, token, worker: name });
  }
}

const handlers = {
  async hello() {
    return { node: process.version, ioredis: require('ioredis/package.json').version };
  },
  async reset() {
    main.reset(); // the server was flushed, the library installed or removed
    binary = null;
    return {};
  },
  async keys(op) {
    return { keys: main.keys(op.script, op.places) };
  },
  async call(op) {
    const reply = await main.call(op.script, op.places, op.args || {});
    return { reply, route: main.lastRoute };
  },
  async enqueue(op) {
    const places = { ns: op.ns, queue: op.queue };
    const replies = [];
    for (const [taskId, payload] of op.tasks) {
      replies.push(await main.call('queue.enqueue', places, {
        task_id: taskId, payload, priority: 0, delay_ms: 0, max_attempts: op.max_attempts || 3,
        ...once,
      }));
    }
    return { replies, route: main.lastRoute };
  },
  async enqueue_hex(op) {
    const reply = await main.call('queue.enqueue', { ns: op.ns, queue: op.queue }, {
      task_id: op.task_id, payload: Buffer.from(op.payload_hex, 'hex'), priority: 0, delay_ms: 0,
      max_attempts: 3, ...once,
    });
    return { reply, route: main.lastRoute };
  },
  async take_hex(op) {
    binary = binary || new Luasched(main.client, main.manifest, main.texts, { buffers: true });
    const places = { ns: op.ns, queue: op.queue };
    const [, taskId, payload, , token] = await binary.call('queue.dequeue', places, {
      worker_id: 'node-binary', count: 1, lease_ms: 30000, wait_ms: 0, ack_task_id: '',
      ack_token: 0, ...once,
    });
    await binary.call('queue.ack', places, { task_id: taskId, token, ...once });
    return { task_id: taskId.toString(), payload_hex: payload.toString('hex'), route: binary.lastRoute };
  },
  async work(op) {
    const workers = Array.from({ length: op.workers }, () => connect());
    const taken = [];
    await Promise.all(workers.map((ls, i) => worker(ls, op, `node-${i}`, taken)));
    return { taken, routes: [...new Set(workers.map((ls) => ls.lastRoute))] };
  },
};

async function answer(line) {
  const op = JSON.parse(line);
  if (op.op === 'quit') {
    for (const client of connections) client.disconnect();
    process.exit(0);
  }
  const handler = handlers[op.op];
  if (!handler) return { ok: false, error: `unknown op ${op.op}` };
  try {
    return { ok: true, ...(await handler(op)) };
  } catch (error) {
    return { ok: false, error: String(error && error.message), code: error.code || null };
  }
}

const lines = readline.createInterface({ input: process.stdin });
let queue = Promise.resolve();
lines.on('line', (line) => {
  // One request at a time, answered in order.
  queue = queue.then(async () => process.stdout.write(`${JSON.stringify(await answer(line))}\n`));
});
lines.on('close', () => {
  queue.then(() => {
    for (const client of connections) client.disconnect();
    process.exit(0);
  });
});
