/*
 * voidrun-userns-limits: sets per-user-namespace sysctls of a running sandbox, from the host.
 *
 *   voidrun-userns-limits PID NAME=VALUE...
 *
 * Enters the user namespace of host process PID and writes each VALUE to /proc/sys/user/NAME.
 * Those files apply to the writer's user namespace and are writable only with CAP_SYS_RESOURCE
 * there, which a process entering the namespace from outside has. NAME is letters and
 * underscores only, VALUE digits only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int only(const char *s, size_t n, const char *allowed) {
  return n > 0 && strspn(s, allowed) == n;
}

int main(int argc, char **argv) {
  if (argc < 3 || !only(argv[1], strlen(argv[1]), "0123456789")) {
    fprintf(stderr, "usage: voidrun-userns-limits PID NAME=VALUE...\n");
    return 2;
  }
  char path[64];
  snprintf(path, sizeof path, "/proc/%s/ns/user", argv[1]);
  int ns = open(path, O_RDONLY | O_CLOEXEC);
  if (ns < 0 || setns(ns, CLONE_NEWUSER) != 0) {
    fprintf(stderr, "voidrun-userns-limits: entering %s: %s\n", path, strerror(errno));
    return 1;
  }
  for (int i = 2; i < argc; i++) {
    const char *eq = strchr(argv[i], '=');
    size_t name_len = eq ? (size_t)(eq - argv[i]) : 0;
    if (!eq || !only(argv[i], name_len, "abcdefghijklmnopqrstuvwxyz_") || !only(eq + 1, strlen(eq + 1), "0123456789")) {
      fprintf(stderr, "voidrun-userns-limits: not NAME=VALUE: %s\n", argv[i]);
      return 2;
    }
    char file[128];
    snprintf(file, sizeof file, "/proc/sys/user/%.*s", (int)name_len, argv[i]);
    int fd = open(file, O_WRONLY | O_CLOEXEC);
    size_t len = strlen(eq + 1);
    if (fd < 0 || write(fd, eq + 1, len) != (ssize_t)len) {
      fprintf(stderr, "voidrun-userns-limits: writing %s: %s\n", file, strerror(errno));
      return 1;
    }
    close(fd);
  }
  return 0;
}
