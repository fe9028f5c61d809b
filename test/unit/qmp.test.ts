import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { QmpClient } from '../../src/qemu/qmp.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { isRubatoError } from '../../src/util/errors.ts';

/** A fake QMP server: greets, answers commands out of order, emits an event, ignores 'hang'. */
async function fakeQmp(path: string) {
  const server = createServer((s: Socket) => {
    s.write('{"QMP": {"version": {}, "capabilities": []}}\n');
    let buf = '';
    const held: string[] = [];
    s.on('data', (d) => {
      buf += d.toString();
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const msg = JSON.parse(buf.slice(0, nl)) as { execute: string; id: string; arguments?: { v: number } };
        buf = buf.slice(nl + 1);
        if (msg.execute === 'qmp_capabilities') s.write(`${JSON.stringify({ return: {}, id: msg.id })}\n`);
        else if (msg.execute === 'echo') {
          held.push(JSON.stringify({ return: { v: msg.arguments?.v }, id: msg.id }));
          if (held.length === 2) {
            s.write(`${held.reverse().join('\n')}\n`);
            held.length = 0;
            s.write('{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 5}}\n');
          }
        } else if (msg.execute === 'bad')
          s.write(`${JSON.stringify({ error: { class: 'GenericError', desc: 'nope' }, id: msg.id })}\n`);
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  return server;
}

test('QMP: concurrent commands matched by id, events, typed errors and timeouts', async (t) => {
  const dir = makeTempDir();
  const path = join(dir, 'qmp');
  const server = await fakeQmp(path);
  const c = new QmpClient(path, 'fake', 300);
  t.after(() => {
    c.close();
    server.close();
    removeTempDir(dir);
  });
  await c.connect(2000);
  const ev = c.waitEvent('STOP', 2000);
  const [a, b] = await Promise.all([
    c.execute<{ v: number }>('echo', { v: 1 }),
    c.execute<{ v: number }>('echo', { v: 2 }),
  ]);
  assert.equal(a.v, 1);
  assert.equal(b.v, 2);
  assert.equal((await ev).timestamp?.microseconds, 5);
  await assert.rejects(
    c.execute('bad'),
    (e: unknown) => isRubatoError(e, 'RUBATO_QMP_ERROR') && /nope/.test(e.message),
  );
  await assert.rejects(c.execute('hang'), (e: unknown) => isRubatoError(e, 'RUBATO_QMP_TIMEOUT'));
});

test('QMP: connecting to nothing fails with a clear error', async () => {
  const c = new QmpClient('/nonexistent/qmp.sock', 'ghost');
  await assert.rejects(
    c.connect(200),
    (e: unknown) => isRubatoError(e, 'RUBATO_QMP_CLOSED') && /ghost/.test(e.message),
  );
});
