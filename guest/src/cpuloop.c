/* Guest CPU loop: pure computation, a progress counter, and a self-check (two independent
 * accumulators that must agree). Dirties almost no memory: the best case for a long epoch. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

int main(int argc, char **argv) {
  unsigned report_ms = argc > 1 ? (unsigned)atoi(argv[1]) : 100;
  volatile uint32_t a = 1, b = 1;
  uint64_t work = 0, start = now_us(), next_report = start + report_ms * 1000u;
  setvbuf(stdout, NULL, _IOLBF, 0);
  printf("RUBATO cpuloop start\n");
  for (;;) {
    for (int i = 0; i < 2000; i++) { a = a * 1103515245u + 12345u; }
    for (int i = 0; i < 2000; i++) { b = b * 1103515245u + 12345u; }
    work++;
    uint64_t t = now_us();
    if (t >= next_report) {
      printf("RUBATO cpuloop t=%llu work=%llu check=%s\n", (unsigned long long)((t - start) / 1000u),
             (unsigned long long)work, a == b ? "ok" : "FAIL");
      next_report += report_ms * 1000u;
      if (next_report < t) next_report = t + report_ms * 1000u;
    }
  }
}
