// The pages left out of the link because the standby holds their bytes: whatever is left out, a
// standby that applies what was kept, in order, ends with the same pages as one that got them all.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SentPages } from '../../src/replication/sent-pages.ts';
import type { DirtyPage } from '../../src/capture/checkpoint.ts';

const PAGE = 4096;
const page = (block: string, n: number, v: number | null, at = 0): DirtyPage => {
  if (v === null) return { block, offset: n * PAGE, data: null, fill: 0 };
  const data = Buffer.alloc(PAGE, 0);
  data[at] = v;
  return { block, offset: n * PAGE, data };
};

/** A standby's pages: each page's last copy applied (a fill written as 4096 bytes of it). */
function apply(into: Map<string, Buffer>, pages: readonly DirtyPage[]): void {
  for (const p of pages)
    into.set(`${p.block}:${p.offset}`, p.data ? Buffer.from(p.data) : Buffer.alloc(PAGE, p.fill ?? 0));
}

test('a page sent again with the same bytes is left out; changed bytes, a fill and a disk page go', () => {
  const s = new SentPages(['ram'], 1 << 20);
  assert.equal(s.filter([page('ram', 1, 7), page('disk', 1, 7)]).pages.length, 2);
  const again = s.filter([page('ram', 1, 7), page('disk', 1, 7), page('ram', 2, 7)]);
  assert.deepEqual(
    again.pages.map((p) => `${p.block}:${p.offset / PAGE}`),
    ['disk:1', 'ram:2'],
  );
  assert.deepEqual(again.counts, { skipped: 1, kept: 2 });
  // One byte differs at the page's end: it goes.
  assert.equal(s.filter([page('ram', 1, 7, PAGE - 1)]).pages.length, 1);
  // A fill is sent and forgets the copy: the same bytes as before the fill go again.
  assert.equal(s.filter([page('ram', 1, null)]).pages.length, 1);
  assert.equal(s.filter([page('ram', 1, 7, PAGE - 1)]).pages.length, 1);
  assert.deepEqual(s.totals, { skipped: 1, kept: 7 });
});

test('with no room, every page goes', () => {
  const s = new SentPages(['ram'], 0);
  s.filter([page('ram', 1, 7)]);
  assert.equal(s.filter([page('ram', 1, 7)]).pages.length, 1);
});

test('a page sent once is forgotten before one sent again', () => {
  const s = new SentPages(['ram'], 2 * PAGE);
  s.filter([page('ram', 1, 1), page('ram', 2, 2)]);
  s.filter([page('ram', 1, 1)]); // 1 was sent again, 2 was not
  s.filter([page('ram', 3, 3)]); // forgets 2
  assert.equal(s.filter([page('ram', 1, 1)]).pages.length, 0);
  assert.equal(s.filter([page('ram', 2, 2)]).pages.length, 1);
});

test('the kept pages leave a standby with the same bytes as all of them, over a random session', () => {
  for (let seed = 1; seed <= 20; seed++) {
    let x = seed * 2654435761;
    const rnd = (n: number) => {
      x = (x * 1103515245 + 12345) >>> 0;
      return (x >>> 8) % n;
    };
    const s = new SentPages(['ram0', 'ram1'], (4 + rnd(12)) * PAGE); // small: pages are forgotten often
    const all = new Map<string, Buffer>();
    const kept = new Map<string, Buffer>();
    let skipped = 0;
    for (let batch = 0; batch < 300; batch++) {
      const pages: DirtyPage[] = [];
      for (let i = rnd(12); i > 0; i--) {
        const block = ['ram0', 'ram1', 'disk'][rnd(3)]!;
        // few pages and few values: the same bytes come back often, a page twice in a batch too
        pages.push(page(block, rnd(20), rnd(5) === 0 ? null : rnd(3), rnd(2) ? 0 : PAGE - 1));
      }
      apply(all, pages);
      const f = s.filter(pages);
      skipped += f.counts.skipped;
      apply(kept, f.pages);
      assert.deepEqual(kept, all, `seed ${seed}, batch ${batch}`);
    }
    assert.ok(skipped > 0, `seed ${seed} left pages out`);
  }
});
