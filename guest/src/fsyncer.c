/* Guest disk workload: appends RECORD_KB records to FILE, each followed by fdatasync (a database
 * commit log), wrapping at WRAP_MB. Its progress counter is the number of durable records. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

int main(int argc, char **argv) {
  const char *path = argc > 1 ? argv[1] : "/data/fsync.log";
  unsigned record_kb = argc > 2 ? (unsigned)atoi(argv[2]) : 4;
  unsigned wrap_mb = argc > 3 ? (unsigned)atoi(argv[3]) : 8;
  unsigned report_ms = argc > 4 ? (unsigned)atoi(argv[4]) : 100;
  if (record_kb == 0) record_kb = 1;
  if (wrap_mb == 0) wrap_mb = 1;
  setvbuf(stdout, NULL, _IOLBF, 0);
  int fd = open(path, O_WRONLY | O_CREAT, 0644);
  if (fd < 0) { printf("RUBATO fsyncer error=open\n"); return 1; }
  size_t rec = (size_t)record_kb * 1024u;
  char *buf = malloc(rec);
  if (!buf) { printf("RUBATO fsyncer error=nomem\n"); return 1; }
  uint64_t start = now_us(), next_report = start + report_ms * 1000u, work = 0, errors = 0;
  off_t off = 0, wrap = (off_t)wrap_mb * 1024 * 1024;
  printf("RUBATO fsyncer start record_kb=%u wrap_mb=%u\n", record_kb, wrap_mb);
  for (;;) {
    memset(buf, (int)(work & 0xff), rec);
    memcpy(buf, &work, sizeof work);
    if (pwrite(fd, buf, rec, off) != (ssize_t)rec || fdatasync(fd) != 0) errors++;
    else work++;
    off += (off_t)rec;
    if (off + (off_t)rec > wrap) off = 0;
    uint64_t t = now_us();
    if (t >= next_report) {
      printf("RUBATO fsyncer t=%llu work=%llu errors=%llu\n", (unsigned long long)((t - start) / 1000u), (unsigned long long)work, (unsigned long long)errors);
      next_report += report_ms * 1000u;
      if (next_report < t) next_report = t + report_ms * 1000u;
    }
  }
}
