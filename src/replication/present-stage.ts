// The standby's staging area for pre-sent pages (PRESEND frames): pages of the running epoch that
// the primary streamed before its checkpoint. Pure bookkeeping, no I/O. They are never applied on
// their own: the checkpoint's record takes them (its own pages after them, so a later copy wins)
// and they commit together; a session that ends before the checkpoint drops them. The replica
// stays exactly one committed checkpoint.
//
// Memory: one copy per page (a page sent again replaces its older copy). The pages reference the
// frames they came in, so a frame stays pinned while any of its pages is live; past `maxPinnedBytes`
// the live pages are copied out and the frames let go (then at most the RAM's size is held).

import { RubatoError } from '../util/index.ts';
import { PAGE_SIZE, PageSet, type DirtyPage } from '../capture/index.ts';

export class PresentStage {
  private epoch = 0;
  private pages = new PageSet();
  private pinned = 0;

  constructor(private readonly maxPinnedBytes: number) {}

  /** Pages staged for checkpoint `epoch`; `frameBytes` is what their frame's payload holds in memory. */
  add(epoch: number, pages: readonly DirtyPage[], frameBytes: number): void {
    if (this.pages.size && epoch !== this.epoch) {
      throw new RubatoError(
        'RUBATO_PROTOCOL',
        `pre-sent pages of checkpoint ${epoch} while ${this.epoch}'s are staged`,
      );
    }
    this.epoch = epoch;
    for (const p of pages) this.pages.set(p);
    this.pinned += frameBytes;
    if (this.pinned > this.maxPinnedBytes) this.compact();
  }

  /** The staged pages of checkpoint `epoch` (none when nothing was pre-sent for it); the stage is empty after. */
  take(epoch: number): DirtyPage[] {
    if (this.pages.size && epoch !== this.epoch) {
      throw new RubatoError(
        'RUBATO_PROTOCOL',
        `checkpoint ${epoch} arrived with checkpoint ${this.epoch}'s pre-sent pages staged`,
      );
    }
    const out = this.pages.values();
    this.clear();
    return out;
  }

  clear(): void {
    this.pages = new PageSet();
    this.pinned = 0;
    this.epoch = 0;
  }

  get size(): number {
    return this.pages.size;
  }
  get pinnedBytes(): number {
    return this.pinned;
  }

  /** Copies the live pages into one buffer of their own: the frames they came in become garbage. */
  private compact(): void {
    const withData = this.pages.values().filter((p) => p.data);
    const buf = Buffer.allocUnsafe(withData.length * PAGE_SIZE);
    withData.forEach((p, i) => {
      const copy = buf.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
      p.data!.copy(copy);
      this.pages.set({ block: p.block, offset: p.offset, data: copy });
    });
    this.pinned = buf.length;
  }
}
