/* webd PORT: the test guest's web server with keep-alive (busybox's httpd closes each connection).
 * HTTP/1.1, one process per connection; every GET answers "rubato N\n", where N counts the answers
 * this guest gave (its state, which a client sees go on across an adoption or a failover). Prints
 * "RUBATO webd ready" once listening. */
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile unsigned long *served;

static void serve(int c) {
  char buf[4096];
  size_t have = 0;
  for (;;) {
    ssize_t n = read(c, buf + have, sizeof buf - 1 - have);
    if (n <= 0) return;
    have += (size_t)n;
    buf[have] = 0;
    char *end;
    while ((end = strstr(buf, "\r\n\r\n")) != NULL) {
      unsigned long k = __sync_add_and_fetch(served, 1);
      char body[64], head[256];
      int bl = snprintf(body, sizeof body, "rubato %lu\n", k);
      int hl = snprintf(head, sizeof head,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n",
                        bl);
      if (write(c, head, (size_t)hl) != hl || write(c, body, (size_t)bl) != bl) return;
      size_t used = (size_t)(end + 4 - buf);
      memmove(buf, buf + used, have - used);
      have -= used;
      buf[have] = 0;
    }
    if (have >= sizeof buf - 1) return; /* a request too large to be ours */
  }
}

int main(int argc, char **argv) {
  int port = argc > 1 ? atoi(argv[1]) : 80;
  served = mmap(NULL, sizeof *served, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (served == MAP_FAILED) return 1;
  signal(SIGCHLD, SIG_IGN);
  int s = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port), .sin_addr = {INADDR_ANY}};
  if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 64) != 0) {
    perror("webd");
    return 1;
  }
  printf("RUBATO webd ready port=%d\n", port);
  fflush(stdout);
  for (;;) {
    int c = accept(s, NULL, NULL);
    if (c < 0) continue;
    if (fork() == 0) {
      close(s);
      serve(c);
      _exit(0);
    }
    close(c);
  }
}
