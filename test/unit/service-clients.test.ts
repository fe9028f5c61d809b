// The stock clients' output, parsed: redis-benchmark --csv, wrk --latency, pgbench (+ its -l log).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parsePgbench, parseRedisCsv, parseWrk } from '../../src/bench/services.ts';
import { isRubatoError } from '../../src/util/errors.ts';

test('redis-benchmark --csv: rate and the p50/p99 columns by name', () => {
  const out = [
    '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"',
    '"SET","1234.57","39.123","2.000","37.055","60.031","80.063","120.127"',
    '"GET","2469.14","19.000","1.000","18.111","30.000","41.500","99.000"',
  ].join('\n');
  const r = parseRedisCsv(out);
  assert.deepEqual(r.get('SET'), { perSec: 1234.57, p50Ms: 37.055, p99Ms: 80.063, errors: 0 });
  assert.equal(r.get('GET')!.p99Ms, 41.5);
  assert.throws(
    () => parseRedisCsv('Could not connect to Redis at 10.231.0.10:6379: Connection refused'),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
});

test('wrk --latency: requests/s, the distribution in any unit, socket errors and non-2xx answers', () => {
  const out = `Running 5s test @ http://10.231.0.10/4k.html
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    45.12ms   10.00ms   1.20s    80.00%
    Req/Sec   700.00    100.00   900.00     70.00%
  Latency Distribution
     50%  812.00us
     75%   50.00ms
     90%   60.00ms
     99%    1.10s
  7000 requests in 5.00s, 30.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 1
Requests/sec:   1400.25
Transfer/sec:      6.00MB
`;
  assert.deepEqual(parseWrk(out), {
    perSec: 1400.25,
    p50Ms: 0.812,
    p99Ms: 1100,
    errors: 6,
    errorKinds: 'connect 0, read 2, write 0, timeout 3, non-2xx 1',
  });
  assert.throws(
    () => parseWrk('unable to connect to 10.231.0.10:80 Connection refused'),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
});

test('pgbench: tps from its report, latencies from the per-transaction log (µs, third column)', () => {
  const out =
    'transaction type: <builtin: TPC-B (sort of)>\nnumber of failed transactions: 0 (0.000%)\nlatency average = 20.1 ms\ntps = 397.123456 (without initial connection time)\n';
  const log = Array.from({ length: 100 }, (_, i) => `0 ${i} ${(i + 1) * 1000} 0 1764440000 ${i}`);
  const r = parsePgbench(out, log);
  assert.equal(r.perSec, 397.123456);
  assert.equal(r.errors, 0);
  assert.ok(r.p50Ms >= 50 && r.p50Ms <= 51, `p50 ${r.p50Ms}`);
  assert.ok(r.p99Ms >= 99 && r.p99Ms <= 100, `p99 ${r.p99Ms}`);
  assert.throws(
    () => parsePgbench('pgbench: error: connection to server failed', []),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
});

test('pgbench: a run with no transaction (all of it spent connecting) is a rate of 0, not a broken client', () => {
  const out =
    'transaction type: <builtin: TPC-B (sort of)>\nduration: 5 s\nnumber of transactions actually processed: 0\nnumber of failed transactions: 0 (NaN%)\n';
  const r = parsePgbench(out, []);
  assert.equal(r.perSec, 0);
  assert.ok(Number.isNaN(r.p50Ms));
  assert.throws(
    () => parsePgbench('pgbench: error: connection refused', []),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
});
