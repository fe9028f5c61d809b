/* taprelay: the only part of Rubato's network path that is not TypeScript. Node cannot open a
 * TAP device, so this process does: it attaches to an existing TAP interface and relays frames
 * between it and one unix-socket client, framed as be32 length + Ethernet frame (QEMU's
 * -netdev stream format). Output commit stays in TypeScript; this only moves bytes.
 * usage: taprelay TAPNAME SOCKET_PATH        (exits when the client goes away) */
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAXF 65536

static int write_all(int fd, const uint8_t *p, size_t n) {
  while (n) {
    ssize_t w = write(fd, p, n);
    if (w < 0) { if (errno == EINTR || errno == EAGAIN) continue; return -1; }
    p += w; n -= (size_t)w;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: taprelay TAPNAME SOCKET_PATH\n"); return 2; }
  int tap = open("/dev/net/tun", O_RDWR);
  if (tap < 0) { perror("taprelay: /dev/net/tun"); return 1; }
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
  strncpy(ifr.ifr_name, argv[1], IFNAMSIZ - 1);
  if (ioctl(tap, TUNSETIFF, &ifr) < 0) { perror("taprelay: TUNSETIFF"); return 1; }
  int ls = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  strncpy(sa.sun_path, argv[2], sizeof sa.sun_path - 1);
  unlink(argv[2]);
  if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 1) < 0) { perror("taprelay: socket"); return 1; }
  printf("ready\n");
  fflush(stdout);
  int c = accept(ls, NULL, NULL);
  if (c < 0) { perror("taprelay: accept"); return 1; }
  close(ls);
  unlink(argv[2]);
  static uint8_t tbuf[MAXF + 4], rbuf[4 * (MAXF + 4)];
  size_t have = 0;
  struct pollfd p[2] = {{tap, POLLIN, 0}, {c, POLLIN, 0}};
  for (;;) {
    if (poll(p, 2, -1) < 0) { if (errno == EINTR) continue; return 1; }
    if (p[0].revents & POLLIN) {
      ssize_t n = read(tap, tbuf + 4, MAXF);
      if (n > 0) {
        tbuf[0] = (uint8_t)(n >> 24); tbuf[1] = (uint8_t)(n >> 16); tbuf[2] = (uint8_t)(n >> 8); tbuf[3] = (uint8_t)n;
        if (write_all(c, tbuf, (size_t)n + 4) < 0) return 0;
      }
    }
    if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = read(c, rbuf + have, sizeof rbuf - have);
      if (n <= 0) return 0;
      have += (size_t)n;
      size_t off = 0;
      while (have - off >= 4) {
        uint32_t len = ((uint32_t)rbuf[off] << 24) | ((uint32_t)rbuf[off + 1] << 16) | ((uint32_t)rbuf[off + 2] << 8) | rbuf[off + 3];
        if (len > MAXF) { fprintf(stderr, "taprelay: frame of %u bytes\n", len); return 1; }
        if (have - off < 4 + len) break;
        if (write(tap, rbuf + off + 4, len) < 0 && errno != EAGAIN) { /* a full TAP queue drops, as a wire would */ }
        off += 4 + len;
      }
      memmove(rbuf, rbuf + off, have - off);
      have -= off;
    }
  }
}
