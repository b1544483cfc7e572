'use strict';
// Calling the luasched scripts from Node.js, driven only by what `luasched export DIR` writes
// (DIR/manifest.json + DIR/<name>.lua; schema in docs/manifest.md). Copy this file into your
// project; it needs no package of its own and takes an ioredis client (`new Redis(...)` or
// `new Redis.Cluster(...)`, ioredis 5.x).
//
//   const ls = Luasched.fromDir(redis, './luasched-scripts');
//   await ls.call('queue.enqueue', { ns: 'orders', queue: 'emails' },
//                 { task_id: 't1', payload: 'hello', priority: 0, delay_ms: 0, max_attempts: 3,
//                   request_id: '', request_ttl_ms: 60000 });
//
// - KEYS come from each key's `pattern` in the manifest (`luasched:{ns}:q:ready:<queue>`): the
//   namespace replaces `ns`, `places` (or an ARGV of the same name, e.g. request_id) fills
//   every `<placeholder>`.
// - ARGV are given by their manifest names and sent in the manifest's order; integers as
//   plain decimals. The last ARGV may `repeat` (slots.keyslot's keys): pass an array; one that
//   may repeat 0 times is optional (queue.node_dequeue's wait_ms: leave it out, or pass [ms]).
// - The call is EVALSHA with the manifest's sha1; on NOSCRIPT the script file is loaded
//   (SCRIPT LOAD, on every primary of a cluster) and the call retried once. A script that got
//   NOSCRIPT never ran, so the retry cannot act twice.
// - When the luasched Functions library (`luasched install-functions`, Redis 7.0+ / Valkey) is
//   installed on every primary with exactly these scripts (its digest function answers the
//   manifest's `functions.digest`), calls go through FCALL (FCALL_RO for `no-writes` scripts)
//   instead; a call answered `Function not found` falls back to EVALSHA and detection runs
//   again on the next call.
// - Error replies `LUASCHED_<CODE> <script>: <detail>` are thrown as LuaschedError with `.code`.

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');

const MANIFEST_VERSION = 1;

class LuaschedError extends Error {
  constructor(code, message, cause) {
    super(message);
    this.name = 'LuaschedError';
    this.code = code; // 'ARG', 'STALE', 'CORRUPT', ... (manifest.error_codes)
    this.cause = cause;
  }
}

function errorText(error) {
  return error && typeof error.message === 'string' ? error.message : String(error);
}

function translate(error) {
  const match = /^LUASCHED_([A-Z]+) /.exec(errorText(error));
  return match ? new LuaschedError(match[1], errorText(error), error) : error;
}

function isNoScript(error) {
  return errorText(error).startsWith('NOSCRIPT');
}

function isFunctionMissing(error) {
  return /^(ERR )?Function not found/.test(errorText(error));
}

function concat(pieces) {
  if (pieces.every((piece) => typeof piece === 'string')) return pieces.join('');
  return Buffer.concat(pieces.map((piece) => (Buffer.isBuffer(piece) ? piece : Buffer.from(piece))));
}

function byteLength(value) {
  return Buffer.isBuffer(value) ? value.length : Buffer.byteLength(value);
}

function toArg(spec, value) {
  if (value === undefined || value === null) {
    throw new TypeError(`missing ARGV ${spec.name}`);
  }
  if (spec.type === 'int') {
    if (typeof value === 'number' && !Number.isSafeInteger(value)) {
      throw new TypeError(`ARGV ${spec.name} must be an integer below 2^53, got ${value}`);
    }
    return String(value); // a plain decimal (number, bigint or a decimal string)
  }
  if (Buffer.isBuffer(value)) return value;
  return String(value);
}

class Luasched {
  // `manifest`: the parsed manifest.json; `texts`: script name -> its file's bytes.
  // options.useFunctions: null/undefined (detect), true (always FCALL), false (never).
  constructor(client, manifest, texts, options = {}) {
    if (manifest.manifest_version !== MANIFEST_VERSION) {
      throw new Error(`manifest_version ${manifest.manifest_version}: this client reads ${MANIFEST_VERSION}`);
    }
    this.client = client;
    this.manifest = manifest;
    this.texts = texts;
    this.buffers = Boolean(options.buffers); // replies as Buffers (binary payloads)
    this.useFunctions = options.useFunctions === undefined ? null : options.useFunctions;
    this._functions = this.useFunctions; // null: not detected yet
    this.lastRoute = null; // 'fcall' | 'evalsha': how the last call went (for tests and logs)
  }

  // Reads DIR/manifest.json and every DIR/<file>, and checks each file's SHA1 against it.
  static fromDir(client, dir, options = {}) {
    const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8'));
    const texts = {};
    for (const [name, entry] of Object.entries(manifest.scripts)) {
      const text = fs.readFileSync(path.join(dir, entry.file));
      const sha1 = crypto.createHash('sha1').update(text).digest('hex');
      if (sha1 !== entry.sha1) {
        throw new Error(`${entry.file}: SHA1 ${sha1} is not the manifest's ${entry.sha1}`);
      }
      texts[name] = text;
    }
    return new Luasched(client, manifest, texts, options);
  }

  script(name) {
    const entry = this.manifest.scripts[name];
    if (!entry) throw new Error(`no script named ${name} in the manifest`);
    return entry;
  }

  // The KEYS of script `name` for namespace places.ns, in the manifest's order.
  keys(name, places) {
    const ns = places.ns;
    if (ns === undefined || byteLength(ns) < 1 || byteLength(ns) > 128 || /[{}]/.test(ns.toString())) {
      throw new TypeError(`namespace must be 1..128 bytes without '{' or '}', got ${ns}`);
    }
    return this.script(name).keys.map((key) => {
      const pieces = [];
      const pattern = key.pattern.replace('{ns}', '{\u0000}');
      for (const part of pattern.split(/(<[a-z_]+>|\u0000)/)) {
        if (part === '\u0000') {
          pieces.push(ns);
        } else if (part.startsWith('<') && part.endsWith('>')) {
          const value = places[part.slice(1, -1)];
          if (value === undefined) throw new TypeError(`${name}: key ${key.name} needs ${part}`);
          pieces.push(Buffer.isBuffer(value) ? value : String(value));
        } else if (part) {
          pieces.push(part);
        }
      }
      return concat(pieces);
    });
  }

  // The ARGV of script `name` from an object keyed by the manifest's ARGV names.
  argv(name, args) {
    const out = [];
    for (const spec of this.script(name).argv) {
      if (spec.repeat) {
        const values = args[spec.name];
        // A repeat with min 0 is optional (queue.node_dequeue's wait_ms): absent = none.
        if ((values === undefined || values === null) && spec.repeat.min === 0) continue;
        if (!Array.isArray(values)) throw new TypeError(`ARGV ${spec.name} repeats: pass an array`);
        for (const value of values) out.push(toArg(spec, value));
      } else {
        out.push(toArg(spec, args[spec.name]));
      }
    }
    return out;
  }

  _send(client, ...command) {
    return this.buffers ? client.callBuffer(...command) : client.call(...command);
  }

  // Every primary (the client itself when standalone). A cluster client knows its nodes only
  // once it is ready, so wait for that.
  async _primaries() {
    const client = this.client;
    if (!client.isCluster) return [client];
    if (client.status !== 'ready') {
      await new Promise((resolve, reject) => {
        client.once('ready', resolve);
        client.once('end', () => reject(new Error('cluster connection ended')));
      });
    }
    const primaries = client.nodes('master');
    if (primaries.length === 0) throw new Error('the cluster client knows no primary');
    return primaries;
  }

  // Whether calls go through FCALL: the library's digest on every primary equals the
  // manifest's (any error - 6.2 has no FCALL, no such function - means no).
  async usesFunctions() {
    if (this._functions !== null) return this._functions;
    const lib = this.manifest.functions;
    let installed = Boolean(lib && lib.digest_function);
    if (installed) {
      try {
        const digests = await Promise.all(
          (await this._primaries()).map((node) => node.call('FCALL_RO', lib.digest_function, '0')),
        );
        installed = digests.length > 0 && digests.every((digest) => String(digest) === lib.digest);
      } catch (error) {
        installed = false;
      }
    }
    this._functions = installed;
    return installed;
  }

  // Forget whether the library is installed (after installing or removing it): the next call
  // asks again.
  reset() {
    this._functions = this.useFunctions;
  }

  async _load(name) {
    const expected = this.script(name).sha1;
    const shas = await Promise.all(
      (await this._primaries()).map((node) => node.call('SCRIPT', 'LOAD', this.texts[name])),
    );
    for (const sha of shas) {
      if (String(sha) !== expected) throw new Error(`${name}: SCRIPT LOAD answered ${sha}, manifest says ${expected}`);
    }
  }

  async _evalsha(name, keys, argv) {
    const sha1 = this.script(name).sha1;
    this.lastRoute = 'evalsha';
    try {
      return await this._send(this.client, 'EVALSHA', sha1, String(keys.length), ...keys, ...argv);
    } catch (error) {
      if (!isNoScript(error)) throw error;
    }
    await this._load(name);
    return this._send(this.client, 'EVALSHA', sha1, String(keys.length), ...keys, ...argv);
  }

  // Calls script `name`: KEYS built from `places` (ns + placeholders), ARGV from `args`.
  async call(name, places, args = {}) {
    const keys = this.keys(name, { ...args, ...places });
    const argv = this.argv(name, args);
    try {
      if (await this.usesFunctions()) {
        const entry = this.script(name);
        const fn = this.manifest.functions.functions[name];
        const head = entry.flags.includes('no-writes') ? 'FCALL_RO' : 'FCALL';
        this.lastRoute = 'fcall';
        try {
          return await this._send(this.client, head, fn, String(keys.length), ...keys, ...argv);
        } catch (error) {
          if (!isFunctionMissing(error)) throw error;
          this._functions = this.useFunctions === true ? true : null; // detect again next time
        }
      }
      return await this._evalsha(name, keys, argv);
    } catch (error) {
      throw translate(error);
    }
  }
}

module.exports = { Luasched, LuaschedError };
