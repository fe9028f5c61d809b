// Logging options and the JSON log format.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { takeLogOptions } from '../../src/cli/log-options.ts';
import { jsonLine } from '../../src/util/log.ts';
import { isRubatoError } from '../../src/util/errors.ts';

test('--log-level and --log-format are taken from anywhere in the arguments and passed on in the environment', () => {
  const env: NodeJS.ProcessEnv = {};
  const rest = takeLogOptions(
    ['node', 'rubato', 'protect', 'vm.json', '--log-format', 'json', '--log-level=debug', '--key', 'k'],
    env,
  );
  assert.deepEqual(rest, ['node', 'rubato', 'protect', 'vm.json', '--key', 'k']);
  assert.deepEqual(env, { RUBATO_LOG_FORMAT: 'json', RUBATO_LOG: 'debug' });
  assert.throws(
    () => takeLogOptions(['node', 'rubato', 'status', '--log-format', 'yaml'], {}),
    (e: unknown) => isRubatoError(e, 'RUBATO_CONFIG') && /text, json/.test(e.message),
  );
  assert.throws(
    () => takeLogOptions(['node', 'rubato', 'status', '--log-level'], {}),
    (e: unknown) => isRubatoError(e, 'RUBATO_CONFIG'),
  );
});

test('a JSON log line: time, level, component, message, then the fields (which never override those)', () => {
  const o = JSON.parse(
    jsonLine('warn', 'primary', 'unprotected', { reason: 'link lost', level: 'nope', err: new Error('boom') }),
  ) as Record<string, unknown>;
  assert.deepEqual(Object.keys(o), ['time', 'level', 'component', 'message', 'reason', 'err']);
  assert.equal(o['level'], 'warn');
  assert.equal(o['err'], 'boom');
  assert.ok(!Number.isNaN(Date.parse(String(o['time']))));
  // A field that cannot be serialised does not lose the line.
  const cyclic: Record<string, unknown> = {};
  cyclic['self'] = cyclic;
  assert.equal(JSON.parse(jsonLine('info', 'x', 'still here', { cyclic }))['message'], 'still here');
});
