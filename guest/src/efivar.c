// efivar PATH VALUE: writes VALUE as a non-volatile EFI variable (runtime and boot-service access)
// through efivarfs. efivarfs marks a variable Linux does not know as immutable once it exists, so
// the flag is cleared first (as chattr -i would; the guest's busybox has no chattr).
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: efivar PATH VALUE\n");
    return 2;
  }
  int fd = open(argv[1], O_RDONLY);
  if (fd >= 0) {
    int flags = 0;
    if (ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0 && (flags & FS_IMMUTABLE_FL)) {
      flags &= ~FS_IMMUTABLE_FL;
      if (ioctl(fd, FS_IOC_SETFLAGS, &flags) != 0) perror("efivar: clearing the immutable flag");
    }
    close(fd);
  }
  char buf[4 + 256];
  size_t n = strlen(argv[2]);
  if (n > 256) n = 256;
  const uint32_t attrs = 0x7; // NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS
  memcpy(buf, &attrs, 4);
  memcpy(buf + 4, argv[2], n);
  fd = open(argv[1], O_WRONLY | O_CREAT, 0644);
  if (fd < 0 || write(fd, buf, 4 + n) != (ssize_t)(4 + n)) {
    perror("efivar");
    return 1;
  }
  return close(fd) == 0 ? 0 : 1;
}
