/* Guest memory dirtier: dirties RATE pages per ms over a working set of WSS_MB, does CPU work
 * in between (its progress counter), and checks its own buffer against a ledger every report.
 * It must never trust the buffer alone: a page that a replica lost shows up as a ledger mismatch. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 4u)

static uint64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static inline uint32_t mixw(uint32_t gen, uint32_t page) { return gen * 2654435761u + page; }

static void write_page(uint32_t *w, uint32_t page, uint32_t gen) {
  w[0] = gen;
  w[1 + page % (WORDS - 2)] = mixw(gen, page);
  w[WORDS - 1] = gen ^ 0xA5A5A5A5u ^ page;
}

static int page_ok(const uint32_t *w, uint32_t page, uint32_t gen) {
  return w[0] == gen && w[1 + page % (WORDS - 2)] == mixw(gen, page) &&
         w[WORDS - 1] == (gen ^ 0xA5A5A5A5u ^ page);
}

int main(int argc, char **argv) {
  double rate = argc > 1 ? atof(argv[1]) : 10.0;   /* pages per ms */
  unsigned wss_mb = argc > 2 ? (unsigned)atoi(argv[2]) : 16;
  unsigned report_ms = argc > 3 ? (unsigned)atoi(argv[3]) : 100;
  unsigned id = argc > 4 ? (unsigned)atoi(argv[4]) : 0; /* one instance per vCPU: whose counter */
  if (wss_mb == 0) wss_mb = 1;
  uint32_t pages = wss_mb * (1024u * 1024u / PAGE);
  uint8_t *buf = mmap(NULL, (size_t)pages * PAGE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  uint32_t *ledger = calloc(pages, sizeof(uint32_t));
  if (buf == MAP_FAILED || !ledger) { printf("RUBATO dirtier error=nomem\n"); return 1; }
  for (uint32_t p = 0; p < pages; p++) { ledger[p] = 1; write_page((uint32_t *)(buf + (size_t)p * PAGE), p, 1); }
  setvbuf(stdout, NULL, _IOLBF, 0);
  printf("RUBATO dirtier start rate=%.2f wss_mb=%u pages=%u\n", rate, wss_mb, pages);

  uint64_t start = now_us(), next_report = start + report_ms * 1000u;
  uint64_t work = 0, written = 0, checks = 0, failures = 0;
  uint32_t cursor = 0, acc = 1;
  for (;;) {
    /* a unit of CPU work: the progress counter */
    for (int i = 0; i < 2000; i++) acc = acc * 1103515245u + 12345u;
    work++;
    uint64_t t = now_us();
    uint64_t target = (uint64_t)(rate * (double)(t - start) / 1000.0);
    if (target > written + (uint64_t)(rate * 1000.0)) written = target - (uint64_t)(rate * 1000.0); /* never chase more than 1 s */
    while (written < target) {
      cursor = (cursor + 7919u) % pages; /* stride over the working set */
      uint32_t gen = ++ledger[cursor];
      write_page((uint32_t *)(buf + (size_t)cursor * PAGE), cursor, gen);
      written++;
    }
    if (t >= next_report) {
      uint32_t bad = 0;
      for (uint32_t p = 0; p < pages; p++)
        if (!page_ok((const uint32_t *)(buf + (size_t)p * PAGE), p, ledger[p])) bad++;
      checks++;
      if (bad) failures++;
      printf("RUBATO dirtier t=%llu work=%llu pages=%llu checks=%llu bad=%u failures=%llu check=%s acc=%u id=%u\n",
             (unsigned long long)((t - start) / 1000u), (unsigned long long)work,
             (unsigned long long)written, (unsigned long long)checks, bad,
             (unsigned long long)failures, failures ? "FAIL" : "ok", acc & 0xff, id);
      next_report += report_ms * 1000u;
      if (next_report < t) next_report = t + report_ms * 1000u;
    }
  }
}
