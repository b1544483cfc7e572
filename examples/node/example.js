'use strict';
// One task through a luasched queue from Node.js: enqueue, dequeue (leased with a fencing
// token), ack. The README shows the same from Python and redis-cli; tests/test_node.py runs it.
//
//   luasched export ./luasched-scripts && npm install ioredis@5.9.3
//   REDIS_URL=redis://127.0.0.1:6379 LUASCHED_SCRIPTS=./luasched-scripts node example.js
const Redis = require('ioredis');
const { Luasched } = require('./luasched');

async function main() {
  const redis = new Redis(process.env.REDIS_URL || 'redis://127.0.0.1:6379');
  const ls = Luasched.fromDir(redis, process.env.LUASCHED_SCRIPTS || './luasched-scripts');
  const emails = { ns: 'orders', queue: 'emails' }; // keys luasched:{orders}:q:<kind>:emails
  const once = { request_id: '', request_ttl_ms: 60000 }; // '': no idempotency record

  const [created, state] = await ls.call('queue.enqueue', emails, {
    task_id: 'task-1', payload: 'hello', priority: 5, delay_ms: 0, max_attempts: 3, ...once,
  });
  console.log(`enqueued task-1: created=${created} state=${state}`);

  const [, taskId, payload, attempt, token] = await ls.call('queue.dequeue', emails, {
    worker_id: 'worker-a', count: 1, lease_ms: 30000, wait_ms: 0, ack_task_id: '', ack_token: 0,
    ...once,
  });
  console.log(`leased ${taskId}: payload=${payload} attempt=${attempt} token=${token}`);

  await ls.call('queue.ack', emails, { task_id: taskId, token, ...once });
  console.log(`acked ${taskId} (via ${ls.lastRoute})`);
  redis.disconnect();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
