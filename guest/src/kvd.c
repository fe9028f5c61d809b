/* Guest key-value service: TCP, one line per request. `SET k v` appends "k v" to a file on the
 * virtio disk, fsyncs it, then replies OK; `GET k` replies `VALUE v` or `NOTFOUND`. On start it
 * reloads the file, so whatever it acknowledged survives as long as the disk does.
 * usage: kvd PORT FILE */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXC 64
#define NBUCKET 65536
#define LINE 512

struct ent { char *k, *v; struct ent *next; };
static struct ent *tab[NBUCKET];
static unsigned long nkeys, nsets;

static unsigned hash(const char *s) { unsigned h = 2166136261u; while (*s) h = (h ^ (unsigned char)*s++) * 16777619u; return h % NBUCKET; }

static void put(const char *k, const char *v) {
  unsigned h = hash(k);
  for (struct ent *e = tab[h]; e; e = e->next)
    if (!strcmp(e->k, k)) { free(e->v); e->v = strdup(v); return; }
  struct ent *e = malloc(sizeof *e);
  e->k = strdup(k); e->v = strdup(v); e->next = tab[h]; tab[h] = e; nkeys++;
}

static const char *get(const char *k) {
  for (struct ent *e = tab[hash(k)]; e; e = e->next) if (!strcmp(e->k, k)) return e->v;
  return NULL;
}

int main(int argc, char **argv) {
  int port = argc > 1 ? atoi(argv[1]) : 7000;
  const char *path = argc > 2 ? argv[2] : "/data/kv.log";
  FILE *f = fopen(path, "r");
  char line[LINE];
  if (f) {
    while (fgets(line, sizeof line, f)) {
      char *sp = strchr(line, ' '), *nl = strchr(line, '\n');
      if (!sp || !nl) continue; /* a torn last line: never acknowledged */
      *sp = 0; *nl = 0; put(line, sp + 1);
    }
    fclose(f);
  }
  int log = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
  if (log < 0) { printf("RUBATO kvd error=open %s\n", strerror(errno)); return 1; }
  int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET; sa.sin_port = htons(port); sa.sin_addr.s_addr = INADDR_ANY;
  if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 64) < 0) { printf("RUBATO kvd error=listen\n"); return 1; }
  setvbuf(stdout, NULL, _IOLBF, 0);
  printf("RUBATO kvd ready port=%d keys=%lu\n", port, nkeys);
  struct pollfd p[MAXC + 1];
  static char buf[MAXC + 1][4096];
  size_t have[MAXC + 1] = {0};
  int n = 1;
  p[0].fd = ls; p[0].events = POLLIN;
  for (;;) {
    if (poll(p, n, -1) < 0) continue;
    if ((p[0].revents & POLLIN) && n <= MAXC) {
      int c = accept(ls, NULL, NULL);
      if (c >= 0) { setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); p[n].fd = c; p[n].events = POLLIN; have[n] = 0; n++; }
    }
    for (int i = 1; i < n; i++) {
      if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t r = read(p[i].fd, buf[i] + have[i], sizeof buf[i] - 1 - have[i]);
      if (r <= 0) { close(p[i].fd); p[i] = p[n - 1]; memcpy(buf[i], buf[n - 1], have[n - 1]); have[i] = have[n - 1]; n--; i--; continue; }
      have[i] += (size_t)r;
      char *start = buf[i], *nl;
      char out[8192];
      size_t olen = 0;
      while ((nl = memchr(start, '\n', have[i] - (size_t)(start - buf[i])))) {
        *nl = 0;
        if (!strncmp(start, "SET ", 4)) {
          char *k = start + 4, *v = strchr(k, ' ');
          if (v) {
            *v++ = 0;
            char rec[LINE];
            int len = snprintf(rec, sizeof rec, "%s %s\n", k, v);
            if (len > 0 && len < LINE && write(log, rec, (size_t)len) == len && fsync(log) == 0) { put(k, v); nsets++; olen += (size_t)snprintf(out + olen, sizeof out - olen, "OK\n"); }
            else olen += (size_t)snprintf(out + olen, sizeof out - olen, "ERR io\n");
          } else olen += (size_t)snprintf(out + olen, sizeof out - olen, "ERR syntax\n");
        } else if (!strncmp(start, "GET ", 4)) {
          const char *v = get(start + 4);
          olen += (size_t)(v ? snprintf(out + olen, sizeof out - olen, "VALUE %s\n", v) : snprintf(out + olen, sizeof out - olen, "NOTFOUND\n"));
        } else olen += (size_t)snprintf(out + olen, sizeof out - olen, "ERR syntax\n");
        start = nl + 1;
        if (olen > sizeof out - 600) { if (write(p[i].fd, out, olen) < 0) {} olen = 0; }
      }
      if (olen && write(p[i].fd, out, olen) < 0) {}
      have[i] -= (size_t)(start - buf[i]);
      memmove(buf[i], start, have[i]);
      if (have[i] >= sizeof buf[i] - 1) have[i] = 0; /* an over-long line: drop it */
    }
  }
}
